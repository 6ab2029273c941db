//! Credentials from each provider's standard places. Secrets live in [`Secret`], whose Debug
//! and Display print `<redacted>`: no credential reaches output or a log through formatting.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A secret string; formatting never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for signing or an Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// AWS-style access key (also DigitalOcean Spaces and any S3-compatible server).
#[derive(Clone, Debug)]
pub struct AwsCredentials {
    pub access_key_id: String,
    secret_access_key: Secret,
    session_token: Option<Secret>,
    /// Where they came from (for messages): "environment" or "<file> [profile]".
    pub source: String,
}

impl AwsCredentials {
    pub fn new(id: String, secret: String, token: Option<String>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret(secret),
            session_token: token.map(Secret),
            source: "given".into(),
        }
    }
    pub fn secret_access_key(&self) -> &str {
        self.secret_access_key.expose()
    }
    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_ref().map(|s| s.expose())
    }

    /// AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) from the environment,
    /// else the shared credentials file (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials),
    /// profile `profile`, AWS_PROFILE or `default`.
    pub fn load(profile: Option<&str>) -> Result<AwsCredentials> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if profile.is_none() {
            if let (Some(id), Some(secret)) =
                (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
            {
                let mut c = AwsCredentials::new(id, secret, env("AWS_SESSION_TOKEN"));
                c.source = "environment".into();
                return Ok(c);
            }
        }
        let profile = profile
            .map(str::to_string)
            .or_else(|| env("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws/credentials")));
        let missing = |why: String| {
            Error::upload(
                format!("no AWS-style credentials: {why}"),
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for \
                 temporary keys), or add aws_access_key_id and aws_secret_access_key to a \
                 profile in ~/.aws/credentials (AWS_PROFILE or the target's `profile` picks it)",
            )
        };
        let Some(file) = file else {
            return Err(missing(
                "AWS_ACCESS_KEY_ID is not set and HOME is unknown".into(),
            ));
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing(format!(
                    "AWS_ACCESS_KEY_ID is not set and {} does not exist",
                    file.display()
                )))
            }
            Err(e) => return Err(Error::io("reading", &file)(e)),
        };
        let section = ini_section(&text, &profile);
        let get = |k: &str| {
            section
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => {
                let mut c = AwsCredentials::new(id, secret, get("aws_session_token"));
                c.source = format!("{} [{profile}]", file.display());
                Ok(c)
            }
            _ => Err(missing(format!(
                "{} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key",
                file.display()
            ))),
        }
    }
}

/// The key = value lines of `[name]` in an INI file (comments and blank lines skipped).
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = h.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// The first non-empty environment variable of `names`.
pub fn env_secret(names: &[&str]) -> Option<Secret> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        .map(Secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let c = AwsCredentials::new(
            "AKIDEXAMPLE".into(),
            "very-secret-key".into(),
            Some("session-tok".into()),
        );
        let shown = format!("{c:?} {} {:?}", c.secret_access_key, c.session_token);
        assert!(!shown.contains("very-secret-key"), "{shown}");
        assert!(!shown.contains("session-tok"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(c.secret_access_key(), "very-secret-key");
    }

    #[test]
    fn reads_a_profile_of_an_ini_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    # comment\n[ci]\naws_access_key_id=C\naws_secret_access_key = D\n\
                    aws_session_token = E\n";
        assert_eq!(
            ini_section(text, "ci"),
            vec![
                ("aws_access_key_id".to_string(), "C".to_string()),
                ("aws_secret_access_key".to_string(), "D".to_string()),
                ("aws_session_token".to_string(), "E".to_string())
            ]
        );
        assert!(ini_section(text, "nosuch").is_empty());
    }
}
