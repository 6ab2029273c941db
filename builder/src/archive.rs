//! Archives: software that is not a Debian package (a Nextcloud release, a container image
//! archive). A layer declares the slot (`[[archives]]` in role.toml: where it goes, who owns it,
//! which signing key vouches for it); the spec says where this build takes it from
//! (`[archives.<name>]`: a URL or a path, its sha256, its signature). Fetching pins the bytes
//! (sha256 before anything reads them), then checks the OpenPGP signature with gpg against the
//! pinned key fingerprint. Verified files are kept in the cache under their sha256.
//!
//! The same code serves the real sources (https) and the test suite's fixtures (a path, or a URL
//! on 127.0.0.1).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::spec::{ArchiveSource, Spec};
use crate::tools;

/// A layer's archive slot (role.toml `[[archives]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArchiveDecl {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A tar archive (plain, gzip or bzip2) unpacked under this folder of the image.
    #[serde(default)]
    pub unpack_to: Option<String>,
    /// Or: the file installed as is at this path.
    #[serde(default)]
    pub install_to: Option<String>,
    /// Owner and group of everything installed (default root).
    #[serde(default = "d_root")]
    pub owner: String,
    #[serde(default = "d_root")]
    pub group: String,
    /// Paths (relative to `unpack_to`, prefix match) owned by `writable_owner` instead.
    #[serde(default)]
    pub writable: Vec<String>,
    #[serde(default = "d_root")]
    pub writable_owner: String,
    /// Paths (relative to `unpack_to`) the archive must contain, or it is not what the slot wants.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Fingerprint of the OpenPGP key that must have signed the archive (spaces allowed).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Where that key comes from: a URL, or a path relative to the layer folder.
    #[serde(default)]
    pub signing_key: Option<String>,
    /// Without a source in the spec, a required archive stops the build; an optional one is left out.
    #[serde(default = "d_true")]
    pub required: bool,
}
fn d_root() -> String {
    "root".into()
}
fn d_true() -> bool {
    true
}

/// An archive fetched and verified for this build.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub name: String,
    pub source: String,
    pub sha256: String,
    /// Fingerprint of the key whose signature verified, when the slot asks for one.
    pub signed_by: Option<String>,
    pub installed_to: String,
    #[serde(skip)]
    pub file: PathBuf,
    #[serde(skip)]
    pub decl: ArchiveDecl,
}

/// Checks the layers' declarations (at load time).
pub fn check_decls(layer: &str, decls: &[ArchiveDecl]) -> Result<()> {
    for d in decls {
        let bad = |what: &str, help: &str| {
            Err(Error::invalid(
                format!("{layer}: archive `{}`: {what}", d.name),
                help,
            ))
        };
        match (&d.unpack_to, &d.install_to) {
            (Some(p), None) | (None, Some(p)) if p.starts_with('/') => {}
            _ => {
                return bad(
                    "needs exactly one of unpack_to or install_to, an absolute path",
                    "unpack_to = \"/var/www\" for a tar archive, install_to = \"/path/file\" for a file kept as is",
                )
            }
        }
        if d.fingerprint.is_some() != d.signing_key.is_some() {
            return bad(
                "fingerprint and signing_key go together",
                "name the key's fingerprint and where the key is (URL or path in the layer folder)",
            );
        }
        if let Some(f) = &d.fingerprint {
            if normalise_fpr(f).is_none() {
                return bad(
                    "fingerprint is not 40 hex digits",
                    "write the full OpenPGP v4 fingerprint",
                );
            }
        }
    }
    Ok(())
}

/// Fetches and verifies every archive the layers declare.
pub fn fetch_all(
    layers: &[Layer],
    spec: &Spec,
    cache: &Path,
    note: &mut dyn FnMut(String),
) -> Result<Vec<Fetched>> {
    let mut out = Vec::new();
    for l in layers {
        for d in &l.manifest.archives {
            let Some(src) = spec.archives.get(&d.name) else {
                if d.required {
                    return Err(Error::invalid(
                        format!(
                            "{}: role {} needs the archive `{}` ({}), and the spec {} names no source for it",
                            l.manifest_path().display(), l.name, d.name, d.description, spec.source
                        ),
                        format!(
                            "add [archives.{}] with `url` or `path` and its `sha256` (and `signature`) to a spec and pass it with --spec",
                            d.name
                        ),
                    ));
                }
                note(format!("  archive {}: none in the spec, left out", d.name));
                continue;
            };
            out.push(fetch_one(l, d, src, spec, cache)?);
        }
    }
    Ok(out)
}

