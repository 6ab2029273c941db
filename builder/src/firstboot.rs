//! First boot, in the guest: `ncimage firstboot` renders the role's first-boot templates from
//! the node's seed (/etc/ncimage/node.json, written by cloud-init) and reloads what changed.
//! Idempotent: a reboot renders the same files and touches nothing.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::overlay::ImageInfo;
use crate::secrets::Secrets;
use crate::template;

/// The node's identity and secrets, as the seed delivers them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: Node,
    /// Only the secrets this node's role declares.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// The cluster's topology (settings and every node's name, role and address); null for a
    /// node booted alone (`ncimage test`).
    #[serde(default)]
    pub cluster: serde_json::Value,
    /// How this node's volumes unlock (the recovery key is in `secrets`); see rekey.rs.
    #[serde(default)]
    pub encryption: crate::rekey::NodeEncryption,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub role: String,
    /// Private address (no prefix).
    pub address: String,
    /// Private network in CIDR notation.
    pub network: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// MAC address of the private interface (matches the seed's network config to the NIC).
    #[serde(default)]
    pub mac: Option<String>,
    /// Role-specific settings of this node from the cluster spec (e.g. db_replica, server_id).
    #[serde(default)]
    pub vars: std::collections::BTreeMap<String, serde_json::Value>,
}

pub struct Paths {
    pub root: PathBuf,
    pub node: PathBuf,
    pub image: PathBuf,
}

impl Paths {
    pub fn under(root: &Path) -> Paths {
        Paths {
            root: root.into(),
            node: root.join("etc/ncimage/node.json"),
            image: root.join("etc/ncimage/image.json"),
        }
    }
}

/// The template context of first-boot files and of checks. `host` holds what first boot reads
/// off the machine itself: the name of the private interface.
pub fn context(node: &NodeConfig, info: &ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "node": node.node,
        "secrets": node.secrets,
        "cluster": node.cluster,
        "role": { "name": info.role, "firewall": info.firewall },
        "image": { "spec": info.spec, "layers": info.layers },
        "host": { "interface": private_interface(Path::new("/sys/class/net"), &node.node) },
    })
}

/// The interface that carries the private network: the one with the seed's MAC address, else
/// node.vars.interface, else eth0.
pub fn private_interface(sys_class_net: &Path, node: &Node) -> String {
    if let Some(mac) = &node.mac {
        for e in std::fs::read_dir(sys_class_net)
            .into_iter()
            .flatten()
            .flatten()
        {
            let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
            if addr.trim().eq_ignore_ascii_case(mac) {
                return e.file_name().to_string_lossy().to_string();
            }
        }
    }
    node.vars
        .get("interface")
        .and_then(|v| v.as_str())
        .unwrap_or("eth0")
        .to_string()
}

/// The image's plan (image.json) and the node's seed (node.json), parsed.
pub fn load(p: &Paths) -> Result<(ImageInfo, NodeConfig)> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(Error::io("reading", path));
    let info: ImageInfo = serde_json::from_str(&read(&p.image)?).map_err(|e| {
        Error::invalid(
            format!("{}: {e}", p.image.display()),
            "the image is damaged: rebuild it",
        )
    })?;
    let node: NodeConfig = serde_json::from_str(&read(&p.node)?).map_err(|e| {
        Error::invalid(
            format!("{}: {e}", p.node.display()),
            "the seed's node.json is malformed: regenerate the seed",
        )
    })?;
    Ok((info, node))
}

