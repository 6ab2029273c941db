//! Boots an image under QEMU and talks to the guest through the QEMU guest agent (QGA).
//!
//! The VM never writes its base image: `Vm::start` puts a qcow2 overlay in the caller's
//! workdir, next to the OVMF variables copy, the QGA and QMP sockets, the serial log (ttyS0)
//! and QEMU's own stderr (`qemu.log`). Networking is user-mode with `restrict=on` (the guest
//! reaches nothing) or none at all. Secrets never go on QEMU's command line: pass them with
//! `Vm::exec`'s stdin or `Vm::write_file`.
//!
//! QEMU gets SIGKILL when the *thread* that called `Vm::start` dies (PR_SET_PDEATHSIG), and
//! `Drop` terminates and reaps it: keep a `Vm` in the thread that started it.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{Error, Result};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// MAC address of the test VM's NIC (the seed's network config matches it).
pub const TEST_MAC: &str = "52:54:00:12:34:56";
/// Unified OVMF image used only by the KVM probe (read-only, no variable store needed).
const OVMF_PROBE: &[&str] = &["/usr/share/qemu/OVMF.fd", "/usr/share/ovmf/OVMF.fd"];
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Chunk for guest-file-read/-write (the agent allows up to 48 MiB).
const FILE_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// OVMF (UEFI) from /usr/share/OVMF, with a per-VM copy of the variable store.
    Uefi,
    /// SeaBIOS, QEMU's default.
    Bios,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Used in messages and as QEMU's guest name.
    pub name: String,
    /// Base image (qcow2 or raw, format detected by qemu-img). Never written.
    pub disk: PathBuf,
    /// Raw files attached read-only as virtio disks after the main disk (vdb, vdc, ...).
    pub extra_disks: Vec<PathBuf>,
    pub firmware: Firmware,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Caller-owned directory for the overlay, OVMF vars, sockets and logs. Keep its path
    /// short: the sockets must fit in 107 bytes.
    pub workdir: PathBuf,
    /// User-mode networking with `restrict=on` (the guest reaches no address).
    pub network: bool,
    /// Host-to-guest TCP forwards (host port on 127.0.0.1 only, guest port); needs `network`.
    pub forwards: Vec<(u16, u16)>,
    /// Direct kernel boot: (kernel, initrd, kernel command line). No secrets in the cmdline.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// A second NIC on a virtual switch (`ncimage lab`): the switch's unix socket and this
    /// NIC's MAC address. Frames go only to the other VMs on that switch.
    pub lan: Option<(PathBuf, String)>,
    /// A TPM 2.0 (tpm-tis) backed by swtpm, whose state lives in this folder: the same folder
    /// across boots is the same TPM. swtpm starts with the VM and ends with it.
    pub tpm: Option<PathBuf>,
    /// Guest-side services on the user-mode network: (address:port inside the guest network,
    /// command QEMU runs for each connection, talking on its stdin/stdout). Nothing leaves
    /// QEMU: the guest reaches the command, the command reaches nothing new.
    pub guest_services: Vec<(String, String)>,
    /// Writable raw disks with a serial (the guest finds them as
    /// /dev/disk/by-id/virtio-<serial>): data volumes. Owned by the caller, kept across boots.
    pub data_disks: Vec<(PathBuf, String)>,
}

impl VmConfig {
    /// UEFI, 2 GiB, 2 vCPUs, no network, no extra disks, boot from the disk.
    pub fn new(
        name: impl Into<String>,
        disk: impl Into<PathBuf>,
        workdir: impl Into<PathBuf>,
    ) -> VmConfig {
        VmConfig {
            name: name.into(),
            disk: disk.into(),
            extra_disks: Vec::new(),
            firmware: Firmware::Uefi,
            memory_mib: 2048,
            cpus: 2,
            workdir: workdir.into(),
            network: false,
            forwards: Vec::new(),
            kernel: None,
            lan: None,
            tpm: None,
            guest_services: Vec::new(),
            data_disks: Vec::new(),
        }
    }
}

/// Files a VM keeps in its workdir.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPaths {
    pub overlay: PathBuf,
    pub ovmf_vars: PathBuf,
    pub qga_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The serial console's input (a unix socket; its output also goes to `serial_log`).
    pub serial_socket: PathBuf,
    pub qemu_log: PathBuf,
    /// swtpm's control socket (with `VmConfig::tpm`).
    pub tpm_socket: PathBuf,
}

