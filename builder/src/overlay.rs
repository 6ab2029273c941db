//! Overlay: turns the cached root tree (a tar) into the image's trees, without unpacking it.
//! Reads the tree once and writes two tars: the root filesystem and /boot. On the way it drops
//! what the layers replace or disable, then appends the layers' files (Tera rendered), the
//! first-boot templates and plan, unit enablement derived from each unit's [Install] section,
//! and the ncimage binary that runs first boot in the guest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::{Firewall, Layer, Merged};
use crate::template;

pub const IMAGE_JSON: &str = "etc/ncimage/image.json";
pub const FIRSTBOOT_DIR: &str = "usr/share/ncimage/firstboot";
pub const GUEST_BINARY: &str = "usr/local/sbin/ncimage";
pub const FIRSTBOOT_UNIT: &str = "ncimage-firstboot.service";
pub const VOLUMES_UNIT: &str = "ncimage-volumes.service";
pub const JOIN_DIR: &str = "usr/share/ncimage/join";

/// What first boot in the guest needs to know about the image (written to /etc/ncimage/image.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub role: String,
    pub spec: String,
    pub layers: Vec<String>,
    pub firewall: Firewall,
    /// Names of the secrets this role receives in its seed.
    pub secrets: Vec<String>,
    pub firstboot: Vec<FirstbootFile>,
    /// The join steps (absolute paths in the image), in order: shared overlays first.
    #[serde(default)]
    pub join: Vec<String>,
    pub reload_after_firstboot: Vec<String>,
    pub ncimage_version: String,
    /// Encrypted data volumes (made at first boot by `ncimage volumes`).
    #[serde(default)]
    pub volumes: Vec<crate::layer::VolumeDecl>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FirstbootFile {
    /// Template in the image (absolute).
    pub template: String,
    /// File it renders to (absolute).
    pub path: String,
    pub owner: String,
    pub group: String,
    pub mode: u32,
}

pub struct Inputs<'a> {
    pub rootfs_tar: &'a Path,
    pub layers: &'a [Layer],
    pub merged: &'a Merged,
    pub role: &'a str,
    pub spec_name: &'a str,
    /// Context of build-time templates.
    pub context: serde_json::Value,
    pub guest_binary: &'a Path,
    pub grub_cfg: String,
    pub mtime: u64,
    /// Archives fetched and verified for this build, installed after the layers' files.
    pub archives: &'a [crate::archive::Fetched],
}

pub struct Output {
    pub root_tar: PathBuf,
    pub boot_tar: PathBuf,
    pub info: ImageInfo,
}

/// One file the layers add.
struct NewFile {
    path: String,
    data: Vec<u8>,
    uid: u64,
    gid: u64,
    mode: u32,
}

