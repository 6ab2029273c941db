//! Image specs: how images are built (suite, mirrors, sizes, LUKS parameters, formats).
//! TOML with defaults and `deny_unknown_fields`; errors name file:line:column.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The default spec, embedded so `ncimage build --role R` needs no file.
pub const DEFAULT_SPEC: &str = include_str!("../../image-specs/default.toml");
pub const DEFAULT_SPEC_NAME: &str = "image-specs/default.toml (embedded)";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default)]
    pub mirror: Option<String>,
    #[serde(default)]
    pub security_mirror: Option<String>,
    #[serde(default)]
    pub image: ImageSettings,
    #[serde(default)]
    pub luks: LuksSettings,
    /// How nodes unlock their volumes after first boot (see rekey.rs); per role in
    /// `[roles.<role>.encryption]`, per node in `[[nodes]] encryption`. Without the section:
    /// tpm2 (as image-specs/default.toml says), never a console-only disk by omission.
    #[serde(default = "default_encryption")]
    pub encryption: crate::rekey::UnlockPolicy,
    #[serde(default)]
    pub roles: BTreeMap<String, RoleOverrides>,
    /// The cluster this spec describes (cluster specs only; see cluster.rs).
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterSettings>,
    #[serde(default)]
    pub nodes: Vec<crate::cluster::NodeSpec>,
    /// Where archives that roles declare come from (`[archives.<name>]`).
    #[serde(default)]
    pub archives: BTreeMap<String, ArchiveSource>,
    /// sha256 of the spec text (set by the loader).
    #[serde(skip_deserializing)]
    pub sha256: String,
    /// Where the spec came from (set by the loader).
    #[serde(skip_deserializing)]
    pub source: String,
    /// Folder of the spec file: relative paths in it start here (set by the loader).
    #[serde(skip)]
    pub dir: Option<std::path::PathBuf>,
}

/// The source of one archive: a URL or a path (relative to the spec), its pinned sha256, and
/// its detached OpenPGP signature. `fingerprint` + `signing_key` replace the role's key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSource {
    pub url: Option<String>,
    pub path: Option<String>,
    pub sha256: String,
    pub signature: Option<String>,
    pub fingerprint: Option<String>,
    pub signing_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    #[serde(default = "d_root")]
    pub root_size: Size,
    /// Free space the image's root filesystem carries for first boot. The built filesystem is
    /// its content plus this, not `root_size`: first boot re-encrypts only that much with the
    /// machine's own key, then grows the filesystem to `root_size` (rekey.rs).
    #[serde(default = "d_root_free")]
    pub root_free: Size,
    #[serde(default = "d_boot")]
    pub boot_size: Size,
    #[serde(default = "d_esp")]
    pub esp_size: Size,
    #[serde(default = "d_formats")]
    pub formats: Vec<Format>,
    #[serde(default = "d_cmdline")]
    pub kernel_cmdline: String,
    #[serde(default = "d_epoch")]
    pub source_date_epoch: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleOverrides {
    pub root_size: Option<Size>,
    pub root_free: Option<Size>,
    pub boot_size: Option<Size>,
    /// Values of the role's build-time `vars` (see the role's role.toml).
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// The role's unlock policy, replacing `[encryption]`.
    #[serde(default)]
    pub encryption: Option<crate::rekey::UnlockPolicy>,
}

/// An output format of the disk (see export.rs for each one's size rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// QEMU's qcow2 (OpenStack, Proxmox, libvirt).
    Qcow2,
    /// The raw disk, sparse (Hetzner-style dd, DigitalOcean).
    Raw,
    /// Azure: a fixed VHD, a whole number of MiB plus the 512-byte footer.
    Vhd,
    /// VMDK streamOptimized (AWS import, VMware).
    Vmdk,
    /// GCE: `disk.raw` (a multiple of 1 GiB) in a GNU sparse tar, gzip.
    Gce,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Qcow2,
        Format::Raw,
        Format::Vhd,
        Format::Vmdk,
        Format::Gce,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vmdk => "vmdk",
            Format::Gce => "gce",
        }
    }

    /// File name suffix of the artifact.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Gce => "gce.tar.gz",
            f => f.name(),
        }
    }

    /// Parses a format name (command line), naming the known ones on error.
    pub fn parse(s: &str) -> std::result::Result<Format, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                format!(
                    "unknown format `{s}`: use one or more of {}",
                    Format::ALL.map(|f| f.name()).join(", ")
                )
            })
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LuksSettings {
    #[serde(default = "d_cipher")]
    pub cipher: String,
    #[serde(default = "d_key_bits")]
    pub key_bits: u32,
    // No PBKDF settings: every keyslot holds a generated key and uses
    // `luks::GENERATED_KEY_PBKDF_ARGS` (see `REMOVED_LUKS_KEYS`).
}

