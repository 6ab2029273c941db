//! `ncimage test`: boots a built image under QEMU with a fresh NoCloud seed (a test node with
//! newly generated secrets), waits until the guest is ready, and asserts the declared checks of
//! every layer inside it through the guest agent. QEMU and every temporary file go away on
//! success, failure or Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::firstboot::{self, Node, NodeConfig};
use crate::layer::{self, Project};
use crate::overlay::ImageInfo;
use crate::qemu::{Firmware, Vm, VmConfig};
use crate::secrets::Secrets;
use crate::{seed, template};

pub struct Options {
    pub role: String,
    pub project: Project,
    /// Folder of a built image (manifest.json, ncimage-<role>.qcow2 or .raw).
    pub image_dir: PathBuf,
    pub firmware: Firmware,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    pub quiet: bool,
    /// The test node's unlock policy (the spec's for the role). A policy with tpm2 gets a
    /// vTPM (swtpm) when swtpm is installed.
    pub policy: crate::rekey::UnlockPolicy,
    /// The NoCloud seed's filesystem (vfat or ISO 9660).
    pub seed: seed::Format,
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug)]
pub struct Report {
    pub ready_after: Duration,
    pub results: Vec<CheckResult>,
    pub analyze: String,
}

/// The single test node: user-mode networking (restrict=on) is 10.0.2.0/24, the guest 10.0.2.15.
/// Its vars are the role's `test_vars`.
pub fn test_node(role: &str, merged: &layer::Merged) -> Node {
    Node {
        name: format!("{role}-test"),
        role: role.into(),
        address: "10.0.2.15".into(),
        network: "10.0.2.0/24".into(),
        gateway: Some("10.0.2.2".into()),
        mac: Some(crate::qemu::TEST_MAC.into()),
        vars: merged.test_vars.clone(),
    }
}

