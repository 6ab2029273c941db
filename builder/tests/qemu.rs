//! Slow tests: real builds (mmdebstrap, mke2fs, cryptsetup, GRUB) and real boots under QEMU.
//! Ignored by a plain `cargo test`; scripts/test (CI) and `just test-qemu` run them with
//! `--ignored --test-threads=1`. They need the host tools of scripts/setup-host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "redis";

fn project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn scratch() -> PathBuf {
    let d = project().join("target/qemu-tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ncimage"));
    c.args(args)
        .current_dir(scratch())
        .env("NCIMAGE_PROJECT", project())
        .env("NO_COLOR", "1");
    c
}

/// `ncimage build --role ROLE --quiet [--spec SPEC] --out OUT`.
fn build_cmd(role: &str, spec: Option<&Path>, out: &Path) -> Command {
    let mut args = vec!["build", "--role", role, "--quiet"];
    if let Some(spec) = spec {
        args.extend(["--spec", spec.to_str().unwrap()]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    cmd(&args)
}

fn ok(out: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "failed:\n{text}");
    text
}

/// The image of the redis role, which most tests use, built once per test process.
fn image() -> &'static Path {
    image_for(ROLE)
}

/// The image of a role, built once per test process.
fn image_for(role: &str) -> &'static Path {
    static IMAGES: std::sync::Mutex<Vec<(String, &'static Path)>> =
        std::sync::Mutex::new(Vec::new());
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = images.iter().find(|(r, _)| r == role) {
        return p;
    }
    let out = scratch().join(if role == ROLE {
        "a".to_string()
    } else {
        role.to_string()
    });
    let t = Instant::now();
    // Roles with archives take them from the test fixtures. The app role downloads its release
    // over HTTP from 127.0.0.1, through the same code as a real download (after dropping the
    // cached copy), and checks its signature.
    let spec = match role {
        "app" => {
            let f = fixtures();
            let _ = std::fs::remove_file(cache_dir().join("archives").join(&f.nextcloud_sha256));
            Some(f.url_spec.clone())
        }
        "collabora" => Some(fixtures().spec.clone()),
        _ => None,
    };
    ok(build_cmd(role, spec.as_deref(), &out).output().unwrap());
    eprintln!("build {role}: {:.1} s", t.elapsed().as_secs_f64());
    let p: &'static Path = Box::leak(out.into_boxed_path());
    images.push((role.to_string(), p));
    p
}

fn cache_dir() -> PathBuf {
    std::env::var_os("NCIMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ncimage"))
}

/// The test fixtures (qemu-tests/fixtures/build-all): a Nextcloud-shaped release signed by a
/// throw-away key and a Collabora-shaped image archive, with specs that use them.
struct Fixtures {
    dir: PathBuf,
    spec: PathBuf,
    url_spec: PathBuf,
    nextcloud_sha256: String,
    fingerprint: String,
}

fn fixtures() -> &'static Fixtures {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch().join("fixtures");
        let script = project().join("qemu-tests/fixtures/build-all");
        // build-all prints the spec's path as its last line on stdout.
        let spec_of = |c: &mut Command| -> PathBuf {
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            PathBuf::from(text.lines().last().unwrap().trim())
        };
        let spec = spec_of(Command::new(&script).arg(&dir));
        let port = serve(&dir);
        let url = format!("http://127.0.0.1:{port}");
        let url_spec = spec_of(Command::new(&script).arg(&dir).args(["--url", &url]));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        Fixtures {
            nextcloud_sha256: read("nextcloud-fixture.tar.bz2.sha256")[..64].to_string(),
            fingerprint: read("fixture-signing-key.fpr").trim().to_string(),
            dir,
            spec,
            url_spec,
        }
    })
}