/// `[luks]` keys of older specs: the PBKDF is no longer a setting. A spec that still sets one
/// gets an error that says why and what to do instead of serde's bare "unknown field".
const REMOVED_LUKS_KEYS: [&str; 4] = [
    "pbkdf",
    "pbkdf_memory_kib",
    "pbkdf_iterations",
    "pbkdf_parallel",
];

/// A byte size written as an integer (bytes) or a string with a K/M/G/T suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct Size(pub u64);

impl From<Size> for u64 {
    fn from(s: Size) -> u64 {
        s.0
    }
}

impl Size {
    pub fn parse(s: &str) -> std::result::Result<Size, String> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            None => (t, 1u64),
            Some((i, _)) => {
                let mult = match t[i..]
                    .trim()
                    .to_ascii_uppercase()
                    .trim_end_matches("IB")
                    .trim_end_matches('B')
                {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    other => {
                        return Err(format!(
                            "unknown size suffix `{other}` in `{s}`: use K, M, G or T"
                        ))
                    }
                };
                (&t[..i], mult)
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size: write e.g. \"2G\" or \"512M\""))?;
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => Size::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

fn default_encryption() -> crate::rekey::UnlockPolicy {
    crate::rekey::UnlockPolicy {
        tpm2: true,
        ..Default::default()
    }
}

fn default_name() -> String {
    "default".into()
}
fn default_suite() -> String {
    "trixie".into()
}
fn d_root() -> Size {
    Size(2 << 30)
}
fn d_root_free() -> Size {
    Size(128 << 20)
}
fn d_boot() -> Size {
    Size(256 << 20)
}
fn d_esp() -> Size {
    Size(32 << 20)
}
fn d_formats() -> Vec<Format> {
    vec![Format::Qcow2, Format::Raw]
}
fn d_cmdline() -> String {
    "ro console=tty0 console=ttyS0,115200n8 no_timer_check".into()
}
fn d_epoch() -> u64 {
    1767225600
}
fn d_cipher() -> String {
    "aes-xts-plain64".into()
}
fn d_key_bits() -> u32 {
    512
}

impl Default for ImageSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}
impl Default for LuksSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

const SPEC_HELP: &str = "see image-specs/default.toml for every key with its default";

/// A spec that does not parse or fit the schema, located at file:line:column; a removed
/// `[luks]` PBKDF key says why it is gone.
fn spec_error(path: &str, text: &str, e: &toml::de::Error) -> Error {
    let removed = REMOVED_LUKS_KEYS
        .iter()
        .find(|k| e.message().starts_with(&format!("unknown field `{k}`")));
    let Some(key) = removed else {
        return Error::toml(path, text, e, SPEC_HELP);
    };
    let mut err = Error::toml(
        path,
        text,
        e,
        "remove pbkdf, pbkdf_memory_kib, pbkdf_iterations and pbkdf_parallel from [luks]",
    );
    if let Error::Toml(t) = &mut err {
        t.message = format!(
            "`{key}`: [luks] pbkdf settings are gone: every keyslot holds a generated key and uses PBKDF2 with 1000 iterations (as systemd-cryptenroll does for recovery keys); remove the line"
        );
    }
    err
}

impl Spec {
    /// Parses spec text; `path` is only used in messages.
    pub fn parse(path: &str, text: &str) -> Result<Spec> {
        let mut spec: Spec = toml::from_str(text).map_err(|e| spec_error(path, text, &e))?;
        spec.sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        spec.source = path.to_string();
        spec.validate(path)?;
        let line = |needle: &str| match text.find(needle) {
            Some(at) => format!("{path}:{}: ", text[..at].lines().count().max(1)),
            None => format!("{path}: "),
        };
        crate::cluster::validate(&spec, &line)?;
        Ok(spec)
    }

