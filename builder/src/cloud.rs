//! What an image carries to run in the clouds: the cloud-init datasources it lists, the
//! drivers of each target in the kernel's module tree and in the initramfs, its consoles.
//! Layers declare what they need (`cloud.toml`); the build reads the finished trees (the root
//! tar, the initrd in the /boot tar, the kernel command line), stops when something declared
//! is missing, and records what it found in the manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A layer's `cloud.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wanted {
    /// cloud-init datasources the image must list (`datasource_list`).
    #[serde(default)]
    pub datasources: Vec<String>,
    /// Consoles the kernel command line must name (`console=`, without options).
    #[serde(default)]
    pub consoles: Vec<String>,
    /// Per target (virtio, nvme, ...): modules needed to find the root (in the initramfs) and
    /// modules needed after it (in the kernel's module tree).
    #[serde(default)]
    pub drivers: BTreeMap<String, WantedDrivers>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WantedDrivers {
    #[serde(default)]
    pub initramfs: Vec<String>,
    #[serde(default)]
    pub kernel: Vec<String>,
}

/// What the built image carries (the manifest's `cloud`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CloudInfo {
    /// cloud-init's `datasource_list` as the image's configuration sets it (ds-identify picks
    /// among them at boot).
    pub datasources: Vec<String>,
    /// `console=` of the kernel command line, in order (the last one is /dev/console).
    pub consoles: Vec<String>,
    pub kernel: String,
    /// Per target: which of the declared modules are in the initramfs and which in the
    /// kernel's module tree (built-in modules count as both).
    pub drivers: BTreeMap<String, FoundDrivers>,
    /// Number of kernel modules in the initramfs.
    pub initramfs_modules: usize,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FoundDrivers {
    pub initramfs: Vec<String>,
    pub kernel: Vec<String>,
}

/// Loads and merges the `cloud.toml` of every layer that has one.
pub fn wanted(layers: &[crate::layer::Layer]) -> Result<(Wanted, Vec<PathBuf>)> {
    let mut w = Wanted::default();
    let mut files = Vec::new();
    for l in layers {
        let p = l.dir.join("cloud.toml");
        if !p.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(Error::io("reading", &p))?;
        let one: Wanted = toml::from_str(&text).map_err(|e| {
            Error::toml(
                &p.display().to_string(),
                &text,
                &e,
                "keys: datasources, consoles, [drivers.<target>] initramfs, kernel",
            )
        })?;
        w.datasources.extend(one.datasources);
        w.consoles.extend(one.consoles);
        for (t, d) in one.drivers {
            let e = w.drivers.entry(t).or_default();
            e.initramfs.extend(d.initramfs);
            e.kernel.extend(d.kernel);
        }
        files.push(p);
    }
    Ok((w, files))
}

/// A module's name as the kernel knows it (`-` and `_` are the same).
fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = base
        .strip_suffix(".ko")
        .or_else(|| base.strip_suffix(".ko.xz"))
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// What the root tree holds: cloud-init config files, module names, built-in modules, kernel.
#[derive(Debug, Default)]
struct RootScan {
    cloud_cfg: BTreeMap<String, String>,
    modules: BTreeSet<String>,
    builtin: BTreeSet<String>,
    kernels: BTreeSet<String>,
}

fn scan_root(root_tar: &Path) -> Result<RootScan> {
    let f = std::fs::File::open(root_tar).map_err(Error::io("opening", root_tar))?;
    let mut a = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut s = RootScan::default();
    for e in a.entries().map_err(Error::io("reading", root_tar))? {
        let mut e = e.map_err(Error::io("reading", root_tar))?;
        let path = e.path().map_err(Error::io("reading", root_tar))?;
        let p = path.to_string_lossy();
        let p = p
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        let rest = p
            .strip_prefix("usr/lib/modules/")
            .or_else(|| p.strip_prefix("lib/modules/"));
        if let Some(rest) = rest {
            if let Some((kver, file)) = rest.split_once('/') {
                s.kernels.insert(kver.to_string());
                if file == "modules.builtin" {
                    let mut t = String::new();
                    e.read_to_string(&mut t)
                        .map_err(Error::io("reading", root_tar))?;
                    s.builtin.extend(t.lines().filter_map(module_name));
                } else if let Some(m) = module_name(file) {
                    s.modules.insert(m);
                }
            }
            continue;
        }
        if (p == "etc/cloud/cloud.cfg"
            || (p.starts_with("etc/cloud/cloud.cfg.d/") && p.ends_with(".cfg")))
            && e.header().entry_type().is_file()
        {
            let mut t = String::new();
            e.read_to_string(&mut t)
                .map_err(Error::io("reading", root_tar))?;
            s.cloud_cfg.insert(p, t);
        }
    }
    Ok(s)
}

