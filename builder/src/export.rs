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

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Artifact {
    pub file: String,
    pub format: String,
    pub size_bytes: u64,
    /// Bytes actually allocated on disk (raw images are sparse).
    pub allocated_bytes: u64,
    /// Size of the disk the artifact holds, as a VM or a cloud sees it.
    #[serde(default)]
    pub disk_bytes: u64,
    pub sha256: String,
    /// Seconds to write and hash it.
    #[serde(default)]
    pub seconds: f64,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// A fixed VHD ends with a 512-byte footer after the disk's bytes.
pub const VHD_FOOTER_BYTES: u64 = 512;
/// GCE imports disks whose size is a multiple of 1 GiB.
pub const GCE_ALIGN: u64 = GIB;
/// The name GCE requires for the disk inside its tar.gz.
pub const GCE_DISK_NAME: &str = "disk.raw";

/// The size of the disk in `format` for a raw disk of `raw_bytes`: Azure wants a whole number
/// of MiB (the layout always is one: an error otherwise), GCE a multiple of 1 GiB (rounded up;
/// the backup GPT moves to the new end), the others keep the size.
pub fn disk_bytes(format: Format, raw_bytes: u64) -> Result<u64> {
    match format {
        Format::Vhd if !raw_bytes.is_multiple_of(MIB) || raw_bytes == 0 => Err(Error::invalid(
            format!("a {raw_bytes}-byte disk cannot be an Azure VHD"),
            "Azure needs a whole number of MiB; ncimage's disk layout always is one: rebuild the image",
        )),
        Format::Gce => Ok(raw_bytes.div_ceil(GCE_ALIGN).max(1) * GCE_ALIGN),
        _ => Ok(raw_bytes),
    }
}

/// The size of the artifact file of a fixed VHD: the disk plus its footer.
pub fn vhd_file_bytes(raw_bytes: u64) -> u64 {
    raw_bytes + VHD_FOOTER_BYTES
}

/// The host tools the formats need.
pub fn tools_for(formats: &[Format]) -> Vec<&'static str> {
    let mut t = Vec::new();
    if formats
        .iter()
        .any(|f| matches!(f, Format::Qcow2 | Format::Vhd | Format::Vmdk))
    {
        t.push("qemu-img");
    }
    if formats.contains(&Format::Gce) {
        t.push("sgdisk");
    }
    t
}

