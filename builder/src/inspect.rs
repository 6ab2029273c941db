//! `ncimage inspect IMAGE`: what a built (or booted) disk holds, without device-mapper or
//! mounts: the GPT partition table, a summary of the root's LUKS2 header (`cryptsetup luksDump`
//! on a copy of the header region, extracted with `qemu-img dd` so qcow2 works too) and the
//! manifest next to the image.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::tools;

const SECTOR: u64 = 512;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GptPartition {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl GptPartition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A GUID as GPT stores it (first three fields little-endian), in text.
fn guid(b: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        hex::encode_upper(&b[10..16])
    )
}

/// The partitions of a GPT disk, from its first 34 sectors (protective MBR, header, entries).
pub fn parse_gpt(head: &[u8]) -> Result<Vec<GptPartition>> {
    let bad = |what: &str| {
        Error::invalid(
            format!("not a GPT disk: {what}"),
            "give an image built by `ncimage build` (qcow2 or raw)",
        )
    };
    if head.len() < 34 * SECTOR as usize {
        return Err(bad("shorter than 34 sectors"));
    }
    let h = &head[SECTOR as usize..2 * SECTOR as usize];
    if &h[..8] != b"EFI PART" {
        return Err(bad("no `EFI PART` signature in sector 1"));
    }
    let u32le = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4"));
    let u64le = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8"));
    let entries_lba = u64le(&h[72..]);
    let count = u32le(&h[80..]) as usize;
    let size = u32le(&h[84..]) as usize;
    if size < 128 || entries_lba != 2 {
        return Err(bad("unusual partition entry array"));
    }
    let mut v = Vec::new();
    for i in 0..count {
        let at = 2 * SECTOR as usize + i * size;
        if at + 128 > head.len() {
            break;
        }
        let e = &head[at..at + 128];
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        v.push(GptPartition {
            number: i as u32 + 1,
            name: String::from_utf16_lossy(&name),
            type_guid: guid(&e[..16]),
            first_lba: u64le(&e[32..]),
            last_lba: u64le(&e[40..]),
        });
    }
    Ok(v)
}

/// The summary lines of a `cryptsetup luksDump`: header fields, data segment, keyslots with
/// their PBKDF, tokens, requirements. Nothing secret is in a dump.
pub fn luks_summary(dump: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = "";
    let mut slot: Option<String> = None;
    let mut slot_info: Vec<String> = Vec::new();
    let flush = |slot: &mut Option<String>, info: &mut Vec<String>, out: &mut Vec<String>| {
        if let Some(s) = slot.take() {
            out.push(format!("  keyslot {s}: {}", info.join(", ")));
        }
        info.clear();
    };
    for l in dump.lines() {
        if !l.starts_with(char::is_whitespace) && l.ends_with(':') {
            flush(&mut slot, &mut slot_info, &mut out);
            section = l.trim_end_matches(':');
            continue;
        }
        let t = l.trim();
        let kv = t.split_once(':').map(|(k, v)| (k.trim(), v.trim()));
        match section {
            "Data segments" | "Tokens" | "Keyslots" | "Digests" => {}
            _ => {
                if let Some((k, v)) = kv {
                    if ["Version", "UUID", "Label", "Requirements", "Flags"].contains(&k)
                        && !v.is_empty()
                    {
                        out.push(format!("{k}: {v}"));
                    }
                }
                continue;
            }
        }
        let indent = l.len() - l.trim_start().len();
        match (section, kv) {
            ("Data segments", Some((k, v))) if ["offset", "cipher", "sector"].contains(&k) => {
                out.push(format!("data {k}: {v}"))
            }
            ("Keyslots", Some((k, v))) if indent == 2 && k.parse::<u32>().is_ok() => {
                flush(&mut slot, &mut slot_info, &mut out);
                slot = Some(format!("{k} ({v})"));
            }
            ("Keyslots", Some((k, v)))
                if [
                    "PBKDF",
                    "Hash",
                    "Iterations",
                    "Memory",
                    "Time cost",
                    "Threads",
                    "Priority",
                ]
                .contains(&k) =>
            {
                slot_info.push(format!("{} {v}", k.to_lowercase()))
            }
            ("Tokens", Some((k, v))) if indent == 2 && k.parse::<u32>().is_ok() => {
                out.push(format!("  token {k}: {v}"))
            }
            ("Tokens", Some(("Keyslot", v))) => {
                if let Some(last) = out.last_mut() {
                    last.push_str(&format!(" (keyslot {v})"));
                }
            }
            _ => {}
        }
    }
    flush(&mut slot, &mut slot_info, &mut out);
    out
}