/// cloud-init's `datasource_list` after merging cloud.cfg and cloud.cfg.d/*.cfg in order (the
/// last file that sets it wins). Only the one-line form is read, as cloud-init advises.
pub fn datasource_list(files: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut order: Vec<&String> = files
        .keys()
        .filter(|k| *k == "etc/cloud/cloud.cfg")
        .collect();
    order.extend(files.keys().filter(|k| *k != "etc/cloud/cloud.cfg"));
    let mut list = Vec::new();
    for f in order {
        for line in files[f].lines() {
            let Some(v) = line.strip_prefix("datasource_list:") else {
                continue;
            };
            let v = v.split('#').next().unwrap_or("").trim();
            let inner = v
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .ok_or_else(|| {
                    Error::invalid(
                        format!("/{f}: datasource_list is not a one-line list"),
                        "write it as datasource_list: [NoCloud, ..., None] (cloud-init's ds-identify reads only that form)",
                    )
                })?;
            list = inner
                .split(',')
                .map(|d| d.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
                .filter(|d| !d.is_empty())
                .collect();
        }
    }
    Ok(list)
}

/// The `console=` devices of a kernel command line, without their options.
pub fn consoles(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("console="))
        .map(|c| c.split(',').next().unwrap_or(c).to_string())
        .collect()
}

/// Names of the files in an initramfs: concatenated newc cpio archives, each uncompressed or
/// compressed (zstd through the `zstd` tool, gzip).
pub fn initramfs_files(initrd: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(initrd).map_err(Error::io("reading", initrd))?;
    let bad = |what: String| {
        Error::invalid(
            format!("{}: {what}", initrd.display()),
            "the initramfs must be newc cpio archives, uncompressed or compressed with zstd or gzip (COMPRESS=zstd)",
        )
    };
    let mut names = Vec::new();
    let mut pos = 0usize;
    loop {
        while pos < data.len() && data[pos] == 0 {
            pos += 1;
        }
        let rest = &data[pos..];
        if rest.is_empty() {
            break;
        }
        if rest.starts_with(b"070701") {
            let mut r = std::io::Cursor::new(rest);
            cpio_names(&mut r, &mut names).map_err(|e| bad(e.to_string()))?;
            pos += r.position() as usize;
            continue;
        }
        // A compressed archive runs to the end of the file.
        if rest.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            crate::tools::require("zstd")?;
            let mut child = Command::new("zstd")
                .args(["-dcq"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(Error::io("running zstd on", initrd))?;
            let mut stdin = child.stdin.take().expect("piped");
            let owned = rest.to_vec();
            let feeder = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&owned);
            });
            let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
            let r = cpio_all(&mut out, &mut names);
            let _ = std::io::copy(&mut out, &mut std::io::sink());
            let _ = feeder.join();
            let status = child.wait().map_err(Error::io("running zstd on", initrd))?;
            r.map_err(|e| bad(e.to_string()))?;
            if !status.success() {
                return Err(bad(format!("zstd failed ({status})")));
            }
        } else if rest.starts_with(&[0x1f, 0x8b]) {
            let mut d = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(rest));
            cpio_all(&mut d, &mut names).map_err(|e| bad(e.to_string()))?;
        } else {
            return Err(bad(format!(
                "unknown data at byte {pos} (starts {:02x?})",
                &rest[..rest.len().min(4)]
            )));
        }
        break;
    }
    Ok(names)
}

/// Every cpio archive in a stream (archives follow each other, padded with zeros).
fn cpio_all<R: std::io::BufRead>(r: &mut R, names: &mut Vec<String>) -> std::io::Result<()> {
    loop {
        // Skip padding; stop at the end.
        loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let zeros = buf.iter().take_while(|b| **b == 0).count();
            let all = zeros == buf.len();
            r.consume(zeros);
            if !all {
                break;
            }
        }
        cpio_names(r, names)?;
    }
}