/// Renders every first-boot file; returns the paths that changed. With `apply`, also chowns
/// and reloads the units the image names.
pub fn run(p: &Paths, apply: bool) -> Result<Vec<String>> {
    let (info, node) = load(p)?;
    let read = |path: &Path| std::fs::read_to_string(path).map_err(Error::io("reading", path));
    if node.node.role != info.role {
        return Err(Error::invalid(
            format!(
                "this seed is for a `{}` node but the image is the `{}` role",
                node.node.role, info.role
            ),
            "boot the node with its role's image",
        ));
    }
    let missing: Vec<&String> = info
        .secrets
        .iter()
        .filter(|s| !node.secrets.contains_key(*s))
        .collect();
    if !missing.is_empty() {
        return Err(Error::invalid(
            format!(
                "the seed lacks secrets: {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "regenerate the node's seed",
        ));
    }
    let secrets = Secrets(node.secrets.clone());
    let ctx = context(&node, &info);
    let mut changed = Vec::new();
    for f in &info.firstboot {
        let tpl_path = p.root.join(f.template.trim_start_matches('/'));
        let text = read(&tpl_path)?;
        let rendered = template::render(&f.template, &text, &ctx).map_err(|e| match e {
            Error::Template { name, message } => Error::Template {
                name,
                message: secrets.redact(&message),
            },
            e => e,
        })?;
        let dest = p.root.join(f.path.trim_start_matches('/'));
        // A template that renders to nothing but white space means "this node has no such file"
        // (e.g. lsyncd's config on a node without a secondary): it is removed, not written.
        if rendered.trim().is_empty() {
            if dest.exists() {
                std::fs::remove_file(&dest).map_err(Error::io("removing", &dest))?;
                changed.push(f.path.clone());
            }
            continue;
        }
        let same = std::fs::read(&dest)
            .map(|old| old == rendered.as_bytes())
            .unwrap_or(false);
        if !same {
            write_atomic(&dest, rendered.as_bytes(), f.mode)?;
            changed.push(f.path.clone());
        }
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode))
            .map_err(Error::io("chmod", &dest))?;
        if apply {
            crate::tools::run(
                Command::new("chown")
                    .arg(format!("{}:{}", f.owner, f.group))
                    .arg(&dest),
            )?;
        }
    }
    if apply && changed.iter().any(|p| p.starts_with("/etc/systemd/")) {
        // A daemon-reload re-reads every unit and re-runs every generator: 6-7 s of a TCG
        // guest's CPU, on the node's way to its join. So only when systemd says it needs one.
        // A unit file systemd did not have (or had as not-found, e.g. named by another unit's
        // RequiresMountsFor=) it loads when asked for it, since its unit directories changed:
        // `systemctl show` asks. A drop-in, or a changed or removed unit file, sets
        // NeedDaemonReload.
        let units = systemd_units(&changed);
        let state = match units.as_slice() {
            [] => None,
            _ => crate::tools::run(
                Command::new("systemctl")
                    .args(["show", "-p", "LoadState", "-p", "NeedDaemonReload", "--"])
                    .args(&units),
            )
            .ok(),
        };
        if state.is_none_or(|out| needs_reload(&out, units.len())) {
            crate::tools::run(Command::new("systemctl").arg("daemon-reload"))?;
        }
        // A unit that only some nodes have (e.g. the NFS mount of the data directory) is
        // rendered at first boot: enable it as its [Install] says and queue its start. Units
        // ordered after it wait for it (ordering is evaluated when their jobs run).
        for unit in rendered_units(&p.root, &changed) {
            // --no-reload: systemd has the unit loaded (see above; a reload costs seconds).
            crate::tools::run(Command::new("systemctl").args(["enable", "--no-reload", &unit]))?;
            crate::tools::run(Command::new("systemctl").args(["start", "--no-block", &unit]))?;
        }
    }
    if apply && !changed.is_empty() {
        for unit in &info.reload_after_firstboot {
            crate::tools::run(Command::new("systemctl").args(["try-reload-or-restart", unit]))?;
        }
    }
    Ok(changed)
}

/// The units systemd knows `changed` paths under /etc/systemd as: a unit file or a drop-in
/// (`x.timer.d/y.conf` is x.timer's) in /etc/systemd/system. None for anything else there
/// (networkd's files, a wants/ link), which takes a daemon-reload to be sure of.
fn systemd_units(changed: &[String]) -> Vec<String> {
    let mut units = Vec::new();
    for p in changed.iter().filter(|p| p.starts_with("/etc/systemd/")) {
        let unit =
            p.strip_prefix("/etc/systemd/system/")
                .and_then(|rest| match rest.split_once('/') {
                    None => Some(rest),
                    Some((dir, _)) => dir.strip_suffix(".d"),
                });
        match unit {
            Some(u) if u.contains('.') => {
                if !units.iter().any(|x| x == u) {
                    units.push(u.to_string());
                }
            }
            _ => return Vec::new(),
        }
    }
    units
}

