//! LUKS2 around the root filesystem, made offline on the build host (it has no device-mapper).
//!
//! cryptsetup writes the header and keyslot (`luksFormat` with a volume key we generate and
//! the minimal PBKDF of generated keys); ncimage then encrypts the filesystem's used blocks
//! into the data segment with AES-256-XTS (plain64 IVs, 512-byte sectors), exactly what
//! dm-crypt reads. Free blocks stay holes, so the image stays small and nothing of them is
//! plaintext (they decrypt to noise, which ext4 never reads). This takes ~1 s where `cryptsetup reencrypt --encrypt`
//! takes ~10 s for 2 GiB; a unit test checks the ciphertext against OpenSSL sector by sector.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use aes::cipher::KeyInit;
use aes::Aes256;
use serde::Serialize;
use xts_mode::{get_tweak_default, Xts128};

use crate::error::{Error, Result};
use crate::spec::LuksSettings;
use crate::tools;

/// Data segment offset: LUKS2's default 16 MiB (header, keyslots area).
pub const DATA_OFFSET: u64 = 16 << 20;
pub const SECTOR: u64 = 512;
/// The PBKDF of every keyslot ncimage makes: PBKDF2-SHA512 with cryptsetup's minimum of 1000
/// iterations. Each of those keyslots holds a generated key, never a person's passphrase: the
/// image's enrollment key, each machine's recovery key (128 random bits) and the data volumes'
/// key files are random, so stretching them adds no strength, only cost (argon2id at 64 MiB
/// took 2-3 s per unlock under QEMU TCG, and first boot unlocks about a dozen times). This is
/// systemd-cryptenroll's choice for recovery keys and TPM2/FIDO2 tokens
/// (`cryptsetup_set_minimal_pbkdf()`), and clevis binds with pbkdf2 at 1000 iterations too.
/// PBKDF2 has no memory or parallel cost: never pass `--pbkdf-memory`/`--pbkdf-parallel` with it.
pub const GENERATED_KEY_PBKDF_ARGS: [&str; 6] = [
    "--pbkdf",
    GENERATED_KEY_PBKDF,
    "--hash",
    GENERATED_KEY_PBKDF_HASH,
    "--pbkdf-force-iterations",
    "1000",
];
/// See [`GENERATED_KEY_PBKDF_ARGS`].
pub const GENERATED_KEY_PBKDF: &str = "pbkdf2";
pub const GENERATED_KEY_PBKDF_HASH: &str = "sha512";
pub const GENERATED_KEY_PBKDF_ITERATIONS: u32 = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct LuksInfo {
    pub uuid: String,
    pub cipher: String,
    pub key_bits: u32,
    pub sector_size: u64,
    pub data_offset: u64,
    /// The keyslot's PBKDF ([`GENERATED_KEY_PBKDF_ARGS`]).
    pub pbkdf: String,
    pub pbkdf_hash: String,
    pub pbkdf_iterations: u32,
    /// Bytes of the filesystem written encrypted (used blocks).
    pub encrypted_bytes: u64,
}

/// A 64-byte AES-XTS key kept only in memory, zeroed on drop.
pub struct VolumeKey([u8; 64]);