/// One newc cpio archive up to its trailer: appends the names; leaves `r` after the trailer.
fn cpio_names<R: Read>(r: &mut R, names: &mut Vec<String>) -> std::io::Result<()> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    loop {
        let mut h = [0u8; 110];
        r.read_exact(&mut h)?;
        if &h[..6] != b"070701" && &h[..6] != b"070702" {
            return Err(invalid("not a newc cpio header"));
        }
        let field = |i: usize| -> std::io::Result<u64> {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i])
                .map_err(|_| invalid("bad cpio header"))?;
            u64::from_str_radix(s, 16).map_err(|_| invalid("bad cpio header"))
        };
        let size = field(6)?;
        let namesize = field(11)?;
        let name_pad = (4 - (110 + namesize) % 4) % 4;
        let mut name = vec![0u8; (namesize + name_pad) as usize];
        r.read_exact(&mut name)?;
        let name =
            String::from_utf8_lossy(&name[..namesize.saturating_sub(1) as usize]).into_owned();
        let data_pad = (4 - size % 4) % 4;
        let skip = size + data_pad;
        let copied = std::io::copy(&mut r.take(skip), &mut std::io::sink())?;
        if copied != skip {
            return Err(invalid("truncated cpio archive"));
        }
        if name == "TRAILER!!!" {
            return Ok(());
        }
        names.push(name);
    }
}

/// Reads the built trees, checks them against `wanted` and returns what they carry.
/// `initrd` is the initramfs (extracted from the /boot tree by the caller).
pub fn inspect(
    root_tar: &Path,
    boot_tar: &Path,
    work: &Path,
    cmdline: &str,
    wanted: &Wanted,
    declared_in: &[PathBuf],
) -> Result<CloudInfo> {
    let (root, initrd_files) = std::thread::scope(|s| -> Result<_> {
        let root = s.spawn(|| scan_root(root_tar));
        let initrd = extract_initrd(boot_tar, work)?;
        let files = initramfs_files(&initrd)?;
        let _ = std::fs::remove_file(&initrd);
        Ok((root.join().expect("scan thread")?, files))
    })?;
    let in_initrd: BTreeSet<String> = initrd_files.iter().filter_map(|f| module_name(f)).collect();
    let kernel = root.kernels.iter().next_back().cloned().unwrap_or_default();
    let datasources = datasource_list(&root.cloud_cfg)?;
    let consoles = consoles(cmdline);
    let declared = declared_in
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut missing = Vec::new();
    for d in &wanted.datasources {
        if !datasources.contains(d) {
            missing.push(format!(
                "cloud-init datasource {d} (datasource_list is [{}])",
                datasources.join(", ")
            ));
        }
    }
    for c in &wanted.consoles {
        if !consoles.contains(c) {
            missing.push(format!("console={c} on the kernel command line"));
        }
    }
    let mut drivers = BTreeMap::new();
    for (target, w) in &wanted.drivers {
        let mut found = FoundDrivers::default();
        for m in w.initramfs.iter().chain(&w.kernel) {
            let n = m.replace('-', "_");
            let builtin = root.builtin.contains(&n);
            if in_initrd.contains(&n) || builtin {
                found.initramfs.push(m.clone());
            } else if w.initramfs.contains(m) {
                missing.push(format!("{target}: module {m} in the initramfs"));
            }
            if root.modules.contains(&n) || builtin {
                found.kernel.push(m.clone());
            } else {
                missing.push(format!("{target}: module {m} in the kernel {kernel}"));
            }
        }
        drivers.insert(target.clone(), found);
    }
    if !missing.is_empty() {
        return Err(Error::invalid(
            format!("the image lacks what {declared} asks for: {}", missing.join("; ")),
            "add the package or configuration that provides it (kernel modules: initramfs-tools MODULES=most keeps storage drivers in the initramfs)",
        ));
    }
    Ok(CloudInfo {
        datasources,
        consoles,
        kernel,
        drivers,
        initramfs_modules: in_initrd.len(),
    })
}

