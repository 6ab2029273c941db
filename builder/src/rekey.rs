//! Per-instance encryption, in the guest: `ncimage rekey` (ncimage-rekey.service, first boot)
//! turns the image's root, which every copy of the image shares (one volume key, opened by the
//! build machine's enrollment key in the initramfs), into this machine's own:
//!
//! 1. LUKS2 re-encryption of the root with a fresh volume key (`cryptsetup reencrypt`,
//!    resilience `checksum`: a power loss leaves a resumable header). The first-boot initramfs
//!    does it offline, before cryptroot opens the root (`scripts/local-top/ncimage-reencrypt`,
//!    written by overlays/base/hooks/10-boot.sh with [`REENCRYPT_ARGS`]; it resumes an
//!    interrupted one the same way), marks the header ([`OWN_KEY_MARK`]) and leaves its figures
//!    in /run/ncimage-reencrypt.json. Only when that did not happen is the active root
//!    re-encrypted here, online (after a power loss the next boot's initramfs resumes it
//!    offline; failing that, it opens the half re-encrypted device and this run resumes with
//!    `--resume-only`);
//! 2. the node's recovery key (from its seed) as a keyslot (PBKDF2, 1000 iterations: it is
//!    generated, 128 random bits; see `luks::GENERATED_KEY_PBKDF_ARGS`);
//! 3. the automatic unlock methods of the node's policy bound with clevis (tpm2, tang, or an
//!    sss threshold across them);
//! 4. the first-boot initramfs with the enrollment key (/boot/ncimage-enroll.img, loaded by
//!    GRUB after the image's keyless initramfs) overwritten and deleted: no initramfs rebuild
//!    in the guest (minutes under TCG);
//! 5. the enrollment keyslot killed and the key file removed.
//!
//! Every step checks whether it is done, so the command is idempotent and survives power loss
//! at any point. Progress is in /var/lib/ncimage/rekey.json (`ncimage status` prints it) and on
//! the journal. The policy (`[encryption]` in specs) is defined here too.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tools;

/// Name of the recovery key in a node's seed (`secrets`), and its prefix in a cluster's
/// secrets file (`luks-recovery:<node>`).
pub const RECOVERY_SECRET: &str = "luks-recovery";

/// The first-boot initramfs (on /boot) that carries the enrollment key (GRUB loads it after the
/// main one while it exists).
pub const ENROLL_INITRD: &str = "boot/ncimage-enroll.img";

/// The mapping the initramfs opens the root as.
pub const ROOT_MAPPING: &str = "root";

/// The LUKS2 subsystem of a root re-encrypted under this machine's own volume key (the image's
/// header has none): set once the re-encryption has finished, by the initramfs or here.
pub const OWN_KEY_MARK: &str = "ncimage-own-volume-key";

/// Figures the first-boot initramfs leaves when it has re-encrypted the root (`seconds`,
/// `bytes`, `resumed`).
pub const INITRAMFS_FIGURES: &str = "run/ncimage-reencrypt.json";

/// How the root is re-encrypted, in the initramfs (the base hook bakes these in) and online.
/// 4 KiB sectors (ext4's block size): an eighth of the IVs and requests of the image's 512-byte
/// sectors, for the re-encryption and every read after it. A bounded hot zone: after a power
/// loss the next run recovers (re-hashes and rewrites) at most this much before the root
/// opens; under TCG the default (as large as the checksum area allows: ~256 MiB with 512-byte
/// sectors) kept a resumed boot in the initramfs for minutes. Online, each hot zone costs a
/// round of device-mapper reloads (and udev events), so not too small either: 300 MiB in a TCG
/// guest took 15.3 s with 16 MiB zones and sha256, 9.9 s with 64 MiB and sha1 (the same as no
/// resilience at all). The checksums only tell which sectors a crash left half-written; they
/// guard no secret, so sha1 is enough. The keyslots it re-wraps use
/// `luks::GENERATED_KEY_PBKDF_ARGS` (they hold generated keys).
pub const REENCRYPT_ARGS: [&str; 8] = [
    "--sector-size",
    "4096",
    "--resilience",
    "checksum",
    "--resilience-hash",
    "sha1",
    "--hotzone-size",
    "64M",
];

/// [`REENCRYPT_ARGS`] and the keyslots' PBKDF, as one shell word list (the base hook's
/// NCIMAGE_REENCRYPT_ARGS; none of them needs quoting).
pub fn reencrypt_shell_args() -> String {
    REENCRYPT_ARGS
        .iter()
        .chain(crate::luks::GENERATED_KEY_PBKDF_ARGS.iter())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the initramfs's re-encryption reports (INITRAMFS_FIGURES).
#[derive(Debug, Deserialize, PartialEq)]
pub struct InitramfsFigures {
    pub seconds: f64,
    /// None when it resumed an interrupted one.
    pub bytes: Option<u64>,
    #[serde(default)]
    pub resumed: u32,
}

/// The subsystem field of a `cryptsetup luksDump` ("Subsystem:  \t(no subsystem)" when unset).
pub fn subsystem(dump: &str) -> Option<&str> {
    dump.lines()
        .find_map(|l| l.strip_prefix("Subsystem:"))
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "(no subsystem)")
}

/// How a node's encrypted volumes unlock without a console. The recovery key is always added.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UnlockPolicy {
    /// Seal to the machine's TPM 2.0 (clevis tpm2).
    #[serde(default)]
    pub tpm2: bool,
    /// PCRs the TPM seal is bound to (e.g. "7"); none by default.
    #[serde(default)]
    pub tpm2_pcrs: Option<String>,
    /// Tang servers (clevis tang): the key is recovered over the network from any of them.
    #[serde(default)]
    pub tang: Vec<TangServer>,
    /// How many of the automatic methods (tpm2 counts one, each tang server one) must answer
    /// (clevis sss). 1 = any of them.
    #[serde(default = "d_threshold")]
    pub threshold: u32,
    /// The policy asks for tpm2 and the machine has none: `skip` binds the other methods (the
    /// recovery key alone if none is left), `fail` binds none and fails the unit. Either way the
    /// volume key is replaced and the enrollment key removed.
    #[serde(default)]
    pub on_missing_tpm2: Missing,
}

fn d_threshold() -> u32 {
    1
}