pub fn apply(inp: &Inputs, out_dir: &Path) -> Result<Output> {
    // What the layers write, before reading the base: their paths replace the base's.
    let mut files: Vec<(String, Vec<u8>, Option<u32>)> = Vec::new(); // (path, data, mode from the file's exec bit)
    let mut firstboot = Vec::new();
    let mut join = Vec::new();
    for l in inp.layers {
        for (rel, src) in l.files("join")? {
            let data = std::fs::read(&src).map_err(Error::io("reading", &src))?;
            let path = format!("{JOIN_DIR}/{}/{rel}", l.name);
            join.push(format!("/{path}"));
            files.push((path, data, Some(0o755)));
        }
        for (rel, src) in l.files("tree")? {
            let raw = std::fs::read(&src).map_err(Error::io("reading", &src))?;
            let exec = is_exec(&src);
            let (rel, data) = match rel.strip_suffix(".tera") {
                Some(stripped) => {
                    let text = String::from_utf8(raw).map_err(|_| {
                        Error::invalid(
                            format!("{}: not UTF-8", src.display()),
                            "templates are text",
                        )
                    })?;
                    let name = format!("{}/tree/{rel}", l.source());
                    (
                        stripped.to_string(),
                        template::render(&name, &text, &inp.context)?.into_bytes(),
                    )
                }
                None => (rel, raw),
            };
            files.push((rel, data, Some(if exec { 0o755 } else { 0o644 })));
        }
        for (rel, src) in l.files("firstboot")? {
            let data = std::fs::read(&src).map_err(Error::io("reading", &src))?;
            let target = rel.strip_suffix(".tera").ok_or_else(|| {
                Error::invalid(
                    format!("{}: first-boot files must be templates", src.display()),
                    "name it <path>.tera",
                )
            })?;
            let tpl = format!("{FIRSTBOOT_DIR}/{}/{rel}", l.name);
            files.push((tpl.clone(), data, Some(0o644)));
            let path = format!("/{target}");
            let (owner, group, mode) = match inp.merged.attr_for(&path) {
                Some(a) => (a.owner.clone(), a.group.clone(), a.mode_bits()?),
                None => ("root".into(), "root".into(), 0o600),
            };
            firstboot.push(FirstbootFile {
                template: format!("/{tpl}"),
                path,
                owner,
                group,
                mode,
            });
        }
    }
    let info = ImageInfo {
        role: inp.role.to_string(),
        spec: inp.spec_name.to_string(),
        layers: inp.layers.iter().map(|l| l.name.clone()).collect(),
        firewall: inp.merged.firewall.clone(),
        secrets: inp.merged.secrets.iter().map(|s| s.name.clone()).collect(),
        firstboot,
        join,
        reload_after_firstboot: inp.merged.reload_after_firstboot.clone(),
        ncimage_version: env!("CARGO_PKG_VERSION").to_string(),
        volumes: inp.merged.volumes.clone(),
    };
    files.push((
        IMAGE_JSON.into(),
        serde_json::to_vec_pretty(&info).expect("serialisable"),
        Some(0o644),
    ));
    let bin = std::fs::read(inp.guest_binary).map_err(Error::io("reading", inp.guest_binary))?;
    files.push((GUEST_BINARY.into(), bin, Some(0o755)));
    for unit in &inp.merged.after_firstboot {
        let body = format!(
            "# Written by ncimage: this unit reads files that first boot renders from the node's seed.\n# Without a seed the node has no identity: the unit does not start.\n[Unit]\nRequires={FIRSTBOOT_UNIT}\nAfter={FIRSTBOOT_UNIT}\nConditionPathExists=/etc/ncimage/node.json\n"
        );
        files.push((
            format!("etc/systemd/system/{unit}.d/50-ncimage-firstboot.conf"),
            body.into_bytes(),
            Some(0o644),
        ));
    }
    for v in &inp.merged.volumes {
        for unit in &v.services {
            let body = format!(
                "# Written by ncimage: this unit keeps its data on the encrypted volume `{name}`,\n# which first boot makes (ncimage volumes) and which is mounted before it starts.\n[Unit]\nRequires={VOLUMES_UNIT}\nAfter={VOLUMES_UNIT}\nRequiresMountsFor={mount}\n",
                name = v.name,
                mount = v.mount
            );
            files.push((
                format!(
                    "etc/systemd/system/{unit}.d/50-ncimage-volume-{}.conf",
                    v.name
                ),
                body.into_bytes(),
                Some(0o644),
            ));
        }
    }
    let replaced: BTreeSet<String> = files.iter().map(|(p, _, _)| p.clone()).collect();
    let mut unit_names: BTreeSet<String> = BTreeSet::new();
    for u in &inp.merged.enable {
        unit_names.insert(u.clone());
        unit_names.insert(template_of(u));
    }

    let root_tar = out_dir.join("root.tar");
    let boot_tar = out_dir.join("boot.tar");
    let mut root = tar::Builder::new(BufWriter::with_capacity(
        1 << 20,
        File::create(&root_tar).map_err(Error::io("creating", &root_tar))?,
    ));
    let mut boot = tar::Builder::new(BufWriter::new(
        File::create(&boot_tar).map_err(Error::io("creating", &boot_tar))?,
    ));
    root.mode(tar::HeaderMode::Complete);
    boot.mode(tar::HeaderMode::Complete);
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut paths: BTreeSet<String> = BTreeSet::new();
    let mut passwd = String::new();
    let mut group = String::new();
    let mut units: BTreeMap<String, String> = BTreeMap::new();

    let src = File::open(inp.rootfs_tar).map_err(Error::io("opening", inp.rootfs_tar))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, src));
    let werr = |e| Error::io("writing", out_dir)(e);
    for entry in archive
        .entries()
        .map_err(Error::io("reading", inp.rootfs_tar))?
    {
        let mut entry = entry.map_err(Error::io("reading", inp.rootfs_tar))?;
        let path = norm(
            &entry
                .path()
                .map_err(Error::io("reading", inp.rootfs_tar))?
                .to_string_lossy(),
        );
        if path.is_empty()
            || replaced.contains(&path)
            || disabled(&path, &inp.merged.disable)
            || inp.merged.remove.contains(&path)
        {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            dirs.insert(path.clone());
        }
        paths.insert(path.clone());
        let mut data = Vec::new();
        let name = path.rsplit('/').next().unwrap_or("");
        let capture = path == "etc/passwd"
            || path == "etc/group"
            || (unit_names.contains(name) && is_unit_dir(&path) && kind.is_file());
        if capture {
            entry
                .read_to_end(&mut data)
                .map_err(Error::io("reading", inp.rootfs_tar))?;
            let text = String::from_utf8_lossy(&data).to_string();
            match path.as_str() {
                "etc/passwd" => passwd = text,
                "etc/group" => group = text,
                _ => {
                    units.entry(name.to_string()).or_insert(text);
                }
            }
        }
        let (dest, dpath) = match path.strip_prefix("boot/") {
            Some(rest) => (&mut boot, rest.to_string()),
            None => (&mut root, path.clone()),
        };
        let mut h = entry.header().clone();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(Error::io("reading", inp.rootfs_tar))?
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let target = if kind.is_hard_link() {
                strip_boot(&norm(&target))
            } else {
                target
            };
            dest.append_link(&mut h, &dpath, &target).map_err(werr)?;
        } else if capture {
            dest.append_data(&mut h, &dpath, data.as_slice())
                .map_err(werr)?;
        } else {
            dest.append_data(&mut h, &dpath, &mut entry).map_err(werr)?;
        }
    }

    let users = Ids::parse(&passwd);
    let groups = Ids::parse(&group);
    let mut new_files = Vec::new();
    for (path, data, mode) in files {
        let abs = format!("/{path}");
        let (uid, gid, mode) = match inp.merged.attr_for(&abs) {
            Some(a) => (
                users.id(&a.owner, "user")?,
                groups.id(&a.group, "group")?,
                a.mode_bits()?,
            ),
            None => (0, 0, mode.unwrap_or(0o644)),
        };
        new_files.push(NewFile {
            path,
            data,
            uid,
            gid,
            mode,
        });
    }
    for f in &new_files {
        if let Some(rest) = f.path.strip_prefix("boot/") {
            add_file(&mut boot, rest, &f.data, f.uid, f.gid, f.mode, inp.mtime).map_err(werr)?;
            continue;
        }
        for d in ancestors(&f.path) {
            if dirs.insert(d.clone()) {
                add_dir(&mut root, &d, inp.mtime).map_err(werr)?;
            }
        }
        add_file(&mut root, &f.path, &f.data, f.uid, f.gid, f.mode, inp.mtime).map_err(werr)?;
        if f.path.starts_with("etc/systemd/system/")
            || f.path.starts_with("usr/lib/systemd/system/")
        {
            let name = f.path.rsplit('/').next().unwrap_or("").to_string();
            units.insert(name, String::from_utf8_lossy(&f.data).to_string());
        }
    }

    let mut taken: BTreeSet<String> = paths.clone();
    taken.extend(new_files.iter().map(|f| f.path.clone()));
    for a in inp.archives {
        let own = crate::archive::Owners {
            uid: users.id(&a.decl.owner, "user")?,
            gid: groups.id(&a.decl.group, "group")?,
            writable_uid: users.id(&a.decl.writable_owner, "user")?,
            writable_gid: groups.id(&a.decl.writable_owner, "group")?,
        };
        crate::archive::append(&mut root, a, &own, &mut dirs, &taken, inp.mtime)?;
    }

    // Unit enablement, as `systemctl enable` would do it from [Install].
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    for unit in &inp.merged.enable {
        let tpl = template_of(unit);
        let text = units.get(unit).or_else(|| units.get(&tpl)).ok_or_else(|| {
            Error::invalid(
                format!("cannot enable {unit}: no unit file in the image"),
                "check the unit's name and that its package is in `packages`",
            )
        })?;
        let file = if units.contains_key(unit) {
            unit.clone()
        } else {
            tpl
        };
        let target = unit_path(&paths, &new_files, &file);
        let install = parse_install(text);
        if install.is_empty() {
            return Err(Error::invalid(
                format!("cannot enable {unit}: it has no [Install] section"),
                "order it from another unit instead",
            ));
        }
        for (key, value) in install {
            match key.as_str() {
                "WantedBy" => links.insert(
                    format!("etc/systemd/system/{value}.wants/{unit}"),
                    target.clone(),
                ),
                "RequiredBy" => links.insert(
                    format!("etc/systemd/system/{value}.requires/{unit}"),
                    target.clone(),
                ),
                "Alias" => links.insert(format!("etc/systemd/system/{value}"), target.clone()),
                _ => None,
            };
        }
    }
    for unit in &inp.merged.mask {
        links.insert(mask_link(unit), "/dev/null".into());
    }
    for (link, target) in &links {
        if paths.contains(link) {
            continue; // already enabled in the base tree
        }
        for d in ancestors(link) {
            if dirs.insert(d.clone()) {
                add_dir(&mut root, &d, inp.mtime).map_err(werr)?;
            }
        }
        add_symlink(&mut root, link, target, inp.mtime).map_err(werr)?;
    }
    add_dir(&mut boot, "grub", inp.mtime).map_err(werr)?;
    add_file(
        &mut boot,
        "grub/grub.cfg",
        inp.grub_cfg.as_bytes(),
        0,
        0,
        0o644,
        inp.mtime,
    )
    .map_err(werr)?;

    root.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(werr)?;
    boot.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(werr)?;
    Ok(Output {
        root_tar,
        boot_tar,
        info,
    })
}