/// Copies the initramfs `/boot/initrd.img` points at (or the only `initrd.img-*`) out of the
/// /boot tar into `work`.
fn extract_initrd(boot_tar: &Path, work: &Path) -> Result<PathBuf> {
    let open = || -> Result<tar::Archive<std::io::BufReader<std::fs::File>>> {
        let f = std::fs::File::open(boot_tar).map_err(Error::io("opening", boot_tar))?;
        Ok(tar::Archive::new(std::io::BufReader::new(f)))
    };
    let norm = |p: &Path| p.to_string_lossy().trim_start_matches("./").to_string();
    let mut target: Option<String> = None;
    let mut images = Vec::new();
    for e in open()?.entries().map_err(Error::io("reading", boot_tar))? {
        let e = e.map_err(Error::io("reading", boot_tar))?;
        let p = norm(&e.path().map_err(Error::io("reading", boot_tar))?);
        if p == "initrd.img" {
            target = e
                .link_name()
                .ok()
                .flatten()
                .map(|l| norm(&l).rsplit('/').next().unwrap_or("").to_string());
        } else if p.starts_with("initrd.img-") && e.header().entry_type().is_file() {
            images.push(p);
        }
    }
    let want = match (target, images.as_slice()) {
        (Some(t), _) => t,
        (None, [one]) => one.clone(),
        _ => {
            return Err(Error::invalid(
                format!(
                    "/boot has {} initramfs images and no initrd.img link",
                    images.len()
                ),
                "the base hook links /boot/initrd.img to the one initramfs",
            ))
        }
    };
    for e in open()?.entries().map_err(Error::io("reading", boot_tar))? {
        let mut e = e.map_err(Error::io("reading", boot_tar))?;
        if norm(&e.path().map_err(Error::io("reading", boot_tar))?) == want {
            let out = work.join("cloud-initrd.img");
            let mut f = std::fs::File::create(&out).map_err(Error::io("creating", &out))?;
            std::io::copy(&mut e, &mut f).map_err(Error::io("writing", &out))?;
            return Ok(out);
        }
    }
    Err(Error::invalid(
        format!("/boot/initrd.img points at {want}, which is not in /boot"),
        "the base hook links /boot/initrd.img to the one initramfs",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_last_file_setting_datasource_list_wins() {
        let f = cfg(&[
            ("etc/cloud/cloud.cfg", "datasource_list: [ Ec2, None ]\n"),
            (
                "etc/cloud/cloud.cfg.d/90-x.cfg",
                "# c\ndatasource_list: [NoCloud, 'GCE', \"Azure\", None]  # the list\n",
            ),
            (
                "etc/cloud/cloud.cfg.d/05_logging.cfg",
                "datasource_list: [Oracle]\n",
            ),
        ]);
        assert_eq!(
            datasource_list(&f).unwrap(),
            ["NoCloud", "GCE", "Azure", "None"]
        );
        assert!(datasource_list(&cfg(&[("etc/cloud/cloud.cfg", "x: 1\n")]))
            .unwrap()
            .is_empty());
        let e = datasource_list(&cfg(&[(
            "etc/cloud/cloud.cfg.d/9.cfg",
            "datasource_list:\n  - NoCloud\n",
        )]))
        .unwrap_err();
        assert!(
            e.to_string().contains("/etc/cloud/cloud.cfg.d/9.cfg"),
            "{e}"
        );
    }

    #[test]
    fn consoles_of_a_command_line() {
        assert_eq!(
            consoles("root=/dev/mapper/root ro console=tty0 console=ttyS0,115200n8"),
            ["tty0", "ttyS0"]
        );
        assert!(consoles("ro quiet").is_empty());
    }

    #[test]
    fn module_names_ignore_compression_and_dashes() {
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-core.ko.xz").unwrap(),
            "nvme_core"
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci.ko").unwrap(),
            "virtio_pci"
        );
        assert_eq!(module_name("x/ena.ko.zst").unwrap(), "ena");
        assert!(module_name("modules.dep").is_none());
    }

    /// A root tar and a /boot tar shaped like the build's, with `modules` in the module tree,
    /// `in_initrd` in the initramfs and `cfg` as cloud-init's ncimage config.
    fn trees(d: &Path, modules: &[&str], in_initrd: &[&str], cfg: &str) -> (PathBuf, PathBuf) {
        let d = &tempfile::tempdir_in(d).unwrap().keep();
        let add = |b: &mut tar::Builder<std::fs::File>, path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, data).unwrap();
        };
        let root = d.join("root.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&root).unwrap());
        add(
            &mut b,
            "./etc/cloud/cloud.cfg",
            b"datasource_list: [Ec2, None]\n",
        );
        add(
            &mut b,
            "./etc/cloud/cloud.cfg.d/90-ncimage.cfg",
            cfg.as_bytes(),
        );
        for m in modules {
            add(
                &mut b,
                &format!("./usr/lib/modules/6.1-k/kernel/drivers/{m}.ko.xz"),
                b"x",
            );
        }
        add(
            &mut b,
            "./usr/lib/modules/6.1-k/modules.builtin",
            b"kernel/drivers/virtio/virtio_pci.ko\n",
        );
        b.finish().unwrap();
        let tree = d.join("initrd-tree");
        for m in in_initrd {
            let p = tree.join(format!("usr/lib/modules/6.1-k/kernel/drivers/{m}.ko.xz"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        std::fs::create_dir_all(&tree).unwrap();
        let o = Command::new("sh")
            .arg("-c")
            .arg("find . | sort | cpio -o -H newc --quiet | zstd -q -c > ../initrd")
            .current_dir(&tree)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let boot = d.join("boot.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&boot).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "./initrd.img", "initrd.img-6.1-k")
            .unwrap();
        add(
            &mut b,
            "./initrd.img-6.1-k",
            &std::fs::read(d.join("initrd")).unwrap(),
        );
        add(&mut b, "./initrd.img-6.0-old", b"not read");
        b.finish().unwrap();
        (root, boot)
    }

    fn want() -> Wanted {
        toml::from_str(
            r#"
datasources = ["NoCloud", "GCE"]
consoles = ["ttyS0"]
[drivers.nvme]
initramfs = ["nvme", "virtio_pci"]
[drivers.ena]
kernel = ["ena"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_image_is_read_checked_and_recorded() {
        let d = tempfile::tempdir().unwrap();
        let (root, boot) = trees(
            d.path(),
            &["nvme/host/nvme", "net/ena/ena"],
            &["nvme/host/nvme", "net/ena/ena"],
            "datasource_list: [NoCloud, GCE, None]\n",
        );
        let decl = [PathBuf::from("base/cloud.toml")];
        let cmdline = "root=/dev/mapper/root ro console=tty0 console=ttyS0,115200n8";
        let info = inspect(&root, &boot, d.path(), cmdline, &want(), &decl).unwrap();
        assert_eq!(info.datasources, ["NoCloud", "GCE", "None"]);
        assert_eq!(info.consoles, ["tty0", "ttyS0"]);
        assert_eq!(info.kernel, "6.1-k");
        assert_eq!(info.initramfs_modules, 2);
        // virtio_pci is built in: in both places.
        assert_eq!(info.drivers["nvme"].initramfs, ["nvme", "virtio_pci"]);
        assert_eq!(info.drivers["nvme"].kernel, ["nvme", "virtio_pci"]);
        assert_eq!(info.drivers["ena"].initramfs, ["ena"]);
        assert_eq!(info.drivers["ena"].kernel, ["ena"]);

        // A storage driver missing from the initramfs, a NIC driver missing from the kernel,
        // a datasource and a console not configured: one error naming each and the file.
        let (root, boot) = trees(
            d.path(),
            &["nvme/host/nvme"],
            &[],
            "datasource_list: [NoCloud, None]\n",
        );
        let e = inspect(&root, &boot, d.path(), "ro console=tty0", &want(), &decl)
            .unwrap_err()
            .to_string();
        for needle in [
            "base/cloud.toml",
            "nvme: module nvme in the initramfs",
            "ena: module ena in the kernel 6.1-k",
            "datasource GCE (datasource_list is [NoCloud, None])",
            "console=ttyS0",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(!e.contains("virtio_pci"), "{e}");
    }

    /// An initramfs like initramfs-tools makes: an uncompressed cpio, then a zstd one.
    #[test]
    fn initramfs_listing_reads_plain_and_zstd_archives() {
        let d = tempfile::tempdir().unwrap();
        for (dir, files) in [
            (
                "a",
                &["usr/lib/modules/k/kernel/drivers/nvme/host/nvme.ko.xz"][..],
            ),
            (
                "b",
                &["init", "usr/lib/modules/k/kernel/fs/ext4/ext4.ko.xz"][..],
            ),
        ] {
            for f in files {
                let p = d.path().join(dir).join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, format!("content of {f}")).unwrap();
            }
        }
        let sh = |script: &str| {
            let o = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(d.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        sh("cd a && find . | sort | cpio -o -H newc --quiet > ../early.cpio");
        sh("cd b && find . | sort | cpio -o -H newc --quiet | zstd -q -c > ../main.cpio.zst");
        sh("cat early.cpio main.cpio.zst > initrd.img");
        let names = initramfs_files(&d.path().join("initrd.img")).unwrap();
        assert!(
            names.contains(&"usr/lib/modules/k/kernel/drivers/nvme/host/nvme.ko.xz".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"init".to_string()), "{names:?}");
        assert!(
            names.contains(&"usr/lib/modules/k/kernel/fs/ext4/ext4.ko.xz".to_string()),
            "{names:?}"
        );
        // gzip works the same way; garbage is named.
        sh("cd b && find . | sort | cpio -o -H newc --quiet | gzip -c > ../main.cpio.gz && cd .. && cat early.cpio main.cpio.gz > initrd-gz.img");
        let gz = initramfs_files(&d.path().join("initrd-gz.img")).unwrap();
        assert_eq!(gz, names);
        std::fs::write(d.path().join("junk.img"), b"not an initramfs").unwrap();
        let e = initramfs_files(&d.path().join("junk.img")).unwrap_err();
        assert!(e.to_string().contains("unknown data at byte 0"), "{e}");
    }
}