impl Default for UnlockPolicy {
    fn default() -> Self {
        UnlockPolicy {
            tpm2: false,
            tpm2_pcrs: None,
            tang: Vec::new(),
            threshold: 1,
            on_missing_tpm2: Missing::Skip,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    #[default]
    Skip,
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TangServer {
    /// e.g. "http://10.20.0.5:7500"
    pub url: String,
    /// Thumbprint of the server's signing key (`tang-show-keys`); without one, the key the
    /// server advertises at first boot is trusted.
    #[serde(default)]
    pub thp: Option<String>,
}

impl UnlockPolicy {
    /// Checks the policy; `what` names where it comes from.
    pub fn validate(&self, what: &str) -> Result<()> {
        let n = self.methods();
        if n > 0 && (self.threshold == 0 || self.threshold > n) {
            return Err(Error::invalid(
                format!(
                    "{what}: threshold = {} but the policy has {n} automatic unlock method(s)",
                    self.threshold
                ),
                format!("set threshold between 1 and {n}"),
            ));
        }
        for t in &self.tang {
            if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
                return Err(Error::invalid(
                    format!("{what}: tang server `{}` is not an http(s) URL", t.url),
                    "write e.g. { url = \"http://10.20.0.5:7500\" }",
                ));
            }
        }
        if let Some(p) = &self.tpm2_pcrs {
            if !p
                .split(',')
                .all(|x| x.trim().parse::<u8>().is_ok_and(|n| n < 24))
            {
                return Err(Error::invalid(
                    format!("{what}: tpm2_pcrs = \"{p}\" is not a list of PCR numbers"),
                    "write e.g. tpm2_pcrs = \"7\" or \"0,7\"",
                ));
            }
        }
        Ok(())
    }

    /// Number of automatic methods (tpm2 one, each tang server one).
    pub fn methods(&self) -> u32 {
        u32::from(self.tpm2) + self.tang.len() as u32
    }

    /// The clevis pin and its configuration for the methods available (`tpm2` false when the
    /// machine has no TPM and the policy skips it). None: recovery key only.
    pub fn clevis_pin(&self, tpm2: bool) -> Option<(String, serde_json::Value)> {
        let tpm_cfg = || match &self.tpm2_pcrs {
            Some(p) => serde_json::json!({"pcr_bank": "sha256", "pcr_ids": p}),
            None => serde_json::json!({}),
        };
        let tang_cfg = |t: &TangServer| match &t.thp {
            Some(thp) => serde_json::json!({"url": t.url, "thp": thp}),
            None => serde_json::json!({"url": t.url}),
        };
        let mut pins: Vec<(&str, serde_json::Value)> = Vec::new();
        if tpm2 && self.tpm2 {
            pins.push(("tpm2", tpm_cfg()));
        }
        pins.extend(self.tang.iter().map(|t| ("tang", tang_cfg(t))));
        match pins.len() {
            0 => None,
            1 => {
                let (p, c) = pins.pop().expect("one");
                Some((p.to_string(), c))
            }
            n => {
                let t = self.threshold.clamp(1, n as u32);
                let mut by: serde_json::Map<String, serde_json::Value> = Default::default();
                for (p, c) in pins {
                    by.entry(p)
                        .or_insert_with(|| serde_json::Value::Array(vec![]))
                        .as_array_mut()
                        .expect("array")
                        .push(c);
                }
                Some(("sss".into(), serde_json::json!({"t": t, "pins": by})))
            }
        }
    }

    /// One line for people: "tpm2 + tang(2), threshold 1, recovery key".
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if self.tpm2 {
            v.push("tpm2".to_string());
        }
        if !self.tang.is_empty() {
            v.push(format!("tang({})", self.tang.len()));
        }
        if v.is_empty() {
            return "recovery key only".into();
        }
        format!(
            "{}, threshold {}, recovery key",
            v.join(" + "),
            self.threshold
        )
    }
}

/// A recovery key people can type at a console: 32 hex digits (128 bits) in groups of four.
pub fn new_recovery_key() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
    let h = hex::encode(b);
    Ok(h.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("hex"))
        .collect::<Vec<_>>()
        .join("-"))
}

/// Whether `key` has the shape [`new_recovery_key`] gives (8 groups of 4 hex digits): the
/// recovery keyslot has a minimal PBKDF because its key is 128 random bits, so a key a person
/// chose (shorter, guessable) must never reach it.
pub fn is_generated_recovery_key(key: &str) -> bool {
    let groups: Vec<&str> = key.trim().split('-').collect();
    groups.len() == 8
        && groups
            .iter()
            .all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Refuses a recovery key that [`new_recovery_key`] did not make (see
/// [`is_generated_recovery_key`]).
pub fn check_recovery_key(key: &str) -> Result<()> {
    if is_generated_recovery_key(key) {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("the seed's `{RECOVERY_SECRET}` is not a generated recovery key (8 groups of 4 hex digits)"),
            "its keyslot has a minimal PBKDF (the key is 128 random bits): let `ncimage secrets init` make it, then write the seed again",
        ))
    }
}

/// The encryption part of a node's seed (node.json): its unlock policy. The recovery key
/// travels with the node's secrets (`luks-recovery`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeEncryption {
    #[serde(default)]
    pub policy: UnlockPolicy,
}

// ---------------------------------------------------------------------------------------
// Status

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The volume key is being replaced (online re-encryption).
    Reencrypting,
    /// Waiting for the node's seed (policy and recovery key).
    WaitingForSeed,
    /// Adding the recovery key, binding the unlock methods, rebuilding the initramfs.
    Binding,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    pub message: String,
    /// Automatic unlock methods bound ("tpm2", "tang", "sss(...)"), empty: recovery key only.
    #[serde(default)]
    pub bound: String,
    #[serde(default)]
    pub reencrypt_seconds: Option<f64>,
    /// Bytes re-encrypted: the image's filesystem, not the whole partition.
    #[serde(default)]
    pub reencrypt_bytes: Option<u64>,
    /// The root filesystem's size once grown to its partition.
    #[serde(default)]
    pub root_bytes: Option<u64>,
    /// Times the re-encryption was resumed after an interruption.
    #[serde(default)]
    pub resumed: u32,
    /// Re-encrypted by the first-boot initramfs, before the root was mounted (not online).
    #[serde(default)]
    pub offline: bool,
    #[serde(default)]
    pub seconds: f64,
}

impl Status {
    pub fn line(&self) -> String {
        let what = match self.state {
            State::Reencrypting => "re-encrypting the root with this machine's volume key".into(),
            State::WaitingForSeed => "volume key replaced; waiting for the seed".into(),
            State::Binding => "binding the unlock methods".into(),
            State::Done => format!(
                "own volume key ({}{}{}), unlock: {}, enrollment key removed",
                if self.offline
                    && self.reencrypt_bytes.is_none()
                    && self.reencrypt_seconds == Some(0.0)
                {
                    // Marked before the initramfs looked (ncimage lab re-encrypts on the
                    // host), or by a boot that lost power before its figures were kept.
                    "re-encrypted before this boot".to_string()
                } else {
                    format!(
                        "re-encrypted {}in {:.0} s{}",
                        self.reencrypt_bytes
                            .map(|b| format!("{} MiB ", b >> 20))
                            .unwrap_or_default(),
                        self.reencrypt_seconds.unwrap_or(0.0),
                        if self.offline {
                            " by the initramfs"
                        } else {
                            ""
                        }
                    )
                },
                self.root_bytes
                    .map(|b| format!(", root {} MiB", b >> 20))
                    .unwrap_or_default(),
                if self.resumed > 0 {
                    format!(", resumed {}x", self.resumed)
                } else {
                    String::new()
                },
                if self.bound.is_empty() {
                    "recovery key only".into()
                } else {
                    format!("{} + recovery key", self.bound)
                }
            ),
            State::Failed => format!("FAILED: {}", self.message),
        };
        let note = if self.state == State::Done && !self.message.is_empty() {
            format!(" ({})", self.message)
        } else {
            String::new()
        };
        format!("ncimage: encryption: {what}{note}")
    }
}

pub fn status_path(root: &Path) -> PathBuf {
    root.join("var/lib/ncimage/rekey.json")
}

