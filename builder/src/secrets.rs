//! Secrets: generated fresh (per cluster, or per test run), held in memory, written only into
//! seeds. Values never appear in logs: `redact` replaces them in anything printed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::{SecretDecl, SecretKind};

/// A temporary folder (mode 0700, removed when dropped) for key material.
pub fn private_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(Error::io(
            "creating a temporary folder",
            std::env::temp_dir(),
        ))
}

/// An ed25519 OpenSSH private key, made by ssh-keygen in a private temporary folder.
fn ssh_key(name: &str) -> Result<String> {
    crate::tools::require("ssh-keygen")?;
    let d = private_tempdir("ncimage-ssh-")?;
    let key = d.path().join("key");
    crate::tools::run(
        std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                &format!("ncimage {name}"),
                "-f",
            ])
            .arg(&key),
    )?;
    std::fs::read_to_string(&key).map_err(Error::io("reading", &key))
}

/// The OpenSSH public key of a private key (ssh-keygen -y in a private temporary folder).
pub fn public_key(private: &str) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let d = private_tempdir("ncimage-ssh-")?;
    let key = d.path().join("key");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| std::io::Write::write_all(&mut f, private.as_bytes()))
        .map_err(Error::io("writing", &key))?;
    let out = crate::tools::run(
        std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key),
    )?;
    Ok(out.trim().to_string())
}

/// A self-signed certificate (P-256, 825 days) and its key in one PEM, made by openssl in a
/// private temporary folder that is removed at once.
fn self_signed_pem(name: &str) -> Result<String> {
    crate::tools::require("openssl")?;
    let d = private_tempdir("ncimage-tls-")?;
    let (key, cert) = (d.path().join("key.pem"), d.path().join("cert.pem"));
    crate::tools::run(
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "825",
            ])
            .args([
                "-subj",
                &format!("/CN=ncimage lab {name}"),
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )?;
    let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(Error::io("reading", p));
    Ok(format!("{}{}", read(&cert)?, read(&key)?))
}

#[derive(Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    /// One random value per declared secret (hex of `bytes` random bytes).
    pub fn generate(decls: &[SecretDecl]) -> Result<Secrets> {
        let mut m = BTreeMap::new();
        let (public, private): (Vec<&SecretDecl>, Vec<&SecretDecl>) =
            decls.iter().partition(|d| d.kind == SecretKind::SshPublic);
        for d in private {
            let value = match d.kind {
                SecretKind::Hex => {
                    let mut b = vec![0u8; d.bytes.max(16)];
                    getrandom::fill(&mut b)
                        .map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
                    hex::encode(b)
                }
                SecretKind::TlsPem => self_signed_pem(&d.name)?,
                SecretKind::SshEd25519 => ssh_key(&d.name)?,
                SecretKind::SshPublic => unreachable!("partitioned"),
            };
            m.insert(d.name.clone(), value);
        }
        // Public halves of keys generated here; without the private key (a role tested
        // alone), of a throw-away one.
        for d in public {
            let of = d.of.as_deref().ok_or_else(|| {
                Error::invalid(
                    format!("secret `{}` is ssh-public but names no key (`of`)", d.name),
                    "set of = \"<name of the ssh-ed25519 secret>\"",
                )
            })?;
            let private = match m.get(of) {
                Some(k) => k.clone(),
                None => ssh_key(of)?,
            };
            m.insert(d.name.clone(), public_key(&private)?);
        }
        Ok(Secrets(m))
    }

    /// Replaces every secret value in `text` by `<secret:NAME>`.
    pub fn redact(&self, text: &str) -> String {
        let mut t = text.to_string();
        for (k, v) in &self.0 {
            if !v.is_empty() {
                t = t.replace(v.as_str(), &format!("<secret:{k}>"));
            }
        }
        t
    }
}

/// The secrets file of a cluster (`ncimage secrets init`): TOML, `[secrets]` name = value,
/// mode 0600, outside any image and repository.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    cluster: String,
    secrets: BTreeMap<String, String>,
}

/// The declarations of every secret the roles of the spec's nodes need (each name once).
pub fn cluster_decls(
    spec: &crate::spec::Spec,
    project: &crate::layer::Project,
) -> Result<Vec<SecretDecl>> {
    crate::cluster::check_roles(spec, project)?;
    let mut roles: Vec<&str> = spec.nodes.iter().map(|n| n.role.as_str()).collect();
    roles.sort();
    roles.dedup();
    let mut decls: BTreeMap<String, SecretDecl> = BTreeMap::new();
    for r in roles {
        for l in project.layers_for(r)? {
            for d in &l.manifest.secrets {
                if let Some(prev) = decls.get(&d.name) {
                    if prev.kind != d.kind {
                        return Err(Error::invalid(
                            format!("secret `{}` is declared with two kinds (role {r})", d.name),
                            "roles that share a secret declare it alike",
                        ));
                    }
                }
                decls.insert(d.name.clone(), d.clone());
            }
        }
    }
    Ok(decls.into_values().collect())
}