fn is_exec(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn norm(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

fn strip_boot(p: &str) -> String {
    p.strip_prefix("boot/").unwrap_or(p).to_string()
}

fn is_unit_dir(p: &str) -> bool {
    [
        "usr/lib/systemd/system/",
        "lib/systemd/system/",
        "etc/systemd/system/",
    ]
    .iter()
    .any(|d| p.starts_with(d) && !p[d.len()..].contains('/'))
}

/// `etc/systemd/system/<x>.wants/<unit>` links of a disabled unit.
fn disabled(path: &str, disable: &[String]) -> bool {
    if !path.starts_with("etc/systemd/system/") {
        return false;
    }
    let name = path.rsplit('/').next().unwrap_or("");
    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    (parent.ends_with(".wants") || parent.ends_with(".requires"))
        && disable.iter().any(|d| d == name)
}

/// `foo@bar.service` -> `foo@.service`.
pub fn template_of(unit: &str) -> String {
    match (unit.split_once('@'), unit.rsplit_once('.')) {
        (Some((prefix, _)), Some((_, suffix))) => format!("{prefix}@.{suffix}"),
        _ => unit.to_string(),
    }
}

fn unit_path(paths: &BTreeSet<String>, new: &[NewFile], file: &str) -> String {
    for dir in [
        "etc/systemd/system",
        "usr/lib/systemd/system",
        "lib/systemd/system",
    ] {
        let p = format!("{dir}/{file}");
        if paths.contains(&p) || new.iter().any(|f| f.path == p) {
            return format!("/{p}");
        }
    }
    format!("/usr/lib/systemd/system/{file}")
}

/// (key, value) pairs of the [Install] section, values split on whitespace.
pub fn parse_install(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_install = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            for value in v.split_whitespace() {
                out.push((k.trim().to_string(), value.to_string()));
            }
        }
    }
    out
}