impl VmPaths {
    pub fn in_workdir(workdir: &Path) -> VmPaths {
        VmPaths {
            overlay: workdir.join("overlay.qcow2"),
            ovmf_vars: workdir.join("OVMF_VARS.fd"),
            qga_socket: workdir.join("qga.sock"),
            qmp_socket: workdir.join("qmp.sock"),
            serial_log: workdir.join("serial.log"),
            serial_socket: workdir.join("serial.sock"),
            qemu_log: workdir.join("qemu.log"),
            tpm_socket: workdir.join("swtpm.sock"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// `-accel tcg,thread=multi,tb-size=512 -cpu max,la57=off,svm=off,erms=off,fsrm=off`
    Tcg,
    /// `-accel kvm -cpu host`
    Kvm,
}

/// The accelerator to use: `NCIMAGE_ACCEL=tcg|kvm` forces one, otherwise KVM only when
/// [`kvm_usable`] proves it boots firmware, else TCG.
pub fn accel() -> Accel {
    match std::env::var("NCIMAGE_ACCEL")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("tcg") => Accel::Tcg,
        Some("kvm") => Accel::Kvm,
        _ if kvm_usable() => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// The CPU TCG emulates: everything it can (AES-NI and SHA-NI for the guest's dm-crypt and
/// checksums) but 5-level paging, which makes every software TLB refill walk five levels of
/// page tables instead of four, SVM, which only makes the guest load kvm_amd, and ERMS/FSRM
/// ("fast rep movsb"). With those two the guest's kernel and glibc copy memory with `rep movsb`,
/// which TCG runs one byte per iteration; without them, eight bytes per move. Measured in a lab
/// node (lb, 1 vCPU): reading 100 MiB from tmpfs 105-173 ms instead of 524-613, writing it
/// 0.8-0.9 s instead of 1.6-1.7, reading the shared libraries 1.0-1.4 s instead of 1.7-2.5,
/// Python's `import json, ssl, email, http.client` 0.9-1.0 s instead of 1.2-1.3.
pub const TCG_CPU: &str = "max,la57=off,svm=off,erms=off,fsrm=off";

/// The machine: q35 without its HPET. QEMU's HPET model wakes QEMU's main loop about 500 times
/// a second whether or not the guest uses it (a Linux guest with the always-running APIC timer
/// of QEMU's CPUs keeps it only as an idle broadcast device it never arms): measured on an idle
/// guest, 5000 `ppoll`s in 10 s and 2.2 % of a host core with it, 174 and 0.3 % without; on an
/// idle lb node QEMU's main thread went from 3.5 % to 0.8 % of a core. Eleven lab guests
/// share two cores. A guest that is scheduled promptly at boot keeps TSC as its clock (acpi_pm
/// watches it instead of the HPET); on a busy host the kernel's watchdog finds TSC unstable and
/// switches to acpi_pm, which measured no dearer (a lone lb: 142 CPU-seconds to join on
/// acpi_pm, 145 on TSC).
pub const MACHINE: &str = "q35,hpet=off";

/// TCG's options. The translation cache is 512 MiB (`NCIMAGE_TB_SIZE` overrides, in MiB)
/// rather than QEMU's 1 GiB default: measured on a redis guest of 2 GiB, QEMU's peak RSS was
/// 986 MiB with 1 GiB and 630 MiB with 128 MiB, which decides how many guests a lab fits in.
/// But a full cache is thrown away and everything retranslated: with 128 MiB every lab node
/// did so 7 to 16 times (QEMU's `info jit`), at the CPU's expense.
pub fn tcg_options() -> String {
    let mib = std::env::var("NCIMAGE_TB_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(512);
    format!("tcg,thread=multi,tb-size={mib}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, or 128 + signal number when the command was killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
fn esc(p: impl AsRef<std::ffi::OsStr>) -> String {
    p.as_ref().to_string_lossy().replace(',', ",,")
}

/// QEMU's command line (without the program) for `cfg`, with its files at `paths`.
pub fn qemu_args(cfg: &VmConfig, paths: &VmPaths, accel: Accel) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={}", esc(&cfg.name))]);
    push(&[
        "-no-user-config",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        MACHINE,
    ]);
    match accel {
        Accel::Tcg => push(&["-accel", &tcg_options(), "-cpu", TCG_CPU]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&[
        "-m",
        &cfg.memory_mib.to_string(),
        "-smp",
        &cfg.cpus.to_string(),
    ]);
    if cfg.firmware == Firmware::Uefi {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                esc(OVMF_CODE)
            ),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", esc(&paths.ovmf_vars)),
        ]);
    }
    if let Some((kernel, initrd, cmdline)) = &cfg.kernel {
        push(&[
            "-kernel",
            &kernel.to_string_lossy(),
            "-initrd",
            &initrd.to_string_lossy(),
        ]);
        push(&["-append", cmdline]);
    }
    // The overlay is thrown away with the workdir: skipping flushes costs nothing.
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=d0,format=qcow2,cache=unsafe,discard=unmap",
            esc(&paths.overlay)
        ),
    ]);
    // With -kernel, QEMU gives bootindex 0 to its linuxboot option ROM.
    push(&[
        "-device",
        if cfg.kernel.is_some() {
            "virtio-blk-pci,drive=d0"
        } else {
            "virtio-blk-pci,drive=d0,bootindex=0"
        },
    ]);
    for (i, d) in cfg.extra_disks.iter().enumerate() {
        let id = format!("d{}", i + 1);
        push(&[
            "-drive",
            &format!("file={},if=none,id={id},format=raw,readonly=on", esc(d)),
        ]);
        push(&["-device", &format!("virtio-blk-pci,drive={id}")]);
    }
    for (i, (d, serial)) in cfg.data_disks.iter().enumerate() {
        let id = format!("v{i}");
        push(&[
            "-drive",
            &format!("file={},if=none,id={id},format=raw,discard=unmap", esc(d)),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive={id},serial={}", esc(serial)),
        ]);
    }
    if cfg.network {
        // restrict=on: the guest can reach no host and no other address. Forwards only from
        // 127.0.0.1 on the host into the guest.
        let mut netdev = String::from("user,id=n0,restrict=on");
        for (host, guest) in &cfg.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        for (addr, command) in &cfg.guest_services {
            netdev.push_str(&format!(",guestfwd=tcp:{addr}-cmd:{}", esc(command)));
        }
        let device = format!("virtio-net-pci,netdev=n0,romfile=,mac={TEST_MAC}");
        push(&["-netdev", &netdev, "-device", &device]);
    }
    if let Some((socket, mac)) = &cfg.lan {
        push(&[
            "-netdev",
            &format!(
                "stream,id=lan0,server=off,addr.type=unix,addr.path={}",
                esc(socket)
            ),
            "-device",
            &format!("virtio-net-pci,netdev=lan0,romfile=,mac={mac}"),
        ]);
    }
    push(&[
        "-chardev",
        &format!(
            "socket,id=qga0,path={},server=on,wait=off",
            esc(&paths.qga_socket)
        ),
    ]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            esc(&paths.qmp_socket)
        ),
    ]);
    push(&["-mon", "chardev=qmp0,mode=control"]);
    // The console's output goes to the log whether or not anyone is connected to its socket;
    // a connection to the socket types at the console (a passphrase prompt).
    push(&[
        "-chardev",
        &format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
            esc(&paths.serial_socket),
            esc(&paths.serial_log)
        ),
    ]);
    if cfg.tpm.is_some() {
        push(&[
            "-chardev",
            &format!("socket,id=chrtpm,path={}", esc(&paths.tpm_socket)),
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]);
    }
    push(&["-serial", "chardev:ser0"]);
    push(&["-device", "virtio-rng-pci"]);
    push(&["-device", "pvpanic", "-action", "panic=exit-failure"]);
    a
}

/// Whether KVM really runs guests here: boots OVMF under `-accel kvm -cpu host` for at most
/// ~4.5 s and looks for its boot manager on the serial port. Nested setups that fail with
/// "KVM internal error ... emulation failure" (or cannot set MSRs) answer false. Cached.
pub fn kvm_usable() -> bool {
    static KVM: OnceLock<bool> = OnceLock::new();
    *KVM.get_or_init(|| {
        let usable = probe_kvm();
        tracing::debug!(usable, "KVM probe");
        usable
    })
}

fn probe_kvm() -> bool {
    use std::sync::mpsc;
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Some(qemu) = crate::tools::which("qemu-system-x86_64") else {
        return false;
    };
    let Some(bios) = OVMF_PROBE.iter().find(|p| Path::new(p).exists()) else {
        return false;
    };
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
    ])
    .args([
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-bios",
        bios,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let (tx, rx) = mpsc::channel::<bool>();
    let mut out = child.stdout.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(6).any(|w| w == b"BdsDxe") {
                let _ = tx2.send(true);
                return;
            }
        }
        let _ = tx2.send(false);
    });
    let mut err = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        if s.contains("KVM internal error")
            || s.contains("emulation failure")
            || s.contains("failed to set MSR")
        {
            let _ = tx.send(false);
        }
    });
    let ok = rx
        .recv_timeout(Duration::from_millis(4500))
        .unwrap_or(false);
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// QEMU dies with the thread that spawns it, and leaves the terminal's process group so a
/// Ctrl-C reaches only us (we then drop the Vm, which stops QEMU).
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "the parent exited before QEMU started",
                ));
            }
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Vm {
    name: String,
    pid: AtomicU32,
    child: Mutex<Child>,
    /// swtpm, when the VM has a TPM (exits with QEMU; killed on drop otherwise).
    tpm: Mutex<Option<Child>>,
    /// The TPM's state folder (`VmConfig::tpm`), for a restart.
    tpm_state: Option<PathBuf>,
    /// QEMU and its arguments, for a restart.
    program: PathBuf,
    args: Vec<String>,
    /// How often QEMU was started again after an [`EMULATOR_FAULTS`] abort.
    restarts: AtomicU32,
    paths: VmPaths,
    agent: Agent,
}

