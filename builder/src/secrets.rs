//! Secrets: generated fresh (per cluster, or per test run), held in memory, written only into
//! seeds. Values never appear in logs: `redact` replaces them in anything printed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::{SecretDecl, SecretKind};

/// An ed25519 OpenSSH private key, made by ssh-keygen in a private temporary folder.
fn ssh_key(name: &str) -> Result<String> {
    crate::tools::require("ssh-keygen")?;
    let d = tempfile::Builder::new()
        .prefix("ncimage-ssh-")
        .tempdir()
        .map_err(Error::io(
            "creating a temporary folder",
            std::env::temp_dir(),
        ))?;
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

/// A self-signed certificate (P-256, 825 days) and its key in one PEM, made by openssl in a
/// private temporary folder that is removed at once.
fn self_signed_pem(name: &str) -> Result<String> {
    crate::tools::require("openssl")?;
    let d = tempfile::Builder::new()
        .prefix("ncimage-tls-")
        .tempdir()
        .map_err(Error::io(
            "creating a temporary folder",
            std::env::temp_dir(),
        ))?;
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
        for d in decls {
            let value = match d.kind {
                SecretKind::Hex => {
                    let mut b = vec![0u8; d.bytes.max(16)];
                    getrandom::fill(&mut b)
                        .map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
                    hex::encode(b)
                }
                SecretKind::TlsPem => self_signed_pem(&d.name)?,
                SecretKind::SshEd25519 => ssh_key(&d.name)?,
            };
            m.insert(d.name.clone(), value);
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
            },
            SecretDecl {
                name: "b".into(),
                description: String::new(),
                bytes: 4,
                kind: SecretKind::Hex,
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
