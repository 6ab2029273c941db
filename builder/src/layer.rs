//! Layers: the data that makes an image what it is. A role (roles/<role>/role.toml) and a shared
//! overlay (overlays/<name>/layer.toml) have the same shape:
//!
//! - `role.toml` / `layer.toml`: packages, units to enable/disable/mask, units ordered after first
//!   boot, units reloaded after first boot, secrets the role receives, firewall ports, file owners;
//! - `tree/`: files copied into the image (`*.tera` rendered at build time, suffix dropped);
//! - `firstboot/`: templates rendered in the guest at first boot from the node's seed;
//! - `hooks/*.sh`: run inside the tree while the root filesystem is bootstrapped (cached);
//! - `checks.toml`: checks asserted on the booted VM.
//!
//! The builder knows nothing role-specific: adding a role is adding a folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub description: String,
    /// Shared overlays this role builds on, in order (roles only).
    #[serde(default)]
    pub layers: Vec<String>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub enable: Vec<String>,
    #[serde(default)]
    pub disable: Vec<String>,
    /// Units masked (linked to /dev/null), and generators when the name ends in `-generator`.
    #[serde(default)]
    pub mask: Vec<String>,
    /// Paths a package installs that the image must not have (e.g. a default site).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Units that need this node's first-boot files: they get Requires=/After= the first-boot unit.
    #[serde(default)]
    pub after_firstboot: Vec<String>,
    /// Units already running when first boot renders its files (reloaded or restarted if a file changed).
    #[serde(default)]
    pub reload_after_firstboot: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<SecretDecl>,
    #[serde(default)]
    pub firewall: Firewall,
    #[serde(default)]
    pub files: Vec<FileAttr>,
    /// Checkers run in the finished image tree at build time (see validate.rs).
    #[serde(default)]
    pub validate: Vec<crate::validate::Validate>,
    /// node.vars of the test node (`ncimage test`, build-time validation, `ncimage render`).
    #[serde(default)]
    pub test_vars: BTreeMap<String, serde_json::Value>,
    /// Software that is not a Debian package, fetched and verified at build time (archive.rs).
    #[serde(default)]
    pub archives: Vec<crate::archive::ArchiveDecl>,
    /// The role's place in a cluster: node counts, cluster settings it needs (cluster.rs).
    #[serde(default)]
    pub cluster: crate::cluster::RoleCluster,
    /// node.vars derived from the cluster spec: Tera expressions over `cluster` and `node`.
    #[serde(default)]
    pub node_vars: BTreeMap<String, String>,
    /// Build-time variables (`vars.*` in tree templates) with their defaults; a spec overrides
    /// them per role (`[roles.<role>.vars]`).
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Encrypted data volumes: a disk of their own, formatted LUKS2 at first boot (volume.rs).
    #[serde(default)]
    pub volumes: Vec<VolumeDecl>,
}

/// A data volume a role declares (`[[volumes]]`): its own disk, LUKS2 made at first boot under
/// the node's unlock policy, mounted at `mount` with what the image had there copied over,
/// and `services` started only once it is mounted.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeDecl {
    /// Short name: the disk's serial is `ncimage-<name>`, the mapping `data-<name>`.
    pub name: String,
    /// Absolute mount point.
    pub mount: String,
    /// Size of the disk `ncimage test` and `ncimage lab` attach.
    #[serde(default = "d_volume_size")]
    pub size: crate::spec::Size,
    /// Units ordered after the mount (RequiresMountsFor drop-ins).
    #[serde(default)]
    pub services: Vec<String>,
}

fn d_volume_size() -> crate::spec::Size {
    crate::spec::Size(1 << 30)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretDecl {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Random bytes behind the secret (rendered as hex).
    #[serde(default = "d_bytes")]
    pub bytes: usize,
    #[serde(default)]
    pub kind: SecretKind,
    /// For `ssh-public`: the ssh-ed25519 secret whose public half this is.
    #[serde(default)]
    pub of: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// Random bytes as hex.
    #[default]
    Hex,
    /// A self-signed TLS certificate and its private key (P-256), one PEM, for labs and tests;
    /// production seeds carry the real certificate.
    TlsPem,
    /// An OpenSSH ed25519 private key.
    SshEd25519,
    /// The public half of another secret's ssh-ed25519 key (`of`): what a node that only
    /// accepts that key receives (authorized_keys), never the private key.
    SshPublic,
}
fn d_bytes() -> usize {
    24
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    /// TCP ports open to the cluster's private network.
    #[serde(default)]
    pub private_tcp: Vec<u16>,
    #[serde(default)]
    pub private_udp: Vec<u16>,
    /// TCP ports open to everyone.
    #[serde(default)]
    pub public_tcp: Vec<u16>,
    /// IP protocols (by nft name, e.g. "vrrp") accepted from the private network.
    #[serde(default)]
    pub private_protocols: Vec<String>,
}

/// Owner and mode of files this layer writes (build-time or first-boot). `path` is an absolute
/// path in the image; a trailing `*` matches a prefix.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileAttr {
    pub path: String,
    #[serde(default = "d_root")]
    pub owner: String,
    #[serde(default = "d_root")]
    pub group: String,
    /// Octal, e.g. "0640".
    pub mode: String,
}
fn d_root() -> String {
    "root".into()
}

