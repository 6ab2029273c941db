//! Export: the disk in the spec's formats, `manifest.json` (inputs, packages, sizes, sha256 of
//! every artifact, per-stage timings) and `SHA256SUMS` (accepted by `sha256sum -c`).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::spec::Format;
use crate::tools;

#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub file: String,
    pub format: String,
    pub size_bytes: u64,
    /// Bytes actually allocated on disk (raw images are sparse).
    pub allocated_bytes: u64,
    pub sha256: String,
}

/// Writes `raw` (already in `dir`, named `<stem>.raw`) out in every format; drops the raw file
/// when raw is not asked for. Each format is converted and hashed on its own thread, the raw
/// image hashed meanwhile.
pub fn write_formats(dir: &Path, stem: &str, formats: &[Format]) -> Result<Vec<Artifact>> {
    let raw = dir.join(format!("{stem}.raw"));
    if formats.contains(&Format::Qcow2) {
        tools::require("qemu-img")?;
    }
    let artifact = |name: String, format: &str| -> Result<Artifact> {
        let path = dir.join(&name);
        let meta = std::fs::metadata(&path).map_err(Error::io("reading", &path))?;
        Ok(Artifact {
            file: name,
            format: format.to_string(),
            size_bytes: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            sha256: sha256_file(&path)?,
        })
    };
    let results: Vec<Result<Artifact>> = std::thread::scope(|s| {
        let handles: Vec<_> = formats
            .iter()
            .map(|f| {
                let raw = &raw;
                s.spawn(move || match f {
                    Format::Raw => artifact(format!("{stem}.raw"), "raw"),
                    Format::Qcow2 => {
                        let out = dir.join(format!("{stem}.qcow2"));
                        tools::run(Command::new("qemu-img").args(["convert", "-W", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&out))?;
                        artifact(format!("{stem}.qcow2"), "qcow2")
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("export thread")).collect()
    });
    if !formats.contains(&Format::Raw) {
        std::fs::remove_file(&raw).map_err(Error::io("removing", &raw))?;
    }
    results.into_iter().collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(Error::io("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        crate::interrupt::check()?;
        let n = f.read(&mut buf).map_err(Error::io("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// `SHA256SUMS` text for (sha256, file name) pairs.
pub fn sha256sums(entries: &[(String, String)]) -> String {
    entries.iter().map(|(h, f)| format!("{h}  {f}\n")).collect()
}

/// Seconds per stage, in pipeline order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings(pub BTreeMap<String, f64>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_in_sha256sum_format_and_verify() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.raw"), b"abc").unwrap();
        let h = sha256_file(&d.path().join("a.raw")).unwrap();
        assert_eq!(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        std::fs::write(d.path().join("SHA256SUMS"), sha256sums(&[(h, "a.raw".into())])).unwrap();
        let ok = Command::new("sha256sum").arg("-c").arg("SHA256SUMS").current_dir(d.path()).output().unwrap();
        assert!(ok.status.success());
        std::fs::write(d.path().join("a.raw"), b"abd").unwrap();
        let bad = Command::new("sha256sum").arg("-c").arg("SHA256SUMS").current_dir(d.path()).output().unwrap();
        assert!(!bad.status.success());
    }

    #[test]
    fn raw_only_keeps_raw_and_hashes_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.raw"), vec![0u8; 4096]).unwrap();
        let a = write_formats(d.path(), "x", &[Format::Raw]).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].size_bytes, 4096);
        assert_eq!(a[0].sha256, sha256_file(&d.path().join("x.raw")).unwrap());
    }
}
