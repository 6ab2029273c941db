//! Encrypted data volumes, in the guest: `ncimage volumes` (ncimage-volumes.service, every boot,
//! before the services that use them) makes each volume the image declares (role.toml
//! `[[volumes]]`) on its own disk, found by its serial (`ncimage-<name>`):
//!
//! - first time: LUKS2 with a random key file kept on the root (/etc/ncimage/volume-keys/
//!   <name>.key, 0400: the root is encrypted and unlocks under the node's policy, so the volume
//!   does too) and the node's recovery key as a second keyslot; both keys are generated, so
//!   both keyslots use PBKDF2 with 1000 iterations (`luks::GENERATED_KEY_PBKDF_ARGS`);
//!   ext4 inside, with what the image had at the mount point copied over; crypttab and fstab
//!   lines so that systemd opens and mounts it at every later boot;
//! - later boots: nothing to make; the unit waits for the volume's mount (crypttab and fstab say
//!   `nofail`, so a missing disk does not stop the boot: only the volume's services fail).
//!
//! The services a volume names get drop-ins (build time) ordering them after this unit and
//! RequiresMountsFor= its mount point, so they never start on the root's copy.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::layer::VolumeDecl;
use crate::tools;

pub fn mapping(v: &VolumeDecl) -> String {
    format!("data-{}", v.name)
}

pub fn serial(v: &VolumeDecl) -> String {
    format!("ncimage-{}", v.name)
}

/// The crypttab line of a volume.
pub fn crypttab_line(v: &VolumeDecl, luks_uuid: &str) -> String {
    format!(
        "{} UUID={luks_uuid} /etc/ncimage/volume-keys/{}.key luks,discard,nofail\n",
        mapping(v),
        v.name
    )
}

/// The fstab line of a volume.
pub fn fstab_line(v: &VolumeDecl) -> String {
    format!(
        "/dev/mapper/{} {} ext4 defaults,nodev,nosuid,nofail 0 2\n",
        mapping(v),
        v.mount
    )
}

/// Whether `table` (crypttab or fstab) already has a line for the mapping or mount.
pub fn has_line(table: &str, first_field: &str) -> bool {
    table
        .lines()
        .any(|l| l.split_whitespace().next() == Some(first_field))
}

fn run(cmd: &mut Command) -> Result<String> {
    tools::run(cmd)
}

fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(Error::io("opening", path))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(Error::io("writing", path))
}

/// Makes (first boot) and checks every volume of the image. Returns one line per volume.
pub fn run_all(root: &Path, pbkdf: &[String]) -> Result<Vec<String>> {
    let (info, node) = crate::firstboot::load(&crate::firstboot::Paths::under(root))?;
    let mut lines = Vec::new();
    for v in &info.volumes {
        lines.push(make(root, v, &node, pbkdf)?);
    }
    Ok(lines)
}

