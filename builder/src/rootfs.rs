//! The root tree: Debian (trixie) bootstrapped by mmdebstrap into a tar, with the layers' hooks
//! run inside it, cached by content. The cache key is the sha256 of everything that goes into
//! the tree: suite, mirrors, package set, hooks, the values hooks receive, and the enrollment key.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tools;

/// Bump when the way the tree is made changes in a way the inputs do not show.
const RECIPE: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub suite: String,
    /// apt source lines (`deb URI SUITE main`).
    pub sources: Vec<String>,
    pub packages: BTreeSet<String>,
    /// (layer/name, sha256 of the hook)
    pub hooks: Vec<(String, String)>,
    /// Values exported to hooks as environment variables.
    pub env: BTreeMap<String, String>,
    /// sha256 of the enrollment key (never the key).
    pub enroll_key_sha256: String,
    pub source_date_epoch: u64,
    pub recipe: u32,
}

impl Inputs {
    pub fn new(
        suite: &str,
        mirrors: &Mirrors,
        packages: BTreeSet<String>,
        hooks: &[(String, PathBuf)],
        env: BTreeMap<String, String>,
        enroll_key: &Path,
        source_date_epoch: u64,
    ) -> Result<Inputs> {
        let mut hs = Vec::new();
        for (name, path) in hooks {
            let data = std::fs::read(path).map_err(Error::io("reading", path))?;
            hs.push((name.clone(), hex::encode(Sha256::digest(&data))));
        }
        let key = std::fs::read(enroll_key).map_err(Error::io("reading", enroll_key))?;
        Ok(Inputs {
            suite: suite.into(),
            sources: mirrors.sources(suite),
            packages,
            hooks: hs,
            env,
            enroll_key_sha256: hex::encode(Sha256::digest(&key)),
            source_date_epoch,
            recipe: RECIPE,
        })
    }

    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("serialisable");
        hex::encode(Sha256::digest(&json))
    }
}

/// The Debian mirrors images are built from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mirrors {
    pub main: String,
    pub security: Option<String>,
}

impl Mirrors {
    /// From the spec, else from the build machine's apt sources.
    pub fn resolve(main: Option<&str>, security: Option<&str>) -> Result<Mirrors> {
        let host = host_mirrors(Path::new("/etc/apt"));
        let main = main.map(str::to_string).or_else(|| host.as_ref().map(|h| h.main.clone())).ok_or_else(|| {
            Error::invalid(
                "no Debian mirror: the spec names none and /etc/apt/sources.list.d/ has no Debian source",
                "set `mirror = \"http://<mirror>/debian\"` in the spec",
            )
        })?;
        let security = security
            .map(str::to_string)
            .or_else(|| host.and_then(|h| h.security));
        Ok(Mirrors { main, security })
    }

    pub fn sources(&self, suite: &str) -> Vec<String> {
        let mut v = vec![
            format!("deb {} {suite} main", self.main),
            format!("deb {} {suite}-updates main", self.main),
        ];
        if let Some(s) = &self.security {
            v.push(format!("deb {s} {suite}-security main"));
        }
        v
    }
}

/// Reads URIs from deb822 `.sources` files and one-line `sources.list` entries.
pub fn host_mirrors(etc_apt: &Path) -> Option<Mirrors> {
    let mut uris = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
        .collect();
    files.sort();
    files.insert(0, etc_apt.join("sources.list"));
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_string));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                let mut parts = rest.split_whitespace().filter(|p| !p.starts_with('['));
                if let Some(u) = parts.next() {
                    uris.push(u.to_string());
                }
            }
        }
    }
    let debian =
        |u: &&String| u.starts_with("http") && u.trim_end_matches('/').ends_with("/debian");
    let security = |u: &&String| {
        u.starts_with("http") && u.trim_end_matches('/').ends_with("/debian-security")
    };
    let main = uris.iter().find(debian)?.trim_end_matches('/').to_string();
    let security = uris
        .iter()
        .find(security)
        .map(|u| u.trim_end_matches('/').to_string());
    Some(Mirrors { main, security })
}

