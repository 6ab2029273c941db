//! gcp: an OAuth token for a service account (JWT signed RS256 with `ring`, already built for
//! rustls) or for gcloud's application-default user credentials; the GCE tar.gz into Cloud
//! Storage by a resumable upload (chunks of 8 MiB, the session kept for resume, the last chunk
//! sent only when every byte read hashes to the manifest's sha256, the object's MD5 compared
//! with the file's); then images.insert with UEFI_COMPATIBLE and the operation waited for.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use md5::{Digest, Md5};
use serde::Deserialize;
use sha2::Sha256;

use super::credentials::Secret;
use super::http::{self, Body};
use super::target::Target;
use crate::error::{Error, Result};

pub const SCOPES: &str =
    "https://www.googleapis.com/auth/devstorage.read_write https://www.googleapis.com/auth/compute";
const CHUNK: u64 = 8 << 20;

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: Option<String>,
    private_key: Option<String>,
    token_uri: Option<String>,
    project_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyFile({}, <redacted>)", self.kind)
    }
}

/// Where the credentials are: GOOGLE_APPLICATION_CREDENTIALS, else gcloud's application
/// default credentials.
pub fn credentials_path() -> Option<PathBuf> {
    std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS")
        .map(PathBuf::from)
        .or_else(|| {
            let cfg = std::env::var_os("CLOUDSDK_CONFIG")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/gcloud"))
                })?;
            Some(cfg.join("application_default_credentials.json"))
        })
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A JWT assertion (RS256) for the OAuth token endpoint, from a PKCS#8 PEM key.
pub fn jwt(email: &str, pem: &str, aud: &str, scope: &str, now: u64) -> Result<String> {
    let der: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(der.trim())
        .map_err(|_| bad_key("its private_key is not PEM"))?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| bad_key(&format!("its private_key is not an RSA PKCS#8 key ({e})")))?;
    let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = b64url(
        serde_json::json!({"iss": email, "scope": scope, "aud": aud, "iat": now, "exp": now + 3600})
            .to_string()
            .as_bytes(),
    );
    let input = format!("{header}.{claims}");
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| bad_key("signing failed"))?;
    Ok(format!("{input}.{}", b64url(&sig)))
}

fn bad_key(why: &str) -> Error {
    Error::upload(
        format!("the Google credentials file is not usable: {why}"),
        "download a JSON key of the service account (IAM, Service accounts, Keys) and point \
         GOOGLE_APPLICATION_CREDENTIALS at it",
    )
}