pub fn image_disk(dir: &Path, role: &str) -> Result<PathBuf> {
    for ext in ["qcow2", "raw"] {
        let p = dir.join(format!("ncimage-{role}.{ext}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::invalid(
        format!("no image for role `{role}` in {}", dir.display()),
        format!("build it first: ncimage build --role {role}"),
    ))
}

pub fn run(o: &Options) -> Result<Report> {
    let layers = o.project.layers_for(&o.role)?;
    let merged = layer::merge(&layers)?;
    let disk = image_disk(&o.image_dir, &o.role)?;
    let say = |s: &str| {
        if !o.quiet {
            println!("{s}");
        }
    };
    let mut secrets = Secrets::generate(&merged.secrets)?;
    secrets.0.insert(
        crate::rekey::RECOVERY_SECRET.into(),
        crate::rekey::new_recovery_key()?,
    );
    let cfg = NodeConfig {
        node: test_node(&o.role, &merged),
        secrets: secrets.0.clone(),
        cluster: serde_json::Value::Null,
        encryption: crate::rekey::NodeEncryption {
            policy: o.policy.clone(),
        },
    };
    let work = tempfile::Builder::new()
        .prefix("ncimage-test-")
        .tempdir()
        .map_err(Error::io(
            "creating a temporary folder",
            std::env::temp_dir(),
        ))?;
    let seed_path = work.path().join("seed.img");
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
    seed::nocloud(
        &cfg,
        &format!("{}-{}", cfg.node.name, hex::encode(nonce)),
        &[],
    )
    .write(o.seed, &seed_path)?;

    // Host ends of two forwards (127.0.0.1 only): SSH, declared by every image, and a port no
    // layer declares, for the firewall's traffic test. A port picked here can be taken by another
    // process (a test booting beside this one) before QEMU binds it: then pick again.
    let tpm =
        (o.policy.tpm2 && crate::tools::which("swtpm").is_some()).then(|| work.path().join("tpm"));
    let data_disks = data_disks(&merged.volumes, work.path())?;
    let mut attempt = 0;
    let (vm, start, ssh_port, probe_port) = loop {
        attempt += 1;
        let [ssh_port, probe_port] = free_ports::<2>()?;
        say(&format!(
            "booting {} ({:?}, {} MiB, {} vCPU) with a fresh seed for {}",
            disk.display(),
            o.firmware,
            o.memory_mib,
            o.cpus,
            cfg.node.name
        ));
        let start = Instant::now();
        match Vm::start(VmConfig {
            name: cfg.node.name.clone(),
            disk: disk.clone(),
            extra_disks: vec![seed_path.clone()],
            firmware: o.firmware,
            memory_mib: o.memory_mib,
            cpus: o.cpus,
            workdir: work.path().join("vm"),
            network: true,
            forwards: vec![(ssh_port, 22), (probe_port, PROBE_PORT)],
            kernel: None,
            lan: None,
            tpm: tpm.clone(),
            guest_services: Vec::new(),
            data_disks: data_disks.clone(),
        }) {
            Ok(vm) => break (vm, start, ssh_port, probe_port),
            Err(e) if attempt < 3 && e.to_string().contains("Could not set up host forwarding") => {
                say("a forwarded port was taken before QEMU bound it; picking new ports");
            }
            Err(e) => return Err(e),
        }
    };
    let deadline = start + o.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    vm.wait_agent(left())?;
    if vm.restarts() > 0 {
        say(&format!(
            "QEMU aborted on a known emulator defect and was started again {} time(s) on the same disks (see qemu::EMULATOR_FAULTS)",
            vm.restarts()
        ));
    }
    say(&format!(
        "guest agent answered after {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    // Ready: systemd has finished starting (running or degraded).
    loop {
        crate::interrupt::check()?;
        // First boot re-encrypts the root (minutes under TCG): ask again every 50 s.
        let out = vm.sh(
            "timeout 50 systemctl is-system-running --wait",
            left().min(Duration::from_secs(70)),
        )?;
        let state = out.stdout.trim().to_string();
        if state == "running" || state == "degraded" {
            break;
        }
        if left().is_zero() {
            return Err(with_log(
                Error::Vm(format!(
                    "the guest is still `{state}` after {} s",
                    o.timeout.as_secs()
                )),
                &vm,
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let ready_after = start.elapsed();
    say(&format!("ready after {:.1} s", ready_after.as_secs_f64()));

    let info_text = vm.read_file("/etc/ncimage/image.json")?;
    let info: ImageInfo = serde_json::from_slice(&info_text)
        .map_err(|e| Error::Vm(format!("/etc/ncimage/image.json in the guest: {e}")))?;
    let mut ctx = firstboot::context(&cfg, &info);
    // What first boot read off the guest (its private interface), read off the guest here too.
    let nics = vm
        .sh(
            "for i in /sys/class/net/*; do echo \"${i##*/} $(cat $i/address)\"; done",
            Duration::from_secs(30),
        )?
        .stdout;
    if let Some(name) = nics.lines().find_map(|l| {
        l.split_once(' ')
            .filter(|(_, mac)| mac.eq_ignore_ascii_case(crate::qemu::TEST_MAC))
            .map(|(n, _)| n.to_string())
    }) {
        ctx["host"]["interface"] = serde_json::Value::String(name);
    }
    let mut results = firewall_traffic(&vm, &info, ssh_port, probe_port);
    for r in &results {
        say(&format!(
            "{} firewall / {}{}",
            if r.ok { "ok  " } else { "FAIL" },
            r.name,
            if r.ok {
                String::new()
            } else {
                format!("\n     {}", r.detail)
            }
        ));
    }
    for l in &layers {
        for c in l.checks()? {
            crate::interrupt::check()?;
            let script =
                template::render(&format!("{}/checks.toml: {}", l.name, c.name), &c.run, &ctx)?;
            let r = match vm.sh(&script, Duration::from_secs(c.timeout)) {
                Ok(out) => judge(&c, &ctx, out.code, &out.stdout, &out.stderr)?,
                Err(e) => Some(format!("could not run: {e}")),
            };
            let detail = secrets.redact(&r.clone().unwrap_or_default());
            say(&format!(
                "{} {} / {}{}",
                if r.is_none() { "ok  " } else { "FAIL" },
                l.name,
                c.name,
                if detail.is_empty() {
                    String::new()
                } else {
                    format!("\n     {}", detail.replace('\n', "\n     "))
                }
            ));
            results.push(CheckResult {
                name: format!("{}/{}", l.name, c.name),
                ok: r.is_none(),
                detail,
            });
        }
    }
    let analyze = vm
        .sh(
            "systemd-analyze; systemd-analyze blame | head -n 5",
            Duration::from_secs(30),
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
    say(&analyze);
    let failed = results.iter().filter(|r| !r.ok).count();
    let log = vm.serial_log().display().to_string();
    if failed > 0 {
        let tail = tail_file(vm.serial_log(), 30);
        say(&format!(
            "--- last lines of the serial console ---\n{}",
            secrets.redact(&tail)
        ));
        drop(vm);
        return Err(Error::Checks {
            failed,
            total: results.len(),
            log,
        });
    }
    let _ = vm.shutdown(Duration::from_secs(30));
    say(&format!(
        "{} passed, 0 failed ({} checks; ready after {:.1} s)",
        results.len(),
        results.len(),
        ready_after.as_secs_f64()
    ));
    Ok(Report {
        ready_after,
        results,
        analyze,
    })
}

/// A sparse raw disk in `dir` per data volume of the role (serial `ncimage-<name>`).
pub fn data_disks(volumes: &[layer::VolumeDecl], dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut v = Vec::new();
    for vol in volumes {
        let p = dir.join(format!("volume-{}.raw", vol.name));
        if !p.exists() {
            std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(vol.size.0))
                .map_err(Error::io("creating", &p))?;
        }
        v.push((p, crate::volume::serial(vol)));
    }
    Ok(v)
}

/// A port no layer declares (the traffic test listens there in the guest).
const PROBE_PORT: u16 = 7777;

/// `N` distinct free ports on 127.0.0.1: every listener is held until all are picked, so the
/// kernel cannot hand out one port twice.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let bind =
        || std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("binding", "127.0.0.1:0"));
    let listeners = (0..N).map(|_| bind()).collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l
            .local_addr()
            .map_err(Error::io("binding", "127.0.0.1:0"))?
            .port();
    }
    Ok(ports)
}

/// Sends a line to 127.0.0.1:port and returns what comes back within `wait`.
fn exchange(port: u16, line: &[u8], wait: Duration) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(5),
    ) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(wait));
    let _ = s.write_all(line);
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
        Err(_) => String::new(),
    }
}

