//! Deterministic FAT images made in Rust: the EFI system partition and the cloud-init
//! NoCloud seed (`cidata`). Same inputs give the same bytes: the volume id is the caller's
//! and every time stamp is 1980-01-01 00:00:00.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

/// A time provider that always answers the DOS epoch, so images are reproducible.
#[derive(Debug)]
struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

/// The largest FAT image [`make_fat`] builds (it builds in memory).
pub const MAX_FAT_BYTES: u64 = 2 << 30;

/// The 11-byte, space-padded FAT volume label of `label` (1 to 11 printable ASCII
/// characters, kept as given so a lowercase `cidata` stays lowercase).
pub fn fat_label(label: &str) -> Result<[u8; 11]> {
    let ok = !label.is_empty()
        && label.len() <= 11
        && label
            .bytes()
            .all(|b| (b.is_ascii_graphic() && !b"\"*+,./:;<=>?[\\]|".contains(&b)) || b == b' ');
    if !ok {
        return Err(Error::invalid(
            format!("FAT volume label {label:?} is not usable"),
            "use 1 to 11 ASCII letters, digits, '-' or '_'",
        ));
    }
    let mut out = [b' '; 11];
    out[..label.len()].copy_from_slice(label.as_bytes());
    Ok(out)
}

/// Creates (or replaces) `path` as a FAT file system of `size_bytes` holding `files`.
/// Each file is given as a '/'-separated path relative to the root (e.g.
/// `EFI/BOOT/BOOTX64.EFI`); parent directories are created as needed. The FAT type
/// (12/16/32) follows from the size. The image is built in memory (at most
/// [`MAX_FAT_BYTES`]) and written sparse.
pub fn make_fat(
    path: &Path,
    size_bytes: u64,
    label: &str,
    volume_id: u32,
    files: &[(&str, &[u8])],
) -> Result<()> {
    let label_bytes = fat_label(label)?;
    if !size_bytes.is_multiple_of(512) || !(64 * 1024..=MAX_FAT_BYTES).contains(&size_bytes) {
        return Err(Error::invalid(
            format!(
                "FAT image size {size_bytes} for {} is not usable",
                path.display()
            ),
            "give a multiple of 512 bytes from 64 KiB to 2 GiB",
        ));
    }
    // Built in memory (fatfs does many small I/Os), then written sparsely: only the
    // 4 KiB blocks that are not all zeros reach the file.
    let mut image = std::io::Cursor::new(vec![0u8; size_bytes as usize]);

    let fat_err = |what: String| {
        let path = path.to_path_buf();
        move |e: std::io::Error| {
            Error::invalid(
                format!("{}: {what}: {e}", path.display()),
                "make the FAT image larger or the files smaller",
            )
        }
    };

    let options = fatfs::FormatVolumeOptions::new()
        .volume_id(volume_id)
        .volume_label(label_bytes);
    fatfs::format_volume(&mut image, options).map_err(fat_err("formatting".into()))?;
    image.set_position(0);

    let fs = fatfs::FileSystem::new(
        &mut image,
        fatfs::FsOptions::new().time_provider(&FIXED_TIME),
    )
    .map_err(fat_err("mounting".into()))?;
    {
        let root = fs.root_dir();
        for (name, data) in files {
            let name = name.trim_matches('/');
            let parts: Vec<&str> = name.split('/').collect();
            if name.is_empty()
                || parts
                    .iter()
                    .any(|p| p.is_empty() || *p == "." || *p == "..")
            {
                return Err(Error::invalid(
                    format!(
                        "file name {name:?} for the FAT image {} is not usable",
                        path.display()
                    ),
                    "give a relative path such as EFI/BOOT/BOOTX64.EFI",
                ));
            }
            let mut dir = root.clone();
            for p in &parts[..parts.len() - 1] {
                dir = dir
                    .create_dir(p)
                    .map_err(fat_err(format!("creating directory {p}")))?;
            }
            let leaf = parts[parts.len() - 1];
            let mut f = dir
                .create_file(leaf)
                .map_err(fat_err(format!("creating {name}")))?;
            f.truncate()
                .map_err(fat_err(format!("truncating {name}")))?;
            f.write_all(data)
                .map_err(fat_err(format!("writing {name}")))?;
            f.flush().map_err(fat_err(format!("writing {name}")))?;
        }
    }
    fs.unmount().map_err(fat_err("closing".into()))?;
    let image = image.into_inner();

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(Error::io("creating", path))?;
    file.set_len(size_bytes)
        .map_err(Error::io("sizing", path))?;
    const BLOCK: usize = 4096;
    let mut at = 0;
    while at < image.len() {
        // Runs of non-zero blocks are written with one call.
        if image[at..(at + BLOCK).min(image.len())]
            .iter()
            .all(|&b| b == 0)
        {
            at += BLOCK;
            continue;
        }
        let mut end = at + BLOCK;
        while end < image.len()
            && !image[end..(end + BLOCK).min(image.len())]
                .iter()
                .all(|&b| b == 0)
        {
            end += BLOCK;
        }
        let end = end.min(image.len());
        file.write_all_at(&image[at..end], at as u64)
            .map_err(Error::io("writing", path))?;
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        vec![
            ("EFI/BOOT/BOOTX64.EFI", big),
            ("EFI/BOOT/grub.cfg", b"hello\n".to_vec()),
            ("meta-data", b"x".to_vec()),
        ]
    }

    fn build(path: &Path, size: u64, label: &str) {
        let f = files();
        let refs: Vec<(&str, &[u8])> = f.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        make_fat(path, size, label, 0x1234_5678, &refs).unwrap();
    }

    #[test]
    fn two_runs_give_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        build(&a, 32 << 20, "ESP");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        build(&b, 32 << 20, "ESP");
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }

    #[test]
    fn files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        for (size, label) in [(32u64 << 20, "ESP"), (1 << 20, "cidata")] {
            let p = dir.path().join(format!("{label}.img"));
            build(&p, size, label);
            let file = std::fs::File::open(&p).unwrap();
            let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
            assert_eq!(fs.volume_id(), 0x1234_5678);
            assert_eq!(fs.volume_label(), label);
            for (name, data) in files() {
                let mut got = Vec::new();
                fs.root_dir()
                    .open_file(name)
                    .unwrap()
                    .read_to_end(&mut got)
                    .unwrap();
                assert_eq!(got, data, "{name}");
            }
        }
    }

    #[test]
    fn labels() {
        assert_eq!(&fat_label("cidata").unwrap(), b"cidata     ");
        assert!(fat_label("").is_err());
        assert!(fat_label("twelve_chars").is_err());
        assert!(fat_label("a/b").is_err());
    }

    #[test]
    fn too_small_image_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 200_000];
        let err = make_fat(
            &dir.path().join("x.img"),
            128 * 1024,
            "x",
            1,
            &[("big", &big)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("big"), "{err}");
    }
}