fn ancestors(path: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut cur = path;
    while let Some((parent, _)) = cur.rsplit_once('/') {
        v.push(parent.to_string());
        cur = parent;
    }
    v.reverse();
    v
}

struct Ids(BTreeMap<String, u64>);

impl Ids {
    fn parse(text: &str) -> Ids {
        Ids(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
            })
            .collect())
    }
    fn id(&self, name: &str, what: &str) -> Result<u64> {
        if let Ok(n) = name.parse() {
            return Ok(n);
        }
        self.0.get(name).copied().ok_or_else(|| {
            Error::invalid(
                format!("no {what} `{name}` in the image"),
                format!("the {what} must be created by a package in `packages` or by a hook"),
            )
        })
    }
}

fn header(
    kind: tar::EntryType,
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_size(size);
    h
}

fn add_file<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = header(
        tar::EntryType::Regular,
        uid,
        gid,
        mode,
        mtime,
        data.len() as u64,
    );
    b.append_data(&mut h, path, data)
}

fn add_dir<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0, 0, 0o755, mtime, 0);
    b.append_data(&mut h, format!("{path}/"), std::io::empty())
}

/// Where masking `name` links to /dev/null: a generator (`systemd-ssh-generator`) in
/// /etc/systemd/system-generators, which overrides the one of the same name systemd ships; a
/// unit in /etc/systemd/system.
fn mask_link(name: &str) -> String {
    if name.ends_with("-generator") {
        format!("etc/systemd/system-generators/{name}")
    } else {
        format!("etc/systemd/system/{name}")
    }
}