fn fetch_one(
    l: &Layer,
    d: &ArchiveDecl,
    src: &ArchiveSource,
    spec: &Spec,
    cache: &Path,
) -> Result<Fetched> {
    let what = format!("{}: [archives.{}]", spec.source, d.name);
    let origin = Origin::of(
        &what,
        src.url.as_deref(),
        src.path.as_deref(),
        spec.dir.as_deref(),
    )?;
    let pinned = src.sha256.trim().to_ascii_lowercase();
    let dir = cache.join("archives");
    std::fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
    let file = dir.join(&pinned);
    if !(file.exists() && hash_file(&file)? == pinned) {
        let part = dir.join(format!("{pinned}.part-{}", std::process::id()));
        let got = origin.copy_to(&part);
        let got = got.and_then(|()| hash_file(&part));
        let got = match got {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        if got != pinned {
            let _ = std::fs::remove_file(&part);
            return Err(Error::invalid(
                format!(
                    "{what}: the sha256 of {} is {got}, the spec pins {pinned}",
                    origin
                ),
                "the file is not the one pinned: fetch it again from its publisher, or correct the pin if the release changed",
            ));
        }
        std::fs::rename(&part, &file).map_err(Error::io("renaming into", &file))?;
    }

    // Signature: the slot's key unless the spec names another.
    let fingerprint = src.fingerprint.as_ref().or(d.fingerprint.as_ref());
    let signed_by = match fingerprint {
        None => {
            if src.signature.is_some() {
                return Err(Error::invalid(
                    format!("{what}: a signature is given but no key to check it with"),
                    "set `fingerprint` and `signing_key` in the spec's archive table",
                ));
            }
            None
        }
        Some(fpr) => {
            let fpr = normalise_fpr(fpr).ok_or_else(|| {
                Error::invalid(
                    format!("{what}: fingerprint `{fpr}` is not 40 hex digits"),
                    "write the full OpenPGP v4 fingerprint",
                )
            })?;
            let (key, key_base) = match (&src.signing_key, &d.signing_key) {
                (Some(k), _) => (k.clone(), spec.dir.clone()),
                (None, Some(k)) if src.fingerprint.is_none() => (k.clone(), Some(l.dir.clone())),
                _ => {
                    return Err(Error::invalid(
                        format!("{what}: the spec names fingerprint {fpr} but no signing_key"),
                        "give the key as `signing_key` (a path or URL) next to `fingerprint`",
                    ))
                }
            };
            let sig = match (&src.signature, &src.url) {
                (Some(s), _) => s.clone(),
                (None, Some(u)) => format!("{u}.asc"),
                (None, None) => {
                    return Err(Error::invalid(
                        format!("{what}: archive `{}` must be signed by {fpr}, and no signature is given", d.name),
                        "set `signature` to the detached signature's path or URL (e.g. the release's .asc)",
                    ))
                }
            };
            let tmp =
                tempfile::tempdir().map_err(Error::io("creating a temporary folder", "/tmp"))?;
            let key_file = tmp.path().join("key");
            let sig_file = tmp.path().join("sig");
            Origin::parse(&key, key_base.as_deref()).copy_to(&key_file)?;
            Origin::parse(&sig, spec.dir.as_deref()).copy_to(&sig_file)?;
            verify_signature(&file, &sig_file, &key_file, &fpr, tmp.path())
                .map_err(|e| with_context(e, &what))?;
            Some(fpr)
        }
    };
    Ok(Fetched {
        name: d.name.clone(),
        source: origin.to_string(),
        sha256: pinned,
        signed_by,
        installed_to: d
            .unpack_to
            .clone()
            .or_else(|| d.install_to.clone())
            .unwrap_or_default(),
        file,
        decl: d.clone(),
    })
}

fn with_context(e: Error, what: &str) -> Error {
    match e {
        Error::Invalid { what: w, help } => Error::Invalid {
            what: format!("{what}: {w}"),
            help,
        },
        other => other,
    }
}

/// 40 uppercase hex digits, or None.
pub fn normalise_fpr(f: &str) -> Option<String> {
    let s: String = f
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    (s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())).then_some(s)
}