/// Assertions by which QEMU itself aborts, with no fault of the guest or of ncimage:
/// - `iotlb_to_section`: a race in QEMU's multi-threaded TCG between one vCPU changing the
///   memory map (the guest kernel assigning PCI BARs) and another vCPU using a TLB entry for the
///   old map (reported upstream as QEMU issue 1921, with several vCPUs; seen here once in CI,
///   1.9 s into a 2-vCPU guest's kernel). Lab guests have one vCPU.
///
/// When QEMU dies of one of these, [`Vm`] starts it again on the same disks: to the guest a
/// power cut and a cold boot, which first boot and the re-encryption survive by design.
pub const EMULATOR_FAULTS: &[&str] = &["iotlb_to_section: Assertion"];

/// At most this many restarts per VM: a fault that comes back every boot is a real failure.
pub const MAX_RESTARTS: u32 = 2;

/// Whether QEMU, exiting with `status` after writing `log` (its stderr), aborted on one of the
/// [`EMULATOR_FAULTS`].
pub fn emulator_fault(status: ExitStatus, log: &str) -> Option<&'static str> {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(libc::SIGABRT) {
        return None;
    }
    EMULATOR_FAULTS.iter().copied().find(|f| log.contains(f))
}

/// Starts QEMU (`program`) with `args`, its stdout and stderr to `log` (truncated).
fn spawn_qemu(qemu: &Path, args: &[String], log_path: &Path) -> Result<Child> {
    let log = fs::File::create(log_path).map_err(Error::io("creating", log_path))?;
    let log2 = log.try_clone().map_err(Error::io("opening", log_path))?;
    let mut cmd = Command::new(qemu);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
    die_with_parent(&mut cmd);
    tracing::debug!(command = %crate::tools::show(&cmd), "starting QEMU");
    cmd.spawn().map_err(Error::io("starting", qemu))
}

/// Removes the sockets QEMU and swtpm create, so that their reappearance means they listen.
fn remove_sockets(paths: &VmPaths) -> Result<()> {
    for sock in [
        &paths.qga_socket,
        &paths.qmp_socket,
        &paths.serial_socket,
        &paths.tpm_socket,
    ] {
        match fs::remove_file(sock) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(Error::io("removing", sock)(e))
            }
            _ => {}
        }
    }
    Ok(())
}