/// Generates every cluster secret into `out` (mode 0600); never overwrites a file.
pub fn init(
    spec: &crate::spec::Spec,
    project: &crate::layer::Project,
    out: &std::path::Path,
) -> Result<Vec<String>> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let decls = cluster_decls(spec, project)?;
    let cluster = spec.cluster.as_ref().expect("checked by cluster_decls");
    if out.exists() {
        return Err(Error::invalid(
            format!(
                "{} exists: refusing to overwrite a cluster's secrets",
                out.display()
            ),
            "keep it (it is the cluster's only copy), or choose another path with --out",
        ));
    }
    let mut values = Secrets::generate(&decls)?;
    // Each node's recovery key of its encrypted volumes: only that node's seed carries it.
    for n in &spec.nodes {
        values
            .0
            .insert(recovery_name(&n.name), crate::rekey::new_recovery_key()?);
    }
    let text = format!(
        "# Secrets of the ncimage cluster `{}`, generated by `ncimage secrets init`.
# Keep this file out of images and repositories; seeds carry each node only its role's.
{}",
        cluster.name,
        toml::to_string(&SecretsFile {
            cluster: cluster.name.clone(),
            secrets: values.0.clone(),
        })
        .expect("serialisable")
    );
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io("creating", dir))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(Error::io("creating", out))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing", out))?;
    Ok(values.0.into_keys().collect())
}

/// The name of a node's recovery key in a cluster's secrets file.
pub fn recovery_name(node: &str) -> String {
    format!("{}:{node}", crate::rekey::RECOVERY_SECRET)
}

/// ~/.config/ncimage/<cluster>.secrets.toml
pub fn default_path(spec: &crate::spec::Spec) -> Result<std::path::PathBuf> {
    let c = spec.cluster.as_ref().ok_or_else(|| {
        Error::invalid(
            format!("{}: no [cluster] in this spec", spec.source),
            "use a cluster spec such as image-specs/lab.toml",
        )
    })?;
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config")))
        .ok_or_else(|| Error::invalid("neither XDG_CONFIG_HOME nor HOME is set", "pass --out"))?;
    Ok(base
        .join("ncimage")
        .join(format!("{}.secrets.toml", c.name)))
}

/// Reads a cluster's secrets file; it must belong to `cluster` and be private (0600 or less).
pub fn load(path: &std::path::Path, cluster: &str) -> Result<BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::invalid(
            format!("cannot read the secrets file {}: {e}", path.display()),
            "create it with `ncimage secrets init --spec S --out FILE`",
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::invalid(
            format!(
                "{} is readable by others (mode {:o})",
                path.display(),
                meta.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(Error::io("reading", path))?;
    let f: SecretsFile = toml::from_str(&text).map_err(|e| {
        Error::toml(
            &path.display().to_string(),
            &text,
            &e,
            "a secrets file holds `cluster` and a [secrets] table",
        )
    })?;
    if f.cluster != cluster {
        return Err(Error::invalid(
            format!(
                "{} holds the secrets of cluster `{}`, not `{cluster}`",
                path.display(),
                f.cluster
            ),
            "pass the secrets file of this spec's cluster",
        ));
    }
    Ok(f.secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_per_declaration_distinct_and_redacted() {
        let decls = vec![
            SecretDecl {
                name: "a".into(),
                description: String::new(),
                bytes: 32,
                kind: SecretKind::Hex,
                of: None,
            },
            SecretDecl {
                name: "b".into(),
                description: String::new(),
                bytes: 4,
                kind: SecretKind::Hex,
                of: None,
            },
        ];
        let s = Secrets::generate(&decls).unwrap();
        assert_eq!(s.0["a"].len(), 64);
        assert_eq!(s.0["b"].len(), 32, "at least 16 bytes");
        assert_ne!(s.0["a"], Secrets::generate(&decls).unwrap().0["a"]);
        let text = format!("pw={} other={}", s.0["a"], s.0["b"]);
        assert_eq!(s.redact(&text), "pw=<secret:a> other=<secret:b>");
        assert!(!format!("{s:?}").contains(&s.0["a"]));
    }

    #[test]
    fn ssh_secret_is_an_ed25519_private_key() {
        let decls = vec![SecretDecl {
            name: "k".into(),
            description: String::new(),
            bytes: 0,
            kind: SecretKind::SshEd25519,
            of: None,
        }];
        let key = &Secrets::generate(&decls).unwrap().0["k"];
        assert!(
            key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{key}"
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let public = crate::tools::run(
            std::process::Command::new("ssh-keygen")
                .arg("-y")
                .arg("-f")
                .arg(&p),
        )
        .unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
    }

    #[test]
    fn tls_secret_is_a_certificate_with_its_key() {
        let decls = vec![SecretDecl {
            name: "tls".into(),
            description: String::new(),
            bytes: 0,
            kind: SecretKind::TlsPem,
            of: None,
        }];
        let s = Secrets::generate(&decls).unwrap();
        let pem = &s.0["tls"];
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----")
                && pem.contains("-----BEGIN PRIVATE KEY-----"),
            "{pem}"
        );
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("p.pem"), pem).unwrap();
        let out = crate::tools::run(
            std::process::Command::new("openssl")
                .args(["x509", "-noout", "-subject", "-in"])
                .arg(d.path().join("p.pem")),
        )
        .unwrap();
        assert!(out.contains("ncimage lab tls"), "{out}");
    }
}