/// The package apt could not find, from mmdebstrap's output.
pub fn unknown_package(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.split("Unable to locate package ").nth(1))
        .map(|p| p.trim().to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// A cached root tree.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub key: String,
    pub tar: PathBuf,
    pub packages: Vec<Package>,
    pub cached: bool,
}

/// The cache folder: $NCIMAGE_CACHE, else /var/cache/ncimage.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NCIMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ncimage"))
}

/// Where [`enrollment_key`] keeps the key, under the cache.
pub const ENROLL_KEY: &str = "keys/enroll.key";

/// The key that lets first boot open the root without a console, made once per build machine
/// (0600 in the cache). A later issue replaces it with per-instance keys at first boot.
pub fn enrollment_key(cache: &Path) -> Result<PathBuf> {
    let path = cache.join(ENROLL_KEY);
    let dir = path.parent().expect("ENROLL_KEY is in a folder");
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    if !path.exists() {
        let mut key = [0u8; 64];
        getrandom::fill(&mut key).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
        let tmp = dir.join(format!(".enroll.key.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io("creating", &tmp))?;
        f.write_all(&key)
            .and_then(|_| f.sync_all())
            .map_err(Error::io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io("renaming", &path))?;
    }
    Ok(path)
}

/// Returns the cached tree for `inputs`, bootstrapping it if needed.
/// `origin` names the layer file that asks for a package (for error messages).
pub fn ensure(
    cache: &Path,
    inputs: &Inputs,
    hooks: &[(String, PathBuf)],
    enroll_key: &Path,
    origin: &dyn Fn(&str) -> String,
) -> Result<Rootfs> {
    let key = inputs.key();
    let dir = cache.join("rootfs").join(&key);
    let tar = dir.join("rootfs.tar");
    let pkgs = dir.join("packages.json");
    if tar.is_file() && pkgs.is_file() {
        let text = std::fs::read_to_string(&pkgs).map_err(Error::io("reading", &pkgs))?;
        let packages = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                format!("{}: {e}", pkgs.display()),
                "delete that cache folder",
            )
        })?;
        return Ok(Rootfs {
            key,
            tar,
            packages,
            cached: true,
        });
    }
    tools::require("mmdebstrap")?;
    let parent = cache.join("rootfs");
    std::fs::create_dir_all(&parent).map_err(Error::io("creating", &parent))?;
    let work = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&parent)
        .map_err(Error::io("creating a folder in", &parent))?;
    let out_tar = work.path().join("rootfs.tar");
    let pkglist = work.path().join("packages.tsv");

    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=apt")
        .arg("--mode=root")
        .arg("--format=tar")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        .arg(format!(
            "--include={}",
            inputs
                .packages
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(",")
        ))
        .env("SOURCE_DATE_EPOCH", inputs.source_date_epoch.to_string())
        .env("NCIMAGE_ENROLL_KEY", enroll_key);
    for (k, v) in &inputs.env {
        cmd.env(k, v);
    }
    for (_, path) in hooks {
        cmd.arg(format!("--customize-hook=sh '{}' \"$1\"", path.display()));
    }
    cmd.arg(format!(
        "--customize-hook=chroot \"$1\" dpkg-query -W -f='${{Package}}\\t${{Version}}\\n' > '{}'",
        pkglist.display()
    ));
    // Last: what must not be in any image (identity, caches).
    cmd.arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin \"$1\"/var/cache/apt/archives/*.deb \"$1\"/etc/ssh/ssh_host_* \"$1\"/etc/hostname \"$1\"/var/lib/dbus/machine-id \"$1\"/var/log/*.log \"$1\"/var/log/apt/* ; : > \"$1\"/etc/machine-id");
    cmd.arg(&inputs.suite).arg(&out_tar);
    for s in &inputs.sources {
        cmd.arg(s);
    }
    tools::run(&mut cmd).map_err(|e| match e {
        Error::Command { ref output, .. } => match unknown_package(output) {
            Some(pkg) => Error::invalid(
                format!("package `{pkg}` does not exist in Debian {} (mmdebstrap: Unable to locate package)", inputs.suite),
                format!("fix the `packages` list in {} (check names with `apt-cache policy NAME` against a trixie mirror)", origin(&pkg)),
            ),
            None => e,
        },
        e => e,
    })?;

    let text = std::fs::read_to_string(&pkglist).map_err(Error::io("reading", &pkglist))?;
    let packages: Vec<Package> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, v)| Package {
            name: n.to_string(),
            version: v.to_string(),
        })
        .collect();
    let json = serde_json::to_string_pretty(&packages).expect("serialisable");
    std::fs::write(work.path().join("packages.json"), json)
        .map_err(Error::io("writing", work.path()))?;
    std::fs::write(
        work.path().join("inputs.json"),
        serde_json::to_string_pretty(inputs).expect("serialisable"),
    )
    .map_err(Error::io("writing", work.path()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let kept = work.keep();
    std::fs::rename(&kept, &dir).map_err(Error::io("renaming", &dir))?;
    Ok(Rootfs {
        key,
        tar,
        packages,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pkgs: &[&str]) -> Inputs {
        Inputs {
            suite: "trixie".into(),
            sources: vec!["deb http://m/debian trixie main".into()],
            packages: pkgs.iter().map(|s| s.to_string()).collect(),
            hooks: vec![("base/00.sh".into(), "ab".into())],
            env: BTreeMap::new(),
            enroll_key_sha256: "k".into(),
            source_date_epoch: 1,
            recipe: RECIPE,
        }
    }

    #[test]
    fn cache_key_follows_inputs_not_order() {
        assert_eq!(inputs(&["a", "b"]).key(), inputs(&["b", "a"]).key());
        assert_ne!(inputs(&["a"]).key(), inputs(&["a", "b"]).key());
        let mut i = inputs(&["a"]);
        i.hooks[0].1 = "cd".into();
        assert_ne!(i.key(), inputs(&["a"]).key());
    }

    #[test]
    fn mirrors_come_from_deb822_and_one_line_sources() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sources.list.d")).unwrap();
        std::fs::write(
            d.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n",
        )
        .unwrap();
        let m = host_mirrors(d.path()).unwrap();
        assert_eq!(m.main, "http://mirror.test/debian");
        assert_eq!(
            m.security.as_deref(),
            Some("http://mirror.test/debian-security")
        );
        assert_eq!(
            m.sources("trixie")[2],
            "deb http://mirror.test/debian-security trixie-security main"
        );

        let d2 = tempfile::tempdir().unwrap();
        std::fs::write(
            d2.path().join("sources.list"),
            "deb [arch=amd64] http://other.test/debian/ bookworm main\n",
        )
        .unwrap();
        let m2 = host_mirrors(d2.path()).unwrap();
        assert_eq!(m2.main, "http://other.test/debian");
        assert_eq!(m2.security, None);
    }

    #[test]
    fn unknown_package_is_read_from_apt_output() {
        let out = "I: running apt-get update...\nE: Unable to locate package nosuch-pkg\nE: apt-get install failed";
        assert_eq!(unknown_package(out).as_deref(), Some("nosuch-pkg"));
        assert_eq!(unknown_package("E: something else"), None);
    }

    #[test]
    fn enrollment_key_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let k1 = enrollment_key(d.path()).unwrap();
        let a = std::fs::read(&k1).unwrap();
        let k2 = enrollment_key(d.path()).unwrap();
        assert_eq!(a, std::fs::read(&k2).unwrap());
        assert_eq!(a.len(), 64);
        assert_eq!(
            std::fs::metadata(&k1).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
