//! Seeds: what makes a node itself at first boot. A NoCloud seed is a small FAT volume labelled
//! `cidata` with meta-data (instance id, hostname), network-config (v2) and user-data that writes
//! /etc/ncimage/node.json (0600: the node's identity and its role's secrets).

use std::path::Path;

use base64::Engine;

use crate::error::Result;
use crate::firstboot::NodeConfig;

pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// `instance_id` must change whenever the node should run first boot again.
pub fn nocloud(cfg: &NodeConfig, instance_id: &str, ssh_keys: &[String]) -> Seed {
    let n = &cfg.node;
    let meta_data = format!("instance-id: {instance_id}\nlocal-hostname: {}\n", n.name);
    let prefix = n.network.rsplit_once('/').map(|(_, p)| p).unwrap_or("24");
    // cloud-init's networkd renderer ignores name globs: match the NIC by its MAC address.
    let matcher = match &n.mac {
        Some(mac) => format!("macaddress: \"{}\"", mac.to_ascii_lowercase()),
        None => "name: \"en*\"".to_string(),
    };
    let mut network_config = format!(
        "version: 2\nethernets:\n  private:\n    match:\n      {matcher}\n    dhcp4: false\n    dhcp6: false\n    addresses: [\"{}/{prefix}\"]\n",
        n.address
    );
    if let Some(gw) = &n.gateway {
        network_config.push_str(&format!(
            "    routes:\n      - to: \"0.0.0.0/0\"\n        via: \"{gw}\"\n"
        ));
    }
    let json = serde_json::to_vec_pretty(cfg).expect("serialisable");
    let b64 = base64::engine::general_purpose::STANDARD.encode(json);
    let mut user_data = String::from(
        "#cloud-config\n# ncimage seed: this node's identity and its role's secrets.\n",
    );
    user_data.push_str(&format!(
        "write_files:\n  - path: /etc/ncimage/node.json\n    owner: root:root\n    permissions: \"0600\"\n    encoding: b64\n    content: {b64}\n"
    ));
    if !ssh_keys.is_empty() {
        user_data.push_str("ssh_authorized_keys:\n");
        for k in ssh_keys {
            user_data.push_str(&format!("  - \"{}\"\n", k.replace('"', "")));
        }
    }
    Seed {
        meta_data,
        user_data,
        network_config,
    }
}

/// How a seed is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// NoCloud: a FAT volume labelled `cidata`.
    Vfat,
    /// NoCloud: an ISO 9660 volume labelled `cidata` (xorriso).
    Iso,
    /// The #cloud-config alone, for a cloud's user-data.
    UserData,
}

impl Seed {
    /// Writes the seed in `format` to `path` (mode 0600: it holds secrets).
    pub fn write(&self, format: Format, path: &Path) -> Result<()> {
        match format {
            Format::Vfat => self.write_vfat(path),
            Format::Iso => self.write_iso(path),
            Format::UserData => write_private(path, self.user_data.as_bytes()),
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(crate::Error::io("writing", path))
}

/// Writes the seed of one node of a cluster spec, mode 0600, via a temporary file renamed into
/// place. Returns the node's role.
pub fn write_node(
    spec: &crate::spec::Spec,
    project: &crate::layer::Project,
    node: &str,
    secrets_file: &Path,
    mac: Option<String>,
    format: Format,
    out: &Path,
) -> Result<String> {
    let cluster = spec.cluster.as_ref().ok_or_else(|| {
        crate::Error::invalid(
            format!("{}: no [cluster] in this spec", spec.source),
            "use a cluster spec such as image-specs/lab.toml",
        )
    })?;
    let secrets = crate::secrets::load(secrets_file, &cluster.name)?;
    let cfg = crate::cluster::node_config(spec, project, node, &secrets, mac)?;
    let seed = nocloud(
        &cfg,
        &format!("ncimage-{}-{node}", cluster.name),
        &cluster.admin_ssh_keys,
    );
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".seed-")
        .tempfile_in(dir)
        .map_err(crate::Error::io("creating a file in", dir))?;
    seed.write(format, tmp.path())?;
    tmp.persist(out)
        .map_err(|e| crate::Error::io("writing", out)(e.error))?;
    Ok(cfg.node.role)
}

impl Seed {
    /// Writes the seed as a FAT volume labelled `cidata` (mode 0600: it holds secrets).
    pub fn write_vfat(&self, path: &Path) -> Result<()> {
        write_private(path, b"")?;
        crate::fat::make_fat(
            path,
            2 << 20,
            "cidata",
            0x5eed_0001,
            &[
                ("meta-data", self.meta_data.as_bytes()),
                ("user-data", self.user_data.as_bytes()),
                ("network-config", self.network_config.as_bytes()),
            ],
        )
    }