impl Vm {
    /// Makes the overlay (and the OVMF vars copy), starts QEMU and waits until its sockets
    /// exist. Does not wait for the guest: see [`Vm::wait_agent`].
    pub fn start(cfg: VmConfig) -> Result<Vm> {
        let program = crate::tools::require("qemu-system-x86_64")?;
        crate::tools::require("qemu-img")?;
        fs::create_dir_all(&cfg.workdir).map_err(Error::io("creating", &cfg.workdir))?;
        let workdir =
            fs::canonicalize(&cfg.workdir).map_err(Error::io("resolving", &cfg.workdir))?;
        let paths = VmPaths::in_workdir(&workdir);
        for sock in [
            &paths.qga_socket,
            &paths.qmp_socket,
            &paths.serial_socket,
            &paths.tpm_socket,
        ] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Error::invalid(
                    format!(
                        "the socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                        sock.display()
                    ),
                    "use a shorter work directory (for example under /tmp)",
                ));
            }
        }
        remove_sockets(&paths)?;
        let base = fs::canonicalize(&cfg.disk).map_err(Error::io("resolving", &cfg.disk))?;
        let format = image_format(&base)?;
        let _ = fs::remove_file(&paths.overlay);
        crate::tools::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
                .arg(&base)
                .arg(&paths.overlay),
        )?;
        for d in &cfg.extra_disks {
            fs::metadata(d).map_err(Error::io("reading", d))?;
        }
        if let Some((k, i, _)) = &cfg.kernel {
            fs::metadata(k).map_err(Error::io("reading", k))?;
            fs::metadata(i).map_err(Error::io("reading", i))?;
        }
        if cfg.firmware == Firmware::Uefi {
            fs::metadata(OVMF_CODE).map_err(|_| Error::MissingTool {
                tool: OVMF_CODE.into(),
                package: "ovmf".into(),
            })?;
            fs::copy(OVMF_VARS, &paths.ovmf_vars).map_err(Error::io("copying", OVMF_VARS))?;
        }
        fs::write(&paths.serial_log, b"").map_err(Error::io("creating", &paths.serial_log))?;
        let tpm = match &cfg.tpm {
            Some(state) => Some(start_swtpm(state, &paths.tpm_socket)?),
            None => None,
        };

        let acc = accel();
        let args = qemu_args(&cfg, &paths, acc);
        tracing::debug!(vm = %cfg.name, accel = ?acc, "starting QEMU");
        let child = spawn_qemu(&program, &args, &paths.qemu_log)?;
        let vm = Vm {
            name: cfg.name.clone(),
            pid: AtomicU32::new(child.id()),
            child: Mutex::new(child),
            tpm: Mutex::new(tpm),
            tpm_state: cfg.tpm.clone(),
            program,
            args,
            restarts: AtomicU32::new(0),
            agent: Agent::new(&cfg.name, &paths.qga_socket),
            paths,
        };
        vm.wait_sockets()?;
        Ok(vm)
    }

    /// Until QEMU has created its listening sockets (within a second on an idle host; a loaded
    /// one gets a minute). A QEMU that dies of an emulator fault meanwhile is started again.
    fn wait_sockets(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.exit_status() {
                // The restart waits for the new QEMU's sockets itself.
                return match self.restart_after_emulator_fault(status)? {
                    true => Ok(()),
                    false => Err(self.died(status, "at start")),
                };
            }
            if self.paths.qga_socket.exists() && self.paths.qmp_socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Vm(format!(
                    "QEMU for {} did not create its sockets within 60 s\n{}",
                    self.name,
                    self.diagnostics()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// When QEMU exited with `status` on one of the [`EMULATOR_FAULTS`], and fewer than
    /// [`MAX_RESTARTS`] times so far, starts it again with the same arguments on the same
    /// overlay, data disks and TPM state (the guest sees a power cut) and answers true. QEMU's
    /// log of the fault is kept as `qemu.log.<n>`; the serial log says what happened.
    /// Call it from the thread that started the VM (QEMU dies with the thread that starts it).
    fn restart_after_emulator_fault(&self, status: ExitStatus) -> Result<bool> {
        let log = fs::read_to_string(&self.paths.qemu_log).unwrap_or_default();
        let Some(fault) = emulator_fault(status, &log) else {
            return Ok(false);
        };
        let n = self.restarts.load(Ordering::SeqCst);
        if n >= MAX_RESTARTS {
            return Ok(false);
        }
        self.restarts.store(n + 1, Ordering::SeqCst);
        let kept = self.paths.qemu_log.with_extension(format!("log.{}", n + 1));
        fs::rename(&self.paths.qemu_log, &kept).map_err(Error::io("renaming", &kept))?;
        tracing::warn!(vm = %self.name, fault, log = %kept.display(), "QEMU aborted on a known emulator defect; starting it again on the same disks");
        let note = format!(
            "\n[ncimage: QEMU aborted ({status}) on a known emulator defect (`{fault}`, see {}); \
             restart {} of at most {MAX_RESTARTS} on the same disks]\n",
            kept.display(),
            n + 1
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&self.paths.serial_log)
            .and_then(|mut f| f.write_all(note.as_bytes()))
            .map_err(Error::io("writing", &self.paths.serial_log))?;
        {
            let mut tpm = lock(&self.tpm);
            if let Some(mut old) = tpm.take() {
                let _ = old.kill();
                let _ = old.wait();
            }
            remove_sockets(&self.paths)?;
            if let Some(state) = &self.tpm_state {
                *tpm = Some(start_swtpm(state, &self.paths.tpm_socket)?);
            }
        }
        self.agent.disconnect();
        let child = spawn_qemu(&self.program, &self.args, &self.paths.qemu_log)?;
        self.pid.store(child.id(), Ordering::SeqCst);
        *lock(&self.child) = child;
        self.wait_sockets()?;
        Ok(true)
    }

    /// Ok while QEMU runs (or runs again after an emulator fault), else why it is gone.
    fn check_running(&self, when: &str) -> Result<()> {
        match self.exit_status() {
            Some(status) if !self.restart_after_emulator_fault(status)? => {
                Err(self.died(status, when))
            }
            _ => Ok(()),
        }
    }

    /// How often QEMU was started again after an emulator fault.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id (a new one after a restart).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The guest's serial console (ttyS0).
    pub fn serial_log(&self) -> &Path {
        &self.paths.serial_log
    }

    /// Types `text` at the serial console (e.g. a passphrase and "\n" at a prompt).
    pub fn type_serial(&self, text: &[u8]) -> Result<()> {
        let mut s = UnixStream::connect(&self.paths.serial_socket)
            .map_err(Error::io("connecting to", &self.paths.serial_socket))?;
        // One byte at a time, as a person types: a line discipline may drop a burst.
        for b in text {
            s.write_all(std::slice::from_ref(b))
                .map_err(Error::io("writing to", &self.paths.serial_socket))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        // Keep the connection until the guest has read the line.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Until the serial console shows `needle` (anywhere in the log).
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = fs::read(&self.paths.serial_log).unwrap_or_default();
            if String::from_utf8_lossy(&log).contains(needle) {
                return Ok(());
            }
            self.check_running(&format!("while waiting for `{needle}`"))?;
            crate::interrupt::check()?;
            if Instant::now() >= deadline {
                return Err(Error::Vm(format!(
                    "{} did not show `{needle}` on its console within {timeout:?}\n{}",
                    self.name,
                    self.serial_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Kills QEMU at once (SIGKILL): a power loss. The disk keeps what the guest wrote.
    pub fn power_cut(self) {
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGKILL);
        }
        let _ = lock(&self.child).wait();
    }

    /// The last `lines` lines of the serial console, terminal escapes removed.
    pub fn serial_tail(&self, lines: usize) -> String {
        file_tail(&self.paths.serial_log, lines)
    }

    /// QEMU's exit status once it has exited (reaps it).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Until the guest agent answers guest-sync-delimited and guest-ping. Fails early, with
    /// QEMU's stderr and the serial log's last lines, if QEMU exits.
    pub fn wait_agent(&self, timeout: Duration) -> Result<()> {
        let alive = || {
            self.check_running("while waiting for the guest agent")?;
            crate::interrupt::check()
        };
        self.agent.wait(timeout, &alive).map_err(|e| match e {
            Error::Vm(msg) if self.exit_status().is_none() => Error::Vm(format!(
                "{msg}\nlast lines of the serial console ({}):\n{}",
                self.paths.serial_log.display(),
                self.serial_tail(40)
            )),
            other => other,
        })
    }

    /// Runs `argv` in the guest (guest-exec, output captured), feeding `stdin` if given.
    /// A command that leaves a background process holding its stdout/stderr open does not
    /// finish until that process closes them (the agent waits for end of output).
    pub fn exec(
        &self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        self.agent
            .exec(argv, stdin, timeout)
            .map_err(|e| self.explain(e))
    }

    /// `/bin/sh -c script`.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec(&["/bin/sh", "-c", script], None, timeout)
    }

    /// A guest file's content (guest-file-open/read/close).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.agent
            .read_file(path, Duration::from_secs(60))
            .map_err(|e| self.explain(e))
    }

    /// Writes a guest file with `mode` (e.g. 0o600), replacing any file there. The content
    /// travels as the stdin of `sh` (never on a command line) and the file is created under
    /// umask 077, so a secret is never readable by others, even briefly. (The agent's own
    /// guest-file-open "w" creates files 0666, hence not used.)
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let script = r#"umask 077 && rm -f -- "$1" && cat > "$1" && chmod "$2" -- "$1""#;
        let mode = format!("{mode:o}");
        let out = self.exec(
            &["/bin/sh", "-c", script, "sh", path, &mode],
            Some(data),
            Duration::from_secs(120),
        )?;
        if out.code != 0 {
            return Err(Error::Vm(format!(
                "writing {path} in {} failed ({}): {}",
                self.name,
                out.code,
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// Any other agent command; returns its "return" value.
    pub fn agent_call(&self, command: &str, args: Value, timeout: Duration) -> Result<Value> {
        self.agent
            .call(command, args, timeout)
            .map_err(|e| self.explain(e))
    }

    /// A QMP command (fresh connection, capabilities negotiated); returns its "return" value.
    pub fn qmp(&self, command: &str, args: Option<Value>) -> Result<Value> {
        qmp_call(
            &self.paths.qmp_socket,
            command,
            args,
            Duration::from_secs(10),
        )
        .map_err(|e| Error::Vm(format!("QMP {command} on {}: {e}", self.name)))
    }

    /// ACPI power button (QMP system_powerdown).
    pub fn powerdown(&self) -> Result<()> {
        self.qmp("system_powerdown", None).map(drop)
    }

    /// Stops QEMU at once (QMP quit). The guest is not shut down.
    pub fn qmp_quit(&self) -> Result<()> {
        match self.qmp("quit", None) {
            Ok(_) => Ok(()),
            // QEMU may close the socket before its answer arrives.
            Err(_) if self.wait_exit(Duration::from_secs(5)).is_some() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Powers the guest off (guest-shutdown, or the ACPI button if the agent does not take
    /// it) and waits for QEMU to exit; kills it after `timeout`. Fails if QEMU had to be
    /// killed or exited with an error (a guest panic, through pvpanic, exits with failure).
    pub fn shutdown(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if self.exit_status().is_none() && self.agent.shutdown_request().is_err() {
            tracing::debug!(vm = %self.name, "guest-shutdown failed; pressing the ACPI power button");
            self.powerdown()?;
        }
        match self.wait_exit(deadline.saturating_duration_since(Instant::now())) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.died(status, "during shutdown")),
            None => {
                let msg = format!(
                    "{} did not power off within {timeout:?}; QEMU was killed\nlast lines of the serial console ({}):\n{}",
                    self.name,
                    self.paths.serial_log.display(),
                    self.serial_tail(30)
                );
                drop(self);
                Err(Error::Vm(msg))
            }
        }
    }

    fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Adds "QEMU exited" and the logs to an agent error when QEMU is gone.
    fn explain(&self, e: Error) -> Error {
        // A closed agent socket means QEMU is exiting: give it a moment to be reaped.
        let status = match self.exit_status() {
            None if e.to_string().contains(SOCKET_CLOSED) => self.wait_exit(Duration::from_secs(2)),
            s => s,
        };
        match status {
            Some(status) => Error::Vm(format!("{e}\n{}", self.died(status, "meanwhile"))),
            None => e,
        }
    }

    fn died(&self, status: ExitStatus, when: &str) -> Error {
        Error::Vm(format!(
            "QEMU for {} exited {when} ({status})\n{}",
            self.name,
            self.diagnostics()
        ))
    }

    fn diagnostics(&self) -> String {
        let qemu = file_tail(&self.paths.qemu_log, 20);
        let mut s = String::new();
        if !qemu.trim().is_empty() {
            s.push_str(&format!("QEMU said:\n{qemu}\n"));
        }
        s.push_str(&format!(
            "last lines of the serial console ({}):\n{}",
            self.paths.serial_log.display(),
            self.serial_tail(40)
        ));
        s
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.tpm).as_mut() {
            let _ = t.kill();
            let _ = t.wait();
        }
        let mut child = lock(&self.child);
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM makes QEMU exit cleanly (closing its files); SIGKILL after a short grace.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// swtpm (TPM 2.0) on `socket` with its state in `state`; dies with its parent thread and
/// exits when QEMU disconnects.
fn start_swtpm(state: &Path, socket: &Path) -> Result<Child> {
    let swtpm = crate::tools::require("swtpm")?;
    fs::create_dir_all(state).map_err(Error::io("creating", state))?;
    let mut cmd = Command::new(&swtpm);
    cmd.args(["socket", "--tpm2", "--terminate", "--tpmstate"])
        .arg(format!("dir={}", esc(state)))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", esc(socket)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(Error::io("starting", &swtpm))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Vm(format!("swtpm exited at start ({status})")));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Vm(
                "swtpm did not create its socket within 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// "qcow2", "raw", ... as qemu-img detects it.
fn image_format(image: &Path) -> Result<String> {
    let out = crate::tools::run(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(image),
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| {
        Error::Vm(format!(
            "qemu-img info {}: unreadable answer: {e}",
            image.display()
        ))
    })?;
    v.get("format")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            Error::Vm(format!(
                "qemu-img info {}: no format in its answer",
                image.display()
            ))
        })
}

/// Removes terminal escape sequences and carriage returns.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::from("(nothing)");
    };
    let start = bytes.len().saturating_sub(256 * 1024);
    let text = strip_ansi(&String::from_utf8_lossy(&bytes[start..]));
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// QGA: JSON lines over the virtio-serial chardev socket.

#[derive(Debug)]
enum QgaError {
    Timeout(&'static str),
    /// The socket closed: QEMU is gone.
    Closed,
    Io(std::io::Error),
    /// The agent answered with an error.
    Agent {
        class: String,
        desc: String,
    },
    Protocol(String),
}

impl std::fmt::Display for QgaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QgaError::Timeout(what) => write!(f, "timed out {what}"),
            QgaError::Closed => write!(f, "{SOCKET_CLOSED}"),
            QgaError::Io(e) => write!(f, "{e}"),
            QgaError::Agent { class, desc } => write!(f, "{class}: {desc}"),
            QgaError::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl From<std::io::Error> for QgaError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => QgaError::Timeout("on the agent socket"),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
                QgaError::Closed
            }
            _ => QgaError::Io(e),
        }
    }
}

const SOCKET_CLOSED: &str = "the socket closed";

type QResult<T> = std::result::Result<T, QgaError>;

fn fresh_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Positive and below 2^53 so it survives any JSON number handling.
    ((t ^ (u64::from(std::process::id()) << 32))
        .wrapping_add(N.fetch_add(1, Ordering::Relaxed) << 8))
        & ((1 << 53) - 1)
}

/// One connection to the agent socket.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    synced: bool,
}

fn remaining(deadline: Instant, what: &'static str) -> QResult<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(QgaError::Timeout(what))
    } else {
        Ok(left)
    }
}

impl Conn {
    fn connect(path: &Path) -> QResult<Conn> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => QgaError::Closed,
            _ => QgaError::Io(e),
        })?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            synced: false,
        })
    }

    fn send(&mut self, bytes: &[u8], deadline: Instant) -> QResult<()> {
        self.stream
            .set_write_timeout(Some(remaining(deadline, "sending to the agent")?))?;
        let r = self
            .stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush());
        r.map_err(|e| {
            self.synced = false;
            QgaError::from(e)
        })
    }

    /// Reads more bytes into the buffer.
    fn fill(&mut self, deadline: Instant, what: &'static str) -> QResult<()> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            self.stream
                .set_read_timeout(Some(remaining(deadline, what)?))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QgaError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(QgaError::Timeout(what));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One line, without its newline.
    fn read_line(&mut self, deadline: Instant, what: &'static str) -> QResult<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=scanned + pos).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.buf.len();
            self.fill(deadline, what)?;
        }
    }

    /// guest-sync-delimited: after a 0xFF (which resets the agent's parser), asks for a fresh
    /// id and discards everything until a 0xFF followed by the answer carrying that id.
    fn sync(&mut self, timeout: Duration) -> QResult<()> {
        let deadline = Instant::now() + timeout;
        self.synced = false;
        let id = fresh_id();
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg, deadline)?;
        loop {
            match self.buf.iter().position(|&b| b == 0xFF) {
                Some(pos) => {
                    self.buf.drain(..=pos);
                }
                None => {
                    self.buf.clear();
                    self.fill(
                        deadline,
                        "waiting for the agent to answer guest-sync-delimited",
                    )?;
                    continue;
                }
            }
            let line = self.read_line(
                deadline,
                "waiting for the agent to answer guest-sync-delimited",
            )?;
            let line: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                if v.get("return").and_then(Value::as_u64) == Some(id) {
                    self.synced = true;
                    return Ok(());
                }
            }
            // A stale answer (an earlier sync, or a command that timed out): keep looking.
        }
    }

    /// Sends one command (resynchronising first if needed) and reads its answer, skipping
    /// answers to earlier commands that were abandoned.
    fn call(&mut self, command: &str, args: &Value, timeout: Duration) -> QResult<Value> {
        let deadline = Instant::now() + timeout;
        if !self.synced {
            self.sync(timeout.min(Duration::from_secs(10)))?;
        }
        let id = fresh_id();
        let mut req = json!({"execute": command, "id": id});
        if !args.is_null() {
            req["arguments"] = args.clone();
        }
        let mut msg = req.to_string().into_bytes();
        msg.push(b'\n');
        self.send(&msg, deadline)?;
        let r = self.answer(id, deadline);
        if matches!(
            r,
            Err(QgaError::Timeout(_) | QgaError::Closed | QgaError::Io(_) | QgaError::Protocol(_))
        ) {
            self.synced = false;
        }
        r
    }

    fn answer(&mut self, id: u64, deadline: Instant) -> QResult<Value> {
        loop {
            let line = self.read_line(deadline, "waiting for the agent's answer")?;
            let line: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line).map_err(|e| {
                QgaError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line)))
            })?;
            if let Some(got) = v.get("id") {
                if got.as_u64() != Some(id) {
                    continue; // an answer to an earlier, abandoned command
                }
            }
            if let Some(r) = reply(&v) {
                return r;
            }
        }
    }
}