pub fn status(root: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(status_path(root)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_status(root: &Path, s: &Status) -> Result<()> {
    let p = status_path(root);
    let dir = p.parent().expect("has a parent");
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(Error::io("creating", &tmp))?;
    f.write_all(&serde_json::to_vec_pretty(s).expect("serialisable"))
        .and_then(|_| f.sync_all())
        .map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, &p).map_err(Error::io("renaming", &p))?;
    println!("{}", s.line());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading cryptsetup's output

/// Whether a `cryptsetup luksDump` shows an unfinished re-encryption.
pub fn reencrypt_in_progress(dump: &str) -> bool {
    dump.lines().any(|l| {
        let l = l.trim();
        (l.starts_with("Requirements:") && l.contains("online-reencrypt"))
            || l == "online-reencrypt-v2"
            || l == "online-reencrypt-v3"
            || l == "online-reencrypt"
    }) || dump.contains("\treencrypt (unbound)")
        || dump.contains(": reencrypt")
}

/// The numbered entries of one section of a `cryptsetup luksDump` ("Keyslots:", "Tokens:"):
/// (number, kind) for each "  0: luks2" line, the lines indented deeper skipped.
fn dump_entries<'a>(dump: &'a str, section: &str) -> Vec<(u32, &'a str)> {
    let mut inside = false;
    let mut v = Vec::new();
    for l in dump.lines() {
        if !l.is_empty() && !l.starts_with(char::is_whitespace) {
            inside = l.trim_end() == section;
            continue;
        }
        if let Some((n, kind)) = l.trim().split_once(':').filter(|_| inside) {
            if let Ok(n) = n.parse() {
                v.push((n, kind.trim()));
            }
        }
    }
    v
}

/// Token ids of clevis tokens in a `cryptsetup luksDump`.
pub fn clevis_tokens(dump: &str) -> Vec<u32> {
    dump_entries(dump, "Tokens:")
        .into_iter()
        .filter(|(_, kind)| *kind == "clevis")
        .map(|(n, _)| n)
        .collect()
}

/// The keyslot `cryptsetup open --test-passphrase -v` reports ("Key slot 0 unlocked.").
pub fn unlocked_slot(out: &str) -> Option<u32> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Key slot "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// crypttab with the root's key file replaced by `none` (the initramfs then asks clevis and
/// the console). Other lines unchanged.
pub fn crypttab_without_key(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if !l.trim_start().starts_with('#') && f.len() >= 3 && f[0] == ROOT_MAPPING {
            let opts = f.get(3).copied().unwrap_or("luks");
            out.push_str(&format!("{} {} none {}\n", f[0], f[1], opts));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The first-boot run

pub struct Options {
    pub root: PathBuf,
    /// The enrollment key file (in the image; gone once done).
    pub enroll_key: PathBuf,
    /// PBKDF of the keyslots it adds (the re-encrypted enrollment keyslot, the recovery key):
    /// all hold generated keys (`luks::GENERATED_KEY_PBKDF_ARGS`).
    pub pbkdf: Vec<String>,
    /// How long to wait for the seed (node.json).
    pub seed_wait: Duration,
}

impl Options {
    pub fn guest() -> Options {
        Options {
            root: PathBuf::from("/"),
            enroll_key: PathBuf::from("/etc/ncimage/keys/enroll.key"),
            pbkdf: crate::luks::GENERATED_KEY_PBKDF_ARGS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            seed_wait: Duration::from_secs(600),
        }
    }
}

fn cs(args: &[&str]) -> Command {
    let mut c = Command::new("cryptsetup");
    c.args(args);
    c
}

/// The block device under the root mapping (`cryptsetup status root`: "device:  /dev/vda4").
fn root_device() -> Result<String> {
    let out = tools::run(&mut cs(&["status", ROOT_MAPPING]))?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("device:"))
        .map(|d| d.trim().to_string())
        .ok_or_else(|| {
            Error::Vm(format!(
                "cryptsetup status {ROOT_MAPPING}: no device in {out}"
            ))
        })
}

/// The root mapping's device: /dev/mapper/root.
fn mapper() -> String {
    format!("/dev/mapper/{ROOT_MAPPING}")
}

/// Size in bytes of a block device (`blockdev --getsize64`).
fn device_bytes(dev: &str) -> Result<u64> {
    let out = tools::run(Command::new("blockdev").args(["--getsize64", dev]))?;
    out.trim()
        .parse()
        .map_err(|_| Error::Vm(format!("blockdev --getsize64 {dev}: `{}`", out.trim())))
}

/// Size in bytes of the ext4 filesystem on `dev` (`dumpe2fs -h`).
fn ext4_bytes(dev: &str) -> Result<u64> {
    let out = tools::run(Command::new("dumpe2fs").args(["-h", dev]))?;
    ext4_size(&out).ok_or_else(|| Error::Vm(format!("dumpe2fs -h {dev}: no block count/size")))
}

/// Block count × block size from `dumpe2fs -h`.
pub fn ext4_size(dump: &str) -> Option<u64> {
    let field = |name: &str| {
        dump.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("Block count:")? * field("Block size:")?)
}

/// A 0600 file in /run (tmpfs) holding `data`, removed on drop.
struct KeyFile(PathBuf);
impl KeyFile {
    fn new(name: &str, data: &[u8]) -> Result<KeyFile> {
        let dir = Path::new("/run/ncimage");
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(Error::io("creating", &p))?;
        f.write_all(data).map_err(Error::io("writing", &p))?;
        Ok(KeyFile(p))
    }
}
impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, vec![0u8; 64]);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn opens(dev: &str, key: &Path) -> Option<u32> {
    let out = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "-v", "--key-file"])
        .arg(key)
        .arg(dev)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    unlocked_slot(&String::from_utf8_lossy(&out.stdout)).or(Some(u32::MAX))
}

/// What `clevis luks bind -y -d DEV -k KEY PIN CFG` does to a LUKS2 header, without
/// clevis-luks-bind's shell (about sixty processes: 8.5 CPU-seconds in a TCG guest, these six
/// about 3.5): a new key (40 random bytes, base64url, as clevis makes it), `clevis encrypt`
/// of it with the pin, a PBKDF2 keyslot for it in the first free slot (authorised by `key`),
/// and a clevis token naming that slot whose `jwe` is `jose jwe fmt` of the compact JWE.
/// clevis's own unlock (initramfs, `clevis luks unlock`, `clevis luks list`) reads it like one
/// it bound. The new key only ever sits in a 0600 file in /run.
fn clevis_bind(dev: &str, key: &Path, pin: &str, cfg: &str) -> Result<()> {
    use base64::Engine;
    let mut raw = [0u8; 40];
    getrandom::fill(&mut raw).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
    let new_key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let new_file = KeyFile::new("clevis-bind.key", new_key.as_bytes())?;
    let stdin = std::fs::File::open(&new_file.0).map_err(Error::io("opening", &new_file.0))?;
    let jwe = tools::run_with_stdin(
        Command::new("clevis").args(["encrypt", pin, cfg, "-y"]),
        stdin.into(),
    )?;
    let jwe = jwe.trim();
    if jwe.split('.').count() != 5 {
        return Err(Error::Vm(format!(
            "clevis encrypt {pin}: not a compact JWE ({} bytes)",
            jwe.len()
        )));
    }
    let json = tools::run(Command::new("jose").args(["jwe", "fmt", "--input", jwe]))?;
    let json: serde_json::Value = serde_json::from_str(json.trim())
        .map_err(|e| Error::Vm(format!("jose jwe fmt: not JSON ({e})")))?;
    let dump = tools::run(&mut cs(&["luksDump", dev]))?;
    let slot = first_free_keyslot(&dump)
        .ok_or_else(|| Error::Vm(format!("{dev}: no free LUKS2 keyslot")))?;
    let mut add = cs(&[
        "luksAddKey",
        "--batch-mode",
        "--key-slot",
        &slot.to_string(),
    ]);
    add.arg("--key-file")
        .arg(key)
        .args(crate::luks::GENERATED_KEY_PBKDF_ARGS)
        .arg(dev)
        .arg(&new_file.0);
    tools::run(&mut add)?;
    let token = clevis_token(slot, json);
    let token_file = KeyFile::new("clevis-token.json", token.to_string().as_bytes())?;
    let r = tools::run(
        cs(&["token", "import", "--json-file"])
            .arg(&token_file.0)
            .arg(dev),
    );
    if let Err(e) = r {
        // No keyslot without its token: the next try binds afresh.
        let _ = tools::run(&mut cs(&[
            "luksKillSlot",
            "--batch-mode",
            dev,
            &slot.to_string(),
            "--key-file",
            &key.to_string_lossy(),
        ]));
        return Err(e);
    }
    Ok(())
}