impl FileAttr {
    pub fn matches(&self, path: &str) -> bool {
        match self.path.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => self.path == path,
        }
    }
    pub fn mode_bits(&self) -> Result<u32> {
        u32::from_str_radix(self.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::invalid(
                    format!("file mode `{}` for {}", self.mode, self.path),
                    "write an octal mode such as \"0640\"",
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Overlay,
    Role,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub name: String,
    pub kind: Kind,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// One check asserted in the booted guest (checks.toml).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    /// Shell script run as root in the guest; a Tera template over `node`, `secrets`, `role`.
    pub run: String,
    /// Expected exit code.
    #[serde(default)]
    pub exit: i32,
    /// Expected stdout, trimmed.
    pub stdout: Option<String>,
    /// Each string must appear in stdout.
    #[serde(default)]
    pub contains: Vec<String>,
    /// No string may appear in stdout.
    #[serde(default)]
    pub not_contains: Vec<String>,
    /// Seconds.
    #[serde(default = "d_timeout")]
    pub timeout: u64,
}
fn d_timeout() -> u64 {
    30
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChecksFile {
    #[serde(default)]
    check: Vec<Check>,
}

/// Where roles/ and overlays/ live.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
}

impl Project {
    /// `explicit`, else $NCIMAGE_PROJECT, else the nearest ancestor of the current directory
    /// holding roles/ and overlays/, else the checkout this binary was built from.
    pub fn locate(explicit: Option<&Path>) -> Result<Project> {
        let candidates: Vec<PathBuf> = explicit
            .map(Path::to_path_buf)
            .into_iter()
            .chain(std::env::var_os("NCIMAGE_PROJECT").map(PathBuf::from))
            .chain(
                std::env::current_dir()
                    .ok()
                    .into_iter()
                    .flat_map(|d| d.ancestors().map(Path::to_path_buf).collect::<Vec<_>>()),
            )
            .chain(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .map(Path::to_path_buf),
            )
            .collect();
        if let Some(p) = explicit {
            if !is_project(p) {
                return Err(Error::invalid(
                    format!("{} holds no roles/ and overlays/ folders", p.display()),
                    "point --project at the ncimage checkout",
                ));
            }
        }
        candidates
            .into_iter()
            .find(|p| is_project(p))
            .map(|root| Project { root })
            .ok_or_else(|| {
                Error::invalid(
                    "no roles/ and overlays/ folders found",
                    "run ncimage from its checkout or pass --project",
                )
            })
    }

    pub fn roles(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("roles"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("role.toml").is_file())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// The layers of a role, shared overlays first, the role last.
    pub fn layers_for(&self, role: &str) -> Result<Vec<Layer>> {
        let roles = self.roles();
        if !roles.iter().any(|r| r == role) {
            return Err(Error::invalid(
                format!("unknown role `{role}`"),
                format!(
                    "known roles: {} (each is a folder roles/<role>/ with a role.toml)",
                    roles.join(", ")
                ),
            ));
        }
        let role_layer = self.load(role, Kind::Role)?;
        let mut layers = Vec::new();
        for name in &role_layer.manifest.layers {
            layers.push(self.load(name, Kind::Overlay)?);
        }
        layers.push(role_layer);
        check_files_have_templates(&layers)?;
        Ok(layers)
    }

    fn load(&self, name: &str, kind: Kind) -> Result<Layer> {
        let (dir, file) = match kind {
            Kind::Role => (self.root.join("roles").join(name), "role.toml"),
            Kind::Overlay => (self.root.join("overlays").join(name), "layer.toml"),
        };
        let path = dir.join(file);
        if !path.is_file() {
            return Err(Error::invalid(
                format!("{}: missing", path.display()),
                "a shared overlay is a folder overlays/<name>/ with a layer.toml; check the `layers` list of the role",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| {
            Error::toml(
                &path.display().to_string(),
                &text,
                &e,
                "see roles/redis/role.toml for the keys a layer takes",
            )
        })?;
        for f in &manifest.files {
            f.mode_bits()?;
        }
        crate::archive::check_decls(&path.display().to_string(), &manifest.archives)?;
        Ok(Layer {
            name: name.to_string(),
            kind,
            dir,
            manifest,
        })
    }
}

/// Every `[[files]]` entry that names one file (no `*`) must be a file some layer provides, in
/// tree/ or as a first-boot template: an entry without one means a template went missing.
fn check_files_have_templates(layers: &[Layer]) -> Result<()> {
    let mut provided = BTreeSet::new();
    for l in layers {
        for sub in ["tree", "firstboot"] {
            for (rel, _) in l.files(sub)? {
                let rel = rel.strip_suffix(".tera").unwrap_or(&rel).to_string();
                provided.insert(format!("/{rel}"));
            }
        }
    }
    for l in layers {
        for f in &l.manifest.files {
            if !f.path.ends_with('*') && !provided.contains(&f.path) {
                return Err(Error::invalid(
                    format!(
                        "{}: [[files]] {} names a file no layer provides: {}/firstboot{}.tera (or tree{}) is missing",
                        l.manifest_path().display(),
                        f.path,
                        l.source(),
                        f.path,
                        f.path
                    ),
                    "restore the template, or remove the [[files]] entry",
                ));
            }
        }
    }
    Ok(())
}

fn is_project(p: &Path) -> bool {
    p.join("roles").is_dir() && p.join("overlays").is_dir()
}

impl Layer {
    /// The layer's folder relative to the project, e.g. `roles/redis`.
    pub fn source(&self) -> String {
        match self.kind {
            Kind::Role => format!("roles/{}", self.name),
            Kind::Overlay => format!("overlays/{}", self.name),
        }
    }

    /// The layer's manifest file.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(self.manifest_file())
    }

    /// The layer's manifest file name (`role.toml` or `layer.toml`).
    pub fn manifest_file(&self) -> &'static str {
        match self.kind {
            Kind::Role => "role.toml",
            Kind::Overlay => "layer.toml",
        }
    }

    pub fn checks(&self) -> Result<Vec<Check>> {
        let path = self.dir.join("checks.toml");
        if !path.is_file() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
        let f: ChecksFile = toml::from_str(&text).map_err(|e| {
            Error::toml(
                &path.display().to_string(),
                &text,
                &e,
                "a check is [[check]] with name, run and stdout/contains/exit",
            )
        })?;
        Ok(f.check)
    }

    /// Files under `sub` (tree/, firstboot/, hooks/), relative paths sorted.
    pub fn files(&self, sub: &str) -> Result<Vec<(String, PathBuf)>> {
        let base = self.dir.join(sub);
        let mut out = Vec::new();
        if !base.is_dir() {
            return Ok(out);
        }
        for e in walkdir::WalkDir::new(&base).sort_by_file_name() {
            let e = e.map_err(|e| {
                Error::invalid(
                    format!("walking {}: {e}", base.display()),
                    "check the folder's permissions",
                )
            })?;
            if e.file_type().is_file() {
                let rel = e
                    .path()
                    .strip_prefix(&base)
                    .expect("under base")
                    .to_string_lossy()
                    .to_string();
                out.push((rel, e.path().to_path_buf()));
            }
        }
        Ok(out)
    }

    /// sha256 over a folder's files (names and contents), for cache keys and the manifest.
    pub fn digest(&self, sub: &str) -> Result<String> {
        let mut h = Sha256::new();
        for (rel, path) in self.files(sub)? {
            let data = std::fs::read(&path).map_err(Error::io("reading", &path))?;
            h.update(rel.as_bytes());
            h.update([0]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(&data);
        }
        Ok(hex::encode(h.finalize()))
    }
}

/// What a stack of layers asks for, merged in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Merged {
    pub packages: BTreeSet<String>,
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
    pub remove: Vec<String>,
    pub after_firstboot: Vec<String>,
    pub reload_after_firstboot: Vec<String>,
    pub secrets: Vec<SecretDecl>,
    pub firewall: Firewall,
    pub files: Vec<FileAttr>,
    pub test_vars: BTreeMap<String, serde_json::Value>,
    pub vars: BTreeMap<String, serde_json::Value>,
    pub node_vars: BTreeMap<String, String>,
    pub volumes: Vec<VolumeDecl>,
}

pub fn merge(layers: &[Layer]) -> Result<Merged> {
    let mut m = Merged::default();
    let mut seen = BTreeMap::new();
    for l in layers {
        let x = &l.manifest;
        m.packages.extend(x.packages.iter().cloned());
        m.enable.extend(x.enable.iter().cloned());
        m.disable.extend(x.disable.iter().cloned());
        m.mask.extend(x.mask.iter().cloned());
        m.remove
            .extend(x.remove.iter().map(|r| r.trim_matches('/').to_string()));
        m.after_firstboot.extend(x.after_firstboot.iter().cloned());
        m.reload_after_firstboot
            .extend(x.reload_after_firstboot.iter().cloned());
        for s in &x.secrets {
            if let Some(prev) = seen.insert(s.name.clone(), l.name.clone()) {
                return Err(Error::invalid(
                    format!(
                        "secret `{}` is declared by both {prev} and {}",
                        s.name, l.name
                    ),
                    "declare each secret once",
                ));
            }
            m.secrets.push(s.clone());
        }
        m.firewall.private_tcp.extend(&x.firewall.private_tcp);
        m.firewall.private_udp.extend(&x.firewall.private_udp);
        m.firewall.public_tcp.extend(&x.firewall.public_tcp);
        m.firewall
            .private_protocols
            .extend(x.firewall.private_protocols.iter().cloned());
        m.files.extend(x.files.iter().cloned());
        m.test_vars
            .extend(x.test_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.vars
            .extend(x.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.node_vars
            .extend(x.node_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        for v in &x.volumes {
            let ok_name = !v.name.is_empty()
                && v.name.len() <= 12
                && v.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !ok_name || !v.mount.starts_with('/') || v.mount == "/" || v.mount.contains("..") {
                return Err(Error::invalid(
                    format!(
                        "{}: volume `{}` at `{}`: a volume needs a short name (a-z, 0-9, up to 12) and an absolute mount point other than /",
                        l.name, v.name, v.mount
                    ),
                    "e.g. [[volumes]] name = \"db\", mount = \"/var/lib/mysql\"",
                ));
            }
            if m.volumes
                .iter()
                .any(|o| o.name == v.name || o.mount == v.mount)
            {
                return Err(Error::invalid(
                    format!(
                        "{}: volume `{}` ({}) is declared twice",
                        l.name, v.name, v.mount
                    ),
                    "declare each volume (name and mount point) once",
                ));
            }
            m.volumes.push(v.clone());
        }
    }
    for v in [
        &mut m.firewall.private_tcp,
        &mut m.firewall.private_udp,
        &mut m.firewall.public_tcp,
    ] {
        v.sort_unstable();
        v.dedup();
    }
    m.firewall.private_protocols.sort();
    m.firewall.private_protocols.dedup();
    Ok(m)
}

impl Merged {
    /// The last matching attribute wins (a role overrides its overlays).
    pub fn attr_for(&self, path: &str) -> Option<&FileAttr> {
        self.files.iter().rev().find(|f| f.matches(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> Project {
        Project::locate(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")))).unwrap()
    }

    #[test]
    fn unknown_role_lists_known_ones() {
        let e = project().layers_for("nosuchrole").unwrap_err();
        let (msg, help) = match &e {
            Error::Invalid { what, help } => (what.clone(), help.clone()),
            other => panic!("{other:?}"),
        };
        assert!(msg.contains("nosuchrole"));
        assert!(help.contains("redis"), "{help}");
    }

    #[test]
    fn redis_role_stacks_on_base() {
        let layers = project().layers_for("redis").unwrap();
        assert_eq!(layers.first().unwrap().name, "base");
        assert_eq!(layers.last().unwrap().kind, Kind::Role);
        let m = merge(&layers).unwrap();
        assert!(m.packages.contains("redis-server"));
        assert!(m.packages.contains("cryptsetup-initramfs"));
        assert!(m.firewall.private_tcp.contains(&22));
        assert!(m.secrets.iter().any(|s| s.name.starts_with("redis")));
    }

    #[test]
    fn file_attrs_match_exact_and_prefix_last_wins() {
        let a = FileAttr {
            path: "/etc/redis/*".into(),
            owner: "redis".into(),
            group: "redis".into(),
            mode: "0640".into(),
        };
        let b = FileAttr {
            path: "/etc/redis/x.conf".into(),
            owner: "root".into(),
            group: "root".into(),
            mode: "0600".into(),
        };
        let m = Merged {
            files: vec![a.clone(), b.clone()],
            ..Default::default()
        };
        assert_eq!(m.attr_for("/etc/redis/x.conf"), Some(&b));
        assert_eq!(m.attr_for("/etc/redis/y.conf"), Some(&a));
        assert_eq!(m.attr_for("/etc/other"), None);
        assert_eq!(a.mode_bits().unwrap(), 0o640);
        let bad = FileAttr {
            mode: "rw-r".into(),
            ..a
        };
        assert!(bad.mode_bits().is_err());
    }

    #[test]
    fn duplicate_secret_is_an_error() {
        let s = SecretDecl {
            name: "x".into(),
            description: String::new(),
            bytes: 8,
            kind: SecretKind::Hex,
            of: None,
        };
        let mk = |n: &str| Layer {
            name: n.into(),
            kind: Kind::Overlay,
            dir: PathBuf::new(),
            manifest: Manifest {
                secrets: vec![s.clone()],
                ..Default::default()
            },
        };
        assert!(merge(&[mk("a"), mk("b")])
            .unwrap_err()
            .to_string()
            .contains("both a and b"));
    }
}