/// Where bytes come from: a URL (http or https) or a local path.
#[derive(Debug, Clone)]
enum Origin {
    Url(String),
    Path(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Url(u) => write!(f, "{u}"),
            Origin::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Origin {
    fn of(
        what: &str,
        url: Option<&str>,
        path: Option<&str>,
        base: Option<&Path>,
    ) -> Result<Origin> {
        match (url, path) {
            (Some(u), None) if u.starts_with("https://") || u.starts_with("http://") => {
                Ok(Origin::Url(u.to_string()))
            }
            (None, Some(p)) => Ok(Origin::parse(p, base)),
            _ => Err(Error::invalid(
                format!("{what}: needs exactly one of `url` (http or https) or `path`"),
                "url = \"https://...\" to download, path = \"file\" (relative to the spec) for a local copy",
            )),
        }
    }

    /// A URL, or a path (relative to `base` when not absolute).
    fn parse(s: &str, base: Option<&Path>) -> Origin {
        if s.starts_with("https://") || s.starts_with("http://") {
            return Origin::Url(s.to_string());
        }
        let p = PathBuf::from(s);
        match base {
            Some(b) if p.is_relative() => Origin::Path(b.join(p)),
            _ => Origin::Path(p),
        }
    }

    fn copy_to(&self, dest: &Path) -> Result<()> {
        let mut out = File::create(dest).map_err(Error::io("creating", dest))?;
        match self {
            Origin::Path(p) => {
                let mut f = File::open(p).map_err(|e| {
                    Error::invalid(
                        format!("cannot read {}: {e}", p.display()),
                        "check the path (relative paths are relative to the spec, or to the layer folder for a layer's key)",
                    )
                })?;
                copy(&mut f, &mut out, &p.display().to_string(), dest)?;
            }
            Origin::Url(u) => {
                let resp = ureq::get(u)
                    .timeout(std::time::Duration::from_secs(600))
                    .call()
                    .map_err(|e| {
                        Error::invalid(
                            format!("downloading {u}: {e}"),
                            "check the URL and the network; or download it yourself and give `path`",
                        )
                    })?;
                copy(&mut resp.into_reader(), &mut out, u, dest)?;
            }
        }
        out.sync_all().map_err(Error::io("writing", dest))
    }
}

fn copy(r: &mut dyn Read, w: &mut File, from: &str, dest: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        crate::interrupt::check()?;
        let n = r.read(&mut buf).map_err(|e| {
            Error::invalid(
                format!("reading {from}: {e}"),
                "the transfer broke off: run the build again",
            )
        })?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).map_err(Error::io("writing", dest))?;
    }
}

fn hash_file(p: &Path) -> Result<String> {
    let mut f = BufReader::new(File::open(p).map_err(Error::io("reading", p))?);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(Error::io("reading", p))?;
    Ok(hex::encode(h.finalize()))
}