fn add_symlink<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    target: &str,
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Symlink, 0, 0, 0o777, mtime, 0);
    b.append_link(&mut h, path, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_section_is_parsed() {
        let u = "[Unit]\nDescription=x\nWantedBy=not-this\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target sockets.target\nAlias=y.service\n# c\n";
        assert_eq!(
            parse_install(u),
            vec![
                ("WantedBy".into(), "multi-user.target".into()),
                ("WantedBy".into(), "sockets.target".into()),
                ("Alias".into(), "y.service".into())
            ]
        );
    }

    #[test]
    fn templates_and_paths() {
        assert_eq!(
            template_of("redis-server@cache.service"),
            "redis-server@.service"
        );
        assert_eq!(template_of("ssh.service"), "ssh.service");
        assert_eq!(
            ancestors("etc/a/b.conf"),
            vec!["etc".to_string(), "etc/a".to_string()]
        );
        assert_eq!(norm("./etc/x/"), "etc/x");
        assert!(disabled(
            "etc/systemd/system/multi-user.target.wants/redis-server.service",
            &["redis-server.service".into()]
        ));
        assert!(!disabled(
            "etc/systemd/system/redis-server.service",
            &["redis-server.service".into()]
        ));
        assert!(
            is_unit_dir("usr/lib/systemd/system/a.service")
                && !is_unit_dir("usr/lib/systemd/system/a.d/x.conf")
        );
    }

    #[test]
    fn ids_resolve_names_and_numbers() {
        let ids = Ids::parse(
            "root:x:0:0::/root:/bin/sh\nredis:x:101:104::/var/lib/redis:/usr/sbin/nologin\n",
        );
        assert_eq!(ids.id("redis", "user").unwrap(), 101);
        assert_eq!(ids.id("33", "user").unwrap(), 33);
        assert!(ids
            .id("nobody-here", "user")
            .unwrap_err()
            .to_string()
            .contains("nobody-here"));
    }

    /// A synthetic base tree and layer through the whole overlay: files replaced and added with
    /// owners from the tree's passwd, templates rendered, /boot split off, units enabled from
    /// [Install], disabled links dropped, masks, first-boot plan and drop-ins.
    #[test]
    fn apply_on_a_synthetic_tree() {
        use crate::layer::{Kind, Manifest};
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.tar");
        {
            let mut b = tar::Builder::new(File::create(&base).unwrap());
            for dir in [
                "./",
                "./etc/",
                "./etc/systemd/",
                "./etc/systemd/system/",
                "./etc/systemd/system/multi-user.target.wants/",
                "./usr/",
                "./usr/lib/",
                "./usr/lib/systemd/",
                "./usr/lib/systemd/system/",
                "./boot/",
            ] {
                add_dir(&mut b, dir.trim_end_matches('/'), 1).unwrap();
            }
            add_file(
                &mut b,
                "./etc/passwd",
                b"root:x:0:0::/root:/bin/sh\nredis:x:101:104::/var/lib/redis:/usr/sbin/nologin\n",
                0,
                0,
                0o644,
                1,
            )
            .unwrap();
            add_file(
                &mut b,
                "./etc/group",
                b"root:x:0:\nredis:x:104:\n",
                0,
                0,
                0o644,
                1,
            )
            .unwrap();
            add_file(&mut b, "./etc/motd", b"old", 0, 0, 0o644, 1).unwrap();
            add_file(
                &mut b,
                "./usr/lib/systemd/system/a@.service",
                b"[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
                0,
                0,
                0o644,
                1,
            )
            .unwrap();
            add_file(
                &mut b,
                "./usr/lib/systemd/system/old.service",
                b"[Install]\nWantedBy=multi-user.target\n",
                0,
                0,
                0o644,
                1,
            )
            .unwrap();
            add_symlink(
                &mut b,
                "./etc/systemd/system/multi-user.target.wants/old.service",
                "/usr/lib/systemd/system/old.service",
                1,
            )
            .unwrap();
            add_file(&mut b, "./boot/vmlinuz-6", b"kernel", 0, 0, 0o644, 1).unwrap();
            add_symlink(&mut b, "./boot/vmlinuz", "vmlinuz-6", 1).unwrap();
            b.finish().unwrap();
        }
        let ldir = d.path().join("roles/r");
        std::fs::create_dir_all(ldir.join("tree/etc/r")).unwrap();
        std::fs::create_dir_all(ldir.join("firstboot/etc/r")).unwrap();
        std::fs::write(ldir.join("tree/etc/motd"), "new").unwrap();
        std::fs::write(
            ldir.join("tree/etc/r/base.conf.tera"),
            "role={{ role.name }}",
        )
        .unwrap();
        std::fs::write(
            ldir.join("firstboot/etc/r/node.conf.tera"),
            "bind {{ node.address }}",
        )
        .unwrap();
        let manifest = Manifest {
            enable: vec!["a@one.service".into()],
            disable: vec!["old.service".into()],
            mask: vec!["old.service".into(), "systemd-ssh-generator".into()],
            after_firstboot: vec!["a@.service".into()],
            files: vec![crate::layer::FileAttr {
                path: "/etc/r/*".into(),
                owner: "redis".into(),
                group: "redis".into(),
                mode: "0640".into(),
            }],
            ..Default::default()
        };
        let layers = vec![Layer {
            name: "r".into(),
            kind: Kind::Role,
            dir: ldir,
            manifest,
        }];
        let merged = crate::layer::merge(&layers).unwrap();
        let bin = d.path().join("ncimage");
        std::fs::write(&bin, b"binary").unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let o = apply(
            &Inputs {
                rootfs_tar: &base,
                layers: &layers,
                merged: &merged,
                role: "r",
                spec_name: "default",
                context: serde_json::json!({"role": {"name": "r"}}),
                guest_binary: &bin,
                grub_cfg: "linux /vmlinuz".into(),
                mtime: 7,
                archives: &[],
            },
            &out,
        )
        .unwrap();
        let read = |p: &Path| -> BTreeMap<String, (tar::EntryType, u64, u32, String)> {
            let mut a = tar::Archive::new(File::open(p).unwrap());
            a.entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let path = norm(&e.path().unwrap().to_string_lossy());
                    let h = e.header().clone();
                    let link = e
                        .link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().to_string());
                    let mut body = String::new();
                    if h.entry_type().is_file() {
                        e.read_to_string(&mut body).unwrap();
                    }
                    (
                        path,
                        (
                            h.entry_type(),
                            h.uid().unwrap(),
                            h.mode().unwrap(),
                            link.unwrap_or(body),
                        ),
                    )
                })
                .collect()
        };
        let root = read(&o.root_tar);
        let boot = read(&o.boot_tar);
        assert_eq!(root["etc/motd"].3, "new", "layer file replaces the base's");
        assert_eq!(root.keys().filter(|k| *k == "etc/motd").count(), 1);
        assert_eq!(root["etc/r/base.conf"].3, "role=r");
        assert_eq!(
            (root["etc/r/base.conf"].1, root["etc/r/base.conf"].2),
            (101, 0o640),
            "owner from the tree's passwd"
        );
        assert!(root.contains_key("etc/r"), "parent folder added");
        assert_eq!(
            root["usr/share/ncimage/firstboot/r/etc/r/node.conf.tera"].3,
            "bind {{ node.address }}"
        );
        assert_eq!(
            root["etc/systemd/system/multi-user.target.wants/a@one.service"].3,
            "/usr/lib/systemd/system/a@.service"
        );
        assert!(
            !root.contains_key("etc/systemd/system/multi-user.target.wants/old.service"),
            "disabled link kept"
        );
        assert_eq!(root["etc/systemd/system/old.service"].3, "/dev/null");
        assert_eq!(
            root["etc/systemd/system-generators/systemd-ssh-generator"].3,
            "/dev/null"
        );
        assert!(
            root["etc/systemd/system/a@.service.d/50-ncimage-firstboot.conf"]
                .3
                .contains("After=ncimage-firstboot.service")
        );
        assert_eq!(root[GUEST_BINARY].2, 0o755);
        assert!(
            !root.keys().any(|k| k.starts_with("boot/")),
            "kernel left in the root tree"
        );
        assert!(root.contains_key("boot"), "no /boot mount point");
        assert_eq!(boot["vmlinuz"].3, "vmlinuz-6");
        assert_eq!(boot["grub/grub.cfg"].3, "linux /vmlinuz");
        let info: ImageInfo = serde_json::from_str(&root[IMAGE_JSON].3).unwrap();
        assert_eq!(info.firstboot[0].path, "/etc/r/node.conf");
        assert_eq!(
            (info.firstboot[0].owner.as_str(), info.firstboot[0].mode),
            ("redis", 0o640)
        );
        assert_eq!(info, o.info);
    }
}