/// The LUKS2 token clevis writes for a binding (clevis_luks2_save_slot).
pub fn clevis_token(slot: u32, jwe_json: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "type": "clevis", "keyslots": [slot.to_string()], "jwe": jwe_json })
}

/// The lowest LUKS2 keyslot number (0-31) a `luksDump` does not list, of any kind ("1:
/// reencrypt (unbound)" takes its number too).
pub fn first_free_keyslot(dump: &str) -> Option<u32> {
    let used = dump_entries(dump, "Keyslots:");
    (0..32).find(|n| !used.iter().any(|(u, _)| u == n))
}

fn tpm_present(root: &Path) -> bool {
    root.join("dev/tpmrm0").exists() || root.join("sys/class/tpm/tpm0").exists()
}

// ---------------------------------------------------------------------------------------------
// On the host, before a first boot

/// Where an image's root LUKS2 volume lies in its disk and how much of it the filesystem fills,
/// from the image's manifest.json.
#[derive(Debug, Clone, PartialEq)]
pub struct RootExtent {
    /// Byte offset of the root partition in the disk.
    pub offset: u64,
    /// The LUKS2 header's size (the data segment's offset).
    pub header: u64,
    /// The filesystem's size: what the first boot re-encrypts.
    pub fs_bytes: u64,
    /// The header's UUID, to tell a manifest from another build.
    pub uuid: String,
}

impl RootExtent {
    /// Reads the extent from a manifest (`disk.partitions` named root, `luks`,
    /// `filesystems.root`).
    pub fn from_manifest(manifest: &Path) -> Result<RootExtent> {
        let text = std::fs::read_to_string(manifest).map_err(Error::io("reading", manifest))?;
        let m: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                format!("{}: not JSON ({e})", manifest.display()),
                "build the image again (ncimage build)",
            )
        })?;
        let missing = |what: &str| {
            Error::invalid(
                format!("{}: no {what}", manifest.display()),
                "build the image again with this ncimage (ncimage build)",
            )
        };
        let root = m["disk"]["partitions"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "root"))
            .ok_or_else(|| missing("root partition in disk.partitions"))?;
        let start = root["start_lba"]
            .as_u64()
            .ok_or_else(|| missing("start_lba for the root partition"))?;
        Ok(RootExtent {
            offset: start * 512,
            header: m["luks"]["data_offset"]
                .as_u64()
                .ok_or_else(|| missing("luks.data_offset"))?,
            fs_bytes: m["filesystems"]["root"]["size_bytes"]
                .as_u64()
                .ok_or_else(|| missing("filesystems.root.size_bytes"))?,
            uuid: m["luks"]["uuid"]
                .as_str()
                .ok_or_else(|| missing("luks.uuid"))?
                .to_string(),
        })
    }

    /// Header and filesystem: the part of the partition the re-encryption reads and writes.
    pub fn bytes(&self) -> u64 {
        self.header + self.fs_bytes
    }
}

/// A byte range of a disk image as a QEMU block node (`--image-opts`): the raw driver's
/// offset and size over the image's own format. Commas in the path are doubled (QEMU's
/// option syntax).
pub fn image_range_opts(image: &Path, format: &str, offset: u64, size: u64) -> String {
    format!(
        "driver=raw,offset={offset},size={size},file.driver={format},file.file.filename={}",
        image.display().to_string().replace(',', ",,")
    )
}

/// What [`own_key_before_boot`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum BeforeBoot {
    /// `disk` holds the root under a fresh volume key, marked ([`OWN_KEY_MARK`]).
    Done { bytes: u64, seconds: f64 },
    /// The enrollment key does not open the image (built on another machine): nothing was
    /// written; the first boot re-encrypts.
    KeyDoesNotOpen,
}

/// On the host, before a VM's first boot: writes `disk`, a qcow2 overlay on `image` whose root
/// is re-encrypted under a fresh volume key, exactly as the first-boot initramfs would do it
/// (the same `cryptsetup reencrypt` arguments, the same mark, so the initramfs leaves it and
/// `ncimage rekey` goes on with the recovery key and the unlock methods). The host's CPU does
/// in seconds what costs a TCG guest half a minute. `ncimage lab` uses it; a cloud instance
/// re-encrypts itself. The root's extent is copied to a file beside `disk`, re-encrypted
/// there (cryptsetup works on a file offline) and written back into the new overlay; `disk`
/// appears only when all of it worked.
pub fn own_key_before_boot(
    image: &Path,
    format: &str,
    extent: &RootExtent,
    enroll_key: &Path,
    disk: &Path,
) -> Result<BeforeBoot> {
    let t = Instant::now();
    // qemu-img resolves a relative backing file against the overlay's folder.
    let image = &std::fs::canonicalize(image).map_err(Error::io("resolving", image))?;
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let part = disk.with_file_name(format!(".{name}.root.tmp"));
    let tmp = disk.with_file_name(format!(".{name}.tmp"));
    let cleanup = || {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&tmp);
    };
    cleanup();
    let r = (|| {
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw", "--image-opts"])
                .arg(image_range_opts(
                    image,
                    format,
                    extent.offset,
                    extent.bytes(),
                ))
                .arg(&part),
        )?;
        let p = part.to_string_lossy().into_owned();
        let dump = tools::run(&mut cs(&["luksDump", &p]))?;
        let uuid = dump
            .lines()
            .find_map(|l| l.strip_prefix("UUID:"))
            .map(str::trim);
        if uuid != Some(extent.uuid.as_str()) {
            return Err(Error::invalid(
                format!(
                    "{}: the root's LUKS2 header has UUID {} and the manifest says {}",
                    image.display(),
                    uuid.unwrap_or("(none)"),
                    extent.uuid
                ),
                "the image and its manifest.json come from different builds: build the image again",
            ));
        }
        if subsystem(&dump) == Some(OWN_KEY_MARK) {
            return Err(Error::invalid(
                format!(
                    "{}: the root already has its own volume key (a machine's disk, not an image)",
                    image.display()
                ),
                "give the image the build wrote (ncimage build), not a disk a VM used",
            ));
        }
        if opens(&p, enroll_key).is_none() {
            return Ok(BeforeBoot::KeyDoesNotOpen);
        }
        let mut c = cs(&["reencrypt", "--batch-mode", "--force-offline-reencrypt"]);
        c.arg("--key-file")
            .arg(enroll_key)
            .args(["--device-size", &extent.fs_bytes.to_string()])
            .args(REENCRYPT_ARGS)
            .args(crate::luks::GENERATED_KEY_PBKDF_ARGS)
            .arg(&part);
        tools::run(&mut c)?;
        tools::run(&mut cs(&["config", "--subsystem", OWN_KEY_MARK, &p]))?;
        tools::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
                .arg(image)
                .arg(&tmp),
        )?;
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw"])
                .arg(&part)
                .arg("--target-image-opts")
                .arg(image_range_opts(
                    &tmp,
                    "qcow2",
                    extent.offset,
                    extent.bytes(),
                )),
        )?;
        std::fs::rename(&tmp, disk).map_err(Error::io("renaming", &tmp))?;
        Ok(BeforeBoot::Done {
            bytes: extent.fs_bytes,
            seconds: t.elapsed().as_secs_f64(),
        })
    })();
    cleanup();
    r
}