    /// Loads a spec file, or the embedded default when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Spec> {
        match path {
            None => Spec::parse(DEFAULT_SPEC_NAME, DEFAULT_SPEC),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(Error::io("reading the spec", p))?;
                let mut spec = Spec::parse(&p.display().to_string(), &text)?;
                spec.dir = Some(
                    p.parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                        .to_path_buf(),
                );
                Ok(spec)
            }
        }
    }

    fn validate(&self, path: &str) -> Result<()> {
        let bad = |what: String, help: &str| Err(Error::invalid(format!("{path}: {what}"), help));
        if self.suite != "trixie" {
            return bad(
                format!("suite `{}` is not supported", self.suite),
                "ncimage builds Debian 13: set suite = \"trixie\"",
            );
        }
        let mib = 1 << 20;
        for (what, size, min) in [
            ("image.root_size", self.image.root_size, 512 * mib),
            ("image.root_free", self.image.root_free, 64 * mib),
            ("image.boot_size", self.image.boot_size, 64 * mib),
            ("image.esp_size", self.image.esp_size, 16 * mib),
        ] {
            if size.0 < min || size.0 % mib != 0 {
                return bad(
                    format!("{what} = {} bytes", size.0),
                    &format!("use a whole number of MiB, at least {} MiB", min / mib),
                );
            }
        }
        if self.image.formats.is_empty() {
            return bad(
                "image.formats is empty".into(),
                "list at least one of \"qcow2\", \"raw\", \"vhd\", \"vmdk\", \"gce\"",
            );
        }
        if self.luks.cipher != "aes-xts-plain64" || self.luks.key_bits != 512 {
            return bad(
                format!(
                    "luks cipher {} with {} bits",
                    self.luks.cipher, self.luks.key_bits
                ),
                "ncimage encrypts with aes-xts-plain64 and a 512-bit key (AES-256 in XTS)",
            );
        }
        for (name, a) in &self.archives {
            let hex = a.sha256.trim();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return bad(
                    format!("archives.{name}.sha256 `{hex}` is not a sha256"),
                    "pin the archive with its 64-hex-digit sha256 (sha256sum prints it)",
                );
            }
            if a.url.is_some() == a.path.is_some() {
                return bad(
                    format!("archives.{name} needs exactly one of `url` or `path`"),
                    "url = \"https://...\" to download, path = \"file\" (relative to the spec) for a local copy",
                );
            }
        }
        for (role, o) in &self.roles {
            for (key, size) in [
                ("root_size", o.root_size),
                ("root_free", o.root_free),
                ("boot_size", o.boot_size),
            ] {
                let Some(size) = size else { continue };
                if size.0 < 64 * mib || size.0 % mib != 0 {
                    return bad(
                        format!("roles.{role}.{key} = {} bytes", size.0),
                        "use a whole number of MiB, at least 64 MiB",
                    );
                }
            }
            if let Some(p) = &o.encryption {
                p.validate(&format!("{path}: [roles.{role}.encryption]"))?;
            }
        }
        self.encryption.validate(&format!("{path}: [encryption]"))?;
        for n in &self.nodes {
            if let Some(p) = &n.encryption {
                p.validate(&format!("{path}: node `{}` encryption", n.name))?;
            }
        }
        Ok(())
    }

    /// The unlock policy of a node of `role`: the node's own, else its role's, else the spec's.
    pub fn unlock_policy(
        &self,
        role: &str,
        node: Option<&crate::rekey::UnlockPolicy>,
    ) -> crate::rekey::UnlockPolicy {
        node.or_else(|| self.roles.get(role).and_then(|o| o.encryption.as_ref()))
            .unwrap_or(&self.encryption)
            .clone()
    }

    pub fn root_size(&self, role: &str) -> u64 {
        self.roles
            .get(role)
            .and_then(|o| o.root_size)
            .unwrap_or(self.image.root_size)
            .0
    }
    /// Free space in the image's root filesystem (see `ImageSettings::root_free`).
    pub fn root_free(&self, role: &str) -> u64 {
        self.roles
            .get(role)
            .and_then(|o| o.root_free)
            .unwrap_or(self.image.root_free)
            .0
    }
    pub fn boot_size(&self, role: &str) -> u64 {
        self.roles
            .get(role)
            .and_then(|o| o.boot_size)
            .unwrap_or(self.image.boot_size)
            .0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_without_an_encryption_section_seals_to_the_tpm() {
        let spec: Spec = toml::from_str("name = \"x\"\n").unwrap();
        assert!(spec.unlock_policy("db", None).tpm2);
        let spec: Spec = toml::from_str("[encryption]\ntang = [{ url = \"http://t\" }]\n").unwrap();
        assert!(
            !spec.unlock_policy("db", None).tpm2,
            "a written policy is taken as written"
        );
    }

    #[test]
    fn embedded_default_parses_with_documented_values() {
        let s = Spec::load(None).unwrap();
        assert_eq!(s.suite, "trixie");
        assert_eq!(s.image.root_size, Size(2 << 30));
        assert_eq!(s.luks.key_bits, 512);
        assert_eq!(s.image.formats, vec![Format::Qcow2, Format::Raw]);
        assert_eq!(s.sha256.len(), 64);
    }

    #[test]
    fn empty_spec_gets_defaults() {
        let s = Spec::parse("x.toml", "").unwrap();
        assert_eq!(s.name, "default");
        assert_eq!(s.root_size("redis"), 2 << 30);
    }

    #[test]
    fn role_override_applies() {
        let s = Spec::parse("x.toml", "[roles.redis]\nroot_size = \"3G\"\n").unwrap();
        assert_eq!(s.root_size("redis"), 3 << 30);
        assert_eq!(s.root_size("db"), 2 << 30);
        assert_eq!(s.root_free("db"), 128 << 20);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(Size::parse("512M").unwrap(), Size(512 << 20));
        assert_eq!(Size::parse("2GiB").unwrap(), Size(2 << 30));
        assert_eq!(Size::parse("1024").unwrap(), Size(1024));
        assert!(Size::parse("2X").unwrap_err().contains("suffix"));
        assert!(Size::parse("lots").is_err());
    }

    fn err(text: &str) -> String {
        match Spec::parse("spec.toml", text) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {text}"),
        }
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = err("name = \"x\"\n[image]\nroot_sise = \"2G\"\n");
        assert!(e.starts_with("spec.toml:3:1"), "{e}");
        assert!(e.contains("root_sise"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_column() {
        let e = err("[image]\nformats = \"qcow2\"\n");
        assert!(e.starts_with("spec.toml:2:11"), "{e}");
    }

    #[test]
    fn malformed_toml_is_located() {
        let e = err("name = \"x\n");
        assert!(e.starts_with("spec.toml:1:"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_help() {
        assert!(err("suite = \"bookworm\"").contains("not supported"));
        assert!(err("[image]\nroot_size = \"10M\"").contains("root_size"));
        assert!(err("[image]\nroot_free = \"16M\"").contains("root_free"));
        assert!(err("[roles.redis]\nroot_free = \"100000\"")
            .contains("roles.redis.root_free = 100000 bytes"));
        assert!(err("[image]\nformats = []").contains("formats"));
        assert!(err("[image]\nformats = [\"vdi\"]").contains("vdi"));
        assert!(err("[luks]\nkey_bits = 256").contains("luks cipher aes-xts-plain64 with 256 bits"));
        assert!(err("[image]\nroot_size = \"2Q\"").contains("suffix"));
    }

    #[test]
    fn removed_pbkdf_keys_say_why_and_where() {
        for key in REMOVED_LUKS_KEYS {
            let e = err(&format!(
                "name = \"x\"\n[luks]\ncipher = \"aes-xts-plain64\"\n{key} = 1\n"
            ));
            assert!(e.starts_with("spec.toml:4:1: "), "{e}");
            assert!(e.contains(&format!("`{key}`")), "{e}");
            assert!(e.contains("PBKDF2 with 1000 iterations"), "{e}");
            assert!(e.contains("remove the line"), "{e}");
        }
        // An unknown key elsewhere keeps serde's message.
        let e = err("[luks]\npbkdf_memory = 1\n");
        assert!(e.contains("unknown field `pbkdf_memory`"), "{e}");
    }
}
