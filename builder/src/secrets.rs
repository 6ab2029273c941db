//! Secrets: generated fresh (per cluster, or per test run), held in memory, written only into
//! seeds. Values never appear in logs: `redact` replaces them in anything printed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::SecretDecl;

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
            let mut b = vec![0u8; d.bytes.max(16)];
            getrandom::fill(&mut b).map_err(|e| Error::Vm(format!("no randomness: {e}")))?;
            m.insert(d.name.clone(), hex::encode(b));
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
            SecretDecl { name: "a".into(), description: String::new(), bytes: 32 },
            SecretDecl { name: "b".into(), description: String::new(), bytes: 4 },
        ];
        let s = Secrets::generate(&decls).unwrap();
        assert_eq!(s.0["a"].len(), 64);
        assert_eq!(s.0["b"].len(), 32, "at least 16 bytes");
        assert_ne!(s.0["a"], Secrets::generate(&decls).unwrap().0["a"]);
        let text = format!("pw={} other={}", s.0["a"], s.0["b"]);
        assert_eq!(s.redact(&text), "pw=<secret:a> other=<secret:b>");
        assert!(!format!("{s:?}").contains(&s.0["a"]));
    }
}
