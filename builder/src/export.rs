//! Export: the disk in the spec's formats, `manifest.json` (inputs, packages, sizes, sha256 of
//! every artifact, per-stage timings) and `SHA256SUMS` (accepted by `sha256sum -c`).

use std::collections::BTreeMap;
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
        let t = std::time::Instant::now();
        let sha256 = sha256_file(&path)?;
        tracing::info!(file = %name, secs = t.elapsed().as_secs_f64(), "hashed");
        Ok(Artifact {
            file: name,
            format: format.to_string(),
            size_bytes: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            sha256,
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
                        let t = std::time::Instant::now();
                        let _converted = tools::run(
                            Command::new("qemu-img")
                                .args(["convert", "-W", "-f", "raw", "-O", "qcow2"])
                                .arg(raw)
                                .arg(&out),
                        )?;
                        tracing::info!(secs = t.elapsed().as_secs_f64(), "qcow2 written");
                        artifact(format!("{stem}.qcow2"), "qcow2")
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("export thread"))
            .collect()
    });
    if !formats.contains(&Format::Raw) {
        std::fs::remove_file(&raw).map_err(Error::io("removing", &raw))?;
    }
    results.into_iter().collect()
}

/// sha256 of a file. Holes of sparse files are hashed as zeros from memory (no reads), which
/// keeps hashing a mostly-empty disk image cheap.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).map_err(Error::io("opening", path))?;
    let len = f.metadata().map_err(Error::io("reading", path))?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let zeros = vec![0u8; 4 << 20];
    let fd = f.as_raw_fd();
    let mut pos = 0u64;
    while pos < len {
        crate::interrupt::check()?;
        // Next data at or after pos; everything before it is a hole.
        let data = match unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) } {
            n if n >= 0 => n as u64,
            _ => len, // ENXIO: only a hole remains
        };
        let mut z = data - pos;
        while z > 0 {
            let n = z.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            z -= n as u64;
        }
        pos = data;
        if pos >= len {
            break;
        }
        let hole = match unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) } {
            n if n >= 0 => (n as u64).min(len),
            _ => len,
        };
        while pos < hole {
            let n = (hole - pos).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos)
                .map_err(Error::io("reading", path))?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
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
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(
            d.path().join("SHA256SUMS"),
            sha256sums(&[(h, "a.raw".into())]),
        )
        .unwrap();
        let ok = Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(ok.status.success());
        std::fs::write(d.path().join("a.raw"), b"abd").unwrap();
        let bad = Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(!bad.status.success());
    }

    #[test]
    fn sparse_files_hash_like_their_bytes() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let sparse = d.path().join("sparse");
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(40 << 20).unwrap();
        f.write_all_at(b"middle", 17 << 20).unwrap();
        f.write_all_at(b"end", (40 << 20) - 3).unwrap();
        let mut dense = vec![0u8; 40 << 20];
        dense[17 << 20..(17 << 20) + 6].copy_from_slice(b"middle");
        dense[(40 << 20) - 3..].copy_from_slice(b"end");
        assert_eq!(
            sha256_file(&sparse).unwrap(),
            hex::encode(Sha256::digest(&dense))
        );
        let hole_at_end = d.path().join("tail");
        let g = std::fs::File::create(&hole_at_end).unwrap();
        g.write_all_at(b"x", 0).unwrap();
        g.set_len(9 << 20).unwrap();
        let mut v = vec![0u8; 9 << 20];
        v[0] = b'x';
        assert_eq!(
            sha256_file(&hole_at_end).unwrap(),
            hex::encode(Sha256::digest(&v))
        );
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