/// Verifies a detached signature with gpg in a throw-away home: it must be a good signature
/// made by the key with fingerprint `fpr` (primary key or subkey of it), not revoked.
pub fn verify_signature(data: &Path, sig: &Path, key: &Path, fpr: &str, tmp: &Path) -> Result<()> {
    let gpg = tools::require("gpg")?;
    let home = tmp.join("gnupg");
    std::fs::create_dir_all(&home).map_err(Error::io("creating", &home))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700));
    }
    let base = |c: &mut Command| {
        c.arg("--homedir").arg(&home).args([
            "--batch",
            "--no-tty",
            "--no-auto-key-retrieve",
            "--no-autostart",
        ]);
    };
    let mut import = Command::new(&gpg);
    base(&mut import);
    import.arg("--import").arg(key);
    let imported = import.output().map_err(Error::io("running", &gpg))?;
    if !imported.status.success() {
        return Err(Error::invalid(
            format!(
                "the signing key {} is not an OpenPGP public key: {}",
                key.display(),
                String::from_utf8_lossy(&imported.stderr).trim()
            ),
            "give the publisher's armored public key",
        ));
    }
    let mut verify = Command::new(&gpg);
    base(&mut verify);
    verify
        .args(["--status-fd", "1", "--verify"])
        .arg(sig)
        .arg(data);
    let out = verify.output().map_err(Error::io("running", &gpg))?;
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(&home)
        .args(["--kill", "all"])
        .output();
    let status = String::from_utf8_lossy(&out.stdout);
    if signature_ok(&status, fpr) {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(Error::invalid(
        format!(
            "the signature does not verify with key {fpr}: {}",
            said.lines()
                .filter(|l| l.starts_with("gpg:"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        "the archive or its signature is not the publisher's: do not use it",
    ))
}

/// Reads gpg's status lines: a VALIDSIG by `fpr` (as signing key or its primary key), no revoked key.
fn signature_ok(status: &str, fpr: &str) -> bool {
    let mut good = false;
    for line in status.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.get(1).copied() {
            Some("VALIDSIG") if (f.get(2) == Some(&fpr) || f.last() == Some(&fpr)) => {
                good = true;
            }
            Some("REVKEYSIG") | Some("BADSIG") | Some("ERRSIG") => return false,
            _ => {}
        }
    }
    good
}

/// Owner ids of what an archive installs.
pub struct Owners {
    pub uid: u64,
    pub gid: u64,
    pub writable_uid: u64,
    pub writable_gid: u64,
}

/// Appends an archive to the image's root tar. Unpacked archives keep their modes without
/// group or world write; every path stays under `unpack_to` (absolute paths, `..` and device
/// nodes are refused). `taken` holds the paths already in the tar: an archive does not
/// overwrite the image.
pub fn append<W: Write>(
    b: &mut tar::Builder<W>,
    a: &Fetched,
    own: &Owners,
    dirs: &mut BTreeSet<String>,
    taken: &BTreeSet<String>,
    mtime: u64,
) -> Result<()> {
    let werr = |e: std::io::Error| {
        Error::invalid(
            format!("writing the image tree: {e}"),
            "check the free space of the scratch folder",
        )
    };
    if let Some(dest) = &a.decl.install_to {
        let rel = dest.trim_start_matches('/').to_string();
        let size = std::fs::metadata(&a.file)
            .map_err(Error::io("reading", &a.file))?
            .len();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(own.uid);
        h.set_gid(own.gid);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_size(size);
        let f = File::open(&a.file).map_err(Error::io("reading", &a.file))?;
        add_parents(b, &rel, dirs, mtime).map_err(werr)?;
        return b.append_data(&mut h, &rel, BufReader::new(f)).map_err(werr);
    }
    let base = a
        .decl
        .unpack_to
        .as_deref()
        .unwrap_or("/")
        .trim_matches('/')
        .to_string();
    let bad = |what: String| {
        Error::invalid(
            format!("archive `{}` ({}): {what}", a.name, a.source),
            "this is not an archive ncimage can install; check the source",
        )
    };
    let reader = decompressor(&a.file)?;
    let mut ar = tar::Archive::new(reader);
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let entries = ar
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    if !base.is_empty() {
        add_parents(b, &format!("{base}/x"), dirs, mtime).map_err(werr)?;
    }
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("unreadable entry: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("unreadable path: {e}")))?
            .to_string_lossy()
            .to_string();
        let rel = safe_rel(&raw).ok_or_else(|| bad(format!("unsafe path `{raw}`")))?;
        if rel.is_empty() {
            continue;
        }
        let path = if base.is_empty() {
            rel.clone()
        } else {
            format!("{base}/{rel}")
        };
        if taken.contains(&path) {
            return Err(bad(format!("/{path} is already in the image")));
        }
        let writable = a.decl.writable.iter().any(|w| {
            rel == *w.trim_end_matches('/')
                || rel.starts_with(&format!("{}/", w.trim_end_matches('/')))
        });
        let (uid, gid) = if writable {
            (own.writable_uid, own.writable_gid)
        } else {
            (own.uid, own.gid)
        };
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7755;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(entry.header().mtime().unwrap_or(mtime));
        h.set_size(0);
        add_parents(b, &path, dirs, mtime).map_err(werr)?;
        match kind {
            tar::EntryType::Directory => {
                h.set_mode(mode | 0o700);
                if dirs.insert(path.clone()) {
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(werr)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(entry.size());
                b.append_data(&mut h, &path, &mut entry).map_err(werr)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.to_string_lossy().to_string())
                    .unwrap_or_default();
                if target.starts_with('/') || safe_rel(&format!("{rel}/../{target}")).is_none() {
                    return Err(bad(format!("symlink `{raw}` points outside: {target}")));
                }
                h.set_mode(0o777);
                b.append_link(&mut h, &path, &target).map_err(werr)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.to_string_lossy().to_string())
                    .unwrap_or_default();
                let t = safe_rel(&target).ok_or_else(|| bad(format!("hard link to `{target}`")))?;
                h.set_mode(mode);
                let t = if base.is_empty() {
                    t
                } else {
                    format!("{base}/{t}")
                };
                b.append_link(&mut h, &path, &t).map_err(werr)?;
            }
            other => {
                return Err(bad(format!(
                    "`{raw}` is a {other:?}: only files, folders and links are installed"
                )))
            }
        }
        seen.insert(rel);
    }
    let missing: Vec<&String> = a
        .decl
        .expect
        .iter()
        .filter(|e| !seen.contains(e.trim_matches('/')))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "it lacks {} (the slot expects {})",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            a.decl.description
        )));
    }
    Ok(())
}