fn make(
    root: &Path,
    v: &VolumeDecl,
    node: &crate::firstboot::NodeConfig,
    pbkdf: &[String],
) -> Result<String> {
    let map = mapping(v);
    let crypttab = root.join("etc/crypttab");
    let fstab = root.join("etc/fstab");
    let ct = std::fs::read_to_string(&crypttab).map_err(Error::io("reading", &crypttab))?;
    if has_line(&ct, &map) {
        let mounted =
            || run(Command::new("findmnt").args(["-no", "SOURCE", &v.mount])).unwrap_or_default();
        let mut src = mounted();
        if src.trim().is_empty() {
            // nofail: the boot does not wait for the volume; its mount unit (which pulls in
            // systemd-cryptsetup@) is started here, and this waits for it.
            let unit =
                run(Command::new("systemd-escape").args(["--path", "--suffix=mount", &v.mount]))?;
            let _ = run(Command::new("systemctl").args(["start", unit.trim()]));
            src = mounted();
        }
        return if src.trim() == format!("/dev/mapper/{map}") {
            Ok(format!("volume {}: {} on {map} (LUKS2)", v.name, v.mount))
        } else {
            Err(Error::Vm(format!(
                "volume {}: {} is not mounted from /dev/mapper/{map} (found `{}`)",
                v.name,
                v.mount,
                src.trim()
            )))
        };
    }
    let disk = PathBuf::from(format!("/dev/disk/by-id/virtio-{}", serial(v)));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !disk.exists() {
        if Instant::now() >= deadline {
            return Err(Error::invalid(
                format!(
                    "volume {}: no disk with serial {} ({} not found)",
                    v.name,
                    serial(v),
                    disk.display()
                ),
                "attach a data disk with that serial (ncimage test and ncimage lab do)",
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let recovery = node
        .secrets
        .get(crate::rekey::RECOVERY_SECRET)
        .ok_or_else(|| {
            Error::invalid(
                "the seed has no recovery key (luks-recovery)",
                "regenerate the node's seed",
            )
        })?;
    crate::rekey::check_recovery_key(recovery)?;
    let dev = std::fs::canonicalize(&disk).map_err(Error::io("resolving", &disk))?;
    let dev = dev.to_string_lossy().to_string();
    let keys = root.join("etc/ncimage/volume-keys");
    std::fs::create_dir_all(&keys).map_err(Error::io("creating", &keys))?;
    let key = keys.join(format!("{}.key", v.name));
    if !key.exists() {
        let mut k = [0u8; 64];
        getrandom::fill(&mut k).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
        let tmp = keys.join(format!(".{}.key", v.name));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)
            .map_err(Error::io("creating", &tmp))?;
        f.write_all(&k)
            .and_then(|_| f.sync_all())
            .map_err(Error::io("writing", &tmp))?;
        std::fs::rename(&tmp, &key).map_err(Error::io("renaming", &key))?;
    }
    // A power loss may have left a formatted volume: format only what is not LUKS yet, or
    // what our key does not open.
    let is_ours = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&dev)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !is_ours {
        run(Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode", "--type", "luks2"])
            .args(["--label", &map])
            .args(pbkdf)
            .arg("--key-file")
            .arg(&key)
            .arg(&dev))?;
    }
    // The recovery key as a second keyslot (also after a power loss between the two).
    {
        let rec = root
            .join("run/ncimage")
            .join(format!("{}.recovery", v.name));
        std::fs::create_dir_all(rec.parent().expect("parent"))
            .map_err(Error::io("creating", &rec))?;
        let _ = std::fs::remove_file(&rec);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&rec)
            .and_then(|mut f| f.write_all(recovery.trim().as_bytes()))
            .map_err(Error::io("writing", &rec))?;
        let has_recovery = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&rec)
            .arg(&dev)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let r = if has_recovery {
            Ok(String::new())
        } else {
            run(Command::new("cryptsetup")
                .args(["luksAddKey", "--batch-mode"])
                .args(pbkdf)
                .arg("--key-file")
                .arg(&key)
                .arg(&dev)
                .arg(&rec))
        };
        let _ = std::fs::remove_file(&rec);
        r?;
    }
    if !Path::new("/dev/mapper").join(&map).exists() {
        run(Command::new("cryptsetup")
            .args(["open", "--key-file"])
            .arg(&key)
            .arg(&dev)
            .arg(&map))?;
    }
    let mapped = format!("/dev/mapper/{map}");
    let has_fs = run(Command::new("blkid").args(["-o", "value", "-s", "TYPE", &mapped]))
        .map(|t| t.trim() == "ext4")
        .unwrap_or(false);
    if !has_fs {
        run(Command::new("mkfs.ext4").args(["-q", "-L", &v.name, &mapped]))?;
    }
    // What the image has at the mount point (e.g. a database's initial files) moves over.
    let staging = root.join("run/ncimage").join(format!("vol-{}", v.name));
    std::fs::create_dir_all(&staging).map_err(Error::io("creating", &staging))?;
    run(Command::new("mount").arg(&mapped).arg(&staging))?;
    // The mount point holds exactly what the image had there: no mkfs `lost+found` (MariaDB
    // would list it as a database, `#mysql50#lost+found`, and a replica's seeding from the
    // primary's dump fails on it). e2fsck makes it again if it ever needs one.
    // (Also when a power loss came between mkfs and here; a lost+found with files in it stays.)
    let lf = staging.join("lost+found");
    match std::fs::remove_dir(&lf) {
        Err(e)
            if e.kind() != std::io::ErrorKind::NotFound
                && e.kind() != std::io::ErrorKind::DirectoryNotEmpty =>
        {
            let _ = run(Command::new("umount").arg(&staging));
            return Err(Error::io("removing", &lf)(e));
        }
        _ => {}
    }
    let mount = root.join(v.mount.trim_start_matches('/'));
    std::fs::create_dir_all(&mount).map_err(Error::io("creating", &mount))?;
    let copied = run(Command::new("cp")
        .args(["-a", "--"])
        .arg(format!("{}/.", mount.display()))
        .arg(&staging))
    .and_then(|_| {
        run(Command::new("chown")
            .arg(format!("--reference={}", mount.display()))
            .arg(&staging))
    })
    .and_then(|_| {
        run(Command::new("chmod")
            .arg(format!("--reference={}", mount.display()))
            .arg(&staging))
    });
    run(Command::new("umount").arg(&staging))?;
    copied?;
    let uuid = run(Command::new("cryptsetup").args(["luksUUID", &dev]))?;
    append(&crypttab, &crypttab_line(v, uuid.trim()))?;
    let ft = std::fs::read_to_string(&fstab).map_err(Error::io("reading", &fstab))?;
    if !has_line(&ft, &mapped) {
        append(&fstab, &fstab_line(v))?;
    }
    // No daemon-reload: this boot's mount comes from fstab through mount(8) (systemd tracks it
    // as it appears); the next boot's generators read the new lines. A reload re-runs every
    // generator and re-reads every unit: 14 s of a first boot under TCG.
    run(Command::new("mount").arg(&v.mount))?;
    Ok(format!(
        "volume {}: {} on {map} (LUKS2, made at first boot)",
        v.name, v.mount
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeDecl {
        toml::from_str(
            "name = \"db\"\nmount = \"/var/lib/mysql\"\nservices = [\"mariadb.service\"]",
        )
        .unwrap()
    }

    #[test]
    fn table_lines_name_the_mapping_key_and_mount() {
        let v = vol();
        assert_eq!(v.size.0, 1 << 30);
        assert_eq!(serial(&v), "ncimage-db");
        assert_eq!(
            crypttab_line(&v, "u-1"),
            "data-db UUID=u-1 /etc/ncimage/volume-keys/db.key luks,discard,nofail\n"
        );
        assert_eq!(
            fstab_line(&v),
            "/dev/mapper/data-db /var/lib/mysql ext4 defaults,nodev,nosuid,nofail 0 2\n"
        );
        assert!(has_line(
            "# c\nroot UUID=x none luks\ndata-db UUID=u /k luks\n",
            "data-db"
        ));
        assert!(!has_line("root UUID=x none luks\n# data-db\n", "data-db"));
    }
}