/// A static file server on 127.0.0.1 (a thread of the test process): GET and HEAD of the files
/// in `dir`, 404 otherwise.
fn serve(dir: &Path) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap_or(0);
                let mut h = String::new();
                while r.read_line(&mut h).unwrap_or(0) > 2 {
                    h.clear();
                }
                let mut w = conn;
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let name = path.trim_start_matches('/');
                match std::fs::read(dir.join(name)) {
                    Ok(body) if !name.contains('/') && !name.is_empty() => {
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        if line.starts_with("GET") {
                            let _ = w.write_all(&body);
                        }
                    }
                    _ => {
                        let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    port
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn build_is_reproducible_verifiable_and_encrypted() {
    let a = image();
    let b = scratch().join("b");
    ok(cmd(&[
        "build",
        "--role",
        ROLE,
        "--quiet",
        "--out",
        b.to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let (ma, mb) = (manifest(a), manifest(&b));
    for fs in ["root", "boot"] {
        assert_eq!(
            ma["filesystems"][fs]["sha256"], mb["filesystems"][fs]["sha256"],
            "{fs} filesystem differs between two builds"
        );
    }
    assert_eq!(
        mb["inputs"]["rootfs_cached"], true,
        "the second build must reuse the cached tree"
    );
    assert_eq!(
        ma["inputs"]["rootfs_cache_key"],
        mb["inputs"]["rootfs_cache_key"]
    );
    // SHA256SUMS verifies with the standard tool.
    for dir in [a, b.as_path()] {
        let out = Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The manifest lists packages with versions, every artifact, timings.
    let pkgs = ma["packages"].as_array().unwrap();
    assert!(pkgs
        .iter()
        .any(|p| p["name"] == "redis-server" && !p["version"].as_str().unwrap().is_empty()));
    assert!(pkgs.iter().any(|p| p["name"] == "linux-image-cloud-amd64"));
    let files: Vec<&str> = ma["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["ncimage-redis.qcow2", "ncimage-redis.raw"]);
    for stage in ["rootfs", "overlay", "fs", "luks", "disk", "export"] {
        assert!(
            ma["timings_seconds"][stage].is_number(),
            "no timing for {stage}"
        );
    }
    // No plaintext of the root filesystem in the root partition: a string from a file the redis
    // layer puts in /etc must not appear there, while /boot (unencrypted) holds grub.cfg.
    let raw = std::fs::read(a.join("ncimage-redis.raw")).unwrap();
    let part = |name: &str| {
        let p = ma["disk"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone();
        let start = p["start_lba"].as_u64().unwrap() as usize * 512;
        start..start + p["size_bytes"].as_u64().unwrap() as usize
    };
    let root = &raw[part("root")];
    assert_eq!(&root[..6], b"LUKS\xba\xbe", "root partition is not LUKS");
    for marker in [
        &b"settings shared by both instances"[..],
        b"maxmemory-policy allkeys-lru",
        b"PermitRootLogin no",
    ] {
        assert!(
            !root.windows(marker.len()).any(|w| w == marker),
            "plaintext {:?} in the root partition",
            String::from_utf8_lossy(marker)
        );
    }
    let boot = &raw[part("boot")];
    assert!(
        boot.windows(22).any(|w| w == b"root=/dev/mapper/root "),
        "grub.cfg not found in /boot"
    );
    // The image is small: ciphertext of free blocks is never written.
    let qcow = std::fs::metadata(a.join("ncimage-redis.qcow2"))
        .unwrap()
        .len();
    assert!(qcow < 900 << 20, "qcow2 is {} MiB", qcow >> 20);
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn interrupted_build_leaves_nothing() {
    image(); // warm cache, so the interrupt lands in the later stages
    let parent = scratch().join("interrupted");
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    let out = parent.join("redis");
    for delay in [2u64, 6] {
        let mut child = cmd(&[
            "build",
            "--role",
            ROLE,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        std::thread::sleep(Duration::from_secs(delay));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "build finished before the interrupt at {delay} s: make the test later stage"
        );
        let left: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "interrupted build at {delay} s left {left:?}"
        );
    }
}

fn boot(role: &str, firmware: &str, must_pass: &str) {
    boot_with(role, firmware, "vfat", must_pass)
}

fn boot_with(role: &str, firmware: &str, seed: &str, must_pass: &str) {
    let dir = image_for(role);
    let t = Instant::now();
    let text = ok(cmd(&[
        "test",
        "--role",
        role,
        "--image",
        dir.to_str().unwrap(),
        "--firmware",
        firmware,
        "--seed",
        seed,
    ])
    .output()
    .unwrap());
    eprintln!("{text}");
    eprintln!(
        "{role} {firmware}: test took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Figures for the CI log (scripts/test prints the file at the end).
    let ready = text
        .lines()
        .find_map(|l| l.strip_prefix("ready after "))
        .unwrap_or("?");
    let line = format!(
        "{role:<10} {firmware:<4} ready after {ready:<8} whole test {:.0} s\n",
        t.elapsed().as_secs_f64()
    );
    use std::io::Write;
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(scratch().join("figures.txt"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    assert!(
        text.contains("ok   base / root mapping is a LUKS2 volume"),
        "{text}"
    );
    assert!(
        text.contains(&format!("ok   {role} / {must_pass}")),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn boots_under_uefi_and_passes_checks() {
    boot(
        ROLE,
        "uefi",
        "sessions answers PING with the seed's password",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn boots_under_bios_with_an_iso_seed_and_passes_checks() {
    // The only seed attached is an ISO 9660 cidata volume: the checks pass only if cloud-init
    // read it.
    boot_with(
        ROLE,
        "bios",
        "iso",
        "sessions answers PING with the seed's password",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn db_role_boots_and_passes_checks() {
    boot(
        "db",
        "uefi",
        "Nextcloud settings: InnoDB, READ-COMMITTED, binlog ROW, utf8mb4",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn nfs_role_boots_and_passes_checks() {
    boot(
        "nfs",
        "uefi",
        "a client mounts it over NFSv4.2; www-data writes, root is squashed",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn lb_role_boots_and_passes_checks() {
    boot(
        "lb",
        "uefi",
        "TLS 1.2 and 1.3 only, with the seed's certificate",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn backup_role_boots_and_passes_checks() {
    boot(
        "backup",
        "uefi",
        "the dry run passes and plans pause, dump, snapshot, resume, retention, mail",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn app_role_downloads_verifies_and_serves_the_release_fixture() {
    let dir = image_for("app");
    let m = manifest(dir);
    let a = &m["archives"][0];
    assert_eq!(a["name"], "nextcloud");
    assert!(
        a["source"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{a}"
    );
    assert_eq!(a["sha256"], fixtures().nextcloud_sha256.as_str());
    assert_eq!(a["signed_by"], fixtures().fingerprint.as_str());
    boot(
        "app",
        "uefi",
        "status.php answers through nginx and PHP-FPM from the release in the image",
    );
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn collabora_role_loads_the_image_archive_and_answers_discovery() {
    boot(
        "collabora",
        "uefi",
        "the discovery URL answers through nginx (TLS) from the container",
    );
}

/// A fixtures spec with one line changed.
fn spec_variant(name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(&fixtures().spec).unwrap();
    assert!(text.contains(from), "{from} not in the fixtures spec");
    let p = fixtures().dir.join(name);
    std::fs::write(&p, text.replace(from, to)).unwrap();
    p
}

fn build_fails(spec: &Path, role: &str, needles: &[&str]) {
    let out = scratch().join(format!("{role}-must-fail"));
    let o = build_cmd(role, Some(spec), &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!out.exists(), "a failed build left {}", out.display());
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn a_release_signed_by_another_key_or_with_a_wrong_checksum_stops_the_build() {
    let f = fixtures();
    // The spec says the release must be signed by Nextcloud's key; the fixture is signed by
    // the test key.
    let nextcloud = "28806A878AE423A28372792ED75899B9A724937A";
    let spec = spec_variant("other-key.toml", &f.fingerprint, nextcloud);
    build_fails(
        &spec,
        "app",
        &[&format!(
            "the signature does not verify with key {nextcloud}"
        )],
    );
    // A corrupted signature.
    let sig = f.dir.join("bad.asc");
    let good = std::fs::read_to_string(f.dir.join("nextcloud-fixture.tar.bz2.asc")).unwrap();
    let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
    let i = lines.iter().position(|l| l.is_empty()).unwrap() + 1;
    lines[i] = lines[i].chars().rev().collect();
    std::fs::write(&sig, lines.join("\n") + "\n").unwrap();
    let spec = spec_variant(
        "bad-sig.toml",
        "signature = \"nextcloud-fixture.tar.bz2.asc\"",
        "signature = \"bad.asc\"",
    );
    build_fails(&spec, "app", &["the signature does not verify"]);
    // A checksum that is not the archive's.
    let zeros = "0".repeat(64);
    let spec = spec_variant("bad-sum.toml", &f.nextcloud_sha256, &zeros);
    build_fails(&spec, "app", &[&format!("the spec pins {zeros}")]);
}

#[test]
#[ignore = "boots QEMU: scripts/test"]
fn ctrl_c_during_a_boot_kills_qemu_and_cleans_up() {
    let dir = image();
    let before = temp_dirs();
    let mut child = cmd(&["test", "--role", ROLE, "--image", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(15));
    let qemus = qemu_children(child.id());
    assert!(!qemus.is_empty(), "QEMU did not start");
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?} to stop",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    for pid in qemus {
        // Gone, or a zombie waiting for init to reap it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = ncimage::lab::stat_field(&stat, 3).unwrap_or("");
        assert!(
            stat.is_empty() || state == "Z",
            "QEMU {pid} left running ({state})"
        );
    }
    let after = temp_dirs();
    assert!(
        after.difference(&before).next().is_none(),
        "temporary folders left: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
}

fn temp_dirs() -> std::collections::BTreeSet<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("ncimage-test-"))
        .collect()
}

/// PIDs of the QEMU processes `pid` started.
fn qemu_children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string(), "qemu-system"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A copy of the project's layers to break on purpose.
fn project_copy(name: &str) -> PathBuf {
    let proj = scratch().join(name);
    let _ = std::fs::remove_dir_all(&proj);
    std::fs::create_dir_all(&proj).unwrap();
    for dir in ["roles", "overlays"] {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(project().join(dir))
            .arg(&proj)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    proj
}

#[test]
#[ignore = "runs mmdebstrap: scripts/test"]
fn an_unknown_package_is_named_with_its_layer() {
    let proj = project_copy("unknown-package");
    let role = proj.join("roles/redis/role.toml");
    let text = std::fs::read_to_string(&role).unwrap().replace(
        "\"redis-tools\"]",
        "\"redis-tools\", \"no-such-package-ncimage\"]",
    );
    std::fs::write(&role, text).unwrap();
    let out = scratch().join("unknown-package-out");
    let o = cmd(&[
        "build",
        "--role",
        ROLE,
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .env("NCIMAGE_PROJECT", &proj)
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("package `no-such-package-ncimage` does not exist in Debian trixie")
            && err.contains("roles/redis/role.toml"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&proj).unwrap();
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn a_config_its_checker_rejects_stops_the_build() {
    image(); // warm cache
    let proj = project_copy("broken-project");
    let conf = proj.join("overlays/base/tree/etc/ssh/sshd_config.d/50-ncimage.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("PermitRootLogn no\n");
    std::fs::write(&conf, text).unwrap();
    let out = scratch().join("broken");
    let _ = std::fs::remove_dir_all(&out);
    let o = cmd(&[
        "build",
        "--role",
        ROLE,
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .env("NCIMAGE_PROJECT", &proj)
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a broken sshd config was accepted");
    assert!(
        err.contains("validation `sshd -t` failed") && err.contains("PermitRootLogn"),
        "{err}"
    );
    assert!(!out.exists(), "a failed build left {}", out.display());
    std::fs::remove_dir_all(&proj).unwrap();
}

// ---------------------------------------------------------------------------------------
// Encryption (issue 5): per-machine volume keys, unlock methods, recovery, power loss.

mod enc {
    use super::*;
    use ncimage::firstboot::NodeConfig;
    use ncimage::qemu::{Firmware, Vm, VmConfig};
    use ncimage::rekey::{self, NodeEncryption, UnlockPolicy};

    /// Address of the Tang server inside the guest network (QEMU runs tangd per connection).
    pub const TANG_ADDR: &str = "10.0.2.100:80";

    /// One test machine: its seed, recovery key, vTPM state and the top of its disk chain
    /// (each boot stacks a qcow2 overlay on the previous one: the same disk across boots).
    pub struct Machine {
        pub name: String,
        pub dir: PathBuf,
        pub seed: PathBuf,
        pub recovery: String,
        pub secrets: std::collections::BTreeMap<String, String>,
        pub disk: PathBuf,
        /// The role's data volumes (kept across boots).
        pub data_disks: Vec<(PathBuf, String)>,
        boots: u32,
    }

    pub fn machine(name: &str, policy: UnlockPolicy) -> Machine {
        machine_of(name, policy, image())
    }

    /// A machine whose image carries 1 GiB of free space in its root: its first-boot
    /// re-encryption in the initramfs (about 1.5 GiB, a minute or more under TCG) lasts long
    /// enough for a test to cut the power in the middle of it. The default image's takes
    /// about 20-50 s.
    pub fn slow_rekey_machine(name: &str, policy: UnlockPolicy) -> Machine {
        static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let image = IMAGE.get_or_init(|| {
            let out = scratch().join("a-slow-rekey");
            let spec = scratch().join("slow-rekey.toml");
            std::fs::write(&spec, format!("[roles.{ROLE}]\nroot_free = \"1G\"\n")).unwrap();
            ok(build_cmd(ROLE, Some(&spec), &out).output().unwrap());
            out
        });
        machine_of(name, policy, image)
    }

    fn machine_of(name: &str, policy: UnlockPolicy, image: &Path) -> Machine {
        let dir = scratch().join(format!("enc-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let project = ncimage::layer::Project::locate(Some(&super::project())).unwrap();
        let layers = project.layers_for(ROLE).unwrap();
        let merged = ncimage::layer::merge(&layers).unwrap();
        let mut secrets = ncimage::secrets::Secrets::generate(&merged.secrets).unwrap();
        let recovery = rekey::new_recovery_key().unwrap();
        secrets
            .0
            .insert(rekey::RECOVERY_SECRET.into(), recovery.clone());
        let cfg = NodeConfig {
            node: ncimage::vmtest::test_node(ROLE, &merged),
            secrets: secrets.0.clone(),
            cluster: serde_json::Value::Null,
            encryption: NodeEncryption { policy },
        };
        let seed = dir.join("seed.img");
        ncimage::seed::nocloud(&cfg, &format!("enc-{name}-{}", std::process::id()), &[])
            .write_vfat(&seed)
            .unwrap();
        let disk = ncimage::vmtest::image_disk(image, ROLE).unwrap();
        let data_disks = ncimage::vmtest::data_disks(&merged.volumes, &dir).unwrap();
        Machine {
            data_disks,
            secrets: secrets.0,
            name: name.into(),
            dir,
            seed,
            recovery,
            disk,
            boots: 0,
        }
    }

    impl Machine {
        /// Boots the machine's disk (with its vTPM, and Tang reachable, if asked).
        pub fn boot(&mut self, tpm: bool, tang: Option<&Path>) -> Vm {
            self.boots += 1;
            let work = self.dir.join(format!("b{}", self.boots));
            let vm = Vm::start(VmConfig {
                name: format!("enc-{}-{}", self.name, self.boots),
                disk: self.disk.clone(),
                extra_disks: vec![self.seed.clone()],
                firmware: Firmware::Uefi,
                memory_mib: 2048,
                cpus: 2,
                workdir: work.clone(),
                network: true,
                forwards: Vec::new(),
                kernel: None,
                lan: None,
                tpm: tpm.then(|| self.dir.join("tpm")),
                guest_services: tang
                    .map(|keys| {
                        vec![(
                            TANG_ADDR.to_string(),
                            // QEMU (libslirp) hands the connection to the command as stdin,
                            // stdout *and* stderr: tangd's log line on stderr would come before
                            // the HTTP response and clevis would read garbage.
                            format!(
                                "/bin/sh -c 'exec /usr/libexec/tangd {} 2>/dev/null'",
                                keys.display()
                            ),
                        )]
                    })
                    .unwrap_or_default(),
                data_disks: self.data_disks.clone(),
            })
            .unwrap();
            self.disk = work.join("overlay.qcow2");
            eprintln!("{}: boot {} started", self.name, self.boots);
            vm
        }
    }

    pub fn sh(vm: &Vm, script: &str) -> String {
        let out = vm.sh(script, Duration::from_secs(120)).unwrap();
        assert!(
            out.success(),
            "{script}: exit {}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        out.stdout.trim().to_string()
    }

    /// Until systemd has finished starting (first boot includes the re-encryption).
    pub fn ready(vm: &Vm, timeout: Duration) -> f64 {
        let t = Instant::now();
        vm.wait_agent(timeout).unwrap();
        loop {
            let out = vm
                .sh(
                    "timeout 50 systemctl is-system-running --wait",
                    Duration::from_secs(70),
                )
                .unwrap();
            let state = out.stdout.trim();
            if state == "running" || state == "degraded" {
                return t.elapsed().as_secs_f64();
            }
            assert!(
                t.elapsed() < timeout,
                "still {state} after {timeout:?}\n{}",
                vm.serial_tail(40)
            );
        }
    }

    /// A figure for the CI log and `just bench` (scripts/test and scripts/bench print the file).
    pub fn figure(line: &str) {
        use std::io::Write;
        eprintln!("{line}");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(scratch().join("figures.txt"))
            .and_then(|mut f| writeln!(f, "{line}"));
    }

    /// Seconds from kernel start until the root file system was mounted (the initramfs has
    /// unlocked it by then), from the kernel log.
    pub fn unlock_figure(vm: &Vm, how: &str) {
        let t = sh(
            vm,
            "journalctl -b -k -o short-monotonic --no-pager | grep -m1 'EXT4-fs (dm-0): mounted' | sed 's/^\\[ *\\([0-9.]*\\)\\].*/\\1/'",
        );
        figure(&format!(
            "encryption: root unlocked {t:>8} s after kernel start ({how})"
        ));
    }

    /// Until ncimage-rekey.service has finished (it does not hold up the boot); its status line.
    pub fn rekeyed(vm: &Vm, timeout: Duration) -> String {
        let t = Instant::now();
        while sh(vm, "systemctl show -P SubState ncimage-rekey.service") == "running" {
            assert!(
                t.elapsed() < timeout,
                "re-keying still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_secs(3));
        }
        eprintln!(
            "re-keyed {:.0} s after the boot was ready",
            t.elapsed().as_secs_f64()
        );
        sh(vm, "ncimage status | head -n1")
    }

    /// Records (a digest of) this machine's volume key for the other encryption test and
    /// asserts that no machine recorded before (from the same image) has the same one.
    pub fn volume_key_is_new(name: &str, vk: &str) {
        let out = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(vk.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let digest = String::from_utf8(out.stdout).unwrap();
        let vk = digest.split_whitespace().next().unwrap();
        let f = scratch().join("enc-volume-key-digests.txt");
        let before = std::fs::read_to_string(&f).unwrap_or_default();
        for l in before.lines() {
            let (other, key) = l.split_once(' ').unwrap();
            if other != name {
                assert_ne!(
                    key, vk,
                    "machines {other} and {name} from one image share a volume key"
                );
                figure(&format!(
                    "encryption: volume keys of machines {other} and {name} differ"
                ));
            }
        }
        let kept: String = before
            .lines()
            .filter(|l| !l.starts_with(&format!("{name} ")))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&f, format!("{kept}{name} {vk}\n")).unwrap();
    }

    /// The root's volume key (hex), read on the host from a copy of the LUKS header with the
    /// recovery key (in the guest, dm-crypt holds it in the kernel keyring, out of sight).
    pub fn volume_key(disk: &Path, recovery: &str, work: &Path) -> String {
        let header = header_copy(disk, work, "vk-header.bin");
        let kf = work.join("vk.key");
        std::fs::write(&kf, recovery.trim()).unwrap();
        let out = Command::new("cryptsetup")
            .args([
                "luksDump",
                "--dump-volume-key",
                "--batch-mode",
                "--disable-locks",
                "--key-file",
            ])
            .arg(&kf)
            .arg(&header)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&kf);
        let _ = std::fs::remove_file(&header);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut hex = String::new();
        let mut on = false;
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("MK dump:").or(l.strip_prefix("Volume key:")) {
                on = true;
                hex.push_str(rest);
            } else if on && l.starts_with(char::is_whitespace) {
                hex.push_str(l);
            } else {
                on = false;
            }
        }
        hex.retain(|c| c.is_ascii_hexdigit());
        hex
    }

    /// A copy of the LUKS header region of `disk`'s root, as `work/name` (no device-mapper).
    pub fn header_copy(disk: &Path, work: &Path, name: &str) -> PathBuf {
        let parts = ncimage::inspect::gpt_of(disk, work).unwrap();
        let header = work.join(name);
        let _ = std::fs::remove_file(&header);
        ncimage::inspect::extract_luks_header(disk, &parts, &header).unwrap();
        header
    }

    /// Whether `key` opens the LUKS header of `disk`'s root (a copy of the header region, on the
    /// host: no device-mapper needed).
    pub fn key_opens(disk: &Path, key: &[u8], work: &Path) -> bool {
        let header = header_copy(disk, work, "header.bin");
        let kf = work.join("try.key");
        std::fs::write(&kf, key).unwrap();
        let st = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--disable-locks", "--key-file"])
            .arg(&kf)
            .arg(&header)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        let _ = std::fs::remove_file(&kf);
        st.success()
    }

    /// Whether `needle` occurs anywhere in the disk's raw bytes (the whole chain, read as the
    /// guest sees it).
    pub fn disk_contains(disk: &Path, needle: &[u8], work: &Path) -> bool {
        let raw = work.join("disk.raw");
        let _ = std::fs::remove_file(&raw);
        let st = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(disk)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        let found = file_contains(&raw, needle);
        let _ = std::fs::remove_file(&raw);
        found
    }

    pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
        use std::io::Read;
        let mut f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                return false;
            }
            carry.extend_from_slice(&buf[..n]);
            if carry.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let keep = carry.len().saturating_sub(needle.len());
            carry.drain(..keep);
        }
    }

    /// A Tang server's keys (tangd-keygen) and the thumbprint of its signing key.
    pub fn tang_keys(dir: &Path) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("/usr/libexec/tangd-keygen")
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "tangd-keygen failed (scripts/setup-host installs tang)"
        );
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let jwk: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            if jwk["alg"] == "ES512" {
                let out = Command::new("jose")
                    .args(["jwk", "thp", "-i"])
                    .arg(e.path())
                    .output()
                    .unwrap();
                assert!(out.status.success());
                return String::from_utf8(out.stdout).unwrap().trim().to_string();
            }
        }
        panic!("no signing key in {}", dir.display());
    }

    pub fn count_in_serial(vm: &Vm, needle: &str) -> usize {
        let log = std::fs::read(vm.serial_log()).unwrap_or_default();
        String::from_utf8_lossy(&log).matches(needle).count()
    }

    pub fn wait_count(vm: &Vm, needle: &str, n: usize, timeout: Duration) {
        let t = Instant::now();
        while count_in_serial(vm, needle) < n {
            assert!(
                t.elapsed() < timeout,
                "`{needle}` not seen {n} time(s) within {timeout:?}\n{}",
                vm.serial_tail(30)
            );
            assert!(vm.exit_status().is_none(), "QEMU exited");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Issue 5, in one machine's life: first boot's initramfs re-encrypts the root with a fresh
/// volume key while a power cut interrupts it, the next boot's initramfs resumes and finishes,
/// first boot binds the vTPM and removes the enrollment key; the vTPM alone unlocks the next
/// boot; on the host the enrollment key no longer opens the header, the recovery key does, a
/// wrong key does not, and a canary written in the guest is nowhere in the raw disk.
#[test]
#[ignore = "boots QEMU: scripts/test"]
fn first_boot_rekeys_resumes_after_power_loss_and_unlocks_with_tpm2() {
    use enc::*;
    let t0 = Instant::now();
    let policy = ncimage::rekey::UnlockPolicy {
        tpm2: true,
        ..Default::default()
    };
    let mut m = slow_rekey_machine("tpm", policy);
    let enroll = std::fs::read(cache_dir().join("keys/enroll.key")).unwrap();
    let work = m.dir.join("host");
    std::fs::create_dir_all(&work).unwrap();
    assert!(
        key_opens(&m.disk, &enroll, &work),
        "the built image should open with the enrollment key"
    );

    // Boot 1: cut the power while the first-boot initramfs re-encrypts the root (offline,
    // before cryptroot opens it).
    {
        let vm = m.boot(true, None);
        wait_count(
            &vm,
            "ncimage-reencrypt: re-encrypting the root",
            1,
            Duration::from_secs(600),
        );
        // Some hot zones in (64 MiB each; the slow image's root is about 1.5 GiB).
        std::thread::sleep(Duration::from_secs(15));
        assert_eq!(
            count_in_serial(&vm, "ncimage-reencrypt: done"),
            0,
            "the re-encryption finished before the power cut: make the test's image slower\n{}",
            vm.serial_tail(20)
        );
        eprintln!(
            "power cut during re-encryption ({:.0} s)",
            t0.elapsed().as_secs_f64()
        );
        vm.power_cut();
    }
    // The header on disk records the unfinished re-encryption.
    let header = header_copy(&m.disk, &work, "mid.bin");
    let dump = ok(Command::new("cryptsetup")
        .args(["luksDump", "--disable-locks"])
        .arg(&header)
        .output()
        .unwrap());
    assert!(ncimage::rekey::reencrypt_in_progress(&dump), "{dump}");

    // Boot 2: the initramfs resumes the re-encryption and opens the root; rekey finishes.
    let canary = format!(
        "NCIMAGE-CANARY-{:x}",
        t0.elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    let vk = {
        let vm = m.boot(true, None);
        let secs = ready(&vm, Duration::from_secs(1200));
        let status = rekeyed(&vm, Duration::from_secs(1200));
        eprintln!("resumed boot ready after {secs:.0} s: {status}");
        assert_eq!(
            count_in_serial(
                &vm,
                "ncimage-reencrypt: resuming the interrupted re-encryption"
            ),
            1,
            "the initramfs did not resume the re-encryption\n{}",
            vm.serial_tail(40)
        );
        unlock_figure(&vm, "enrollment key, re-encryption interrupted");
        figure(&format!(
            "encryption: resumed re-encryption took {} s",
            sh(&vm, "jq .reencrypt_seconds /var/lib/ncimage/rekey.json")
        ));
        assert!(
            status.contains("own volume key")
                && status.contains("resumed 1x")
                && status.contains("unlock: tpm2 + recovery key"),
            "{status}"
        );
        sh(
            &vm,
            &format!("printf '%s\\n' {canary} > /root/canary && sync"),
        );
        // The same canary in the redis data volume (AOF), through the service.
        let pw = &m.secrets["redis_sessions_password"];
        assert_eq!(
            sh(&vm, &format!("REDISCLI_AUTH='{pw}' redis-cli -h 10.0.2.15 -p 6379 set enc-canary {canary}; sleep 2; sync")),
            "OK"
        );
        assert_eq!(
            sh(&vm, "findmnt -no SOURCE /var/lib/redis"),
            "/dev/mapper/data-redis"
        );
        vm.shutdown(Duration::from_secs(120)).unwrap();
        let vk = volume_key(&m.disk, &m.recovery, &work);
        assert_eq!(vk.len(), 128, "{vk}");
        vk
    };
    // Boot 3: the vTPM unlocks the root; nobody types anything.
    {
        let vm = m.boot(true, None);
        vm.wait_agent(Duration::from_secs(600)).unwrap();
        assert_eq!(sh(&vm, "cat /root/canary"), canary);
        unlock_figure(&vm, "tpm2 (swtpm)");
        // The data volume reopened (its key file is on the root) and redis found its data.
        ready(&vm, Duration::from_secs(900));
        let pw = &m.secrets["redis_sessions_password"];
        assert_eq!(
            sh(
                &vm,
                &format!("REDISCLI_AUTH='{pw}' redis-cli -h 10.0.2.15 -p 6379 get enc-canary")
            ),
            canary
        );
        assert_eq!(sh(&vm, "systemctl is-enabled ncimage-rekey.service; test -e /etc/ncimage/keys/enroll.key && echo key || echo nokey"), "enabled\nnokey");
        vm.shutdown(Duration::from_secs(120)).unwrap();
    }
    assert_eq!(volume_key(&m.disk, &m.recovery, &work), vk);
    // On the host: nothing shipped in the image opens the disk; the recovery key does.
    assert!(
        !key_opens(&m.disk, &enroll, &work),
        "the enrollment key still opens the root"
    );
    assert!(
        key_opens(&m.disk, m.recovery.as_bytes(), &work),
        "the recovery key does not open the root"
    );
    assert!(!key_opens(
        &m.disk,
        b"0000-0000-0000-0000-0000-0000-0000-0000",
        &work
    ));
    for (d, _) in &m.data_disks {
        assert!(
            !file_contains(d, canary.as_bytes()),
            "the canary is in the data disk {} in plaintext",
            d.display()
        );
        assert!(
            !file_contains(d, b"enc-canary"),
            "the redis key name is in the data disk in plaintext"
        );
    }
    assert!(
        !disk_contains(&m.disk, canary.as_bytes(), &work),
        "the canary is in the raw disk in plaintext"
    );
    volume_key_is_new("tpm", &vk);
    eprintln!(
        "tpm2 machine: whole test {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&m.dir);
}

/// Issue 5, a second machine from the same image: its own volume key (not the first
/// machine's), Tang (tangd run by QEMU inside the guest network) unlocks its reboot, and with
/// neither Tang nor a TPM the boot waits at the console, where a wrong key is refused and the
/// recovery key unlocks it.
#[test]
#[ignore = "boots QEMU: scripts/test"]
fn a_second_machine_gets_its_own_key_unlocks_with_tang_and_at_the_console() {
    use enc::*;
    let t0 = Instant::now();
    let keys_dir = scratch().join("enc-tang-keys");
    let _ = std::fs::remove_dir_all(&keys_dir);
    let thp = tang_keys(&keys_dir);
    // The policy also asks for tpm2, which this machine lacks: on_missing_tpm2 = skip binds
    // Tang alone and says so (the bad-input case of a policy the machine cannot meet).
    let policy = ncimage::rekey::UnlockPolicy {
        tpm2: true,
        tang: vec![ncimage::rekey::TangServer {
            url: format!("http://{}", TANG_ADDR.trim_end_matches(":80")),
            thp: Some(thp),
        }],
        on_missing_tpm2: ncimage::rekey::Missing::Skip,
        ..Default::default()
    };
    let mut m = machine("tang", policy);
    let work = m.dir.join("host");
    std::fs::create_dir_all(&work).unwrap();
    let vk = {
        let vm = m.boot(false, Some(&keys_dir));
        let secs = ready(&vm, Duration::from_secs(1200));
        let status = rekeyed(&vm, Duration::from_secs(1200));
        eprintln!("first boot ready after {secs:.0} s: {status}");
        // The initramfs re-encrypted it, offline, before the root was mounted.
        assert_eq!(
            count_in_serial(&vm, "ncimage-reencrypt: done in"),
            1,
            "the first-boot initramfs did not re-encrypt the root\n{}",
            vm.serial_tail(40)
        );
        unlock_figure(&vm, "enrollment key, first boot");
        figure(&format!(
            "encryption: first-boot re-encryption of {} MiB (the image's filesystem; the root grew to {}) took {} s ({})",
            sh(&vm, "jq '.reencrypt_bytes / 1048576' /var/lib/ncimage/rekey.json"),
            sh(&vm, "lsblk -dno SIZE /dev/mapper/root"),
            sh(&vm, "jq .reencrypt_seconds /var/lib/ncimage/rekey.json"),
            sh(&vm, "cryptsetup luksDump $(cryptsetup status root | awk '/device:/ { print $2 }') | awk '/^[A-Z]/ { k = ($0 == \"Keyslots:\") } !k { next } /PBKDF:/ { p = $2 } /^\\tHash:/ { h = $2 } /Iterations:/ { printf \"%s%s %s %s iter\", sep, p, h, $2; sep = \"; \" } /Time cost:/ { t = $3 } /Memory:/ { m = $2 } /Threads:/ { printf \"%s%s %s KiB %s iter %s lane\", sep, p, m, t, $2; sep = \"; \" }'")
        ));
        assert!(
            status.contains("unlock: tang + recovery key")
                && status.contains("has no TPM")
                && status.contains("on_missing_tpm2 = skip: bound to tang only"),
            "{status}"
        );
        vm.shutdown(Duration::from_secs(120)).unwrap();
        volume_key(&m.disk, &m.recovery, &work)
    };
    assert_eq!(vk.len(), 128);
    volume_key_is_new("tang", &vk);
    {
        let vm = m.boot(false, Some(&keys_dir));
        vm.wait_agent(Duration::from_secs(600)).unwrap();
        unlock_figure(&vm, "tang (tangd in the guest network)");
        vm.shutdown(Duration::from_secs(120)).unwrap();
    }
    assert_eq!(volume_key(&m.disk, &m.recovery, &work), vk);
    {
        let prompt = "Please unlock disk root";
        let vm = m.boot(false, None);
        wait_count(&vm, prompt, 1, Duration::from_secs(600));
        // Nothing unlocks it by itself.
        std::thread::sleep(Duration::from_secs(20));
        assert!(vm.wait_agent(Duration::from_secs(1)).is_err());
        vm.type_serial(b"0000-1111-2222-3333-4444-5555-6666-7777\n")
            .unwrap();
        wait_count(&vm, prompt, 2, Duration::from_secs(300));
        assert!(vm.wait_agent(Duration::from_secs(1)).is_err());
        let typed = Instant::now();
        vm.type_serial(format!("{}\n", m.recovery).as_bytes())
            .unwrap();
        vm.wait_agent(Duration::from_secs(600)).unwrap();
        figure(&format!(
            "encryption: recovery key typed at the console: guest agent up {:.0} s later",
            typed.elapsed().as_secs_f64()
        ));
        let log = std::fs::read_to_string(vm.serial_log()).unwrap_or_default();
        assert!(
            !log.contains(&m.recovery),
            "the recovery key was echoed on the console"
        );
        vm.shutdown(Duration::from_secs(120)).unwrap();
    }
    assert_eq!(volume_key(&m.disk, &m.recovery, &work), vk);
    eprintln!(
        "tang machine: whole test {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&m.dir);
    let _ = std::fs::remove_dir_all(&keys_dir);
}

fn run_ok(c: &mut Command) -> String {
    ok(c.output().unwrap())
}

/// `cmp` of `len` bytes from `from` in two files.
fn same_range(a: &Path, b: &Path, from: u64, len: u64) -> bool {
    Command::new("cmp")
        .arg(format!("--ignore-initial={from}"))
        .arg(format!("--bytes={len}"))
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn every_format_of_a_real_image_reads_back_as_its_disk() {
    // The redis image the other tests use, hard-linked (export never writes into its files).
    let dir = scratch().join("formats");
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(Command::new("cp").arg("-al").arg(image()).arg(&dir));
    let t = Instant::now();
    let text = ok(
        cmd(&["export", dir.to_str().unwrap(), "--format", "vhd,vmdk,gce"])
            .output()
            .unwrap(),
    );
    eprintln!("{text}export: {:.1} s", t.elapsed().as_secs_f64());
    let m = manifest(&dir);
    let arts = m["artifacts"].as_array().unwrap();
    let art = |f: &str| arts.iter().find(|a| a["format"] == f).unwrap().clone();
    let names: Vec<&str> = arts.iter().map(|a| a["file"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "ncimage-redis.qcow2",
            "ncimage-redis.raw",
            "ncimage-redis.vhd",
            "ncimage-redis.vmdk",
            "ncimage-redis.gce.tar.gz"
        ]
    );
    for a in arts {
        eprintln!(
            "export {:<6} {:>6.1} s",
            a["format"].as_str().unwrap(),
            a["seconds"].as_f64().unwrap()
        );
    }
    // Every artifact and the manifest verify with the standard tool.
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(&dir),
    );
    let raw = dir.join("ncimage-redis.raw");
    let raw_len = std::fs::metadata(&raw).unwrap().len();
    let raw_sha = art("raw")["sha256"].as_str().unwrap().to_string();
    assert!(raw_len.is_multiple_of(1 << 20));

    // qemu-img reads each disk format with the raw's size, and converting it back gives the
    // raw's bytes.
    for (fmt, qfmt) in [("qcow2", "qcow2"), ("vhd", "vpc"), ("vmdk", "vmdk")] {
        let file = dir.join(art(fmt)["file"].as_str().unwrap());
        let info: serde_json::Value = serde_json::from_str(&run_ok(
            Command::new("qemu-img")
                .args(["info", "--output=json", "-f", qfmt])
                .arg(&file),
        ))
        .unwrap();
        assert_eq!(info["format"], qfmt);
        assert_eq!(info["virtual-size"], raw_len, "{fmt}");
        assert_eq!(art(fmt)["disk_bytes"], raw_len, "{fmt}");
        if fmt == "vmdk" {
            assert_eq!(
                info["format-specific"]["data"]["create-type"],
                "streamOptimized"
            );
        }
        let back = scratch().join("formats-back.raw");
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", qfmt, "-O", "raw"])
                .arg(&file)
                .arg(&back),
        );
        assert_eq!(
            ncimage::export::sha256_file(&back).unwrap(),
            raw_sha,
            "{fmt} converted back to raw"
        );
        std::fs::remove_file(&back).unwrap();
    }
    // Azure: the VHD is the disk's bytes and a 512-byte fixed-disk footer giving its size.
    let vhd = dir.join("ncimage-redis.vhd");
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), raw_len + 512);
    assert!(same_range(&raw, &vhd, 0, raw_len));
    let footer = {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 512];
        std::fs::File::open(&vhd)
            .unwrap()
            .read_exact_at(&mut b, raw_len)
            .unwrap();
        b
    };
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u64::from_be_bytes(footer[40..48].try_into().unwrap()),
        raw_len,
        "original size"
    );
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        raw_len,
        "current size"
    );
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed disk"
    );

    // GCE: gzip is sound; GNU tar lists one sparse disk.raw of a whole number of GiB, which
    // extracts to the raw's partitions and boot code with a valid GPT at the new end.
    let tgz = dir.join("ncimage-redis.gce.tar.gz");
    run_ok(Command::new("gzip").arg("-t").arg(&tgz));
    let listing = run_ok(Command::new("tar").arg("-tvzf").arg(&tgz));
    let gce_len = raw_len.div_ceil(1 << 30) << 30;
    assert_eq!(art("gce")["disk_bytes"], gce_len);
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(listing.contains(&format!(" {gce_len} ")), "{listing}");
    assert!(listing.trim_end().ends_with(" disk.raw"), "{listing}");
    let header = run_ok(Command::new("sh").arg("-c").arg(format!(
        "zcat {} | head -c 512 | od -An -c -j 156 -N 1",
        tgz.display()
    )));
    assert_eq!(header.trim(), "S", "a GNU sparse entry");
    let x = scratch().join("formats-gce");
    let _ = std::fs::remove_dir_all(&x);
    std::fs::create_dir_all(&x).unwrap();
    run_ok(Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&x));
    let disk = x.join("disk.raw");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), gce_len);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < raw_len / 2, "extracted sparse");
    assert!(same_range(&raw, &disk, 0, 446), "MBR boot code");
    let parts = m["disk"]["partitions"].as_array().unwrap();
    let first = parts[0]["start_lba"].as_u64().unwrap() * 512;
    let last = parts.last().unwrap();
    let end = last["start_lba"].as_u64().unwrap() * 512 + last["size_bytes"].as_u64().unwrap();
    assert!(same_range(&raw, &disk, first, end - first), "partitions");
    let v = run_ok(Command::new("sgdisk").arg("-v").arg(&disk));
    assert!(v.contains("No problems found"), "{v}");
    let table = |f: &Path| -> Vec<String> {
        run_ok(Command::new("sgdisk").arg("-p").arg(f))
            .lines()
            .filter(|l| {
                l.contains("GUID") || l.trim_start().starts_with(|c: char| c.is_ascii_digit())
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(table(&disk), table(&raw));
    std::fs::remove_dir_all(&x).unwrap();

    // `build --format` writes only what it is asked for.
    let only = scratch().join("formats-vhd");
    ok(cmd(&[
        "build",
        "--role",
        ROLE,
        "--quiet",
        "--format",
        "vhd",
        "--out",
        only.to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let mut files: Vec<String> = std::fs::read_dir(&only)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["SHA256SUMS", "manifest.json", "ncimage-redis.vhd"]);
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(&only),
    );
    std::fs::remove_dir_all(&only).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Names in an initramfs, listed by the host's cpio and zstd: the uncompressed newc archives
/// at its start (walked here only to find where they end), then the compressed rest.
fn initramfs_listing(initrd: &Path) -> Vec<String> {
    let data = std::fs::read(initrd).unwrap();
    let mut pos = 0usize;
    loop {
        while pos < data.len() && data[pos] == 0 {
            pos += 1;
        }
        if !data[pos..].starts_with(b"070701") {
            break;
        }
        loop {
            let h = &data[pos..pos + 110];
            let field = |i: usize| {
                usize::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = &data[pos + 110..pos + 110 + namesize - 1];
            pos = (pos + 110 + namesize).div_ceil(4) * 4;
            pos = (pos + size).div_ceil(4) * 4;
            if name == b"TRAILER!!!" {
                break;
            }
        }
    }
    let dir = initrd.parent().unwrap();
    std::fs::write(dir.join("early.cpio"), &data[..pos]).unwrap();
    std::fs::write(dir.join("main.cpio.zst"), &data[pos..]).unwrap();
    let listing = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("set -e; cpio -t --quiet < early.cpio; zstd -dcq main.cpio.zst | cpio -t --quiet")
            .current_dir(dir),
    );
    listing.lines().map(String::from).collect()
}

#[test]
#[ignore = "builds an image: scripts/test"]
fn the_image_carries_cloud_datasources_drivers_and_a_serial_console() {
    let dir = image();
    let m = manifest(dir);
    let cloud = &m["cloud"];
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    // cloud-init lists every target's datasource (read from the image's cloud-init config);
    // NoCloud first, so a seed wins wherever one is attached.
    let ds = list(&cloud["datasources"]);
    assert_eq!(ds.first().map(String::as_str), Some("NoCloud"), "{ds:?}");
    for want in [
        "ConfigDrive",
        "OpenStack",
        "Ec2",
        "GCE",
        "Azure",
        "DigitalOcean",
        "Hetzner",
    ] {
        assert!(ds.iter().any(|d| d == want), "{want} missing from {ds:?}");
    }
    for want in ["tty0", "ttyS0"] {
        assert!(
            list(&cloud["consoles"]).iter().any(|c| c == want),
            "{cloud}"
        );
    }
    let kernel = cloud["kernel"].as_str().unwrap();

    // The /boot file system of the raw disk (plain ext4), read with debugfs.
    let raw = dir.join("ncimage-redis.raw");
    let boot = m["disk"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "boot")
        .unwrap()["start_lba"]
        .as_u64()
        .unwrap()
        * 512;
    let fs = format!("{}?offset={boot}", raw.display());
    let debugfs = |req: &str| run_ok(Command::new("debugfs").arg("-R").arg(req).arg(&fs));
    // GRUB boots the kernel with both consoles, the serial one last (/dev/console).
    let grub = debugfs("cat /grub/grub.cfg");
    let linux = grub
        .lines()
        .find(|l| l.trim_start().starts_with("linux "))
        .unwrap();
    assert!(
        linux.contains("console=tty0 console=ttyS0,115200n8"),
        "{grub}"
    );
    assert!(grub.contains("terminal_output serial"), "{grub}");

    let work = scratch().join("cloud-initrd");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let initrd = work.join("initrd.img");
    debugfs(&format!("dump /initrd.img-{kernel} {}", initrd.display()));
    let files = initramfs_listing(&initrd);
    let config = debugfs(&format!("cat /config-{kernel}"));
    let setting = |name: &str| -> String {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or("n")
            .to_string()
    };
    let in_initrd = |module: &str| {
        files.iter().any(|f| {
            f.rsplit('/')
                .next()
                .unwrap()
                .split(".ko")
                .next()
                .unwrap()
                .replace('-', "_")
                == module
                && f.contains(".ko")
        })
    };
    // Storage: built in, or a module in the initramfs, so the root is found on every target.
    for (module, option) in [
        ("virtio_pci", "CONFIG_VIRTIO_PCI"),
        ("virtio_blk", "CONFIG_VIRTIO_BLK"),
        ("virtio_scsi", "CONFIG_SCSI_VIRTIO"),
        ("nvme", "CONFIG_BLK_DEV_NVME"),
        ("hv_vmbus", "CONFIG_HYPERV"),
        ("hv_storvsc", "CONFIG_HYPERV_STORAGE"),
    ] {
        let s = setting(option);
        assert!(
            s == "y" || (s == "m" && in_initrd(module)),
            "{module}: {option}={s}, in the initramfs: {}",
            in_initrd(module)
        );
        let rec = cloud["drivers"]
            .as_object()
            .unwrap()
            .values()
            .any(|d| list(&d["initramfs"]).iter().any(|x| x == module));
        assert!(
            rec,
            "the manifest does not record {module} in the initramfs: {cloud}"
        );
    }
    // NICs: built for this kernel (the guest's modinfo proves the module files in the boot
    // checks); the manifest records them in the kernel's module tree.
    for (module, option) in [
        ("virtio_net", "CONFIG_VIRTIO_NET"),
        ("ena", "CONFIG_ENA_ETHERNET"),
        ("gve", "CONFIG_GVE"),
        ("hv_netvsc", "CONFIG_HYPERV_NET"),
    ] {
        assert!(["y", "m"].contains(&setting(option).as_str()), "{option}");
        let rec = cloud["drivers"]
            .as_object()
            .unwrap()
            .values()
            .any(|d| list(&d["kernel"]).iter().any(|x| x == module));
        assert!(rec, "the manifest does not record {module}: {cloud}");
    }
    assert_eq!(
        cloud["initramfs_modules"].as_u64().unwrap() as usize,
        files
            .iter()
            .filter(|f| f.contains(".ko"))
            .map(|f| f.rsplit('/').next().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    std::fs::remove_dir_all(&work).unwrap();
}