fn image_file(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if path.is_dir() {
        let mut found = None;
        for e in std::fs::read_dir(path)
            .map_err(Error::io("reading", path))?
            .flatten()
        {
            let p = e.path();
            let n = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if n.starts_with("ncimage-") && (n.ends_with(".qcow2") || n.ends_with(".raw")) {
                // qcow2 first (smaller to read), then raw.
                if found.is_none() || n.ends_with(".qcow2") {
                    found = Some(p);
                }
            }
        }
        let f = found.ok_or_else(|| {
            Error::invalid(
                format!("{} holds no ncimage-*.qcow2 or .raw", path.display()),
                "give the image file or the folder `ncimage build` wrote",
            )
        })?;
        return Ok((f, Some(path.join("manifest.json"))));
    }
    if !path.is_file() {
        return Err(Error::invalid(
            format!("{} does not exist", path.display()),
            "give an image file (qcow2 or raw) or the folder `ncimage build` wrote",
        ));
    }
    let m = path.parent().map(|d| d.join("manifest.json"));
    Ok((path.to_path_buf(), m))
}

/// Copies `count` blocks of `bs` bytes from `skip` blocks into the image to `out` (any format
/// qemu-img reads). qemu-img dd counts the skipped blocks in `count`.
fn extract(image: &Path, bs: u64, skip: u64, count: u64, out: &Path) -> Result<()> {
    let count = skip + count;
    tools::run(
        Command::new("qemu-img")
            .args(["dd", "-U", "-O", "raw"])
            .arg(format!("bs={bs}"))
            .arg(format!("skip={skip}"))
            .arg(format!("count={count}"))
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", out.display())),
    )
    .map(drop)
}

pub struct Inspection {
    pub image: PathBuf,
    pub partitions: Vec<GptPartition>,
    pub luks_dump: String,
    pub manifest: Option<serde_json::Value>,
}

/// The root partition: named `root`, else the last one.
pub fn root_partition(parts: &[GptPartition]) -> Option<&GptPartition> {
    parts.iter().find(|p| p.name == "root").or(parts.last())
}

/// Extracts the root's LUKS2 header region (16 MiB) of `image` into `out`.
pub fn extract_luks_header(image: &Path, parts: &[GptPartition], out: &Path) -> Result<()> {
    let root = root_partition(parts).ok_or_else(|| {
        Error::invalid(
            "the disk has no partitions",
            "give an image built by ncimage",
        )
    })?;
    let mib = 1 << 20;
    if root.offset() % mib != 0 {
        return Err(Error::invalid(
            format!(
                "the root partition starts at byte {}, not on a MiB",
                root.offset()
            ),
            "give an image built by ncimage",
        ));
    }
    extract(image, mib, root.offset() / mib, 16, out)
}

pub fn gpt_of(image: &Path, work: &Path) -> Result<Vec<GptPartition>> {
    let head = work.join("head.bin");
    extract(image, SECTOR, 0, 34, &head)?;
    parse_gpt(&std::fs::read(&head).map_err(Error::io("reading", &head))?)
}