/// Real traffic through the guest's firewall, from the private network (user-mode networking
/// delivers host connections from 10.0.2.2): SSH, declared, answers; a listener on a port no
/// layer declares gets nothing through, and does once that port is opened by hand.
fn firewall_traffic(vm: &Vm, info: &ImageInfo, ssh_port: u16, probe_port: u16) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let mut push = |name: &str, ok: bool, detail: String| {
        out.push(CheckResult {
            name: name.into(),
            ok,
            detail,
        })
    };
    let banner = exchange(ssh_port, b"", Duration::from_secs(10));
    push(
        "SSH (declared) answers from the private network",
        banner.starts_with("SSH-2.0-"),
        format!("got {banner:?}"),
    );
    if info.firewall.private_tcp.contains(&PROBE_PORT)
        || info.firewall.public_tcp.contains(&PROBE_PORT)
    {
        push(
            "probe port is undeclared",
            false,
            format!("port {PROBE_PORT} is declared by a layer: pick another probe port"),
        );
        return out;
    }
    let started = vm.sh(
        &format!("systemd-run --quiet --unit=ncimage-probe /usr/bin/systemd-socket-activate --accept --inetd -l {PROBE_PORT} /bin/cat"),
        Duration::from_secs(30),
    );
    if let Err(e) = started.as_ref().map_err(|e| e.to_string()).and_then(|o| {
        if o.code == 0 {
            Ok(())
        } else {
            Err(o.stderr.clone())
        }
    }) {
        push(
            "an undeclared port is dropped",
            false,
            format!("could not start the probe listener: {e}"),
        );
        return out;
    }
    let blocked = exchange(probe_port, b"ncimage-probe\n", Duration::from_secs(8));
    push(
        "an undeclared port is dropped by nftables",
        blocked.is_empty(),
        format!("the probe answered {blocked:?}"),
    );
    let opened = vm.sh(
        &format!("nft insert rule inet filter input tcp dport {PROBE_PORT} accept"),
        Duration::from_secs(30),
    );
    let echoed = exchange(probe_port, b"ncimage-probe\n", Duration::from_secs(8));
    push(
        "the same port answers once opened (the drop was the firewall's)",
        opened.map(|o| o.code == 0).unwrap_or(false) && echoed.starts_with("ncimage-probe"),
        format!("got {echoed:?}"),
    );
    let _ = vm.sh(&format!("systemctl stop ncimage-probe.service; nft delete rule inet filter input handle $(nft -a list chain inet filter input | sed -n 's/.*tcp dport {PROBE_PORT} accept # handle //p')"), Duration::from_secs(30));
    out
}