impl VolumeKey {
    pub fn random() -> Result<VolumeKey> {
        let mut k = [0u8; 64];
        getrandom::fill(&mut k).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
        Ok(VolumeKey(k))
    }
    fn cipher(&self) -> Xts128<Aes256> {
        Xts128::new(
            Aes256::new_from_slice(&self.0[..32]).expect("32"),
            Aes256::new_from_slice(&self.0[32..]).expect("32"),
        )
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// A filesystem image to encrypt.
pub struct Plain<'a> {
    pub fs: &'a Path,
    /// Its used ranges in bytes (offset, len).
    pub used: &'a [(u64, u64)],
    /// Length of the data segment (at least the filesystem's): past the filesystem it stays
    /// a hole, which first boot grows the filesystem into.
    pub data_len: u64,
}

/// Encrypts the filesystem image into a LUKS2 volume at `out`, unlockable with `key_file`.
pub fn encrypt(
    plain: &Plain,
    out: &Path,
    uuid: &str,
    key_file: &Path,
    s: &LuksSettings,
    work: &Path,
) -> Result<LuksInfo> {
    tools::require("cryptsetup")?;
    let Plain { fs, used, data_len } = *plain;
    let fs_len = std::fs::metadata(fs)
        .map_err(Error::io("reading", fs))?
        .len();
    let vk = VolumeKey::random()?;
    {
        let f = File::create(out).map_err(Error::io("creating", out))?;
        f.set_len(DATA_OFFSET + fs_len.max(data_len))
            .map_err(Error::io("sizing", out))?;
    }
    format_header(out, uuid, &vk, key_file, s, work)?;
    let encrypted = encrypt_ranges(fs, out, used, &vk)?;
    Ok(LuksInfo {
        uuid: uuid.to_string(),
        cipher: s.cipher.clone(),
        key_bits: s.key_bits,
        sector_size: SECTOR,
        data_offset: DATA_OFFSET,
        pbkdf: GENERATED_KEY_PBKDF.to_string(),
        pbkdf_hash: GENERATED_KEY_PBKDF_HASH.to_string(),
        pbkdf_iterations: GENERATED_KEY_PBKDF_ITERATIONS,
        encrypted_bytes: encrypted,
    })
}

/// `cryptsetup luksFormat` on the file with our volume key (passed through a 0600 file that is
/// removed right after, never on a command line) and `key_file` (the enrollment key) in
/// keyslot 0, under [`GENERATED_KEY_PBKDF_ARGS`].
fn format_header(
    out: &Path,
    uuid: &str,
    vk: &VolumeKey,
    key_file: &Path,
    s: &LuksSettings,
    work: &Path,
) -> Result<()> {
    let vk_dir = tempfile::Builder::new()
        .prefix(".vk-")
        .tempdir_in(work)
        .map_err(Error::io("creating a folder in", work))?;
    let vk_path = vk_dir.path().join("volume.key");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&vk_path)
            .map_err(Error::io("creating", &vk_path))?;
        f.write_all(&vk.0).map_err(Error::io("writing", &vk_path))?;
    }
    let mut cmd = Command::new("cryptsetup");
    cmd.args([
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        &s.cipher,
    ])
    .args([
        "--key-size",
        &s.key_bits.to_string(),
        "--sector-size",
        &SECTOR.to_string(),
    ])
    .args([
        "--offset",
        &(DATA_OFFSET / 512).to_string(),
        "--uuid",
        uuid,
        "--label",
        "root",
    ])
    // The enrollment key is random (and ships in the image): the minimal PBKDF.
    .args(GENERATED_KEY_PBKDF_ARGS)
    .arg("--volume-key-file")
    .arg(&vk_path)
    .arg("--key-file")
    .arg(key_file)
    .arg(out)
    .current_dir(work);
    let r = tools::run(&mut cmd);
    // Overwrite the key file before the folder goes.
    let _ = std::fs::write(&vk_path, [0u8; 64]);
    r.map(|_| ())
}

/// Encrypts `ranges` of `fs` into `out` at DATA_OFFSET; returns the bytes written.
fn encrypt_ranges(fs: &Path, out: &Path, ranges: &[(u64, u64)], vk: &VolumeKey) -> Result<u64> {
    let src = File::open(fs).map_err(Error::io("opening", fs))?;
    let dst = OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(Error::io("opening", out))?;
    let xts = vk.cipher();
    const CHUNK: u64 = 4 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut total = 0;
    for &(start, len) in ranges {
        if start % SECTOR != 0 || len % SECTOR != 0 {
            return Err(Error::invalid(
                format!("range {start}+{len} is not sector aligned"),
                "this is a bug in ncimage",
            ));
        }
        let mut off = start;
        while off < start + len {
            crate::interrupt::check()?;
            let n = CHUNK.min(start + len - off) as usize;
            let b = &mut buf[..n];
            src.read_exact_at(b, off)
                .map_err(Error::io("reading", fs))?;
            xts.encrypt_area(
                b,
                SECTOR as usize,
                (off / SECTOR) as u128,
                get_tweak_default,
            );
            dst.write_all_at(b, DATA_OFFSET + off)
                .map_err(Error::io("writing", out))?;
            off += n as u64;
            total += n as u64;
        }
    }
    Ok(total)
}