    /// Writes the seed as an ISO 9660 volume (Rock Ridge, Joliet) labelled `cidata`, mode 0600.
    pub fn write_iso(&self, path: &Path) -> Result<()> {
        let xorriso = crate::tools::require("xorriso")?;
        let src = crate::secrets::private_tempdir("ncimage-seed-")?;
        for (name, data) in [
            ("meta-data", &self.meta_data),
            ("user-data", &self.user_data),
            ("network-config", &self.network_config),
        ] {
            write_private(&src.path().join(name), data.as_bytes())?;
        }
        // xorriso replaces the file: create it 0600 first and let it write into it.
        write_private(path, b"")?;
        crate::tools::run(
            std::process::Command::new(xorriso)
                .args([
                    "-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock",
                ])
                .arg("-output")
                .arg(path)
                .arg(src.path()),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(crate::Error::io("protecting", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firstboot::Node;

    fn cfg() -> NodeConfig {
        NodeConfig {
            node: Node {
                name: "redis-1".into(),
                role: "redis".into(),
                address: "10.0.2.15".into(),
                network: "10.0.2.0/24".into(),
                gateway: Some("10.0.2.2".into()),
                mac: Some("52:54:00:12:34:56".into()),
                vars: Default::default(),
            },
            secrets: [("pw".to_string(), "s3cret".to_string())].into(),
            cluster: serde_json::Value::Null,
            encryption: Default::default(),
        }
    }

    #[test]
    fn user_data_carries_node_json_base64_and_no_plain_secret() {
        let s = nocloud(&cfg(), "i-1", &["ssh-ed25519 AAAA test".into()]);
        assert!(s.user_data.starts_with("#cloud-config\n"));
        assert!(!s.user_data.contains("s3cret"));
        let b64 = s
            .user_data
            .lines()
            .find_map(|l| l.trim().strip_prefix("content: "))
            .unwrap();
        let json = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let back: NodeConfig = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.secrets["pw"], "s3cret");
        assert!(
            s.meta_data.contains("instance-id: i-1")
                && s.meta_data.contains("local-hostname: redis-1")
        );
        assert!(s
            .network_config
            .contains("macaddress: \"52:54:00:12:34:56\""));
        assert!(
            s.network_config.contains("10.0.2.15/24")
                && s.network_config.contains("via: \"10.0.2.2\"")
        );
        assert!(s.user_data.contains("ssh-ed25519 AAAA test"));
    }

    #[test]
    fn iso_seed_is_private_labelled_and_readable() {
        use std::os::unix::fs::PermissionsExt;
        if crate::tools::which("xorriso").is_none() {
            panic!("xorriso is missing: scripts/setup-host installs it");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seed.iso");
        let s = nocloud(&cfg(), "i-1", &[]);
        s.write_iso(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let bytes = std::fs::read(&p).unwrap();
        // The primary volume descriptor at sector 16: type 1, "CD001", volume id at byte 40.
        let pvd = &bytes[16 * 2048..17 * 2048];
        assert_eq!(&pvd[..6], b"\x01CD001");
        assert_eq!(
            std::str::from_utf8(&pvd[40..72]).unwrap().trim_end(),
            "cidata"
        );
        // Read user-data back with xorriso.
        let out = std::process::Command::new("xorriso")
            .args(["-indev"])
            .arg(&p)
            .args(["-osirrox", "on", "-extract", "/user-data"])
            .arg(d.path().join("ud"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("ud")).unwrap(),
            s.user_data
        );
    }

    #[test]
    fn vfat_seed_is_private_and_labelled() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seed.img");
        nocloud(&cfg(), "i-1", &[]).write_vfat(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let f = std::fs::File::open(&p).unwrap();
        let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim().to_ascii_lowercase(), "cidata");
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec!["meta-data", "network-config", "user-data"]);
    }
}