/// None when the check passes, else why it failed.
pub(crate) fn judge(
    c: &layer::Check,
    ctx: &serde_json::Value,
    code: i32,
    stdout: &str,
    stderr: &str,
) -> Result<Option<String>> {
    let r = |s: &str| template::render(&c.name, s, ctx);
    let got = stdout.trim();
    let mut why = Vec::new();
    if code != c.exit {
        why.push(format!("exit {code}, expected {}", c.exit));
    }
    if let Some(want) = &c.stdout {
        let want = r(want)?;
        if got != want.trim() {
            why.push(format!("stdout {got:?}, expected {:?}", want.trim()));
        }
    }
    for s in &c.contains {
        let s = r(s)?;
        if !stdout.contains(&s) {
            why.push(format!("stdout lacks {s:?}: {got:?}"));
        }
    }
    for s in &c.not_contains {
        let s = r(s)?;
        if stdout.contains(&s) {
            why.push(format!("stdout has {s:?}: {got:?}"));
        }
    }
    if why.is_empty() {
        Ok(None)
    } else {
        if !stderr.trim().is_empty() {
            why.push(format!("stderr: {}", stderr.trim()));
        }
        Ok(Some(why.join("; ")))
    }
}

fn tail_file(p: &Path, n: usize) -> String {
    let t = std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

fn with_log(e: Error, vm: &Vm) -> Error {
    Error::Vm(format!(
        "{e}\n--- last lines of the serial console ---\n{}",
        tail_file(vm.serial_log(), 25)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        // The CI failure this guards against: two forwards given the same host port.
        for _ in 0..200 {
            let [a, b, c] = free_ports::<3>().unwrap();
            assert!(a != b && b != c && a != c, "{a} {b} {c}");
        }
    }

    fn check(stdout: Option<&str>, contains: &[&str]) -> layer::Check {
        layer::Check {
            name: "c".into(),
            run: String::new(),
            exit: 0,
            stdout: stdout.map(String::from),
            contains: contains.iter().map(|s| s.to_string()).collect(),
            not_contains: vec!["secret-leak".into()],
            timeout: 5,
        }
    }

    #[test]
    fn judge_compares_trimmed_stdout_templates_and_exit() {
        let ctx = serde_json::json!({"node": {"name": "redis-test"}});
        assert_eq!(
            judge(
                &check(Some("{{ node.name }}"), &[]),
                &ctx,
                0,
                "redis-test\n",
                ""
            )
            .unwrap(),
            None
        );
        assert!(judge(&check(Some("x"), &[]), &ctx, 0, "y", "")
            .unwrap()
            .unwrap()
            .contains("expected \"x\""));
        assert!(judge(&check(None, &[]), &ctx, 1, "", "boom")
            .unwrap()
            .unwrap()
            .contains("exit 1"));
        assert!(
            judge(&check(None, &["NOAUTH"]), &ctx, 0, "(error) NOAUTH", "")
                .unwrap()
                .is_none()
        );
        assert!(judge(&check(None, &[]), &ctx, 0, "a secret-leak", "")
            .unwrap()
            .is_some());
    }

    #[test]
    fn every_declared_check_renders_for_the_test_node() {
        let project =
            Project::locate(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")))).unwrap();
        for role in project.roles() {
            let layers = project.layers_for(&role).unwrap();
            let merged = layer::merge(&layers).unwrap();
            let cfg = NodeConfig {
                node: test_node(&role, &merged),
                secrets: Secrets::generate(&merged.secrets).unwrap().0,
                cluster: serde_json::Value::Null,
                encryption: Default::default(),
            };
            let info = ImageInfo {
                role: role.clone(),
                spec: "default".into(),
                layers: vec![],
                firewall: merged.firewall.clone(),
                secrets: vec![],
                firstboot: vec![],
                join: Vec::new(),
                reload_after_firstboot: vec![],
                ncimage_version: String::new(),
                volumes: Vec::new(),
            };
            let ctx = firstboot::context(&cfg, &info);
            let mut n = 0;
            for l in &layers {
                for c in l.checks().unwrap() {
                    template::render(&c.name, &c.run, &ctx).unwrap();
                    n += 1;
                }
            }
            assert!(n >= 10, "{role}: only {n} checks");
        }
    }
}