/// (access token, project id of the credentials).
pub fn token(agent: &ureq::Agent) -> Result<(Secret, Option<String>)> {
    let path = credentials_path().ok_or_else(|| missing("HOME is not set"))?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing(&format!("{} does not exist", path.display())))
        }
        Err(e) => return Err(Error::io("reading", &path)(e)),
    };
    let k: KeyFile = serde_json::from_str(&text).map_err(|e| {
        bad_key(&format!(
            "{} is not a credentials JSON ({e})",
            path.display()
        ))
    })?;
    let token_uri = k
        .token_uri
        .clone()
        .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into());
    let form: Vec<(String, String)> = match k.kind.as_str() {
        "service_account" => {
            let (Some(email), Some(pem)) = (&k.client_email, &k.private_key) else {
                return Err(bad_key("it lacks client_email or private_key"));
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            vec![
                (
                    "grant_type".into(),
                    "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                ),
                (
                    "assertion".into(),
                    jwt(email, pem, &token_uri, SCOPES, now)?,
                ),
            ]
        }
        "authorized_user" => {
            let (Some(id), Some(secret), Some(refresh)) =
                (&k.client_id, &k.client_secret, &k.refresh_token)
            else {
                return Err(bad_key(
                    "it lacks client_id, client_secret or refresh_token",
                ));
            };
            vec![
                ("grant_type".into(), "refresh_token".into()),
                ("client_id".into(), id.clone()),
                ("client_secret".into(), secret.clone()),
                ("refresh_token".into(), refresh.clone()),
            ]
        }
        other => return Err(bad_key(&format!("its type `{other}` is not supported"))),
    };
    let body = super::sigv4::canonical_query(&form);
    let r = http::call(
        agent,
        "POST",
        &token_uri,
        &[(
            "content-type".into(),
            "application/x-www-form-urlencoded".into(),
        )],
        Body::Bytes(body.as_bytes()),
    )?;
    if !r.ok() {
        let why = r
            .json()
            .ok()
            .and_then(|j| {
                j["error_description"]
                    .as_str()
                    .or(j["error"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return Err(Error::upload(
            format!(
                "Google's token endpoint {token_uri} refused the credentials of {}: HTTP {} {why}",
                path.display(),
                r.status
            ),
            "check that the key is valid and not disabled",
        ));
    }
    let t = r.json()?["access_token"].as_str().unwrap_or("").to_string();
    if t.is_empty() {
        return Err(Error::upload(
            format!("{token_uri} gave no access_token"),
            "check token_uri",
        ));
    }
    Ok((Secret::new(t), k.project_id.clone()))
}

fn missing(why: &str) -> Error {
    Error::upload(
        format!("no Google credentials: GOOGLE_APPLICATION_CREDENTIALS is not set and {why}"),
        "point GOOGLE_APPLICATION_CREDENTIALS at a service account's JSON key, or run \
         `gcloud auth application-default login`",
    )
}

pub struct Inserted {
    pub image: String,
    pub object: String,
}

#[allow(clippy::too_many_arguments)]
pub fn upload_and_insert(
    name: &str,
    t: &Target,
    file: &Path,
    size: u64,
    sha256: &str,
    image_name: &str,
    quiet: bool,
    state_dir: &Path,
    say: &dyn Fn(String),
) -> Result<Inserted> {
    let agent = http::agent();
    let bucket = t.need(name, "bucket", &t.bucket)?.to_string();
    let (token, sa_project) = token(&agent)?;
    let project = t.project.clone().or(sa_project).ok_or_else(|| {
        Error::upload(
            format!("target `{name}` (gcp) has no `project` and the credentials name none"),
            format!("add `project = \"...\"` to [targets.{name}]"),
        )
    })?;
    let storage = t
        .storage_endpoint
        .clone()
        .unwrap_or_else(|| "https://storage.googleapis.com".into());
    let storage = storage.trim_end_matches('/');
    let compute = t
        .compute_endpoint
        .clone()
        .unwrap_or_else(|| "https://compute.googleapis.com".into());
    let compute = compute.trim_end_matches('/');
    let prefix = t.prefix.clone().unwrap_or_default();
    let fname = file
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("image.tar.gz");
    let object = if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{fname}")
    } else {
        format!("{prefix}/{fname}")
    };
    let auth = (
        "authorization".to_string(),
        format!("Bearer {}", token.expose()),
    );
    let gmsg = |r: &http::Reply| {
        r.json()
            .ok()
            .and_then(|j| j["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| http::excerpt(&r.text()))
    };
    let gerr = |what: &str, r: &http::Reply| {
        let msg = gmsg(r);
        Error::upload(
            format!("Google {what}: HTTP {}: {msg}", r.status),
            match r.status {
                401 | 403 => "check the service account's roles (Storage Object Admin, Compute Storage Admin)",
                404 => "check `bucket` and `project`",
                _ => "see Google's message; run again to retry",
            },
        )
    };

    // The resumable session, kept for resume.
    let state = state_dir.join(format!(
        "gcs-{}.json",
        &hex::encode(sha2::Sha256::digest(
            format!("{storage}\n{bucket}\n{object}\n{sha256}").as_bytes()
        ))[..32]
    ));
    let mut session: Option<String> = std::fs::read_to_string(&state).ok();
    let mut offset = 0u64;
    let mut done_reply: Option<serde_json::Value> = None;
    if let Some(s) = &session {
        let r = http::call(
            &agent,
            "PUT",
            s,
            &[("content-range".into(), format!("bytes */{size}"))],
            Body::Bytes(&[]),
        )?;
        match r.status {
            308 => {
                offset = r
                    .header("range")
                    .and_then(|v| v.rsplit('-').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .map_or(0, |n| n + 1);
                say(format!(
                    "resuming the upload to gs://{bucket}/{object} at {} MiB",
                    offset >> 20
                ));
            }
            200 | 201 => {
                // The upload finished in an earlier run that stopped before forgetting its
                // session: the whole file is what the server holds.
                say(format!(
                    "gs://{bucket}/{object} was uploaded completely by an earlier run: checking it"
                ));
                offset = size;
                done_reply = Some(r.json()?);
            }
            _ => session = None,
        }
    }
    if session.is_none() {
        let meta = serde_json::json!({"name": object, "metadata": {"sha256": sha256}}).to_string();
        let r = http::call(
            &agent,
            "POST",
            &format!(
                "{storage}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&name={}",
                super::sigv4::uri_encode(&object, true)
            ),
            &[
                auth.clone(),
                (
                    "content-type".into(),
                    "application/json; charset=UTF-8".into(),
                ),
                ("x-upload-content-type".into(), "application/gzip".into()),
                ("x-upload-content-length".into(), size.to_string()),
            ],
            Body::Bytes(meta.as_bytes()),
        )?;
        if r.status == 404 {
            return Err(Error::upload(
                format!(
                    "Cloud Storage bucket `{bucket}` does not exist (or the credentials cannot see \
                     it): HTTP 404: {}",
                    gmsg(&r)
                ),
                format!(
                    "create it (gcloud storage buckets create gs://{bucket}), or fix `bucket` in \
                     [targets.{name}]"
                ),
            ));
        }
        if !r.ok() {
            return Err(gerr(
                &format!("starting the upload to gs://{bucket}/{object}"),
                &r,
            ));
        }
        let loc = r.header("location").unwrap_or("").to_string();
        if loc.is_empty() {
            return Err(Error::upload(
                "Cloud Storage gave no upload session",
                "check storage_endpoint",
            ));
        }
        std::fs::create_dir_all(state_dir).map_err(Error::io("creating", state_dir))?;
        std::fs::write(&state, &loc).map_err(Error::io("writing", &state))?;
        session = Some(loc);
    }
    let session = session.expect("a session");
    let f = std::fs::File::open(file).map_err(Error::io("opening", file))?;
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    // The bytes the server already holds count for the MD5 and the sha256 too.
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < offset {
        let n = (offset - pos).min(CHUNK) as usize;
        f.read_exact_at(&mut buf[..n], pos)
            .map_err(Error::io("reading", file))?;
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
        pos += n as u64;
    }
    let bar = crate::progress::transfer_bar(size, format!("upload gs://{bucket}/{object}"), quiet);
    bar.set_position(offset);
    while done_reply.is_none() {
        crate::interrupt::check()?;
        let n = (size - pos).min(CHUNK) as usize;
        f.read_exact_at(&mut buf[..n], pos)
            .map_err(Error::io("reading", file))?;
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
        if pos + n as u64 == size {
            // The last chunk makes the object: only from the bytes the manifest names.
            let got = hex::encode(sha.clone().finalize());
            if got != sha256 {
                bar.abandon();
                let _ = std::fs::remove_file(&state);
                let cancelled = http::call(&agent, "DELETE", &session, &[], Body::Empty);
                let outcome = format!(
                    "its last chunk was not sent{}, so no object gs://{bucket}/{object} and no \
                     image were made",
                    // Cloud Storage answers a cancelled session with 499.
                    if cancelled.is_ok_and(|r| r.ok() || r.status == 499) {
                        " and the upload session was cancelled"
                    } else {
                        ""
                    }
                );
                return Err(super::differs_from_manifest(file, &got, sha256, &outcome));
            }
        }
        let range = if n == 0 {
            format!("bytes */{size}")
        } else {
            format!("bytes {pos}-{}/{size}", pos + n as u64 - 1)
        };
        let r = http::call(
            &agent,
            "PUT",
            &session,
            &[("content-range".into(), range)],
            Body::Bytes(&buf[..n]),
        )?;
        match r.status {
            308 => {
                let got = r
                    .header("range")
                    .and_then(|v| v.rsplit('-').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .map_or(0, |n| n + 1);
                if got != pos + n as u64 {
                    return Err(Error::upload(
                        format!(
                            "Cloud Storage holds {got} bytes, expected {}",
                            pos + n as u64
                        ),
                        "run the same command again to resume",
                    ));
                }
                pos = got;
                bar.set_position(pos);
            }
            200 | 201 => {
                bar.set_position(size);
                done_reply = Some(r.json()?);
            }
            _ => {
                bar.abandon();
                return Err(gerr("uploading a chunk (the same command resumes)", &r));
            }
        }
    }
    bar.finish();
    let _ = std::fs::remove_file(&state);
    let obj = done_reply.expect("finished");
    let got = hex::encode(sha.finalize());
    if got != sha256 {
        // Only an upload finished by an earlier run gets here: the file changed since.
        let r = http::call(
            &agent,
            "DELETE",
            &format!(
                "{storage}/storage/v1/b/{bucket}/o/{}",
                super::sigv4::uri_encode(&object, true)
            ),
            std::slice::from_ref(&auth),
            Body::Empty,
        );
        let outcome = match r {
            Ok(r) if r.ok() => {
                format!("gs://{bucket}/{object} was deleted and no image was made")
            }
            _ => format!(
                "no image was made, but deleting gs://{bucket}/{object} failed: delete it with \
                 `gcloud storage rm gs://{bucket}/{object}`"
            ),
        };
        return Err(super::differs_from_manifest(file, &got, sha256, &outcome));
    }
    let want = base64::engine::general_purpose::STANDARD.encode(md5.finalize());
    let got = obj["md5Hash"].as_str().unwrap_or("");
    if got != want || obj["size"].as_str() != Some(size.to_string().as_str()) {
        return Err(Error::upload(
            format!(
                "gs://{bucket}/{object} holds {} bytes with MD5 {got}, but the file has {size} bytes with MD5 {want}",
                obj["size"].as_str().unwrap_or("?")
            ),
            "delete the object and upload again",
        ));
    }
    say(format!(
        "uploaded gs://{bucket}/{object}; MD5 {want} matches the file, and the sha256 of every \
         byte read matches the manifest"
    ));

    let insert = serde_json::json!({
        "name": image_name,
        "description": format!("ncimage image, sha256 {sha256}"),
        "rawDisk": {"source": format!("https://storage.googleapis.com/{bucket}/{object}")},
        "architecture": "X86_64",
        "guestOsFeatures": [
            {"type": "UEFI_COMPATIBLE"}, {"type": "VIRTIO_SCSI_MULTIQUEUE"}, {"type": "GVNIC"}
        ],
        "labels": {"ncimage-sha256-prefix": &sha256[..12]},
    })
    .to_string();
    let base = format!("{compute}/compute/v1/projects/{project}/global");
    let r = http::call(
        &agent,
        "POST",
        &format!("{base}/images"),
        &[
            auth.clone(),
            ("content-type".into(), "application/json".into()),
        ],
        Body::Bytes(insert.as_bytes()),
    )?;
    if !r.ok() {
        return Err(gerr("images.insert", &r));
    }
    let mut op = r.json()?;
    let wait = Duration::from_secs(t.wait_minutes.unwrap_or(60) * 60);
    let poll = Duration::from_secs(t.poll_seconds.unwrap_or(10));
    let t0 = Instant::now();
    loop {
        if op["status"] == "DONE" {
            if let Some(errs) = op["error"]["errors"].as_array() {
                let msgs: Vec<String> = errs
                    .iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["code"].as_str().unwrap_or(""),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                return Err(Error::upload(
                    format!("images.insert of {image_name} failed: {}", msgs.join("; ")),
                    "see Google's message (the tar.gz must hold disk.raw)",
                ));
            }
            return Ok(Inserted {
                image: image_name.to_string(),
                object: format!("gs://{bucket}/{object}"),
            });
        }
        if t0.elapsed() > wait {
            return Err(Error::upload(
                format!(
                    "images.insert of {image_name} is still {} after {} minutes",
                    op["status"],
                    wait.as_secs() / 60
                ),
                "look at it with `gcloud compute operations list`, or raise `wait_minutes`",
            ));
        }
        std::thread::sleep(poll);
        crate::interrupt::check()?;
        let opname = op["name"].as_str().unwrap_or("").to_string();
        let r = http::call(
            &agent,
            "GET",
            &format!("{base}/operations/{opname}"),
            std::slice::from_ref(&auth),
            Body::Empty,
        )?;
        if !r.ok() {
            return Err(gerr(&format!("operations.get {opname}"), &r));
        }
        op = r.json()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JWT signed with a key made by openssl verifies with its public key, and its claims
    /// are the ones Google's OAuth documentation lists for service accounts.
    #[test]
    fn jwt_is_rs256_with_googles_claims() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .output()
            .unwrap();
        assert!(ok.status.success());
        let pem = std::fs::read_to_string(&key).unwrap();
        let j = jwt(
            "sa@p.iam.gserviceaccount.com",
            &pem,
            "https://oauth2.example/token",
            SCOPES,
            1_700_000_000,
        )
        .unwrap();
        let parts: Vec<&str> = j.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&dec(parts[0])).unwrap();
        assert_eq!(header["alg"], "RS256");
        let claims: serde_json::Value = serde_json::from_slice(&dec(parts[1])).unwrap();
        assert_eq!(claims["iss"], "sa@p.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "https://oauth2.example/token");
        assert_eq!(claims["exp"], 1_700_003_600u64);
        // openssl verifies the signature over header.claims with the public key.
        let pubkey = d.path().join("pub.pem");
        let sig = d.path().join("sig");
        let data = d.path().join("data");
        std::fs::write(&sig, dec(parts[2])).unwrap();
        std::fs::write(&data, format!("{}.{}", parts[0], parts[1])).unwrap();
        assert!(std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey)
            .status()
            .unwrap()
            .success());
        let verify = |data: &Path| {
            std::process::Command::new("openssl")
                .args(["dgst", "-sha256", "-verify"])
                .arg(&pubkey)
                .arg("-signature")
                .arg(&sig)
                .arg(data)
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(verify(&data));
        std::fs::write(&data, format!("{}.{}x", parts[0], parts[1])).unwrap();
        assert!(!verify(&data));
        assert!(jwt(
            "a",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
            "x",
            SCOPES,
            0
        )
        .is_err());
    }
}
