//! The ncimage command line: parses and dispatches; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ncimage::layer::Project;
use ncimage::qemu::Firmware;
use ncimage::spec::Format;
use ncimage::{build, firstboot, interrupt, rootfs, spec::Spec, vmtest};

#[derive(Parser)]
#[command(
    name = "ncimage",
    version,
    about = "Builds and proves the per-role VM images of an encrypted Nextcloud cluster"
)]
struct Cli {
    /// Log more (repeat for debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Folder holding roles/ and overlays/ (default: found from the current folder).
    #[arg(long, global = true, env = "NCIMAGE_PROJECT")]
    project: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image of one role.
    Build {
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        role: Option<String>,
        /// Build every role (each into <out>/<role>, default out/<role>).
        #[arg(long)]
        all: bool,
        /// Image spec (TOML); default: the embedded image-specs/default.toml.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Output folder (replaced atomically); default: out/<role>. With --all: the parent folder.
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
        /// Output formats instead of the spec's `formats` (comma-separated): qcow2, raw,
        /// vhd (Azure), vmdk (streamOptimized: AWS, VMware), gce (tar.gz).
        #[arg(long, value_delimiter = ',', value_parser = Format::parse)]
        format: Vec<Format>,
    },
    /// Write more formats of a built image from its raw disk (or qcow2), into the same folder;
    /// manifest.json and SHA256SUMS are updated.
    Export {
        /// The folder `ncimage build` wrote (e.g. out/redis).
        image: PathBuf,
        /// Formats to write (comma-separated): qcow2, raw, vhd, vmdk, gce.
        #[arg(long, required = true, value_delimiter = ',', value_parser = Format::parse)]
        format: Vec<Format>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Boot a built image under QEMU with a fresh seed and assert its checks.
    Test {
        #[arg(long)]
        role: String,
        /// Folder of the built image; default: out/<role>.
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "uefi")]
        firmware: Firmware,
        /// Seconds to wait for the guest to be ready.
        #[arg(long, default_value_t = 420)]
        timeout: u64,
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        #[arg(short, long)]
        quiet: bool,
        /// Spec whose unlock policy (`[encryption]`, per role) the test node gets; default: the
        /// embedded spec.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// The NoCloud seed's filesystem.
        #[arg(long, value_enum, default_value = "vfat")]
        seed: TestSeed,
    },
    /// Print every template of a role rendered (first-boot ones for the test node; secrets by name).
    Render {
        #[arg(long)]
        role: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        /// A node of the spec's cluster: first-boot files as that node gets them.
        #[arg(long)]
        node: Option<String>,
    },
    /// List the roles (folders under roles/).
    Roles,
    /// Show an image's partition table, the LUKS2 header of its root and its manifest.
    Inspect {
        /// An image file (qcow2 or raw) or the folder `ncimage build` wrote.
        image: PathBuf,
    },
    /// The whole cluster of a spec under QEMU on a private virtual network.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// A cluster's secrets.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Write one node's seed: its identity, the cluster's topology and its role's secrets only.
    Seed {
        /// Cluster spec (e.g. image-specs/lab.toml).
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        node: String,
        /// The cluster's secrets file; default: ~/.config/ncimage/<cluster>.secrets.toml.
        #[arg(long)]
        secrets: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "nocloud")]
        format: SeedFormat,
        /// MAC address of the node's private NIC (the network config matches it); without one,
        /// the first en* interface.
        #[arg(long)]
        mac: Option<String>,
        /// Output file; default: <node>.seed.img or <node>.user-data.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Upload a built image to S3-compatible storage or a cloud (README.md: Uploading).
    Upload {
        /// Folder of the built image (manifest.json); default: out/<role>.
        #[arg(required_unless_present = "role", conflicts_with = "role")]
        image_dir: Option<PathBuf>,
        /// Upload out/<role>.
        #[arg(long)]
        role: Option<String>,
        /// A target of the targets file, or s3://bucket[/prefix].
        #[arg(long)]
        to: String,
        /// Targets file; default: ~/.config/ncimage/targets.toml.
        #[arg(long)]
        targets: Option<PathBuf>,
        /// Object storage endpoint (overrides the target's), e.g. http://127.0.0.1:9000.
        #[arg(long)]
        endpoint: Option<String>,
        /// Region of the bucket (and of the cloud's API).
        #[arg(long)]
        region: Option<String>,
        /// Path-style addressing (endpoint/bucket/key).
        #[arg(long)]
        path_style: bool,
        /// Artifact to upload: raw, qcow2, vhd, vmdk, gce (default: the provider's choice).
        #[arg(long)]
        format: Option<String>,
        /// Profile of ~/.aws/credentials.
        #[arg(long)]
        profile: Option<String>,
        /// Multipart part size (default 16; doubled as needed to fit 10 000 parts).
        #[arg(long)]
        part_size_mib: Option<u64>,
        /// Parts sent at once.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// In the guest: run this node's join steps (run by ncimage-join.service after first boot).
    Join {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// In the guest: one line saying whether this node has joined its cluster.
    Status {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// In the guest: replace the image's volume key by this machine's own, bind the seed's
    /// unlock methods, remove the enrollment key (run by ncimage-rekey.service at first boot).
    Rekey {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// In the guest: make (first boot) and check the image's encrypted data volumes (run by
    /// ncimage-volumes.service before the services that use them).
    Volumes {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// In the guest: render this node's files from its seed (run by ncimage-firstboot.service).
    Firstboot {
        /// Root of the system to configure.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Subcommand)]
enum SecretsCmd {
    /// Generate every secret of the spec's cluster into a new file (mode 0600); never overwrites.
    Init {
        #[arg(long)]
        spec: PathBuf,
        /// Default: ~/.config/ncimage/<cluster>.secrets.toml.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct LabArgs {
    /// Cluster spec (e.g. image-specs/lab.toml).
    #[arg(long)]
    spec: PathBuf,
    /// The lab's folder; default: /var/tmp/ncimage-lab-<cluster>.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Boot every node with its seed and wait until each has joined.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Folder of the built images (<images>/<role>/ncimage-<role>.qcow2).
        #[arg(long, default_value = "out")]
        images: PathBuf,
        /// Seconds to wait for every node to join.
        #[arg(long, default_value_t = 2400)]
        timeout: u64,
        /// Leave the lab running when `up` fails, to look inside.
        #[arg(long)]
        keep: bool,
        /// Seconds between two VM starts (later ones run at a lower priority).
        #[arg(long, default_value_t = 10)]
        stagger: u64,
        /// At most this many VMs boot at once: the next starts when one has joined (0: no
        /// limit, every VM `stagger` seconds after the last).
        #[arg(long, default_value_t = 3)]
        booting: usize,
        /// The VMs' firmware. SeaBIOS (a legacy BIOS, as Hetzner Cloud and AWS's older
        /// instance types boot) costs each guest 7-8 s less CPU under TCG than OVMF;
        /// `ncimage test` boots every image both ways.
        #[arg(long, value_enum, default_value_t = Firmware::Bios)]
        firmware: Firmware,
        /// Leave each root's re-encryption under its own volume key to the VM's first boot
        /// (its initramfs), as a cloud instance does. By default the lab does it on the host
        /// just before each VM starts, with the same cryptsetup arguments: seconds of host CPU
        /// instead of half a minute of TCG per node.
        #[arg(long)]
        reencrypt_in_guest: bool,
    },
    /// Every node's join status.
    Status {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Assert the cluster works as one (qemu-tests/lab/checks.toml by default).
    Test {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long, default_value = "qemu-tests/lab/checks.toml")]
        checks: PathBuf,
    },
    /// Run a shell command on a node through its guest agent (prints its output).
    Exec {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long)]
        node: String,
        /// The command (bash -c).
        command: String,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Stop every VM and remove everything the lab created.
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// (internal) Run the switch and the VMs until told to stop.
    #[command(hide = true)]
    Supervise {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 10)]
        stagger: u64,
        #[arg(long, default_value_t = 3)]
        booting: usize,
        #[arg(long, value_enum, default_value_t = Firmware::Bios)]
        firmware: Firmware,
        #[arg(long)]
        reencrypt_in_guest: bool,
    },
}

impl LabArgs {
    fn load(&self) -> ncimage::Result<(Spec, PathBuf)> {
        let spec = Spec::load(Some(&self.spec))?;
        let name = spec
            .cluster
            .as_ref()
            .map(|c| c.name.clone())
            .ok_or_else(|| {
                ncimage::Error::invalid(
                    format!("{}: no [cluster] in this spec", self.spec.display()),
                    "use a cluster spec such as image-specs/lab.toml",
                )
            })?;
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| ncimage::lab::default_dir(&name));
        Ok((spec, dir))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TestSeed {
    /// A FAT volume labelled cidata.
    Vfat,
    /// An ISO 9660 volume labelled cidata.
    Iso,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SeedFormat {
    /// NoCloud: a FAT volume labelled cidata.
    Nocloud,
    /// NoCloud: an ISO 9660 volume labelled cidata.
    Iso,
    /// The #cloud-config for a cloud's user-data.
    UserData,
}

impl From<SeedFormat> for ncimage::seed::Format {
    fn from(f: SeedFormat) -> Self {
        match f {
            SeedFormat::Nocloud => ncimage::seed::Format::Vfat,
            SeedFormat::Iso => ncimage::seed::Format::Iso,
            SeedFormat::UserData => ncimage::seed::Format::UserData,
        }
    }
}

fn main() -> ExitCode {
    // Printing into a closed pipe (`ncimage render | head`) ends the process quietly.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| filter.into())
                // ureq's debug log prints request lines and headers (presigned and SAS URLs,
                // session tokens): never, whatever RUST_LOG says.
                .add_directive("ureq=warn".parse().expect("directive")),
        )
        .with_writer(std::io::stderr)
        .init();
    interrupt::install();
    // Into a log or a pipe, an error stays one line per message (greppable); on a terminal,
    // miette wraps it to the width.
    let tty = unsafe { libc::isatty(2) } == 1;
    let _ = miette::set_hook(Box::new(move |_| {
        Box::new(miette::MietteHandlerOpts::new().wrap_lines(tty).build())
    }));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{:?}", miette::Report::new(e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> ncimage::Result<()> {
    match cli.command {
        Cmd::Build {
            role,
            all,
            spec,
            out,
            quiet,
            format,
        } => {
            let mut spec = Spec::load(spec.as_deref())?;
            if !format.is_empty() {
                spec.image.formats = format;
            }
            let project = Project::locate(cli.project.as_deref())?;
            let guest_binary = std::env::current_exe()
                .map_err(ncimage::Error::io("locating", "the ncimage binary"))?;
            let roles = match role {
                Some(r) => vec![(
                    r.clone(),
                    out.unwrap_or_else(|| PathBuf::from("out").join(&r)),
                )],
                None => {
                    let parent = out.unwrap_or_else(|| PathBuf::from("out"));
                    project
                        .roles()
                        .into_iter()
                        .map(|r| (r.clone(), parent.join(r)))
                        .collect()
                }
            };
            debug_assert!(all || roles.len() == 1);
            for (role, out) in roles {
                let m = build::build(&build::Options {
                    role,
                    spec: spec.clone(),
                    project: project.clone(),
                    out: out.clone(),
                    cache: rootfs::cache_dir(),
                    guest_binary: guest_binary.clone(),
                    quiet,
                })?;
                if !quiet {
                    println!("built {} in {}", m.role, out.display());
                    for a in &m.artifacts {
                        println!(
                            "  {} {:>6} MiB ({} MiB allocated) sha256 {}",
                            a.file,
                            a.size_bytes >> 20,
                            a.allocated_bytes >> 20,
                            &a.sha256[..16]
                        );
                    }
                    let total: f64 = m.timings_seconds.0.values().sum();
                    println!(
                        "  stages: {} (total {total:.1} s)",
                        m.timings_seconds
                            .0
                            .iter()
                            .map(|(k, v)| format!("{k} {v:.1} s"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        }
        Cmd::Export {
            image,
            format,
            quiet,
        } => {
            let written = ncimage::export::reexport(&image, &format)?;
            if !quiet {
                println!("exported into {}", image.display());
                for a in &written {
                    println!(
                        "  {} {:>6} MiB ({} MiB allocated, disk {} MiB) sha256 {} in {:.1} s",
                        a.file,
                        a.size_bytes >> 20,
                        a.allocated_bytes >> 20,
                        a.disk_bytes >> 20,
                        &a.sha256[..16],
                        a.seconds
                    );
                }
            }
            Ok(())
        }
        Cmd::Test {
            role,
            image,
            firmware,
            timeout,
            memory,
            cpus,
            quiet,
            spec,
            seed,
        } => {
            let project = Project::locate(cli.project.as_deref())?;
            let image_dir = image.unwrap_or_else(|| PathBuf::from("out").join(&role));
            let policy = Spec::load(spec.as_deref())?.unlock_policy(&role, None);
            vmtest::run(&vmtest::Options {
                role,
                project,
                image_dir,
                firmware,
                timeout: Duration::from_secs(timeout),
                memory_mib: memory,
                cpus,
                quiet,
                policy,
                seed: match seed {
                    TestSeed::Vfat => ncimage::seed::Format::Vfat,
                    TestSeed::Iso => ncimage::seed::Format::Iso,
                },
            })?;
            Ok(())
        }
        Cmd::Render { role, spec, node } => {
            let spec = Spec::load(spec.as_deref())?;
            let project = Project::locate(cli.project.as_deref())?;
            for f in ncimage::render::render(&project, &spec, &role, node.as_deref())? {
                println!("==> {} ({}, from {})", f.path, f.phase, f.source);
                println!("{}", f.text.trim_end());
            }
            Ok(())
        }
        Cmd::Upload {
            image_dir,
            role,
            to,
            targets,
            endpoint,
            region,
            path_style,
            format,
            profile,
            part_size_mib,
            threads,
            quiet,
        } => {
            let image_dir = image_dir
                .unwrap_or_else(|| PathBuf::from("out").join(role.as_deref().unwrap_or_default()));
            let report = ncimage::upload::run(&ncimage::upload::Options {
                image_dir,
                to,
                targets_file: targets,
                overrides: ncimage::upload::target::Overrides {
                    endpoint,
                    region,
                    path_style,
                    format,
                    part_size_mib,
                    threads,
                    profile,
                },
                quiet,
                state_dir: ncimage::upload::default_state_dir(),
            })?;
            for line in report.lines {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Roles => {
            let project = Project::locate(cli.project.as_deref())?;
            for r in project.roles() {
                let layers = project.layers_for(&r)?;
                let desc = layers
                    .last()
                    .map(|l| {
                        l.manifest
                            .description
                            .lines()
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
                    .unwrap_or_default();
                println!("{r}\t{desc}");
            }
            Ok(())
        }
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Up {
                lab,
                images,
                timeout,
                keep,
                stagger,
                booting,
                firmware,
                reencrypt_in_guest,
            } => {
                let (spec, dir) = lab.load()?;
                let project = Project::locate(cli.project.as_deref())?;
                let spec_path = std::fs::canonicalize(&lab.spec)
                    .map_err(ncimage::Error::io("resolving", &lab.spec))?;
                let images = std::fs::canonicalize(&images).unwrap_or(images);
                let t = std::time::Instant::now();
                let (state, figures) = ncimage::lab::up(
                    &ncimage::lab::UpOptions {
                        spec,
                        spec_path,
                        project,
                        dir: dir.clone(),
                        images,
                        timeout: std::time::Duration::from_secs(timeout),
                        stagger: std::time::Duration::from_secs(stagger),
                        booting,
                        firmware,
                        reencrypt_in_guest,
                        keep_on_failure: keep,
                    },
                    &|m| eprintln!("{m}"),
                )?;
                println!(
                    "lab up: healthy after {:.0} s ({})",
                    t.elapsed().as_secs_f64(),
                    dir.display()
                );
                for n in &state.nodes {
                    let (at, cpu) = figures.joins.get(&n.name).copied().unwrap_or_default();
                    println!(
                        "  {:<12} {:<10} {:<15} joined at {:>5.0} s, QEMU CPU {:>4.0} s by then; QEMU RSS {:>5} MiB, guest memory {} MiB",
                        n.name,
                        n.role,
                        n.address,
                        at,
                        cpu,
                        ncimage::lab::rss_mib(n.qemu_pid).unwrap_or(0),
                        n.memory_mib
                    );
                }
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                println!("  {}", figures.summary(cores));
                Ok(())
            }
            LabCmd::Status { lab } => {
                let (_, dir) = lab.load()?;
                let state = ncimage::lab::read_state(&dir)?;
                for n in &state.nodes {
                    println!("{}", ncimage::lab::node_status(n).1);
                }
                Ok(())
            }
            LabCmd::Test { lab, checks } => {
                let (spec, dir) = lab.load()?;
                let checks = ncimage::lab::load_checks(&checks)?;
                let (passed, failed) =
                    ncimage::lab::test(&dir, &spec, &checks, &|m| println!("{m}"))?;
                if failed > 0 {
                    return Err(ncimage::Error::Checks {
                        failed,
                        total: passed + failed,
                        log: dir.join("vms").display().to_string(),
                    });
                }
                Ok(())
            }
            LabCmd::Exec {
                lab,
                node,
                command,
                timeout,
            } => {
                let (_, dir) = lab.load()?;
                let state = ncimage::lab::read_state(&dir)?;
                let n = state.nodes.iter().find(|n| n.name == node).ok_or_else(|| {
                    ncimage::Error::invalid(
                        format!("no node `{node}` in the lab"),
                        "see `ncimage lab status`",
                    )
                })?;
                let o = ncimage::lab::exec(n, &command, std::time::Duration::from_secs(timeout))?;
                print!("{}", o.stdout);
                eprint!("{}", o.stderr);
                if o.code != 0 {
                    return Err(ncimage::Error::Vm(format!("{node}: exit {}", o.code)));
                }
                Ok(())
            }
            LabCmd::Down { lab } => {
                let (_, dir) = lab.load()?;
                ncimage::lab::down(&dir)?;
                println!("lab down: {} removed", dir.display());
                Ok(())
            }
            LabCmd::Supervise {
                lab,
                images,
                stagger,
                booting,
                firmware,
                reencrypt_in_guest,
            } => {
                let (spec, dir) = lab.load()?;
                let project = Project::locate(cli.project.as_deref())?;
                let order = ncimage::cluster::boot_order(&spec, &project)?;
                ncimage::lab::supervise(&ncimage::lab::SuperviseOptions {
                    spec,
                    order,
                    dir,
                    images,
                    stagger: std::time::Duration::from_secs(stagger),
                    booting,
                    firmware,
                    reencrypt_in_guest,
                })
            }
        },
        Cmd::Secrets {
            cmd: SecretsCmd::Init { spec, out },
        } => {
            let project = Project::locate(cli.project.as_deref())?;
            let spec = Spec::load(Some(&spec))?;
            let out = match out {
                Some(o) => o,
                None => ncimage::secrets::default_path(&spec)?,
            };
            let names = ncimage::secrets::init(&spec, &project, &out)?;
            println!(
                "{}: {} secrets of cluster `{}` (mode 0600): {}",
                out.display(),
                names.len(),
                spec.cluster.as_ref().map(|c| c.name.as_str()).unwrap_or(""),
                names.join(", ")
            );
            Ok(())
        }
        Cmd::Seed {
            spec,
            node,
            secrets,
            format,
            mac,
            out,
        } => {
            let project = Project::locate(cli.project.as_deref())?;
            let spec = Spec::load(Some(&spec))?;
            let secrets = match secrets {
                Some(s) => s,
                None => ncimage::secrets::default_path(&spec)?,
            };
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "{node}.{}",
                    match format {
                        SeedFormat::Nocloud => "seed.img",
                        SeedFormat::Iso => "seed.iso",
                        SeedFormat::UserData => "user-data",
                    }
                ))
            });
            let role = ncimage::seed::write_node(
                &spec,
                &project,
                &node,
                &secrets,
                mac,
                format.into(),
                &out,
            )?;
            println!("{}: seed of {node} ({role})", out.display());
            Ok(())
        }
        Cmd::Join { root } => {
            // Each step's line goes to stdout, which the unit sends to the serial console.
            let s = ncimage::join::run(&firstboot::Paths::under(&root), &|l| {
                println!("{l}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            })?;
            println!("{}", s.line());
            if s.state == ncimage::join::State::Failed {
                return Err(ncimage::Error::invalid(s.line(), "see `journalctl -u ncimage-join.service`; the steps run again at the next boot or with `systemctl restart ncimage-join.service`"));
            }
            Ok(())
        }
        Cmd::Status { root } => {
            if let Some(s) = ncimage::rekey::status(&root) {
                println!("{}", s.line());
            }
            println!("{}", ncimage::join::status(&root)?.line());
            Ok(())
        }
        Cmd::Inspect { image } => {
            print!("{}", ncimage::inspect::inspect(&image)?.report());
            Ok(())
        }
        Cmd::Volumes { root } => {
            for l in ncimage::volume::run_all(&root, &ncimage::rekey::Options::guest().pbkdf)? {
                println!("ncimage: {l}");
            }
            Ok(())
        }
        Cmd::Rekey { root } => {
            let o = ncimage::rekey::Options {
                root,
                ..ncimage::rekey::Options::guest()
            };
            ncimage::rekey::run(&o)?;
            Ok(())
        }
        Cmd::Firstboot { root } => {
            let changed = firstboot::run(
                &firstboot::Paths::under(&root),
                root == std::path::Path::new("/"),
            )?;
            println!(
                "ncimage firstboot: {} file(s) rendered{}",
                changed.len(),
                if changed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", changed.join(", "))
                }
            );
            Ok(())
        }
    }
}
