//! The build pipeline for one role: spec -> rootfs -> overlay -> fs -> luks -> disk -> export.
//! Everything is written under a temporary folder next to the output and renamed into place
//! at the end: an interrupted or failed build leaves no artifact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::export::{self, Artifact, Timings};
use crate::layer::{self, Project};
use crate::luks::LuksInfo;
use crate::overlay;
use crate::progress::Progress;
use crate::rootfs::{self, Mirrors, Package};
use crate::spec::Spec;
use crate::{disk, fs, luks, tools};

pub struct Options {
    pub role: String,
    pub spec: Spec,
    pub project: Project,
    /// Final folder of the artifacts (replaced atomically).
    pub out: PathBuf,
    pub cache: PathBuf,
    /// The ncimage binary copied into the image (runs first boot in the guest).
    pub guest_binary: PathBuf,
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub ncimage_version: String,
    pub role: String,
    pub spec: SpecRef,
    pub inputs: InputsRef,
    pub filesystems: BTreeMap<String, FsInfo>,
    pub luks: LuksInfo,
    pub disk: disk::DiskLayout,
    pub kernel_cmdline: String,
    /// What the image carries for the clouds, read from the built trees.
    pub cloud: crate::cloud::CloudInfo,
    pub artifacts: Vec<Artifact>,
    pub timings_seconds: Timings,
    pub packages: Vec<Package>,
    /// Archives installed (source, sha256, the key that signed them).
    pub archives: Vec<crate::archive::Fetched>,
    /// Encrypted data volumes the image makes at first boot (each needs its own disk).
    pub volumes: Vec<crate::layer::VolumeDecl>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpecRef {
    pub name: String,
    pub source: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputsRef {
    pub suite: String,
    pub sources: Vec<String>,
    pub packages_requested: Vec<String>,
    pub layers: Vec<LayerRef>,
    pub rootfs_cache_key: String,
    pub rootfs_cached: bool,
    pub source_date_epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerRef {
    pub name: String,
    pub kind: layer::Kind,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FsInfo {
    pub uuid: String,
    pub size_bytes: u64,
    /// The size first boot grows the filesystem to (the root: `root_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grows_to_bytes: Option<u64>,
    pub sha256: String,
}

/// Stable identifiers for one spec and role: the same inputs give the same filesystems.
pub struct Ids {
    pub root_fs: String,
    pub boot_fs: String,
    pub luks: String,
    pub disk_seed: [u8; 32],
}

impl Ids {
    pub fn new(spec: &str, role: &str) -> Ids {
        let h = |what: &str| -> [u8; 32] {
            Sha256::digest(format!("ncimage/{spec}/{role}/{what}").as_bytes()).into()
        };
        Ids {
            root_fs: uuid(&h("root-fs")),
            boot_fs: uuid(&h("boot-fs")),
            luks: uuid(&h("luks")),
            disk_seed: h("disk"),
        }
    }
}

/// A version-4-shaped UUID from hash bytes.
pub fn uuid(b: &[u8; 32]) -> String {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let x = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

pub const BUILD_TOOLS: &[&str] = &[
    "mmdebstrap",
    "mke2fs",
    "dumpe2fs",
    "cryptsetup",
    "sgdisk",
    "grub-mkimage",
    "qemu-img",
];

pub fn build(o: &Options) -> Result<Manifest> {
    let layers = o.project.layers_for(&o.role)?;
    let merged = layer::merge(&layers)?;
    let (wanted, declared_in) = crate::cloud::wanted(&layers)?;
    tools::require_all(BUILD_TOOLS)?;
    let out_parent = o
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_parent).map_err(|e| {
        Error::invalid(
            format!(
                "cannot create the output folder {}: {e}",
                out_parent.display()
            ),
            "choose a writable folder with --out",
        )
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", o.role))
        .tempdir_in(out_parent)
        .map_err(|e| {
            Error::invalid(
                format!("cannot write in {}: {e}", out_parent.display()),
                "choose a writable folder with --out",
            )
        })?;
    // Intermediate files (trees, filesystems, the LUKS volume) go to a private temporary folder,
    // in memory (/dev/shm) when it has room: they never outlive the build.
    let scratch = scratch_dir(tmp.path())?;
    let work = scratch.path().to_path_buf();
    let mut p = Progress::new(o.quiet);
    let ids = Ids::new(&o.spec.name, &o.role);
    let epoch = o.spec.image.source_date_epoch;
    let stem = format!("ncimage-{}", o.role);

    // archives (software that is not a Debian package), verified first: a wrong pin fails before
    // minutes of bootstrapping
    check_archive_names(&o.spec, &o.project)?;
    let declared: usize = layers.iter().map(|l| l.manifest.archives.len()).sum();
    let archives = if declared > 0 {
        let mut notes = Vec::new();
        let a = p.stage(
            "fetch",
            &format!("{declared} archive(s): sha256 and signature"),
            || crate::archive::fetch_all(&layers, &o.spec, &o.cache, &mut |n| notes.push(n)),
        )?;
        for n in notes {
            p.note(&n);
        }
        a
    } else {
        Vec::new()
    };

    // rootfs
    let mut hooks: Vec<(String, PathBuf)> = Vec::new();
    for l in &layers {
        hooks.extend(
            l.files("hooks")?
                .into_iter()
                .map(|(rel, p)| (format!("{}/{rel}", l.name), p)),
        );
    }
    let mirrors = Mirrors::resolve(o.spec.mirror.as_deref(), o.spec.security_mirror.as_deref())?;
    let key = rootfs::enrollment_key(&o.cache)?;
    let env: BTreeMap<String, String> = [
        ("NCIMAGE_LUKS_UUID", ids.luks.clone()),
        ("NCIMAGE_BOOT_UUID", ids.boot_fs.clone()),
        ("NCIMAGE_ROOT_UUID", ids.root_fs.clone()),
        // First boot's re-encryption in the initramfs (rekey.rs).
        (
            "NCIMAGE_REENCRYPT_ARGS",
            crate::rekey::reencrypt_shell_args(),
        ),
        (
            "NCIMAGE_OWN_KEY_MARK",
            crate::rekey::OWN_KEY_MARK.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let inputs = rootfs::Inputs::new(
        &o.spec.suite,
        &mirrors,
        merged.packages.clone(),
        &hooks,
        env,
        &key,
        epoch,
    )?;
    let cache_key = inputs.key();
    let what = format!(
        "Debian {} tree ({} packages asked)",
        o.spec.suite,
        merged.packages.len()
    );
    let origin = |pkg: &str| -> String {
        layers
            .iter()
            .filter(|l| l.manifest.packages.iter().any(|p| p == pkg))
            .map(|l| format!("{}/{}", l.source(), l.manifest_file()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let root = p.stage("rootfs", &what, || {
        rootfs::ensure(&o.cache, &inputs, &hooks, &key, &origin)
    })?;
    if root.cached {
        p.note(&format!("  rootfs: cached {}", &cache_key[..16]));
    }

    // overlay
    let cmdline = format!("root=/dev/mapper/root {}", o.spec.image.kernel_cmdline);
    let context = build_context(&o.spec, &o.role, &layers, &merged, &ids, &archives);
    let ov = p.stage("overlay", "layers, templates and units", || {
        overlay::apply(
            &overlay::Inputs {
                rootfs_tar: &root.tar,
                layers: &layers,
                merged: &merged,
                role: &o.role,
                spec_name: &o.spec.name,
                context,
                guest_binary: &o.guest_binary,
                grub_cfg: disk::grub_cfg(&cmdline),
                mtime: epoch,
                archives: &archives,
            },
            &work,
        )
    })?;

    let checkers: usize = layers.iter().map(|l| l.manifest.validate.len()).sum();
    if checkers > 0 {
        p.stage(
            "validate",
            &format!("{checkers} config checkers in the image tree"),
            || crate::validate::run(&ov.root_tar, &layers, &merged, &o.role, &work),
        )?;
    }

    // what the image carries for the clouds (datasources, drivers, consoles), from the trees
    let cloud = p.stage(
        "cloud",
        "datasources, drivers in the kernel and initramfs",
        || {
            crate::cloud::inspect(
                &ov.root_tar,
                &ov.boot_tar,
                &work,
                &cmdline,
                &wanted,
                &declared_in,
            )
        },
    )?;

    // fs
    let root_img = work.join("root.img");
    let boot_img = work.join("boot.img");
    let root_size = o.spec.root_size(&o.role);
    let boot_size = o.spec.boot_size(&o.role);
    let root_free = o.spec.root_free(&o.role);
    let (used, root_fs_size) = p.stage("fs", "ext4 root and /boot from the trees", || {
        // As small as its content plus `root_free` allows (fs.rs); first boot re-encrypts
        // only the filesystem's extent and grows it to the partition (rekey.rs).
        let compact = fs::make_compact_ext4(
            &ov.root_tar,
            &root_img,
            &fs::Params {
                label: "root",
                uuid: &ids.root_fs,
                size: root_size,
                source_date_epoch: epoch,
            },
            root_free,
        )?;
        fs::make_ext4(
            &ov.boot_tar,
            &boot_img,
            &fs::Params {
                label: "boot",
                uuid: &ids.boot_fs,
                size: boot_size,
                source_date_epoch: epoch,
            },
        )?;
        let _ = std::fs::remove_file(&ov.root_tar);
        let _ = std::fs::remove_file(&ov.boot_tar);
        Ok((fs::used_blocks(&root_img)?, compact))
    })?;

    // luks, while another core hashes the filesystems for the manifest
    let root_luks = work.join("root.luks");
    let (luks_info, root_sha, boot_sha) = std::thread::scope(|s| -> Result<_> {
        let hashes = s.spawn(|| -> Result<(String, String)> {
            Ok((
                export::sha256_file(&root_img)?,
                export::sha256_file(&boot_img)?,
            ))
        });
        let info = p.stage("luks", "LUKS2 encryption of the root", || {
            let ranges: Vec<(u64, u64)> = used
                .iter()
                .map(|&(s, n)| (s * fs::BLOCK, n * fs::BLOCK))
                .collect();
            luks::encrypt(
                &luks::Plain {
                    fs: &root_img,
                    used: &ranges,
                    data_len: root_size,
                },
                &root_luks,
                &ids.luks,
                &key,
                &o.spec.luks,
                &work,
            )
        });
        let (root_sha, boot_sha) = hashes.join().expect("hash thread")?;
        Ok((info?, root_sha, boot_sha))
    })?;
    std::fs::remove_file(&root_img).map_err(Error::io("removing", &root_img))?;

    // disk
    let raw = tmp.path().join(format!("{stem}.raw"));
    let layout = p.stage("disk", "GPT, BIOS and UEFI boot", || {
        disk::assemble(
            &raw,
            &work,
            &disk::DiskInputs {
                boot_fs: &boot_img,
                boot_fs_uuid: &ids.boot_fs,
                root: &root_luks,
                esp_bytes: o.spec.image.esp_size.0,
                seed: ids.disk_seed,
            },
        )
    })?;
    drop(scratch);

    // export
    let artifacts = p.stage("export", "formats, manifest, checksums", || {
        let a = export::write_formats(tmp.path(), &stem, &o.spec.image.formats)?;
        if !o.spec.image.formats.contains(&crate::spec::Format::Raw) {
            std::fs::remove_file(&raw).map_err(Error::io("removing", &raw))?;
        }
        Ok(a)
    })?;
    let manifest = Manifest {
        ncimage_version: env!("CARGO_PKG_VERSION").into(),
        role: o.role.clone(),
        spec: SpecRef {
            name: o.spec.name.clone(),
            source: o.spec.source.clone(),
            sha256: o.spec.sha256.clone(),
        },
        inputs: InputsRef {
            suite: o.spec.suite.clone(),
            sources: inputs.sources.clone(),
            packages_requested: merged.packages.iter().cloned().collect(),
            layers: layers
                .iter()
                .map(|l| {
                    let mut h = Sha256::new();
                    for sub in ["tree", "firstboot", "hooks"] {
                        h.update(l.digest(sub).unwrap_or_default());
                    }
                    h.update(std::fs::read(l.dir.join(l.manifest_file())).unwrap_or_default());
                    h.update(std::fs::read(l.dir.join("cloud.toml")).unwrap_or_default());
                    LayerRef {
                        name: l.name.clone(),
                        kind: l.kind,
                        sha256: hex::encode(h.finalize()),
                    }
                })
                .collect(),
            rootfs_cache_key: cache_key,
            rootfs_cached: root.cached,
            source_date_epoch: epoch,
        },
        filesystems: BTreeMap::from([
            (
                "root".to_string(),
                FsInfo {
                    uuid: ids.root_fs.clone(),
                    size_bytes: root_fs_size,
                    grows_to_bytes: Some(root_size),
                    sha256: root_sha,
                },
            ),
            (
                "boot".to_string(),
                FsInfo {
                    uuid: ids.boot_fs.clone(),
                    size_bytes: boot_size,
                    grows_to_bytes: None,
                    sha256: boot_sha,
                },
            ),
        ]),
        luks: luks_info,
        disk: layout,
        kernel_cmdline: cmdline,
        cloud,
        artifacts: artifacts.clone(),
        timings_seconds: p.timings.clone(),
        packages: root.packages.clone(),
        archives: archives.clone(),
        volumes: merged.volumes.clone(),
    };
    export::write_manifest_and_sums(tmp.path(), &manifest, &artifacts)?;
    // Swap into place.
    export::swap_into_place(tmp, &o.out, &o.role)?;
    Ok(manifest)
}

/// The context of build-time templates (tree/*.tera).
pub fn build_context(
    spec: &Spec,
    role: &str,
    layers: &[layer::Layer],
    merged: &layer::Merged,
    ids: &Ids,
    archives: &[crate::archive::Fetched],
) -> serde_json::Value {
    let mut vars = merged.vars.clone();
    if let Some(o) = spec.roles.get(role) {
        vars.extend(o.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let archives: serde_json::Map<String, serde_json::Value> = archives
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                serde_json::json!({ "path": a.installed_to, "sha256": a.sha256, "source": a.source }),
            )
        })
        .collect();
    serde_json::json!({
        "vars": vars,
        "archives": archives,
        "role": { "name": role, "firewall": merged.firewall, "secrets": merged.secrets.iter().map(|s| &s.name).collect::<Vec<_>>() },
        "image": { "spec": spec.name, "suite": spec.suite, "layers": layers.iter().map(|l| &l.name).collect::<Vec<_>>() },
        "ids": { "luks": ids.luks, "root_fs": ids.root_fs, "boot_fs": ids.boot_fs },
    })
}

/// A spec's `[archives.<name>]` must be a slot some role declares: a misspelt name would
/// otherwise be ignored while the role's slot stays empty.
fn check_archive_names(spec: &Spec, project: &Project) -> Result<()> {
    if spec.archives.is_empty() {
        return Ok(());
    }
    let mut known = std::collections::BTreeSet::new();
    for r in project.roles() {
        for l in project.layers_for(&r)? {
            known.extend(l.manifest.archives.iter().map(|a| a.name.clone()));
        }
    }
    for name in spec.archives.keys() {
        if !known.contains(name) {
            return Err(Error::invalid(
                format!(
                    "{}: [archives.{name}] is not an archive any role declares",
                    spec.source
                ),
                format!(
                    "archives the roles declare: {}",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A private temporary folder for intermediate files: in /dev/shm when it has 6 GiB free
/// ($NCIMAGE_SCRATCH overrides), else beside the output.
fn scratch_dir(fallback: &Path) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = match std::env::var_os("NCIMAGE_SCRATCH") {
        Some(d) => PathBuf::from(d),
        None if free_bytes(shm) > 6 << 30 => shm.to_path_buf(),
        None => fallback.to_path_buf(),
    };
    tempfile::Builder::new()
        .prefix("ncimage-work-")
        .tempdir_in(&dir)
        .map_err(Error::io("creating a scratch folder in", &dir))
}

fn free_bytes(p: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_distinct_uuids() {
        let a = Ids::new("default", "redis");
        let b = Ids::new("default", "redis");
        let c = Ids::new("default", "db");
        assert_eq!(a.luks, b.luks);
        assert_ne!(a.luks, c.luks);
        assert_ne!(a.root_fs, a.boot_fs);
        assert_eq!(a.luks.len(), 36);
        assert_eq!(&a.luks[14..15], "4");
    }
}
