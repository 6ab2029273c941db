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
    Err(Error::invalid(format!("no image for role `{role}` in {}", dir.display()), format!("build it first: ncimage build --role {role}")))
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
    let secrets = Secrets::generate(&merged.secrets)?;
    let cfg = NodeConfig { node: test_node(&o.role, &merged), secrets: secrets.0.clone() };
    let work = tempfile::Builder::new().prefix("ncimage-test-").tempdir().map_err(Error::io("creating a temporary folder", std::env::temp_dir()))?;
    let seed_path = work.path().join("seed.img");
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
    seed::nocloud(&cfg, &format!("{}-{}", cfg.node.name, hex::encode(nonce)), &[]).write_vfat(&seed_path)?;

    say(&format!("booting {} ({:?}, {} MiB, {} vCPU) with a fresh seed for {}", disk.display(), o.firmware, o.memory_mib, o.cpus, cfg.node.name));
    let start = Instant::now();
    let vm = Vm::start(VmConfig {
        name: cfg.node.name.clone(),
        disk,
        extra_disks: vec![seed_path],
        firmware: o.firmware,
        memory_mib: o.memory_mib,
        cpus: o.cpus,
        workdir: work.path().join("vm"),
        network: true,
        kernel: None,
    })?;
    let deadline = start + o.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    vm.wait_agent(left())?;
    say(&format!("guest agent answered after {:.1} s", start.elapsed().as_secs_f64()));
    // Ready: systemd has finished starting (running or degraded).
    loop {
        crate::interrupt::check()?;
        let out = vm.sh("systemctl is-system-running --wait", left().min(Duration::from_secs(60)))?;
        let state = out.stdout.trim().to_string();
        if state == "running" || state == "degraded" {
            break;
        }
        if left().is_zero() {
            return Err(with_log(Error::Vm(format!("the guest is still `{state}` after {} s", o.timeout.as_secs())), &vm));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let ready_after = start.elapsed();
    say(&format!("ready after {:.1} s", ready_after.as_secs_f64()));

    let info_text = vm.read_file("/etc/ncimage/image.json")?;
    let info: ImageInfo = serde_json::from_slice(&info_text).map_err(|e| Error::Vm(format!("/etc/ncimage/image.json in the guest: {e}")))?;
    let mut ctx = firstboot::context(&cfg, &info);
    // What first boot read off the guest (its private interface), read off the guest here too.
    let nics = vm.sh("for i in /sys/class/net/*; do echo \"${i##*/} $(cat $i/address)\"; done", Duration::from_secs(30))?.stdout;
    if let Some(name) = nics.lines().find_map(|l| l.split_once(' ').filter(|(_, mac)| mac.eq_ignore_ascii_case(crate::qemu::TEST_MAC)).map(|(n, _)| n.to_string())) {
        ctx["host"]["interface"] = serde_json::Value::String(name);
    }
    let mut results = Vec::new();
    for l in &layers {
        for c in l.checks()? {
            crate::interrupt::check()?;
            let script = template::render(&format!("{}/checks.toml: {}", l.name, c.name), &c.run, &ctx)?;
            let r = match vm.sh(&script, Duration::from_secs(c.timeout)) {
                Ok(out) => judge(&c, &ctx, out.code, &out.stdout, &out.stderr)?,
                Err(e) => Some(format!("could not run: {e}")),
            };
            let detail = secrets.redact(&r.clone().unwrap_or_default());
            say(&format!("{} {} / {}{}", if r.is_none() { "ok  " } else { "FAIL" }, l.name, c.name, if detail.is_empty() { String::new() } else { format!("\n     {}", detail.replace('\n', "\n     ")) }));
            results.push(CheckResult { name: format!("{}/{}", l.name, c.name), ok: r.is_none(), detail });
        }
    }
    let analyze = vm.sh("systemd-analyze; systemd-analyze blame | head -n 5", Duration::from_secs(30)).map(|o| o.stdout).unwrap_or_default();
    say(&analyze);
    let failed = results.iter().filter(|r| !r.ok).count();
    let log = vm.serial_log().display().to_string();
    if failed > 0 {
        let tail = tail_file(vm.serial_log(), 30);
        say(&format!("--- last lines of the serial console ---\n{}", secrets.redact(&tail)));
        drop(vm);
        return Err(Error::Checks { failed, total: results.len(), log });
    }
    let _ = vm.shutdown(Duration::from_secs(30));
    say(&format!("{} passed, 0 failed ({} checks; ready after {:.1} s)", results.len(), results.len(), ready_after.as_secs_f64()));
    Ok(Report { ready_after, results, analyze })
}

/// None when the check passes, else why it failed.
fn judge(c: &layer::Check, ctx: &serde_json::Value, code: i32, stdout: &str, stderr: &str) -> Result<Option<String>> {
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
    let t = std::fs::read(p).map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

fn with_log(e: Error, vm: &Vm) -> Error {
    Error::Vm(format!("{e}\n--- last lines of the serial console ---\n{}", tail_file(vm.serial_log(), 25)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(judge(&check(Some("{{ node.name }}"), &[]), &ctx, 0, "redis-test\n", "").unwrap(), None);
        assert!(judge(&check(Some("x"), &[]), &ctx, 0, "y", "").unwrap().unwrap().contains("expected \"x\""));
        assert!(judge(&check(None, &[]), &ctx, 1, "", "boom").unwrap().unwrap().contains("exit 1"));
        assert!(judge(&check(None, &["NOAUTH"]), &ctx, 0, "(error) NOAUTH", "").unwrap().is_none());
        assert!(judge(&check(None, &[]), &ctx, 0, "a secret-leak", "").unwrap().is_some());
    }

    #[test]
    fn every_declared_check_renders_for_the_test_node() {
        let project = Project::locate(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")))).unwrap();
        for role in project.roles() {
            let layers = project.layers_for(&role).unwrap();
            let merged = layer::merge(&layers).unwrap();
            let cfg = NodeConfig { node: test_node(&role, &merged), secrets: Secrets::generate(&merged.secrets).unwrap().0 };
            let info = ImageInfo {
                role: role.clone(),
                spec: "default".into(),
                layers: vec![],
                firewall: merged.firewall.clone(),
                secrets: vec![],
                firstboot: vec![],
                reload_after_firstboot: vec![],
                ncimage_version: String::new(),
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