/// Unlocks the header with `key_file` (no device-mapper needed): proves the keyslot works.
pub fn test_key(volume: &Path, key_file: &Path) -> Result<()> {
    tools::run(
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(key_file)
            .arg(volume),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our ciphertext is byte for byte what `cryptsetup reencrypt --encrypt` writes for the same
    /// volume key (the slow reference path: it encrypts every sector in userspace).
    #[test]
    fn ciphertext_matches_cryptsetup_reencrypt() {
        let d = tempfile::tempdir().unwrap();
        let mut vk_bytes = [0u8; 64];
        getrandom::fill(&mut vk_bytes).unwrap();
        let vk = VolumeKey(vk_bytes);
        let vk_file = d.path().join("vk");
        std::fs::write(&vk_file, vk_bytes).unwrap();
        let key = d.path().join("key");
        std::fs::write(&key, [42u8; 64]).unwrap();
        let mut plain = vec![0u8; 1 << 20];
        getrandom::fill(&mut plain).unwrap();
        let reference = d.path().join("reference.img");
        std::fs::write(&reference, &plain).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&reference)
            .unwrap()
            .set_len((1 << 20) + (32 << 20))
            .unwrap();
        tools::run(
            Command::new("cryptsetup")
                .args([
                    "reencrypt",
                    "--encrypt",
                    "--batch-mode",
                    "--type",
                    "luks2",
                    "--reduce-device-size",
                    "32M",
                    "--sector-size",
                    "512",
                ])
                .args(GENERATED_KEY_PBKDF_ARGS)
                .arg("--volume-key-file")
                .arg(&vk_file)
                .arg("--key-file")
                .arg(&key)
                .arg(&reference)
                .current_dir(d.path()),
        )
        .unwrap();
        let fs = d.path().join("fs.img");
        std::fs::write(&fs, &plain).unwrap();
        let ours = d.path().join("ours.img");
        std::fs::File::create(&ours)
            .unwrap()
            .set_len(DATA_OFFSET + (1 << 20))
            .unwrap();
        encrypt_ranges(&fs, &ours, &[(0, 1 << 20)], &vk).unwrap();
        let a = std::fs::read(&reference).unwrap();
        let b = std::fs::read(&ours).unwrap();
        let seg = DATA_OFFSET as usize..DATA_OFFSET as usize + (1 << 20);
        assert_ne!(&b[seg.clone()], &plain[..]);
        assert!(
            a[seg.clone()] == b[seg],
            "ciphertext differs from cryptsetup's"
        );
    }

    #[test]
    fn volume_has_a_working_keyslot_and_no_plaintext() {
        let d = tempfile::tempdir().unwrap();
        let fs = d.path().join("fs.img");
        let marker = b"NCIMAGE-PLAINTEXT-MARKER-0123456789";
        let mut data = vec![0u8; 1 << 20];
        for chunk in data.chunks_mut(4096) {
            chunk[..marker.len()].copy_from_slice(marker);
        }
        std::fs::write(&fs, &data).unwrap();
        let key = d.path().join("key");
        std::fs::write(&key, [42u8; 64]).unwrap();
        let out = d.path().join("root.luks");
        let s: LuksSettings = toml::from_str("").unwrap();
        // The data segment is 1 MiB longer than the filesystem: a hole first boot grows into.
        let data_len = data.len() as u64 + (1 << 20);
        let info = encrypt(
            &Plain {
                fs: &fs,
                used: &[(0, 1 << 19)],
                data_len,
            },
            &out,
            "9c3f7d1e-2b4a-4c5d-8e6f-0a1b2c3d4e5f",
            &key,
            &s,
            d.path(),
        )
        .unwrap();
        assert_eq!(info.encrypted_bytes, 1 << 19);
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            DATA_OFFSET + data_len
        );
        test_key(&out, &key).unwrap();
        let wrong = d.path().join("wrong");
        std::fs::write(&wrong, [1u8; 64]).unwrap();
        assert!(test_key(&out, &wrong).is_err());
        let bytes = std::fs::read(&out).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext found in the volume"
        );
        let dump = tools::run(Command::new("cryptsetup").arg("luksDump").arg(&out)).unwrap();
        assert!(dump.contains("offset: 16777216"), "{dump}");
        // Only the used range was written: the rest of the data segment is a hole.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated < (16 << 20) + (1 << 19) + (1 << 20),
            "allocated {allocated}"
        );
    }

    /// The keyslots of a `luksDump`: (number, the slot's "Key: value" lines).
    fn keyslots(dump: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let mut inside = false;
        for l in dump.lines() {
            if !l.starts_with(char::is_whitespace) {
                inside = l == "Keyslots:";
                continue;
            }
            let Some((k, v)) = l.trim().split_once(':').filter(|_| inside) else {
                continue;
            };
            if l.starts_with("  ") && k.parse::<u32>().is_ok() {
                out.push((k.to_string(), Vec::new()));
            } else if let Some(slot) = out.last_mut() {
                slot.1.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        out
    }

    /// The enrollment keyslot `encrypt` writes uses the minimal PBKDF of generated keys
    /// (PBKDF2-SHA512, 1000 iterations), and the manifest's record of it says so.
    #[test]
    fn enrollment_keyslot_uses_the_minimal_pbkdf2() {
        assert_eq!(
            GENERATED_KEY_PBKDF_ARGS,
            [
                "--pbkdf",
                GENERATED_KEY_PBKDF,
                "--hash",
                GENERATED_KEY_PBKDF_HASH,
                "--pbkdf-force-iterations",
                &GENERATED_KEY_PBKDF_ITERATIONS.to_string(),
            ]
        );
        let d = tempfile::tempdir().unwrap();
        let fs = d.path().join("fs.img");
        std::fs::write(&fs, vec![7u8; 1 << 16]).unwrap();
        let key = d.path().join("key");
        std::fs::write(&key, [42u8; 64]).unwrap();
        let out = d.path().join("root.luks");
        let info = encrypt(
            &Plain {
                fs: &fs,
                used: &[(0, 1 << 16)],
                data_len: 1 << 16,
            },
            &out,
            "9c3f7d1e-2b4a-4c5d-8e6f-0a1b2c3d4e5f",
            &key,
            &LuksSettings::default(),
            d.path(),
        )
        .unwrap();
        assert_eq!(
            (
                info.pbkdf.as_str(),
                info.pbkdf_hash.as_str(),
                info.pbkdf_iterations
            ),
            ("pbkdf2", "sha512", 1000)
        );
        let dump = tools::run(Command::new("cryptsetup").arg("luksDump").arg(&out)).unwrap();
        let slots = keyslots(&dump);
        assert_eq!(slots.len(), 1, "{dump}");
        let (n, fields) = &slots[0];
        assert_eq!(n, "0", "{dump}");
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PBKDF"), Some("pbkdf2"), "{dump}");
        assert_eq!(get("Hash"), Some("sha512"), "{dump}");
        assert_eq!(get("Iterations"), Some("1000"), "{dump}");
        assert_eq!(get("Memory"), None, "{dump}");
        assert!(dump.contains("\tPBKDF:      pbkdf2\n"), "{dump}");
        assert!(dump.contains("\tIterations: 1000\n"), "{dump}");
        test_key(&out, &key).unwrap();
    }
}