fn add_parents<W: Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    dirs: &mut BTreeSet<String>,
    mtime: u64,
) -> std::io::Result<()> {
    let mut cur = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts[..parts.len().saturating_sub(1)] {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(p);
        if dirs.insert(cur.clone()) {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o755);
            h.set_mtime(mtime);
            h.set_size(0);
            b.append_data(&mut h, format!("{cur}/"), std::io::empty())?;
        }
    }
    Ok(())
}

/// A relative path with no `..` escaping and no absolute start, normalised; None if unsafe.
fn safe_rel(p: &str) -> Option<String> {
    if p.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// A reader that undoes gzip or bzip2 (by magic bytes), or passes a plain tar through.
fn decompressor(p: &Path) -> Result<Box<dyn Read>> {
    let mut f = File::open(p).map_err(Error::io("reading", p))?;
    let mut magic = [0u8; 3];
    let n = f.read(&mut magic).map_err(Error::io("reading", p))?;
    drop(f);
    let f = BufReader::with_capacity(1 << 20, File::open(p).map_err(Error::io("reading", p))?);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(f)),
        [b'B', b'Z', b'h'] => Box::new(bzip2::read::BzDecoder::new(f)),
        _ => Box::new(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalise() {
        assert_eq!(
            normalise_fpr("2880 6A87 8AE4 23A2 8372  792E D758 99B9 A724 937A").as_deref(),
            Some("28806A878AE423A28372792ED75899B9A724937A")
        );
        assert!(normalise_fpr("2880 6A87").is_none());
        assert!(normalise_fpr(&"Z".repeat(40)).is_none());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(
            safe_rel("./nextcloud/occ").as_deref(),
            Some("nextcloud/occ")
        );
        assert_eq!(safe_rel("a/./b/../c").as_deref(), Some("a/c"));
        assert!(safe_rel("/etc/passwd").is_none());
        assert!(safe_rel("../etc/passwd").is_none());
        assert!(safe_rel("a/../../etc").is_none());
    }

    #[test]
    fn gpg_status_needs_validsig_by_the_pinned_key() {
        let fpr = "28806A878AE423A28372792ED75899B9A724937A";
        let good = format!("[GNUPG:] GOODSIG D75899B9A724937A x\n[GNUPG:] VALIDSIG {fpr} 2024-01-01 1 0 4 0 1 10 00 {fpr}\n");
        assert!(signature_ok(&good, fpr));
        let sub = format!(
            "[GNUPG:] VALIDSIG {} 2024-01-01 1 0 4 0 1 10 00 {fpr}\n",
            "A".repeat(40)
        );
        assert!(signature_ok(&sub, fpr));
        let other = format!(
            "[GNUPG:] VALIDSIG {} 2024-01-01 1 0 4 0 1 10 00 {}\n",
            "B".repeat(40),
            "B".repeat(40)
        );
        assert!(!signature_ok(&other, fpr));
        assert!(!signature_ok(&format!("{good}[GNUPG:] REVKEYSIG x\n"), fpr));
        assert!(!signature_ok("[GNUPG:] BADSIG D75899B9A724937A x\n", fpr));
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (p, d) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o664);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_path(p).unwrap();
            h.set_cksum();
            b.append(&h, *d).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn fetched(dir: &Path, data: &[u8], expect: &[&str]) -> Fetched {
        let file = dir.join("a.tar.gz");
        std::fs::write(&file, data).unwrap();
        Fetched {
            name: "app".into(),
            source: file.display().to_string(),
            sha256: String::new(),
            signed_by: None,
            installed_to: "/var/www".into(),
            file,
            decl: ArchiveDecl {
                name: "app".into(),
                description: "a release".into(),
                unpack_to: Some("/var/www".into()),
                install_to: None,
                owner: "root".into(),
                group: "root".into(),
                writable: vec!["app/config".into()],
                writable_owner: "www-data".into(),
                expect: expect.iter().map(|s| s.to_string()).collect(),
                fingerprint: None,
                signing_key: None,
                required: true,
            },
        }
    }

    fn unpack(a: &Fetched) -> Result<Vec<(String, u64, u32)>> {
        let mut b = tar::Builder::new(Vec::new());
        let own = Owners {
            uid: 0,
            gid: 0,
            writable_uid: 33,
            writable_gid: 33,
        };
        append(
            &mut b,
            a,
            &own,
            &mut BTreeSet::new(),
            &BTreeSet::from(["etc/passwd".to_string()]),
            1,
        )?;
        let data = b.into_inner().unwrap();
        let mut ar = tar::Archive::new(data.as_slice());
        Ok(ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().to_string(),
                    e.header().uid().unwrap(),
                    e.header().mode().unwrap(),
                )
            })
            .collect())
    }

    #[test]
    fn unpacks_under_the_folder_with_owners_and_without_group_write() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_gz(&[
            ("app/status.php", b"<?php"),
            ("app/config/config.sample.php", b"<?php"),
        ]);
        let got = unpack(&fetched(d.path(), &data, &["app/status.php"])).unwrap();
        assert!(
            got.contains(&("var/www/app/status.php".into(), 0, 0o644)),
            "{got:?}"
        );
        assert!(
            got.contains(&("var/www/app/config/config.sample.php".into(), 33, 0o644)),
            "{got:?}"
        );
        assert!(got.iter().any(|(p, _, _)| p == "var/www/"), "{got:?}");
    }

    #[test]
    fn missing_expected_file_and_escapes_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_gz(&[("app/index.php", b"<?php")]);
        let e = unpack(&fetched(d.path(), &data, &["app/status.php"])).unwrap_err();
        assert!(e.to_string().contains("lacks app/status.php"), "{e}");
        // A path that climbs out of the folder (written raw: the tar crate refuses to build one).
        let mut raw = tar::Header::new_gnu();
        raw.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../../etc/passwd");
        raw.set_size(1);
        raw.set_mode(0o644);
        raw.set_cksum();
        let mut bytes = raw.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 512]);
        bytes.extend_from_slice(&[0u8; 1024]);
        let e = unpack(&fetched(d.path(), &bytes, &[])).unwrap_err();
        assert!(e.to_string().contains("unsafe path"), "{e}");
    }
}