/// Runs (or resumes, or finishes) the first-boot re-keying. Idempotent.
pub fn run(o: &Options) -> Result<Status> {
    let started = Instant::now();
    let mut st = status(&o.root).unwrap_or(Status {
        state: State::Reencrypting,
        message: String::new(),
        bound: String::new(),
        reencrypt_seconds: None,
        reencrypt_bytes: None,
        root_bytes: None,
        resumed: 0,
        offline: false,
        seconds: 0.0,
    });
    if st.state == State::Done {
        println!("{}", st.line());
        return Ok(st);
    }
    let enroll = o.enroll_key.clone();
    if !enroll.exists() {
        return fail(
            o,
            st,
            "the enrollment key is gone but re-keying never finished".into(),
        );
    }
    let dev = root_device()?;

    // 1. The volume key.
    let dump = tools::run(&mut cs(&["luksDump", &dev]))?;
    let pending = reencrypt_in_progress(&dump);
    let own = subsystem(&dump) == Some(OWN_KEY_MARK) && !pending;
    // An online run that started re-encrypting (it recorded the extent) but never recorded
    // the end was interrupted. If the header no longer says so, the initramfs finished the
    // last hot zone when it opened the root: the re-encryption runs again in full (a fresh
    // volume key once more), and counts as resumed.
    let interrupted = !pending
        && !own
        && st.state == State::Reencrypting
        && st.reencrypt_bytes.is_some()
        && st.reencrypt_seconds.is_none();
    if interrupted {
        st.resumed += 1;
    }
    if own && st.reencrypt_seconds.is_none() {
        // The initramfs re-encrypted it (this boot, or a boot that lost power before this
        // was recorded: then without figures).
        let p = o.root.join(INITRAMFS_FIGURES);
        let f = std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| serde_json::from_str::<InitramfsFigures>(&t).ok());
        st.reencrypt_seconds = Some(f.as_ref().map_or(0.0, |f| f.seconds));
        st.reencrypt_bytes = f.as_ref().and_then(|f| f.bytes);
        st.resumed += f.as_ref().map_or(0, |f| f.resumed);
        st.offline = true;
        // Recorded with step 1b's result, next.
    }
    if !own && (st.reencrypt_seconds.is_none() || pending) {
        let t = Instant::now();
        let mut c = cs(&["reencrypt", "--batch-mode", "--key-file"]);
        c.arg(&enroll);
        if pending {
            st.resumed += 1;
            st.state = State::Reencrypting;
            st.message = "resuming an interrupted re-encryption".into();
            write_status(&o.root, &st)?;
            c.arg("--resume-only");
        } else {
            // The image's filesystem is only its content plus first-boot room; the rest of
            // the partition was never written. The mapping is shrunk to the filesystem, so
            // only that extent is re-encrypted (cryptsetup wants the active size and
            // --device-size to agree); step 1b grows both afterwards.
            let mapper = mapper();
            let fs = ext4_bytes(&mapper)?;
            let mapped = device_bytes(&mapper)?;
            st.reencrypt_bytes = Some(fs.min(mapped));
            st.state = State::Reencrypting;
            write_status(&o.root, &st)?;
            if fs < mapped {
                let mut shrink = cs(&["resize", ROOT_MAPPING, "--key-file"]);
                shrink
                    .arg(&enroll)
                    .args(["--size", &(fs / 512).to_string()]);
                if let Err(e) = tools::run(&mut shrink) {
                    return fail(o, st, format!("cryptsetup resize (to the filesystem): {e}"));
                }
                c.args(["--device-size", &fs.to_string()]);
            }
            c.args(REENCRYPT_ARGS).args(&o.pbkdf);
        }
        c.arg(&dev);
        if let Err(e) = tools::run(&mut c) {
            return fail(o, st, format!("cryptsetup reencrypt: {e}"));
        }
        if let Err(e) = tools::run(&mut cs(&["config", "--subsystem", OWN_KEY_MARK, &dev])) {
            return fail(o, st, format!("marking the header re-encrypted: {e}"));
        }
        st.reencrypt_seconds =
            Some(st.reencrypt_seconds.unwrap_or(0.0) + t.elapsed().as_secs_f64());
        st.message.clear();
        write_status(&o.root, &st)?;
    }

    // 1b. The root grows to its partition: the mapping (the LUKS2 segment covers the whole
    // device, so cryptsetup fills it), then ext4, online. Both are no-ops once done; the
    // enrollment key is still there (it goes in step 5, after this is recorded).
    if st.root_bytes.is_none() {
        let mut grow = cs(&["resize", ROOT_MAPPING, "--key-file"]);
        grow.arg(&enroll);
        if let Err(e) = tools::run(&mut grow) {
            return fail(o, st, format!("cryptsetup resize (to the partition): {e}"));
        }
        let mapper = mapper();
        if ext4_bytes(&mapper)? < device_bytes(&mapper)? {
            if let Err(e) = tools::run(Command::new("resize2fs").arg(&mapper)) {
                return fail(o, st, format!("resize2fs {mapper}: {e}"));
            }
        }
        st.root_bytes = Some(ext4_bytes(&mapper)?);
        st.state = State::WaitingForSeed;
        write_status(&o.root, &st)?;
    }

    // 2. The seed: policy and recovery key.
    let node_json = o.root.join("etc/ncimage/node.json");
    let deadline = Instant::now() + o.seed_wait;
    while !node_json.exists() {
        if Instant::now() >= deadline {
            return fail(
                o,
                st,
                format!(
                    "no seed after {} s: {} is missing, so there is no recovery key to add",
                    o.seed_wait.as_secs(),
                    node_json.display()
                ),
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let node: crate::firstboot::NodeConfig = {
        let text = std::fs::read_to_string(&node_json).unwrap_or_default();
        match serde_json::from_str(&text) {
            Ok(n) => n,
            Err(e) => {
                return fail(
                    o,
                    st,
                    format!(
                        "{} is unreadable ({e}): no recovery key to add (a power loss before cloud-init's write reached the disk empties it)",
                        node_json.display()
                    ),
                )
            }
        }
    };
    let Some(recovery) = node.secrets.get(RECOVERY_SECRET).cloned() else {
        return fail(
            o,
            st,
            format!("the seed has no `{RECOVERY_SECRET}`: the node would have no recovery key"),
        );
    };
    if let Err(e) = check_recovery_key(&recovery) {
        return fail(o, st, e.to_string());
    }
    let policy = node.encryption.policy.clone();
    policy.validate("the seed's encryption policy")?;
    st.state = State::Binding;
    write_status(&o.root, &st)?;

    // 3. The recovery key (generated: the minimal PBKDF).
    let rec = KeyFile::new("recovery.key", recovery.trim().as_bytes())?;
    if opens(&dev, &rec.0).is_none() {
        let mut c = cs(&["luksAddKey", "--batch-mode", "--key-file"]);
        c.arg(&enroll).args(&o.pbkdf).arg(&dev).arg(&rec.0);
        if let Err(e) = tools::run(&mut c) {
            return fail(o, st, format!("adding the recovery key: {e}"));
        }
    }

    // 4. The automatic methods (unbound first if a power loss left a half-made token).
    let mut notes = Vec::new();
    let has_tpm = tpm_present(&o.root);
    let mut use_tpm = policy.tpm2;
    let mut failed = None;
    if policy.tpm2 && !has_tpm {
        use_tpm = false;
        let msg = format!(
            "the policy asks for tpm2 but this machine has no TPM (no /dev/tpmrm0); {}",
            match policy.on_missing_tpm2 {
                Missing::Skip if policy.tang.is_empty() => "on_missing_tpm2 = skip: the recovery key alone unlocks this node (typed at the console at every boot)".to_string(),
                Missing::Skip => "on_missing_tpm2 = skip: bound to tang only".to_string(),
                Missing::Fail => "on_missing_tpm2 = fail: nothing bound, only the recovery key unlocks this node".to_string(),
            }
        );
        eprintln!("ncimage rekey: {msg}");
        notes.push(msg.clone());
        if policy.on_missing_tpm2 == Missing::Fail {
            failed = Some(msg);
        }
    }
    let dump = tools::run(&mut cs(&["luksDump", &dev]))?;
    let pin = if failed.is_some() {
        None
    } else {
        // sss with fewer pins than asked (tpm2 skipped): the threshold is clamped.
        policy.clevis_pin(use_tpm)
    };
    if let Some((pin, cfg)) = &pin {
        if clevis_tokens(&dump).is_empty() {
            let cfg = cfg.to_string();
            let mut last = String::new();
            let mut ok = false;
            // Tang may come up after this node (a cluster booting): retry for two minutes.
            for _ in 0..12 {
                let r = clevis_bind(&dev, &enroll, pin, &cfg);
                match r {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
                std::thread::sleep(Duration::from_secs(10));
            }
            if !ok {
                let msg = format!("clevis luks bind {pin} failed: {last}");
                eprintln!("ncimage rekey: {msg}; the recovery key alone unlocks this node");
                failed = Some(msg);
            }
        }
        if failed.is_none() {
            st.bound = if pin == "sss" {
                format!("sss({})", cfg)
            } else {
                pin.clone()
            };
        }
    }

    // 5. crypttab without a key file (the image's already is); the first-boot initramfs
    //    with the enrollment key goes: GRUB then loads only the machine's own initramfs,
    //    which opens the root with clevis or the recovery key. Overwritten before removal.
    let crypttab = o.root.join("etc/crypttab");
    let text = std::fs::read_to_string(&crypttab).map_err(Error::io("reading", &crypttab))?;
    let new = crypttab_without_key(&text);
    if new != text {
        std::fs::write(&crypttab, new).map_err(Error::io("writing", &crypttab))?;
    }
    let enroll_initrd = o.root.join(ENROLL_INITRD);
    if enroll_initrd.exists() {
        if let Err(e) = tools::run(Command::new("shred").arg("-u").arg(&enroll_initrd)) {
            return fail(o, st, format!("removing {}: {e}", enroll_initrd.display()));
        }
        tools::run(&mut Command::new("sync"))?;
    }

    // 6. The enrollment keyslot goes (authorised by the recovery key).
    if let Some(slot) = opens(&dev, &enroll) {
        let mut c = cs(&["luksKillSlot", "--batch-mode", "--key-file"]);
        c.arg(&rec.0).arg(&dev).arg(slot.to_string());
        if let Err(e) = tools::run(&mut c) {
            return fail(o, st, format!("killing the enrollment keyslot {slot}: {e}"));
        }
    }
    if opens(&dev, &enroll).is_some() {
        return fail(o, st, "the enrollment key still opens the root".into());
    }
    // Last: the key file (its presence is what starts ncimage-rekey.service).
    if let Err(e) = std::fs::remove_file(&enroll) {
        return fail(o, st, format!("removing {}: {e}", enroll.display()));
    }

    st.seconds += started.elapsed().as_secs_f64();
    st.message = notes.join("; ");
    if let Some(f) = failed {
        return fail(o, st, f);
    }
    st.state = State::Done;
    write_status(&o.root, &st)?;
    Ok(st)
}

fn fail(o: &Options, mut st: Status, msg: String) -> Result<Status> {
    st.state = State::Failed;
    st.message = msg.clone();
    let _ = write_status(&o.root, &st);
    Err(Error::invalid(
        format!("re-keying the root: {msg}"),
        "see `journalctl -u ncimage-rekey.service`; the unit runs again at the next boot",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> UnlockPolicy {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn policy_to_clevis_pins() {
        assert_eq!(policy("").clevis_pin(true), None);
        let p = policy("tpm2 = true");
        assert_eq!(
            p.clevis_pin(true),
            Some(("tpm2".into(), serde_json::json!({})))
        );
        assert_eq!(p.clevis_pin(false), None);
        let p = policy("tpm2 = true\ntpm2_pcrs = \"7\"\ntang = [{ url = \"http://10.0.0.5\", thp = \"abc\" }, { url = \"http://10.0.0.6\" }]\nthreshold = 2");
        p.validate("t").unwrap();
        let (pin, cfg) = p.clevis_pin(true).unwrap();
        assert_eq!(pin, "sss");
        assert_eq!(
            cfg,
            serde_json::json!({"t": 2, "pins": {
                "tpm2": [{"pcr_bank": "sha256", "pcr_ids": "7"}],
                "tang": [{"url": "http://10.0.0.5", "thp": "abc"}, {"url": "http://10.0.0.6"}]
            }})
        );
        // Without a TPM, two tang servers remain and the threshold still fits.
        let (_, cfg) = p.clevis_pin(false).unwrap();
        assert_eq!(cfg["t"], 2);
        assert!(cfg["pins"].get("tpm2").is_none());
        let one = policy("tang = [{ url = \"http://t\" }]");
        assert_eq!(
            one.clevis_pin(false),
            Some(("tang".into(), serde_json::json!({"url": "http://t"})))
        );
        assert_eq!(one.describe(), "tang(1), threshold 1, recovery key");
    }

    #[test]
    fn bad_policies_are_refused_with_what_to_do() {
        let e = policy("tpm2 = true\nthreshold = 2")
            .validate("spec.toml [encryption]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("threshold = 2") && e.contains("1 automatic"),
            "{e}"
        );
        assert!(policy("tang = [{ url = \"10.0.0.5\" }]")
            .validate("x")
            .is_err());
        assert!(policy("tpm2 = true\ntpm2_pcrs = \"7,x\"")
            .validate("x")
            .is_err());
        assert!(toml::from_str::<UnlockPolicy>("tmp2 = true").is_err());
        assert!(toml::from_str::<UnlockPolicy>("on_missing_tpm2 = \"maybe\"").is_err());
        policy("").validate("x").unwrap();
    }

    #[test]
    fn recovery_keys_are_typable_and_fresh() {
        let a = new_recovery_key().unwrap();
        let b = new_recovery_key().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 39);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert!(is_generated_recovery_key(&a), "{a}");
        // A person's passphrase never reaches the minimal-PBKDF keyslot.
        for chosen in [
            "correct horse battery staple",
            "0123-4567-89ab-cdef",
            "0123-4567-89ab-cdef-0123-4567-89ab-cdeg",
            "",
        ] {
            assert!(!is_generated_recovery_key(chosen), "{chosen}");
            let e = check_recovery_key(chosen).unwrap_err().to_string();
            assert!(e.contains("not a generated recovery key"), "{e}");
        }
    }

    const DUMP: &str = "LUKS header information
Version:       \t2
Epoch:         \t9
Metadata area: \t16384 [bytes]
Keyslots area: \t16744448 [bytes]
UUID:          \t9c3f7d1e-2b4a-4c5d-8e6f-0a1b2c3d4e5f
Label:         \troot
Subsystem:     \t(no subsystem)
Flags:       \t(no flags)
Requirements:\tonline-reencrypt-v2

Data segments:
  0: crypt
\toffset: 16777216 [bytes]
Keyslots:
  0: luks2
\tKey:        512 bits
  1: reencrypt (unbound)
\tKey:        8 bits
Tokens:
  0: clevis
\tKeyslot:    2
  1: systemd-tpm2
Digests:
  0: pbkdf2
";

    #[test]
    fn luks_dump_is_read() {
        assert!(reencrypt_in_progress(DUMP));
        let done = DUMP
            .replace("Requirements:\tonline-reencrypt-v2\n", "")
            .replace("  1: reencrypt (unbound)\n", "");
        assert!(!reencrypt_in_progress(&done));
        assert_eq!(clevis_tokens(DUMP), vec![0]);
        assert_eq!(
            clevis_tokens(&done.replace("0: clevis", "0: other")),
            Vec::<u32>::new()
        );
        assert_eq!(
            unlocked_slot("Key slot 3 unlocked.\nCommand successful.\n"),
            Some(3)
        );
        assert_eq!(unlocked_slot("No key available"), None);
    }

    #[test]
    fn a_binding_takes_the_first_free_keyslot_and_names_it_in_its_token() {
        // Slot 0 (luks2) and 1 (the re-encryption's) are taken.
        assert_eq!(first_free_keyslot(DUMP), Some(2));
        assert_eq!(first_free_keyslot("Keyslots:\nTokens:\n"), Some(0));
        let full: String = (0..32).map(|n| format!("  {n}: luks2\n")).collect();
        assert_eq!(
            first_free_keyslot(&format!("Keyslots:\n{full}Tokens:\n")),
            None
        );
        // Digests and tokens are numbered too, and are not keyslots.
        assert_eq!(
            first_free_keyslot(
                "Keyslots:\n  1: luks2\nTokens:\n  0: clevis\nDigests:\n  0: pbkdf2\n"
            ),
            Some(0)
        );
        let jwe =
            serde_json::json!({ "protected": "eyJ", "iv": "a", "ciphertext": "b", "tag": "c" });
        assert_eq!(
            clevis_token(2, jwe.clone()),
            serde_json::json!({ "type": "clevis", "keyslots": ["2"], "jwe": jwe })
        );
    }

    #[test]
    fn the_own_key_mark_is_read_from_the_header() {
        // The image's header has no subsystem; the initramfs or the online run sets the mark.
        assert_eq!(subsystem(DUMP), None);
        let marked = DUMP.replace(
            "Subsystem:     \t(no subsystem)",
            &format!("Subsystem:     \t{OWN_KEY_MARK}"),
        );
        assert_ne!(marked, DUMP);
        assert_eq!(subsystem(&marked), Some(OWN_KEY_MARK));
        assert_eq!(subsystem("Label: root\n"), None);
    }

    #[test]
    fn the_initramfs_gets_the_same_reencryption_parameters() {
        let a = reencrypt_shell_args();
        assert!(
            a.starts_with("--sector-size 4096 --resilience checksum"),
            "{a}"
        );
        assert!(
            a.ends_with("--pbkdf pbkdf2 --hash sha512 --pbkdf-force-iterations 1000"),
            "{a}"
        );
        // One shell word each: nothing to quote in the hook's script.
        assert!(a.split(' ').all(|w| !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))));
        let f: InitramfsFigures =
            serde_json::from_str(r#"{"seconds": 47.5, "bytes": 587202560, "resumed": 0}"#).unwrap();
        assert_eq!(
            f,
            InitramfsFigures {
                seconds: 47.5,
                bytes: Some(560 << 20),
                resumed: 0
            }
        );
        // A resumed one does not know its extent.
        let f: InitramfsFigures =
            serde_json::from_str(r#"{"seconds": 12.0, "bytes": null, "resumed": 1}"#).unwrap();
        assert_eq!((f.bytes, f.resumed), (None, 1));
    }

    #[test]
    fn crypttab_loses_its_key_file_only() {
        let t = "# <name> <device> <key> <opts>\nroot     UUID=abc /etc/ncimage/keys/enroll.key luks,discard,initramfs\ndata UUID=d /k luks\n";
        assert_eq!(
            crypttab_without_key(t),
            "# <name> <device> <key> <opts>\nroot UUID=abc none luks,discard,initramfs\ndata UUID=d /k luks\n"
        );
        let once = crypttab_without_key(t);
        assert_eq!(crypttab_without_key(&once), once);
    }

    #[test]
    fn ext4_size_is_block_count_times_block_size() {
        let dump = "Filesystem volume name:   root\nBlock count:              245760\nReserved block count:     12288\nBlock size:               4096\n";
        assert_eq!(ext4_size(dump), Some(960 << 20));
        assert_eq!(ext4_size("Block count: 10\n"), None);
    }

    #[test]
    fn status_lines_say_what_happens() {
        let mut s = Status {
            state: State::Done,
            message: String::new(),
            bound: "tpm2".into(),
            reencrypt_seconds: Some(41.2),
            reencrypt_bytes: None,
            root_bytes: None,
            resumed: 1,
            offline: false,
            seconds: 60.0,
        };
        assert_eq!(s.line(), "ncimage: encryption: own volume key (re-encrypted in 41 s, resumed 1x), unlock: tpm2 + recovery key, enrollment key removed");
        s.reencrypt_bytes = Some(960 << 20);
        s.root_bytes = Some(2048 << 20);
        s.resumed = 0;
        assert_eq!(s.line(), "ncimage: encryption: own volume key (re-encrypted 960 MiB in 41 s, root 2048 MiB), unlock: tpm2 + recovery key, enrollment key removed");
        s.offline = true;
        assert_eq!(s.line(), "ncimage: encryption: own volume key (re-encrypted 960 MiB in 41 s by the initramfs, root 2048 MiB), unlock: tpm2 + recovery key, enrollment key removed");
        // Marked before the initramfs looked: no figures from this machine.
        s.reencrypt_bytes = None;
        s.reencrypt_seconds = Some(0.0);
        assert_eq!(s.line(), "ncimage: encryption: own volume key (re-encrypted before this boot, root 2048 MiB), unlock: tpm2 + recovery key, enrollment key removed");
        s.state = State::Failed;
        s.message = "clevis luks bind tang failed".into();
        assert!(s.line().contains("FAILED: clevis luks bind tang failed"));
    }

    fn manifest(dir: &Path, uuid: &str) -> PathBuf {
        let m = serde_json::json!({
            "disk": { "partitions": [
                { "name": "esp", "start_lba": 34 },
                { "name": "root", "start_lba": 2048 },
            ] },
            "luks": { "uuid": uuid, "data_offset": 16u64 << 20 },
            "filesystems": { "root": { "size_bytes": 1u64 << 20 } },
        });
        let p = dir.join("manifest.json");
        std::fs::write(&p, m.to_string()).unwrap();
        p
    }

    #[test]
    fn root_extent_comes_from_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let p = manifest(d.path(), "u-1");
        assert_eq!(
            RootExtent::from_manifest(&p).unwrap(),
            RootExtent {
                offset: 1 << 20,
                header: 16 << 20,
                fs_bytes: 1 << 20,
                uuid: "u-1".into()
            }
        );
        std::fs::write(&p, r#"{"disk": {"partitions": []}}"#).unwrap();
        let e = RootExtent::from_manifest(&p).unwrap_err().to_string();
        assert!(e.contains("manifest.json: no root partition"), "{e}");
        std::fs::write(&p, "{").unwrap();
        let e = RootExtent::from_manifest(&p).unwrap_err().to_string();
        assert!(e.contains("manifest.json: not JSON"), "{e}");
    }

    #[test]
    fn an_image_range_is_a_raw_node_over_the_image() {
        assert_eq!(
            image_range_opts(Path::new("/v/a,b.qcow2"), "qcow2", 512, 1024),
            "driver=raw,offset=512,size=1024,file.driver=qcow2,file.file.filename=/v/a,,b.qcow2"
        );
    }

    /// The data area of a LUKS2 file (`header` bytes in).
    fn data_area(path: &Path, header: u64) -> Vec<u8> {
        std::fs::read(path).unwrap()[header as usize..].to_vec()
    }

    /// A disk's root extent as a file of its own.
    fn extract(disk: &Path, e: &RootExtent, to: &Path) {
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw", "--image-opts"])
                .arg(image_range_opts(disk, "qcow2", e.offset, e.bytes()))
                .arg(to),
        )
        .unwrap();
    }

    /// A node's disk made on the host: a fresh volume key, the mark the initramfs looks for,
    /// the image's UUID and enrollment keyslot, 4 KiB sectors, and the same plaintext (put
    /// back under the image's volume key and 512-byte sectors, the ciphertext is the image's
    /// again, byte for byte). The image is not written; a key that does not open it, or a
    /// manifest from another build, leaves no disk.
    #[test]
    fn a_disk_gets_its_own_volume_key_on_the_host() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let uuid = "0d7e3c2a-6b1f-4e59-9a8d-3c2b1a0f9e8d";
        let key = p.join("enroll.key");
        std::fs::write(&key, [7u8; 64]).unwrap();
        let vk = p.join("vk");
        let mut vk_bytes = [0u8; 64];
        getrandom::fill(&mut vk_bytes).unwrap();
        std::fs::write(&vk, vk_bytes).unwrap();
        // The image's root: a LUKS2 header (512-byte sectors, as the build writes it) and 1 MiB
        // of ciphertext, behind a 1 MiB gap for the partition table.
        let root = p.join("root.luks");
        std::fs::File::create(&root)
            .unwrap()
            .set_len((16 << 20) + (1 << 20))
            .unwrap();
        tools::run(
            Command::new("cryptsetup")
                .args(["luksFormat", "--batch-mode", "--type", "luks2"])
                .args(["--sector-size", "512", "--offset", "32768", "--uuid", uuid])
                .args(crate::luks::GENERATED_KEY_PBKDF_ARGS)
                .arg("--volume-key-file")
                .arg(&vk)
                .arg("--key-file")
                .arg(&key)
                .arg(&root),
        )
        .unwrap();
        let mut cipher = vec![0u8; 1 << 20];
        getrandom::fill(&mut cipher).unwrap();
        let mut whole = vec![0u8; 1 << 20];
        whole.extend_from_slice(&std::fs::read(&root).unwrap()[..16 << 20]);
        whole.extend_from_slice(&cipher);
        let raw = p.join("image.raw");
        std::fs::write(&raw, &whole).unwrap();
        let image = p.join("ncimage-x.qcow2");
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&image),
        )
        .unwrap();
        let before = std::fs::read(&image).unwrap();
        let extent = RootExtent::from_manifest(&manifest(p, uuid)).unwrap();

        let disk = p.join("disk.qcow2");
        let r = own_key_before_boot(&image, "qcow2", &extent, &key, &disk).unwrap();
        assert!(
            matches!(r, BeforeBoot::Done { bytes, .. } if bytes == 1 << 20),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read(&image).unwrap(),
            before,
            "the image was written"
        );
        let leftovers: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let got = p.join("got.luks");
        extract(&disk, &extent, &got);
        let g = got.to_string_lossy().into_owned();
        let dump = tools::run(&mut cs(&["luksDump", &g])).unwrap();
        assert_eq!(subsystem(&dump), Some(OWN_KEY_MARK), "{dump}");
        assert!(dump.contains(&format!("UUID:          \t{uuid}")), "{dump}");
        assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
        assert!(!reencrypt_in_progress(&dump), "{dump}");
        // The re-wrapped enrollment keyslot keeps the minimal PBKDF of generated keys.
        assert!(
            dump.contains("PBKDF:      pbkdf2") && !dump.contains("argon2"),
            "{dump}"
        );
        assert!(opens(&g, &key).is_some());
        assert_ne!(data_area(&got, 16 << 20), cipher, "not re-encrypted");
        // Back under the image's volume key: the image's ciphertext again.
        tools::run(
            cs(&["reencrypt", "--batch-mode", "--force-offline-reencrypt"])
                .arg("--key-file")
                .arg(&key)
                .arg("--volume-key-file")
                .arg(&vk)
                .args(["--sector-size", "512"])
                .args(crate::luks::GENERATED_KEY_PBKDF_ARGS)
                .arg(&got),
        )
        .unwrap();
        assert!(
            data_area(&got, 16 << 20) == cipher,
            "the plaintext changed on the way"
        );

        // Another machine's enrollment key: nothing written.
        let other = p.join("other.key");
        std::fs::write(&other, [8u8; 64]).unwrap();
        let disk2 = p.join("disk2.qcow2");
        assert_eq!(
            own_key_before_boot(&image, "qcow2", &extent, &other, &disk2).unwrap(),
            BeforeBoot::KeyDoesNotOpen
        );
        assert!(!disk2.exists());
        // A manifest of another build: an error naming the image, nothing written.
        let mut wrong = extent.clone();
        wrong.uuid = "11111111-2222-3333-4444-555555555555".into();
        let e = own_key_before_boot(&image, "qcow2", &wrong, &key, &disk2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ncimage-x.qcow2") && e.contains("has UUID"),
            "{e}"
        );
        assert!(!disk2.exists());
        // A machine's disk is not an image.
        let e = own_key_before_boot(&disk, "qcow2", &extent, &key, &disk2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already has its own volume key"), "{e}");
        assert!(!disk2.exists());
    }
}
