//! Filesystems from tars, without mounting: `mke2fs -d <tar>` with fixed UUIDs, hash seed and
//! SOURCE_DATE_EPOCH, so the same inputs give the same bytes. Also reads the block allocation
//! back (dumpe2fs) so later stages touch only used blocks.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::tools;

pub const BLOCK: u64 = 4096;

#[derive(Clone, Copy)]
pub struct Params<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    pub size: u64,
    pub source_date_epoch: u64,
}

/// Makes an ext4 image at `out` holding the tree in `tar`.
pub fn make_ext4(tar: &Path, out: &Path, p: &Params) -> Result<()> {
    tools::require("mke2fs")?;
    if !p.size.is_multiple_of(BLOCK) {
        return Err(Error::invalid(
            format!("filesystem size {} is not a multiple of 4 KiB", p.size),
            "use a size in MiB",
        ));
    }
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new("mke2fs");
    // One inode per 16 KiB at every size: mke2fs.conf's "small" type (under 512 MiB) would
    // give four times as many inodes, so a compact root shrunk below 512 MiB would grow.
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-i", "16384", "-L", p.label, "-U", p.uuid,
    ])
    .arg("-E")
    .arg(format!("hash_seed={},root_owner=0:0", p.uuid))
    .arg("-d")
    .arg(tar)
    .arg(out)
    .arg(format!("{}k", p.size / 1024))
    .env("SOURCE_DATE_EPOCH", p.source_date_epoch.to_string())
    .env("E2FSPROGS_FAKE_TIME", p.source_date_epoch.to_string())
    .env("MKE2FS_CONFIG", "/etc/mke2fs.conf");
    tools::run(&mut cmd).map_err(|e| match e {
        Error::Command { output, .. } if output.contains("libarchive") => Error::MissingTool {
            tool: "libarchive (mke2fs -d <tar>)".into(),
            package: "libarchive13".into(),
        },
        e => e,
    })?;
    Ok(())
}

/// Size of a compact filesystem for content that used `used_blocks` blocks in a larger one,
/// with `free` bytes to spare, rounded up to 16 MiB and at most `max`. A smaller ext4 has
/// smaller inode tables and journal, so the content always fits.
pub fn compact_size(used_blocks: u64, free: u64, max: u64) -> u64 {
    let step = 16 << 20;
    let want = used_blocks * BLOCK + free;
    want.div_ceil(step).saturating_mul(step).min(max)
}

/// Makes the ext4 image of `tar` at `out` as small as its content plus `free` bytes allows
/// (at most `p.size`) and returns its size. The first pass at full size counts the content
/// together with that size's metadata (a 2 GiB ext4 has a 64 MiB journal and 32 MiB of inode
/// tables); each smaller pass has less, so the size is measured again until it stops
/// shrinking (two or three passes).
pub fn make_compact_ext4(tar: &Path, out: &Path, p: &Params, free: u64) -> Result<u64> {
    let mut size = p.size;
    make_ext4(tar, out, p)?;
    for _ in 0..4 {
        let used = used_count(out)?;
        let want = compact_size(used, free, size);
        if want >= size {
            break;
        }
        make_ext4(tar, out, &Params { size: want, ..*p })?;
        size = want;
    }
    let used = used_count(out)?;
    if size < p.size && size - used * BLOCK < free {
        return Err(Error::invalid(
            format!(
                "the compact root filesystem ({} MiB) has {} MiB free, less than root_free ({} MiB)",
                size >> 20,
                (size - used * BLOCK) >> 20,
                free >> 20
            ),
            "report this; meanwhile set a larger root_free in the spec",
        ));
    }
    Ok(size)
}

/// Number of used 4 KiB blocks (the sum of `used_blocks`).
fn used_count(image: &Path) -> Result<u64> {
    Ok(used_blocks(image)?.iter().map(|r| r.1).sum())
}

/// Used block ranges (start, count) in 4 KiB blocks, from the block bitmaps.
pub fn used_blocks(image: &Path) -> Result<Vec<(u64, u64)>> {
    tools::require("dumpe2fs")?;
    let out = tools::run(Command::new("dumpe2fs").arg(image))?;
    let total = out
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            Error::invalid(
                format!("dumpe2fs {}: no block count", image.display()),
                "is it an ext4 image?",
            )
        })?;
    let free = parse_free(&out)?;
    Ok(complement(&free, total))
}