pub fn inspect(path: &Path) -> Result<Inspection> {
    tools::require_all(&["qemu-img", "cryptsetup"])?;
    let (image, manifest) = image_file(path)?;
    let work = tempfile::Builder::new()
        .prefix("ncimage-inspect-")
        .tempdir()
        .map_err(Error::io(
            "creating a temporary folder",
            std::env::temp_dir(),
        ))?;
    let partitions = gpt_of(&image, work.path())?;
    let header = work.path().join("luks-header.bin");
    extract_luks_header(&image, &partitions, &header)?;
    let luks_dump = tools::run(
        Command::new("cryptsetup")
            .args(["luksDump", "--disable-locks"])
            .arg(&header),
    )?;
    let manifest = match manifest.filter(|m| m.is_file()) {
        Some(m) => {
            let text = std::fs::read_to_string(&m).map_err(Error::io("reading", &m))?;
            Some(serde_json::from_str(&text).map_err(|e| {
                Error::invalid(format!("{}: {e}", m.display()), "rebuild the image")
            })?)
        }
        None => None,
    };
    Ok(Inspection {
        image,
        partitions,
        luks_dump,
        manifest,
    })
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

impl Inspection {
    pub fn report(&self) -> String {
        let mut s = format!("image: {}\n\npartitions (GPT):\n", self.image.display());
        for p in &self.partitions {
            s.push_str(&format!(
                "  {:>2} {:<10} offset {:>10}  size {:>10}  type {}\n",
                p.number,
                p.name,
                mib(p.offset()),
                mib(p.size()),
                p.type_guid
            ));
        }
        s.push_str("\nroot LUKS2 header:\n");
        for l in luks_summary(&self.luks_dump) {
            s.push_str(&format!("  {l}\n"));
        }
        match &self.manifest {
            Some(m) => {
                let g = |k: &str| m.pointer(k).map(|v| v.to_string()).unwrap_or_default();
                s.push_str("\nmanifest.json:\n");
                for (label, ptr) in [
                    ("role", "/role"),
                    ("ncimage", "/ncimage_version"),
                    ("spec", "/spec/name"),
                    ("spec sha256", "/spec/sha256"),
                    ("suite", "/inputs/suite"),
                    ("root fs sha256", "/filesystems/root/sha256"),
                    ("boot fs sha256", "/filesystems/boot/sha256"),
                    ("kernel cmdline", "/kernel_cmdline"),
                ] {
                    s.push_str(&format!("  {label}: {}\n", g(ptr).trim_matches('"')));
                }
                let n = m
                    .get("packages")
                    .and_then(|p| p.as_array())
                    .map(|a| a.len())
                    .unwrap_or(0);
                s.push_str(&format!("  packages: {n}\n"));
                for a in m
                    .get("artifacts")
                    .and_then(|a| a.as_array())
                    .into_iter()
                    .flatten()
                {
                    s.push_str(&format!(
                        "  artifact: {} sha256 {}\n",
                        a.get("file").and_then(|v| v.as_str()).unwrap_or("?"),
                        a.get("sha256").and_then(|v| v.as_str()).unwrap_or("?")
                    ));
                }
            }
            None => s.push_str("\nmanifest.json: none next to the image\n"),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_written_by_sgdisk_is_read_back() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("d.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        tools::run(
            Command::new("sgdisk")
                .args(["-n", "1:2048:+1M", "-t", "1:EF02", "-c", "1:bios"])
                .args(["-n", "2:0:+8M", "-t", "2:8309", "-c", "2:root"])
                .arg(&disk),
        )
        .unwrap();
        let head = std::fs::read(&disk).unwrap();
        let parts = parse_gpt(&head[..34 * 512]).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "bios");
        assert_eq!(parts[0].type_guid, "21686148-6449-6E6F-744E-656564454649");
        assert_eq!(parts[0].offset(), 1 << 20);
        assert_eq!(parts[1].name, "root");
        assert_eq!(parts[1].size(), 8 << 20);
        assert_eq!(root_partition(&parts).unwrap().number, 2);
        assert!(parse_gpt(&vec![0u8; 34 * 512])
            .unwrap_err()
            .to_string()
            .contains("EFI PART"));
    }

    #[test]
    fn luks_header_is_summarised_from_a_file() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("v.img");
        std::fs::File::create(&vol)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        let key = d.path().join("k");
        std::fs::write(&key, "k").unwrap();
        tools::run(
            Command::new("cryptsetup")
                .args(["luksFormat", "-q", "--disable-locks", "--type", "luks2"])
                .args(crate::luks::GENERATED_KEY_PBKDF_ARGS)
                .args(["--label", "root", "--key-file"])
                .arg(&key)
                .arg(&vol),
        )
        .unwrap();
        // An argon2id keyslot too (images built before keyslots used PBKDF2).
        let key2 = d.path().join("k2");
        std::fs::write(&key2, "k2").unwrap();
        tools::run(
            Command::new("cryptsetup")
                .args(["luksAddKey", "-q", "--disable-locks"])
                .args(["--pbkdf", "argon2id", "--pbkdf-memory", "65536"])
                .args(["--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1"])
                .arg("--key-file")
                .arg(&key)
                .arg(&vol)
                .arg(&key2),
        )
        .unwrap();
        let dump = tools::run(
            Command::new("cryptsetup")
                .args(["luksDump", "--disable-locks"])
                .arg(&vol),
        )
        .unwrap();
        let s = luks_summary(&dump).join("\n");
        assert!(s.contains("Version: 2"), "{s}");
        assert!(s.contains("Label: root"), "{s}");
        assert!(s.contains("data cipher: aes-xts-plain64"), "{s}");
        assert!(
            s.contains(
                "keyslot 0 (luks2): priority normal, pbkdf pbkdf2, hash sha512, iterations 1000\n"
            ),
            "{s}"
        );
        assert!(s.contains("keyslot 1 (luks2): "), "{s}");
        assert!(s.contains("pbkdf argon2id"), "{s}");
        assert!(s.contains("memory 65536"), "{s}");
        assert_eq!(s.matches("hash ").count(), 1, "{s}");
        assert!(!s.contains("token"), "{s}");
    }
}