/// Whether `systemctl show -p LoadState -p NeedDaemonReload` of `count` units says a
/// daemon-reload is needed: a unit still not loaded (a not-found one systemd did not retry), or
/// one whose files changed under it. Anything unreadable: yes.
fn needs_reload(show: &str, count: usize) -> bool {
    let mut loaded = 0;
    for line in show.lines() {
        match line.trim().split_once('=') {
            Some(("LoadState", "loaded")) => loaded += 1,
            Some(("LoadState", _)) => return true,
            Some(("NeedDaemonReload", "no")) => {}
            Some(("NeedDaemonReload", _)) => return true,
            _ => {}
        }
    }
    loaded != count
}

/// Unit files (directly in /etc/systemd/system) among `changed` that still exist and have an
/// [Install] section.
fn rendered_units(root: &Path, changed: &[String]) -> Vec<String> {
    changed
        .iter()
        .filter_map(|p| p.strip_prefix("/etc/systemd/system/"))
        .filter(|name| !name.contains('/'))
        .filter(|name| {
            std::fs::read_to_string(root.join("etc/systemd/system").join(name))
                .map(|t| !crate::overlay::parse_install(&t).is_empty())
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect()
}

fn write_atomic(dest: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let tmp = dir.join(format!(
        ".{}.ncimage-tmp",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(Error::io("creating", &tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, dest).map_err(Error::io("renaming", dest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Firewall;
    use crate::overlay::FirstbootFile;

    fn setup(secret: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ncimage")).unwrap();
        std::fs::create_dir_all(r.join("usr/share/ncimage/firstboot/redis/etc/redis")).unwrap();
        std::fs::write(
            r.join("usr/share/ncimage/firstboot/redis/etc/redis/r.conf.tera"),
            "bind {{ node.address }}\npass {{ secrets.pw }}\n",
        )
        .unwrap();
        let info = ImageInfo {
            role: "redis".into(),
            spec: "default".into(),
            layers: vec!["base".into(), "redis".into()],
            firewall: Firewall::default(),
            secrets: vec!["pw".into()],
            firstboot: vec![FirstbootFile {
                template: "/usr/share/ncimage/firstboot/redis/etc/redis/r.conf.tera".into(),
                path: "/etc/redis/r.conf".into(),
                owner: "redis".into(),
                group: "redis".into(),
                mode: 0o640,
            }],
            join: vec![],
            reload_after_firstboot: vec![],
            ncimage_version: "0".into(),
            volumes: Vec::new(),
        };
        std::fs::write(
            r.join("etc/ncimage/image.json"),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
        let secrets = match secret {
            Some(s) => format!("{{\"pw\": \"{s}\"}}"),
            None => "{}".into(),
        };
        std::fs::write(
            r.join("etc/ncimage/node.json"),
            format!("{{\"node\": {{\"name\": \"redis-1\", \"role\": \"redis\", \"address\": \"10.0.0.5\", \"network\": \"10.0.0.0/24\"}}, \"secrets\": {secrets}}}"),
        )
        .unwrap();
        d
    }

    #[test]
    fn renders_once_with_mode_and_is_idempotent() {
        let d = setup(Some("s3cret"));
        let p = Paths::under(d.path());
        assert_eq!(
            run(&p, false).unwrap(),
            vec!["/etc/redis/r.conf".to_string()]
        );
        let out = d.path().join("etc/redis/r.conf");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "bind 10.0.0.5\npass s3cret\n"
        );
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(
            run(&p, false).unwrap().is_empty(),
            "second run changed files"
        );
    }

    #[test]
    fn rendered_units_with_install_are_found() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("etc/systemd/system");
        std::fs::create_dir_all(sys.join("x.service.d")).unwrap();
        std::fs::write(
            sys.join("a.mount"),
            "[Mount]\nWhat=x\n[Install]\nWantedBy=remote-fs.target\n",
        )
        .unwrap();
        std::fs::write(sys.join("b.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
        let changed: Vec<String> = ["a.mount", "b.service", "gone.mount", "x.service.d/y.conf"]
            .iter()
            .map(|n| format!("/etc/systemd/system/{n}"))
            .chain(["/etc/other.conf".to_string()])
            .collect();
        assert_eq!(
            rendered_units(d.path(), &changed),
            vec!["a.mount".to_string()]
        );
    }

    #[test]
    fn rendered_systemd_files_map_to_their_units() {
        let sys = |n: &str| format!("/etc/systemd/system/{n}");
        assert_eq!(
            systemd_units(&[
                sys("a.mount"),
                "/etc/other.conf".into(),
                sys("t.timer.d/schedule.conf"),
                sys("a.mount"),
            ]),
            vec!["a.mount".to_string(), "t.timer".to_string()]
        );
        // networkd's files or a wants/ link: not a unit systemd can be asked about.
        assert!(systemd_units(&["/etc/systemd/network/10-lan.network".into()]).is_empty());
        assert!(systemd_units(&[sys("a.mount"), sys("x.target.wants/a.mount")]).is_empty());
    }

    #[test]
    fn a_reload_only_when_systemd_needs_one() {
        let loaded = "LoadState=loaded\nNeedDaemonReload=no\n\n";
        assert!(!needs_reload(loaded, 1));
        assert!(!needs_reload(&loaded.repeat(2), 2));
        // A drop-in added to a loaded timer; a unit systemd did not retry; a unit missing.
        assert!(needs_reload("LoadState=loaded\nNeedDaemonReload=yes\n", 1));
        assert!(needs_reload(
            "LoadState=not-found\nNeedDaemonReload=no\n",
            1
        ));
        assert!(needs_reload(loaded, 2));
        assert!(needs_reload("", 1));
    }

    #[test]
    fn private_interface_is_found_by_mac() {
        let d = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("enp0s3", "52:54:00:12:34:56")] {
            std::fs::create_dir_all(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        let mut node = crate::vmtest::test_node("lb", &Default::default());
        assert_eq!(private_interface(d.path(), &node), "enp0s3");
        node.mac = Some("52:54:00:ff:ff:ff".into());
        assert_eq!(private_interface(d.path(), &node), "eth0");
        node.vars.insert("interface".into(), "ens3".into());
        assert_eq!(private_interface(d.path(), &node), "ens3");
    }

    #[test]
    fn a_template_rendering_empty_removes_its_file() {
        let d = setup(Some("x"));
        let p = Paths::under(d.path());
        run(&p, false).unwrap();
        let out = d.path().join("etc/redis/r.conf");
        assert!(out.exists());
        std::fs::write(
            d.path()
                .join("usr/share/ncimage/firstboot/redis/etc/redis/r.conf.tera"),
            "{% if node.vars.peer is defined %}peer{% endif %}\n",
        )
        .unwrap();
        assert_eq!(
            run(&p, false).unwrap(),
            vec!["/etc/redis/r.conf".to_string()]
        );
        assert!(!out.exists());
        assert!(run(&p, false).unwrap().is_empty());
    }

    #[test]
    fn missing_secret_and_wrong_role_are_refused() {
        let d = setup(None);
        let e = run(&Paths::under(d.path()), false).unwrap_err().to_string();
        assert!(e.contains("lacks secrets: pw"), "{e}");
        let d = setup(Some("x"));
        let node = d.path().join("etc/ncimage/node.json");
        let t = std::fs::read_to_string(&node)
            .unwrap()
            .replace("\"role\": \"redis\"", "\"role\": \"db\"");
        std::fs::write(&node, t).unwrap();
        assert!(run(&Paths::under(d.path()), false)
            .unwrap_err()
            .to_string()
            .contains("`db` node"));
    }
}