/// The answer in a QGA or QMP message: its `return`, or its `error` as an error; None for
/// anything else (events).
fn reply(v: &Value) -> Option<QResult<Value>> {
    if let Some(r) = v.get("return") {
        return Some(Ok(r.clone()));
    }
    v.get("error").map(|e| {
        Err(QgaError::Agent {
            class: e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string(),
            desc: e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    })
}

/// The guest agent of one VM: connects lazily, resynchronises after any failure.
/// A guest-agent client on a QEMU virtio-serial socket (usable without owning the VM: `ncimage lab`).
pub struct Agent {
    name: String,
    path: PathBuf,
    conn: Mutex<Option<Conn>>,
}

impl Agent {
    pub fn new(name: &str, path: &Path) -> Agent {
        Agent {
            name: name.to_string(),
            path: path.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    /// Drops the connection (the next call connects again): QEMU was started again.
    fn disconnect(&self) {
        *lock(&self.conn) = None;
    }

    fn raw_call(&self, command: &str, args: &Value, timeout: Duration) -> QResult<Value> {
        let mut g = lock(&self.conn);
        if g.is_none() {
            *g = Some(Conn::connect(&self.path)?);
        }
        let r = g.as_mut().expect("connected").call(command, args, timeout);
        if matches!(r, Err(QgaError::Closed | QgaError::Io(_))) {
            *g = None;
        }
        r
    }

    pub fn call(&self, command: &str, args: Value, timeout: Duration) -> Result<Value> {
        self.raw_call(command, &args, timeout)
            .map_err(|e| Error::Vm(format!("guest agent of {}: {command}: {e}", self.name)))
    }

    pub fn wait(&self, timeout: Duration, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last = String::from("no answer yet");
        loop {
            alive()?;
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(3));
            if step.is_zero() {
                return Err(Error::Vm(format!(
                    "the guest agent of {} did not answer within {timeout:?} ({last})",
                    self.name
                )));
            }
            let began = Instant::now();
            let r = {
                let mut g = lock(&self.conn);
                let r = match g.as_mut() {
                    Some(c) => Ok(c),
                    None => Conn::connect(&self.path).map(|c| g.insert(c)),
                }
                .and_then(|c| {
                    c.sync(step)?;
                    c.call("guest-ping", &Value::Null, step)
                });
                if matches!(r, Err(QgaError::Closed | QgaError::Io(_))) {
                    *g = None;
                }
                r
            };
            match r {
                Ok(_) => {
                    tracing::debug!(vm = %self.name, after = ?start.elapsed(), "guest agent answers");
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            // Don't spin when the socket is refused at once.
            if let Some(rest) = Duration::from_millis(500).checked_sub(began.elapsed()) {
                std::thread::sleep(rest.min(deadline.saturating_duration_since(Instant::now())));
            }
        }
    }

    pub fn exec(
        &self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let shown = argv.join(" ");
        let Some((path, args)) = argv.split_first() else {
            return Err(Error::Vm("exec: empty command".into()));
        };
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let mut req = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(data) = stdin {
            req["input-data"] = Value::String(B64.encode(data));
        }
        let started = self.call("guest-exec", req, left().min(Duration::from_secs(60)))?;
        let pid = started.get("pid").and_then(Value::as_i64).ok_or_else(|| {
            Error::Vm(format!(
                "guest-exec `{shown}` in {}: no pid in {started}",
                self.name
            ))
        })?;
        let mut delay = Duration::from_millis(20);
        loop {
            crate::interrupt::check()?;
            // The status call gets a few seconds of its own, so a command that ends right at its
            // deadline is still seen as finished.
            let poll = left().clamp(Duration::from_secs(3), Duration::from_secs(30));
            let st = self.call("guest-exec-status", json!({"pid": pid}), poll)?;
            if st.get("exited").and_then(Value::as_bool) == Some(true) {
                let text = |key: &str| -> Result<String> {
                    match st.get(key).and_then(Value::as_str) {
                        None => Ok(String::new()),
                        Some(b) => B64
                            .decode(b)
                            .map(|d| String::from_utf8_lossy(&d).into_owned())
                            .map_err(|e| {
                                Error::Vm(format!(
                                    "`{shown}` in {}: bad base64 in {key}: {e}",
                                    self.name
                                ))
                            }),
                    }
                };
                let mut stderr = text("err-data")?;
                let mut stdout = text("out-data")?;
                if st.get("out-truncated").and_then(Value::as_bool) == Some(true) {
                    stdout.push_str("\n[output truncated by the guest agent]");
                }
                if st.get("err-truncated").and_then(Value::as_bool) == Some(true) {
                    stderr.push_str("\n[output truncated by the guest agent]");
                }
                let code = match (
                    st.get("exitcode").and_then(Value::as_i64),
                    st.get("signal").and_then(Value::as_i64),
                ) {
                    (Some(c), _) => c as i32,
                    (None, Some(s)) => 128 + s as i32,
                    (None, None) => -1,
                };
                return Ok(ExecOutput {
                    code,
                    stdout,
                    stderr,
                });
            }
            if Instant::now() >= deadline {
                // Best effort: the agent has no kill command of its own.
                let _ = self.raw_call(
                    "guest-exec",
                    &json!({"path": "/bin/kill", "arg": ["-KILL", pid.to_string()]}),
                    Duration::from_secs(5),
                );
                return Err(Error::Vm(format!(
                    "`{shown}` did not finish within {timeout:?} in {} (guest pid {pid}, killed)",
                    self.name
                )));
            }
            std::thread::sleep(delay.min(left()));
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    pub fn read_file(&self, path: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let handle = self.call(
            "guest-file-open",
            json!({"path": path, "mode": "r"}),
            left(),
        )?;
        let handle = handle.as_i64().ok_or_else(|| {
            Error::Vm(format!(
                "guest-file-open {path} in {}: no handle in {handle}",
                self.name
            ))
        })?;
        let read = || -> Result<Vec<u8>> {
            let mut data = Vec::new();
            loop {
                let r = self.call(
                    "guest-file-read",
                    json!({"handle": handle, "count": FILE_CHUNK}),
                    left(),
                )?;
                let chunk = r.get("buf-b64").and_then(Value::as_str).unwrap_or("");
                data.extend(B64.decode(chunk).map_err(|e| {
                    Error::Vm(format!("reading {path} in {}: bad base64: {e}", self.name))
                })?);
                let count = r.get("count").and_then(Value::as_u64).unwrap_or(0);
                if r.get("eof").and_then(Value::as_bool) == Some(true) || count == 0 {
                    return Ok(data);
                }
            }
        };
        let result = read();
        let closed = self.call("guest-file-close", json!({"handle": handle}), left());
        let data = result?;
        closed?;
        Ok(data)
    }

    /// guest-shutdown answers nothing on success: an error answer within 3 s is a failure,
    /// silence or the socket closing is success.
    fn shutdown_request(&self) -> QResult<()> {
        match self.raw_call(
            "guest-shutdown",
            &json!({"mode": "powerdown"}),
            Duration::from_secs(3),
        ) {
            Ok(_) | Err(QgaError::Timeout(_)) | Err(QgaError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// QMP

fn qmp_call(path: &Path, command: &str, args: Option<Value>, timeout: Duration) -> QResult<Value> {
    let deadline = Instant::now() + timeout;
    let mut c = Conn::connect(path)?;
    let greeting = c.read_line(deadline, "waiting for the QMP greeting")?;
    let greeting: Value =
        serde_json::from_slice(&greeting).map_err(|e| QgaError::Protocol(e.to_string()))?;
    if greeting.get("QMP").is_none() {
        return Err(QgaError::Protocol(greeting.to_string()));
    }
    let mut exchange = |req: Value| -> QResult<Value> {
        let mut msg = req.to_string().into_bytes();
        msg.push(b'\n');
        c.send(&msg, deadline)?;
        loop {
            let line = c.read_line(deadline, "waiting for QMP's answer")?;
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| QgaError::Protocol(e.to_string()))?;
            if let Some(r) = reply(&v) {
                return r;
            }
            // an event: skip
        }
    };
    exchange(json!({"execute": "qmp_capabilities"}))?;
    let mut req = json!({"execute": command});
    if let Some(a) = args {
        req["arguments"] = a;
    }
    exchange(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn cfg(firmware: Firmware, network: bool) -> VmConfig {
        VmConfig {
            extra_disks: vec![PathBuf::from("/tmp/seed,1.img")],
            firmware,
            network,
            ..VmConfig::new("t1", "/tmp/base.qcow2", "/tmp/w")
        }
    }

    fn joined(a: &[String]) -> String {
        a.join(" ")
    }

    #[test]
    fn uefi_command_line() {
        let c = cfg(Firmware::Uefi, true);
        let a = qemu_args(&c, &VmPaths::in_workdir(&c.workdir), Accel::Tcg);
        let s = joined(&a);
        assert_eq!(
            a.iter().filter(|x| x.starts_with("if=pflash")).count(),
            2,
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            )),
            "{s}"
        );
        assert!(
            s.contains("if=pflash,format=raw,unit=1,file=/tmp/w/OVMF_VARS.fd"),
            "{s}"
        );
        assert!(
            s.contains(
                "-accel tcg,thread=multi,tb-size=512 -cpu max,la57=off,svm=off,erms=off,fsrm=off"
            ),
            "{s}"
        );
        assert!(s.contains("-netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56"), "{s}");
        let mut c2 = cfg(Firmware::Uefi, true);
        c2.forwards = vec![(40022, 22)];
        let s2 = joined(&qemu_args(
            &c2,
            &VmPaths::in_workdir(&c2.workdir),
            Accel::Tcg,
        ));
        assert!(
            s2.contains("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22 "),
            "forwards only from 127.0.0.1: {s2}"
        );
        assert!(!s.contains("fwd"), "no forwards: {s}");
        assert!(!s.contains("-nic"), "{s}");
        assert!(
            s.contains("file=/tmp/w/overlay.qcow2,if=none,id=d0,format=qcow2"),
            "{s}"
        );
        assert!(s.contains("virtio-blk-pci,drive=d0,bootindex=0"), "{s}");
        assert!(
            s.contains("file=/tmp/seed,,1.img,if=none,id=d1,format=raw,readonly=on"),
            "commas escaped: {s}"
        );
        assert!(
            s.contains("socket,id=qga0,path=/tmp/w/qga.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("name=org.qemu.guest_agent.0"), "{s}");
        assert!(
            s.contains("-serial chardev:ser0") && s.contains("socket,id=ser0,path=/tmp/w/serial.sock,server=on,wait=off,logfile=/tmp/w/serial.log"),
            "{s}"
        );
        assert!(
            s.contains("-device pvpanic -action panic=exit-failure"),
            "{s}"
        );
        assert!(
            s.contains("-nodefaults")
                && s.contains("-display none")
                && s.contains("-machine q35,hpet=off"),
            "{s}"
        );
        assert!(
            !s.contains("/tmp/base.qcow2"),
            "the base image is never opened directly: {s}"
        );
        assert!(!s.contains("-kernel"), "{s}");
    }

    #[test]
    fn bios_command_line_without_network_with_kernel() {
        let mut c = cfg(Firmware::Bios, false);
        c.kernel = Some((
            "/k/vmlinuz".into(),
            "/k/initrd".into(),
            "root=/dev/vda rw console=ttyS0".into(),
        ));
        let a = qemu_args(&c, &VmPaths::in_workdir(&c.workdir), Accel::Kvm);
        let s = joined(&a);
        assert!(!s.contains("pflash"), "{s}");
        assert!(!s.contains("netdev") && !s.contains("user,"), "{s}");
        assert!(s.contains("-accel kvm -cpu host"), "{s}");
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "root=/dev/vda rw console=ttyS0");
        assert!(s.contains("-kernel /k/vmlinuz -initrd /k/initrd"), "{s}");
        assert!(!s.contains("bootindex"), "-kernel takes bootindex 0: {s}");
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\x1b[2J\x1b[01;01Hhello\r\n\x1b[1mok\x1b[0m"),
            "hello\nok"
        );
    }

    /// A fake agent: answers sync-delimited (after some stale output), ping, exec, exec-status,
    /// file-open/read/close. `mute` makes it accept and never answer.
    fn fake_agent(dir: &Path, mute: bool) -> (PathBuf, Arc<AtomicUsize>, Arc<Mutex<Vec<Value>>>) {
        let path = dir.join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (polls2, seen2) = (polls.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                // Stale output from a previous client: must be skipped.
                if !mute {
                    stream
                        .write_all(b"{\"return\": {\"pid\": 1}}\n\xff{\"return\": 7}\n")
                        .unwrap();
                }
                let mut line = Vec::new();
                while reader
                    .read_until(b'\n', &mut line)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {
                    let clean: Vec<u8> = line.iter().copied().filter(|&b| b != 0xFF).collect();
                    line.clear();
                    if mute {
                        continue;
                    }
                    let Ok(req) = serde_json::from_slice::<Value>(&clean) else {
                        continue;
                    };
                    seen2.lock().unwrap().push(req.clone());
                    let id = req.get("id").cloned().unwrap_or(Value::Null);
                    let args = req.get("arguments").cloned().unwrap_or(Value::Null);
                    let reply = |v: Value| {
                        let mut r = json!({"return": v});
                        if !id.is_null() {
                            r["id"] = id.clone();
                        }
                        format!("{r}\n").into_bytes()
                    };
                    let out = match req["execute"].as_str().unwrap() {
                        "guest-sync-delimited" => {
                            let mut b = vec![0xFF];
                            b.extend(format!("{}\n", json!({"return": args["id"]})).into_bytes());
                            b
                        }
                        "guest-ping" => reply(json!({})),
                        "guest-exec" if args["path"] == "/bin/hang" => reply(json!({"pid": 99})),
                        "guest-exec" => reply(json!({"pid": 42})),
                        "guest-exec-status" if args["pid"] == 99 => reply(json!({"exited": false})),
                        "guest-exec-status" => {
                            if polls2.fetch_add(1, Ordering::SeqCst) < 2 {
                                reply(json!({"exited": false}))
                            } else {
                                reply(json!({"exited": true, "exitcode": 3,
                                    "out-data": B64.encode("hello\n"), "err-data": B64.encode("warn")}))
                            }
                        }
                        "guest-file-open" if args["path"] == "/nope" => {
                            let mut r =
                                json!({"error": {"class": "GenericError", "desc": "No such file"}});
                            r["id"] = id.clone();
                            format!("{r}\n").into_bytes()
                        }
                        "guest-file-open" => reply(json!(5)),
                        "guest-file-read" => {
                            reply(json!({"count": 3, "buf-b64": B64.encode("abc"), "eof": true}))
                        }
                        "guest-file-close" => reply(json!({})),
                        _ => continue,
                    };
                    if stream.write_all(&out).is_err() {
                        break;
                    }
                }
            }
        });
        (path, polls, seen)
    }

    #[test]
    fn agent_exec_against_fake() {
        let dir = tempfile::tempdir().unwrap();
        let (path, polls, seen) = fake_agent(dir.path(), false);
        let agent = Agent::new("fake", &path);
        agent.wait(Duration::from_secs(5), &|| Ok(())).unwrap();
        let out = agent
            .exec(&["/bin/cat", "-"], Some(b"secret"), Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            out,
            ExecOutput {
                code: 3,
                stdout: "hello\n".into(),
                stderr: "warn".into()
            }
        );
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        let seen = seen.lock().unwrap();
        let exec = seen.iter().find(|r| r["execute"] == "guest-exec").unwrap();
        assert_eq!(exec["arguments"]["path"], "/bin/cat");
        assert_eq!(exec["arguments"]["arg"], json!(["-"]));
        assert_eq!(exec["arguments"]["capture-output"], true);
        assert_eq!(exec["arguments"]["input-data"], B64.encode("secret"));
        drop(seen);
        assert_eq!(
            agent.read_file("/etc/x", Duration::from_secs(5)).unwrap(),
            b"abc"
        );
        let err = agent
            .read_file("/nope", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("No such file"), "{err}");
        // The connection stays usable after an agent error.
        assert_eq!(
            agent.read_file("/etc/x", Duration::from_secs(5)).unwrap(),
            b"abc"
        );
    }

    #[test]
    fn exec_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, seen) = fake_agent(dir.path(), false);
        let agent = Agent::new("fake", &path);
        let t = Instant::now();
        let err = agent
            .exec(&["/bin/hang"], None, Duration::from_millis(700))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // It tried to kill the guest process.
        assert!(seen
            .lock()
            .unwrap()
            .iter()
            .any(|r| r["arguments"]["path"] == "/bin/kill"));
    }

    #[test]
    fn silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = fake_agent(dir.path(), true);
        let agent = Agent::new("mute", &path);
        let t = Instant::now();
        let err = agent
            .wait(Duration::from_millis(1200), &|| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not answer"), "{err}");
        assert!(
            t.elapsed() >= Duration::from_millis(1200) && t.elapsed() < Duration::from_secs(4),
            "{:?}",
            t.elapsed()
        );
        let err = agent
            .call("guest-ping", Value::Null, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn missing_socket_times_out_and_dead_vm_fails_early() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new("none", &dir.path().join("absent.sock"));
        let t = Instant::now();
        assert!(agent.wait(Duration::from_millis(800), &|| Ok(())).is_err());
        assert!(t.elapsed() < Duration::from_secs(3));
        let err = agent
            .wait(Duration::from_secs(60), &|| {
                Err(Error::Vm("QEMU exited".into()))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "QEMU exited");
    }

    #[test]
    fn emulator_faults_are_told_from_other_exits() {
        use std::os::unix::process::ExitStatusExt;
        let abort = ExitStatus::from_raw(libc::SIGABRT);
        let log = "qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: Assertion \
                   `section_index < d->map.sections_nb' failed.\n";
        assert_eq!(
            emulator_fault(abort, log),
            Some("iotlb_to_section: Assertion")
        );
        // Another assertion, a guest panic (exit 1), a kill: not ours to restart.
        assert_eq!(
            emulator_fault(abort, "tcg.c:42: tcg_gen_code: Assertion"),
            None
        );
        assert_eq!(emulator_fault(ExitStatus::from_raw(1 << 8), log), None);
        assert_eq!(
            emulator_fault(ExitStatus::from_raw(libc::SIGKILL), log),
            None
        );
    }

    /// A VM whose "QEMU" is a shell script: it aborts with the iotlb_to_section assertion
    /// `faults` times (counted in a file), then makes its sockets (plain files suffice for
    /// `wait_sockets`) and runs.
    fn scripted_vm(dir: &Path, faults: u32) -> Vm {
        let paths = VmPaths::in_workdir(dir);
        fs::write(&paths.serial_log, b"booting\n").unwrap();
        let script = format!(
            "ulimit -c 0; n=$(cat {d}/runs 2>/dev/null || echo 0); echo $((n + 1)) > {d}/runs; \
             if [ \"$n\" -lt {faults} ]; then \
               echo \"qemu: physmem.c:2678: iotlb_to_section: Assertion \\`x' failed.\" >&2; \
               kill -ABRT $$; fi; \
             touch {q} {m}; exec sleep 60",
            d = dir.display(),
            q = paths.qga_socket.display(),
            m = paths.qmp_socket.display(),
        );
        sh_vm(dir, script)
    }

    /// A VM whose "QEMU" is `sh -c script`, run in `dir`.
    fn sh_vm(dir: &Path, script: String) -> Vm {
        let paths = VmPaths::in_workdir(dir);
        let program = PathBuf::from("/bin/sh");
        let args = vec!["-c".to_string(), script];
        let child = spawn_qemu(&program, &args, &paths.qemu_log).unwrap();
        Vm {
            name: "scripted".into(),
            pid: AtomicU32::new(child.id()),
            child: Mutex::new(child),
            tpm: Mutex::new(None),
            tpm_state: None,
            program,
            args,
            restarts: AtomicU32::new(0),
            agent: Agent::new("scripted", &paths.qga_socket),
            paths,
        }
    }

    #[test]
    fn qemu_is_started_again_after_an_emulator_fault() {
        let dir = tempfile::tempdir().unwrap();
        let vm = scripted_vm(dir.path(), 1);
        let first = vm.pid();
        assert!(vm.wait_exit(Duration::from_secs(10)).is_some());
        vm.check_running("while testing").unwrap();
        assert_eq!(vm.restarts(), 1);
        assert_ne!(vm.pid(), first);
        assert!(vm.exit_status().is_none(), "the second QEMU runs");
        let kept = fs::read_to_string(dir.path().join("qemu.log.1")).unwrap();
        assert!(kept.contains("iotlb_to_section"), "{kept}");
        let serial = fs::read_to_string(vm.serial_log()).unwrap();
        assert!(serial.starts_with("booting\n"), "{serial}");
        assert!(serial.contains("restart 1 of at most 2"), "{serial}");
    }

    #[test]
    fn a_fault_on_every_boot_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let vm = scripted_vm(dir.path(), 10);
        assert!(vm.wait_exit(Duration::from_secs(10)).is_some());
        // One check restarts QEMU as often as allowed, each new one aborting at once.
        let msg = vm.check_running("while testing").unwrap_err().to_string();
        assert_eq!(vm.restarts(), MAX_RESTARTS);
        assert_eq!(
            fs::read_to_string(dir.path().join("runs")).unwrap().trim(),
            "3"
        );
        assert!(msg.contains("exited at start"), "{msg}");
        assert!(msg.contains("iotlb_to_section"), "{msg}");
    }

    #[test]
    fn other_exits_are_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let vm = sh_vm(dir.path(), "echo 'guest panicked' >&2; exit 1".to_string());
        assert!(vm.wait_exit(Duration::from_secs(10)).is_some());
        let msg = vm.check_running("while testing").unwrap_err().to_string();
        assert!(msg.contains("guest panicked"), "{msg}");
        assert_eq!(vm.restarts(), 0);
    }

    #[test]
    fn sync_skips_stale_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = fake_agent(dir.path(), false);
        let mut c = Conn::connect(&path).unwrap();
        c.sync(Duration::from_secs(5)).unwrap();
        assert!(c.synced);
        assert_eq!(
            c.call("guest-ping", &Value::Null, Duration::from_secs(5))
                .unwrap(),
            json!({})
        );
    }
}