/// Writes the raw disk `<dir>/<stem>.raw` out in every format (each on its own thread) and
/// hashes each artifact. The raw file stays; the caller removes it when raw is not asked for.
pub fn write_formats(dir: &Path, stem: &str, formats: &[Format]) -> Result<Vec<Artifact>> {
    let raw = dir.join(format!("{stem}.raw"));
    for t in tools_for(formats) {
        tools::require(t)?;
    }
    let raw_bytes = std::fs::metadata(&raw)
        .map_err(Error::io("reading", &raw))?
        .len();
    let mut unique: Vec<Format> = Vec::new();
    for f in formats {
        if !unique.contains(f) {
            unique.push(*f);
        }
    }
    let results: Vec<Result<Artifact>> = std::thread::scope(|s| {
        let handles: Vec<_> = unique
            .iter()
            .map(|&f| {
                let raw = &raw;
                s.spawn(move || -> Result<Artifact> {
                    let t = std::time::Instant::now();
                    let name = format!("{stem}.{}", f.extension());
                    let out = dir.join(&name);
                    let disk = disk_bytes(f, raw_bytes)?;
                    match f {
                        Format::Raw => {}
                        Format::Qcow2 => qemu_img(raw, &out, &["-W", "-O", "qcow2"])?,
                        Format::Vhd => qemu_img(
                            raw,
                            &out,
                            &["-W", "-O", "vpc", "-o", "subformat=fixed,force_size=on"],
                        )?,
                        Format::Vmdk => qemu_img(
                            raw,
                            &out,
                            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
                        )?,
                        Format::Gce => write_gce(raw, &out, dir, disk)?,
                    }
                    let meta = std::fs::metadata(&out).map_err(Error::io("reading", &out))?;
                    let sha256 = sha256_file(&out)?;
                    let secs = t.elapsed().as_secs_f64();
                    tracing::info!(file = %name, secs, "written and hashed");
                    Ok(Artifact {
                        file: name,
                        format: f.name().to_string(),
                        size_bytes: meta.len(),
                        allocated_bytes: meta.blocks() * 512,
                        disk_bytes: disk,
                        sha256,
                        seconds: (secs * 100.0).round() / 100.0,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("export thread"))
            .collect()
    });
    results.into_iter().collect()
}

fn qemu_img(raw: &Path, out: &Path, args: &[&str]) -> Result<()> {
    tools::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw"])
            .args(args)
            .arg(raw)
            .arg(out),
    )?;
    Ok(())
}

/// GCE: the disk padded to `disk` bytes with its backup GPT moved to the new end
/// (`sgdisk -e`), as `disk.raw` in a GNU sparse tar (holes stay holes), gzip.
fn write_gce(raw: &Path, out: &Path, dir: &Path, disk: u64) -> Result<()> {
    let padded = tempfile::Builder::new()
        .prefix(".gce-disk-")
        .tempdir_in(dir)
        .map_err(Error::io("creating a temporary folder in", dir))?;
    let disk_path = padded.path().join(GCE_DISK_NAME);
    let f = std::fs::File::create(&disk_path).map_err(Error::io("creating", &disk_path))?;
    crate::disk::copy_sparse(raw, &f, &disk_path, 0)?;
    let raw_bytes = std::fs::metadata(raw)
        .map_err(Error::io("reading", raw))?
        .len();
    if disk != raw_bytes {
        f.set_len(disk).map_err(Error::io("resizing", &disk_path))?;
        tools::run(Command::new("sgdisk").arg("-e").arg(&disk_path))?;
        // The old backup GPT (the raw disk's last 33 sectors) is now stale: zero it.
        let stale = crate::disk::GPT_SECTORS * crate::disk::SECTOR;
        punch(&f, &disk_path, raw_bytes - stale, stale)?;
    }
    drop(f);
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(Error::io("creating", &tmp))?;
    let write = || -> std::io::Result<()> {
        let gz = flate2::write::GzEncoder::new(
            Interruptible(std::io::BufWriter::with_capacity(1 << 20, file)),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.sparse(true);
        let mut d = std::fs::File::open(&disk_path)?;
        tar.append_file(GCE_DISK_NAME, &mut d)?;
        let mut w = tar.into_inner()?.finish()?;
        w.flush()
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    crate::interrupt::check()?;
    r.map_err(Error::io("writing", out))?;
    std::fs::rename(&tmp, out).map_err(Error::io("renaming into", out))?;
    Ok(())
}

use std::io::Write;

/// A writer that stops with an error once Ctrl-C was pressed.
struct Interruptible<W>(W);

impl<W: Write> Write for Interruptible<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if crate::interrupt::interrupted() {
            return Err(std::io::Error::other("interrupted"));
        }
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Deallocates `len` bytes at `offset` (they read as zeros).
fn punch(f: &std::fs::File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(Error::Io {
            action: "zeroing the old backup GPT in",
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
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

/// Writes `manifest.json` (`manifest`, pretty JSON) and `SHA256SUMS` (every artifact, then the
/// manifest) into `dir`.
pub fn write_manifest_and_sums<M: Serialize>(
    dir: &Path,
    manifest: &M,
    artifacts: &[Artifact],
) -> Result<()> {
    let mpath = dir.join("manifest.json");
    let mtext = serde_json::to_string_pretty(manifest).expect("serialisable") + "\n";
    std::fs::write(&mpath, &mtext).map_err(Error::io("writing", &mpath))?;
    let mut sums: Vec<(String, String)> = artifacts
        .iter()
        .map(|a| (a.sha256.clone(), a.file.clone()))
        .collect();
    sums.push((
        hex::encode(Sha256::digest(mtext.as_bytes())),
        "manifest.json".into(),
    ));
    let spath = dir.join("SHA256SUMS");
    std::fs::write(&spath, sha256sums(&sums)).map_err(Error::io("writing", &spath))?;
    Ok(())
}

/// Renames the finished temporary folder `tmp` to `out`, replacing what was there.
pub fn swap_into_place(tmp: tempfile::TempDir, out: &Path, name: &str) -> Result<()> {
    crate::interrupt::check()?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old).map_err(Error::io("moving aside", out))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(Error::io("renaming into", out))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// `ncimage export DIR --format ...`: writes `formats` from the raw disk of an existing build
/// (or from its qcow2 when the build kept no raw), after checking that disk against the
/// manifest, into the same folder; the manifest's artifacts and SHA256SUMS are updated. The
/// new folder is assembled beside the old one (unchanged files hard-linked) and renamed into
/// place: an error or Ctrl-C leaves the old folder as it was.
pub fn reexport(dir: &Path, formats: &[Format]) -> Result<Vec<Artifact>> {
    let not_output = |why: String| {
        Error::invalid(
            format!("{} is not an ncimage output folder: {why}", dir.display()),
            "give the folder `ncimage build` wrote, e.g. out/redis",
        )
    };
    if !dir.is_dir() {
        return Err(not_output("no such folder".into()));
    }
    // `.` or a path through a link: the folder's own name and parent are needed for the swap.
    let dir = &std::fs::canonicalize(dir).map_err(Error::io("resolving", dir))?;
    let mpath = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_output("it has no manifest.json".into()))
        }
        Err(e) => return Err(Error::io("reading", &mpath)(e)),
    };
    let mut manifest: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| not_output(format!("manifest.json is not JSON ({e})")))?;
    let role = manifest["role"]
        .as_str()
        .ok_or_else(|| not_output("manifest.json names no role".into()))?
        .to_string();
    let old: Vec<Artifact> = serde_json::from_value(manifest["artifacts"].clone())
        .map_err(|e| not_output(format!("manifest.json has no valid artifacts list ({e})")))?;
    let stem = format!("ncimage-{role}");
    for t in tools_for(formats) {
        tools::require(t)?;
    }

    // The source disk, checked against the manifest before anything reads it.
    let find = |f: Format| old.iter().find(|a| a.format == f.name());
    let source = find(Format::Raw).or(find(Format::Qcow2)).ok_or_else(|| {
        Error::invalid(
            format!(
                "{} has neither a raw nor a qcow2 disk to export from",
                dir.display()
            ),
            "rebuild the image with raw or qcow2 among its formats",
        )
    })?;
    let source_path = dir.join(&source.file);
    if !source_path.is_file() {
        return Err(Error::invalid(
            format!(
                "{}: the manifest lists {} but the file is missing",
                dir.display(),
                source.file
            ),
            "rebuild the image",
        ));
    }
    if sha256_file(&source_path)? != source.sha256 {
        return Err(Error::invalid(
            format!(
                "{}: its sha256 differs from manifest.json (the file was changed after the build)",
                source_path.display()
            ),
            "rebuild the image",
        ));
    }

    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| role.clone());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)
        .map_err(|e| {
            Error::invalid(
                format!("cannot write in {}: {e}", parent.display()),
                "export needs write access to the image's folder and its parent",
            )
        })?;
    // Keep every file but the ones rewritten (hard links: no copy, the originals untouched).
    let rewritten: Vec<String> = formats
        .iter()
        .filter(|f| **f != Format::Raw)
        .map(|f| format!("{stem}.{}", f.extension()))
        .chain(["manifest.json".to_string(), "SHA256SUMS".to_string()])
        .collect();
    for e in std::fs::read_dir(dir).map_err(Error::io("reading", dir))? {
        let e = e.map_err(Error::io("reading", dir))?;
        let fname = e.file_name().to_string_lossy().to_string();
        if rewritten.contains(&fname) || !e.path().is_file() {
            continue;
        }
        let to = tmp.path().join(&fname);
        std::fs::hard_link(e.path(), &to).map_err(Error::io("linking", &to))?;
    }
    let raw = tmp.path().join(format!("{stem}.raw"));
    let had_raw = raw.exists();
    if !had_raw {
        tools::require("qemu-img")?;
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&source_path)
                .arg(&raw),
        )?;
    }
    let new = write_formats(tmp.path(), &stem, formats)?;
    if !had_raw && !formats.contains(&Format::Raw) {
        std::fs::remove_file(&raw).map_err(Error::io("removing", &raw))?;
    }

    // Artifacts in the formats' order: the new ones, and the old ones not rewritten.
    let artifacts: Vec<Artifact> = Format::ALL
        .iter()
        .filter_map(|f| {
            new.iter()
                .find(|a| a.format == f.name())
                .or_else(|| find(*f))
                .filter(|a| tmp.path().join(&a.file).is_file())
                .cloned()
        })
        .collect();
    manifest["artifacts"] = serde_json::to_value(&artifacts).expect("serialisable");
    write_manifest_and_sums(tmp.path(), &manifest, &artifacts)?;
    swap_into_place(tmp, dir, &name)?;
    Ok(new)
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
    fn size_rules_of_the_clouds() {
        let mib = 1u64 << 20;
        // Azure: a whole number of MiB, the file is the disk plus the 512-byte footer.
        assert_eq!(disk_bytes(Format::Vhd, 2355 * mib).unwrap(), 2355 * mib);
        assert_eq!(vhd_file_bytes(2355 * mib), 2355 * mib + 512);
        let e = disk_bytes(Format::Vhd, 2355 * mib + 512).unwrap_err();
        assert!(e.to_string().contains("Azure VHD"), "{e}");
        assert!(disk_bytes(Format::Vhd, 0).is_err());
        // GCE: rounded up to a multiple of 1 GiB.
        assert_eq!(disk_bytes(Format::Gce, 2355 * mib).unwrap(), 3 << 30);
        assert_eq!(disk_bytes(Format::Gce, 1).unwrap(), 1 << 30);
        assert_eq!(disk_bytes(Format::Gce, 2 << 30).unwrap(), 2 << 30);
        assert_eq!(disk_bytes(Format::Gce, (2 << 30) + 1).unwrap(), 3 << 30);
        // The others keep the size.
        for f in [Format::Raw, Format::Qcow2, Format::Vmdk] {
            assert_eq!(disk_bytes(f, 2355 * mib + 512).unwrap(), 2355 * mib + 512);
        }
    }

    fn run(c: &mut Command) -> String {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn sha_of_range(path: &Path, from: u64, len: u64) -> String {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(path).unwrap();
        f.seek(std::io::SeekFrom::Start(from)).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).unwrap();
            h.update(&buf[..n]);
            left -= n as u64;
        }
        hex::encode(h.finalize())
    }

    /// A small GPT disk with data in its partition and holes around it.
    fn small_disk(path: &Path) -> u64 {
        use std::os::unix::fs::FileExt;
        let len = 8u64 << 20;
        let f = std::fs::File::create(path).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        run(Command::new("sgdisk")
            .arg("--new=1:2048:12287")
            .arg("--disk-guid=11111111-2222-4333-8444-555555555555")
            .arg(path));
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        f.write_all_at(&data, 1 << 20).unwrap();
        f.write_all_at(b"the end of the partition", (6 << 20) - 24)
            .unwrap();
        len
    }

    #[test]
    fn every_format_reads_back_as_the_same_disk() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("x.raw");
        let len = small_disk(&raw);
        let raw_sha = sha256_file(&raw).unwrap();
        let arts = write_formats(d.path(), "x", &Format::ALL).unwrap();
        assert_eq!(
            arts.iter().map(|a| a.file.as_str()).collect::<Vec<_>>(),
            ["x.qcow2", "x.raw", "x.vhd", "x.vmdk", "x.gce.tar.gz"]
        );
        for a in &arts {
            assert_eq!(a.sha256, sha256_file(&d.path().join(&a.file)).unwrap());
        }
        // qemu-img reads each disk format with the raw's size and converts back to its bytes
        // (a fixed VHD has no header to probe: name its format).
        for (file, fmt, create) in [
            ("x.qcow2", "qcow2", None),
            ("x.vhd", "vpc", None),
            ("x.vmdk", "vmdk", Some("streamOptimized")),
        ] {
            let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
                .args(["info", "--output=json", "-f", fmt])
                .arg(d.path().join(file))))
            .unwrap();
            assert_eq!(info["format"], fmt, "{file}");
            assert_eq!(info["virtual-size"], len, "{file}");
            if let Some(c) = create {
                assert_eq!(info["format-specific"]["data"]["create-type"], c);
            }
            let back = d.path().join(format!("{file}.back"));
            run(Command::new("qemu-img")
                .args(["convert", "-f", fmt, "-O", "raw"])
                .arg(d.path().join(file))
                .arg(&back));
            assert_eq!(sha256_file(&back).unwrap(), raw_sha, "{file}");
        }
        // A fixed VHD: the disk's bytes, then a valid footer.
        let vhd = std::fs::read(d.path().join("x.vhd")).unwrap();
        assert_eq!(vhd.len() as u64, vhd_file_bytes(len));
        let footer = &vhd[vhd.len() - 512..];
        assert_eq!(&footer[..8], b"conectix");
        assert_eq!(
            u64::from_be_bytes(footer[48..56].try_into().unwrap()),
            len,
            "current size"
        );
        assert_eq!(
            u32::from_be_bytes(footer[60..64].try_into().unwrap()),
            2,
            "fixed"
        );
        let sum = footer
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |s, (_, b)| s + *b as u32);
        assert_eq!(u32::from_be_bytes(footer[64..68].try_into().unwrap()), !sum);
        assert_eq!(hex::encode(Sha256::digest(&vhd[..len as usize])), raw_sha);
        // GCE: GNU tar lists one sparse disk.raw; it extracts to 1 GiB whose partitions and
        // MBR are the raw's, with a valid GPT whose backup is at the new end.
        let tgz = d.path().join("x.gce.tar.gz");
        run(Command::new("gzip").arg("-t").arg(&tgz));
        let listing = run(Command::new("tar").arg("-tvzf").arg(&tgz));
        assert_eq!(listing.lines().count(), 1, "{listing}");
        assert!(listing.contains(&format!("{} ", 1u64 << 30)), "{listing}");
        assert!(listing.trim_end().ends_with(" disk.raw"), "{listing}");
        let mut first = [0u8; 512];
        use std::io::Read;
        flate2::read::GzDecoder::new(std::fs::File::open(&tgz).unwrap())
            .read_exact(&mut first)
            .unwrap();
        assert_eq!(first[156], b'S', "a GNU sparse entry");
        assert_eq!(&first[257..265], b"ustar  \0", "GNU format");
        let x = d.path().join("extract");
        std::fs::create_dir(&x).unwrap();
        run(Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&x));
        let disk = x.join("disk.raw");
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(meta.blocks() * 512 < 16 << 20, "extracted sparse");
        // The MBR keeps its boot code; its protective entry now covers the larger disk.
        assert_eq!(sha_of_range(&disk, 0, 446), sha_of_range(&raw, 0, 446));
        let mbr = {
            let mut b = [0u8; 512];
            std::fs::File::open(&disk)
                .unwrap()
                .read_exact(&mut b)
                .unwrap();
            b
        };
        assert_eq!(mbr[446 + 4], 0xee, "protective MBR");
        assert_eq!(
            u32::from_le_bytes(mbr[458..462].try_into().unwrap()) as u64,
            (1u64 << 30) / 512 - 1
        );
        let parts = (1 << 20, 5 << 20);
        assert_eq!(
            sha_of_range(&disk, parts.0, parts.1),
            sha_of_range(&raw, parts.0, parts.1)
        );
        let v = run(Command::new("sgdisk").arg("-v").arg(&disk));
        assert!(v.contains("No problems found"), "{v}");
        let p = |f: &Path| {
            run(Command::new("sgdisk").arg("-p").arg(f))
                .lines()
                .filter(|l| l.trim_start().starts_with('1') || l.contains("GUID"))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(p(&disk), p(&raw));
        assert_eq!(
            sha_of_range(&disk, len - 33 * 512, 33 * 512),
            hex::encode(Sha256::digest(vec![0u8; 33 * 512])),
            "the stale backup GPT is zeroed"
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