/// Per-group `Free blocks: a-b, c` lines of dumpe2fs.
pub fn parse_free(dump: &str) -> Result<Vec<(u64, u64)>> {
    let mut v = Vec::new();
    for line in dump.lines().filter(|l| l.starts_with(' ')) {
        let Some(list) = line.trim().strip_prefix("Free blocks:") else {
            continue;
        };
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u64, u64) = match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) if b >= a => (a, b),
                _ => {
                    return Err(Error::invalid(
                        format!("dumpe2fs: cannot read `{part}`"),
                        "report this with the e2fsprogs version",
                    ))
                }
            };
            v.push((a, b - a + 1));
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Ranges of [0, total) not covered by `free` (sorted, non-overlapping).
pub fn complement(free: &[(u64, u64)], total: u64) -> Vec<(u64, u64)> {
    let mut used = Vec::new();
    let mut cur = 0;
    for &(start, len) in free {
        if start > cur {
            used.push((cur, start - cur));
        }
        cur = cur.max(start + len);
    }
    if cur < total {
        used.push((cur, total - cur));
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar in `dir` of directories (names ending in `/`, mode 0755) and regular files (0644),
    /// mtime 1; panics without mke2fs, which every test using it needs.
    fn tar_of(dir: &Path, files: &[(&str, &[u8])]) -> std::path::PathBuf {
        if tools::which("mke2fs").is_none() {
            panic!("mke2fs missing: run scripts/setup-host");
        }
        let path = dir.join("t.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            if name.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
            } else {
                h.set_mode(0o644);
            }
            h.set_size(data.len() as u64);
            h.set_mtime(1);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
        path
    }

    #[test]
    fn compact_size_is_content_plus_free_in_16_mib_steps_up_to_the_maximum() {
        let mib = 1u64 << 20;
        // 389 MiB used + 512 MiB free = 901 MiB -> 912 MiB.
        assert_eq!(compact_size(389 * 256, 512 * mib, 2048 * mib), 912 * mib);
        assert_eq!(compact_size(0, 64 * mib, 2048 * mib), 64 * mib);
        assert_eq!(compact_size(256, 64 * mib, 2048 * mib), 80 * mib);
        // Never more than the root's size.
        assert_eq!(compact_size(1900 * 256, 512 * mib, 2048 * mib), 2048 * mib);
    }

    #[test]
    fn a_compact_root_is_its_content_plus_free_within_one_step() {
        let d = tempfile::tempdir().unwrap();
        let tar_path = tar_of(d.path(), &[("big", &vec![7u8; 3 << 20])]);
        let mib = 1u64 << 20;
        let p = Params {
            label: "t",
            uuid: "0d1f2e3c-4b5a-4968-8776-a5b4c3d2e1f0",
            size: 512 * mib,
            source_date_epoch: 1,
        };
        let out = d.path().join("root.img");
        let size = make_compact_ext4(&tar_path, &out, &p, 16 * mib).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        let used = used_count(&out).unwrap() * BLOCK;
        assert!(size - used >= 16 * mib, "{size} bytes, {used} used");
        // One pass would keep the 512 MiB filesystem's 16 MiB journal and its inode tables
        // (about 22 MiB with the content, so 48 MiB); measured again, the content and a
        // small filesystem's metadata need one 16 MiB step above 16 MiB free.
        assert!(size <= used + 32 * mib, "{size} bytes, {used} used");
        assert!(size < 48 * mib, "{size}");
    }

    #[test]
    fn free_lines_parse_and_complement() {
        let dump = "Free blocks:              100\nGroup 0: (Blocks 0-32767)\n  Free blocks: 10-19, 25\n  Free inodes: 12-100\nGroup 1:\n  Free blocks: 40-49\n";
        let free = parse_free(dump).unwrap();
        assert_eq!(free, vec![(10, 10), (25, 1), (40, 10)]);
        assert_eq!(
            complement(&free, 60),
            vec![(0, 10), (20, 5), (26, 14), (50, 10)]
        );
        assert_eq!(complement(&[], 5), vec![(0, 5)]);
        assert_eq!(complement(&[(0, 5)], 5), vec![]);
    }

    #[test]
    fn same_tar_gives_same_bytes_and_used_blocks_are_found() {
        let d = tempfile::tempdir().unwrap();
        let tar_path = tar_of(d.path(), &[("etc/", b""), ("etc/hello", b"hello")]);
        let p = Params {
            label: "t",
            uuid: "0d1f2e3c-4b5a-4968-8776-a5b4c3d2e1f0",
            size: 16 << 20,
            source_date_epoch: 1,
        };
        let a = d.path().join("a.img");
        let b = d.path().join("b.img");
        make_ext4(&tar_path, &a, &p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        make_ext4(&tar_path, &b, &p).unwrap();
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "mke2fs -d is not reproducible"
        );
        let used = used_blocks(&a).unwrap();
        let n: u64 = used.iter().map(|r| r.1).sum();
        assert!(n > 0 && n < 4096, "used {n} of 4096 blocks");
        assert_eq!(used[0].0, 0, "the superblock's block is used");
    }
}
