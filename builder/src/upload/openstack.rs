//! openstack: a Keystone v3 token (password or application credential, from the standard OS_*
//! variables), the image endpoint from its catalog (or `image_endpoint`), then Glance v2:
//! create the image (UEFI, q35), upload its data in one streamed PUT (its last bytes held back,
//! and the image deleted, unless every byte read hashes to the manifest's sha256), and compare
//! Glance's hash of what it stored (os_hash_value, when sha512) with the file's.

use std::io::Read;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256, Sha512};

use super::credentials::Secret;
use super::http::{self, Body};
use super::target::Target;
use crate::error::{Error, Result};

/// The variables read, for messages.
pub const VARS: &str = "OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME (or \
     OS_PROJECT_ID), OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME, OS_REGION_NAME; or \
     OS_APPLICATION_CREDENTIAL_ID and OS_APPLICATION_CREDENTIAL_SECRET";

#[derive(Debug)]
pub enum Auth {
    Password {
        user: String,
        user_domain: String,
        password: Secret,
        project: Project,
        project_domain: String,
    },
    ApplicationCredential {
        id: String,
        secret: Secret,
    },
}

#[derive(Debug)]
pub enum Project {
    Name(String),
    Id(String),
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

pub fn auth_from_env() -> Result<Auth> {
    let missing = |what: &str| {
        Error::upload(
            format!("no OpenStack credentials: {what}"),
            format!("source your cloud's openrc file; ncimage reads {VARS}"),
        )
    };
    if let (Some(id), Some(secret)) = (
        env("OS_APPLICATION_CREDENTIAL_ID"),
        env("OS_APPLICATION_CREDENTIAL_SECRET"),
    ) {
        return Ok(Auth::ApplicationCredential {
            id,
            secret: Secret::new(secret),
        });
    }
    let user = env("OS_USERNAME").ok_or_else(|| missing("OS_USERNAME is not set"))?;
    let password = env("OS_PASSWORD").ok_or_else(|| missing("OS_PASSWORD is not set"))?;
    let project = match (env("OS_PROJECT_ID"), env("OS_PROJECT_NAME")) {
        (Some(id), _) => Project::Id(id),
        (None, Some(n)) => Project::Name(n),
        _ => return Err(missing("neither OS_PROJECT_NAME nor OS_PROJECT_ID is set")),
    };
    Ok(Auth::Password {
        user,
        user_domain: env("OS_USER_DOMAIN_NAME").unwrap_or_else(|| "Default".into()),
        password: Secret::new(password),
        project,
        project_domain: env("OS_PROJECT_DOMAIN_NAME").unwrap_or_else(|| "Default".into()),
    })
}

/// The JSON body of POST /v3/auth/tokens.
pub fn token_request(auth: &Auth) -> serde_json::Value {
    match auth {
        Auth::ApplicationCredential { id, secret } => serde_json::json!({"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": {"id": id, "secret": secret.expose()}}}}),
        Auth::Password {
            user,
            user_domain,
            password,
            project,
            project_domain,
        } => {
            let project = match project {
                Project::Id(id) => serde_json::json!({"id": id}),
                Project::Name(n) => {
                    serde_json::json!({"name": n, "domain": {"name": project_domain}})
                }
            };
            serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": user_domain}, "password": password.expose()}}},
                "scope": {"project": project}}})
        }
    }
}

/// The image endpoint of a token's catalog (interface, region when given).
pub fn image_endpoint(
    catalog: &serde_json::Value,
    interface: &str,
    region: Option<&str>,
) -> Option<String> {
    catalog["token"]["catalog"]
        .as_array()?
        .iter()
        .filter(|s| s["type"] == "image")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| {
            e["interface"] == interface
                && region.is_none_or(|r| e["region_id"] == r || e["region"] == r)
        })
        .and_then(|e| {
            e["url"]
                .as_str()
                .map(|u| u.trim_end_matches('/').to_string())
        })
}

pub struct Uploaded {
    pub id: String,
    /// sha512 of the bytes sent.
    pub sha512: String,
    /// Glance's os_hash_algo ("" when it reports none): the stored data was compared only when
    /// it is sha512.
    pub stored_algo: String,
}

#[allow(clippy::too_many_arguments)]
pub fn upload(
    name: &str,
    t: &Target,
    file: &std::path::Path,
    size: u64,
    format: &str,
    image_name: &str,
    role: &str,
    sha256: &str,
    quiet: bool,
    say: &dyn Fn(String),
) -> Result<Uploaded> {
    let auth_url = t
        .auth_url
        .clone()
        .or_else(|| env("OS_AUTH_URL"))
        .ok_or_else(|| {
            Error::upload(
                format!("target `{name}` (openstack) has no `auth_url` and OS_AUTH_URL is not set"),
                format!("source your cloud's openrc file; ncimage reads {VARS}"),
            )
        })?;
    let auth = auth_from_env()?;
    let agent = http::agent();
    let base = auth_url.trim_end_matches('/');
    let base = base.strip_suffix("/v3").unwrap_or(base);
    let tokens = format!("{base}/v3/auth/tokens");
    let body = token_request(&auth).to_string();
    let r = http::call(
        &agent,
        "POST",
        &tokens,
        &[("content-type".into(), "application/json".into())],
        Body::Bytes(body.as_bytes()),
    )?;
    if !r.ok() {
        return Err(Error::upload(
            format!(
                "Keystone refused the credentials at {tokens}: HTTP {}",
                r.status
            ),
            format!("check {VARS}"),
        ));
    }
    let token = Secret::new(r.header("x-subject-token").unwrap_or("").to_string());
    if token.expose().is_empty() {
        return Err(Error::upload(
            format!("Keystone at {tokens} gave no X-Subject-Token"),
            "check that auth_url is Keystone v3",
        ));
    }
    let catalog = r.json()?;
    let interface = env("OS_INTERFACE").unwrap_or_else(|| "public".into());
    let region = t.region.clone().or_else(|| env("OS_REGION_NAME"));
    let glance = match &t.image_endpoint {
        Some(e) => e.trim_end_matches('/').to_string(),
        None => image_endpoint(&catalog, &interface, region.as_deref()).ok_or_else(|| {
            Error::upload(
                format!(
                    "the token's catalog has no {interface} image endpoint{}",
                    region
                        .as_deref()
                        .map(|r| format!(" in region {r}"))
                        .unwrap_or_default()
                ),
                "set OS_REGION_NAME (or `region`), or `image_endpoint` in the target",
            )
        })?,
    };
    let auth_h = ("x-auth-token".to_string(), token.expose().to_string());
    let disk_format = match format {
        "qcow2" | "raw" | "vmdk" | "vhd" => format,
        other => {
            return Err(Error::upload(
                format!("Glance takes no {other} images here"),
                "use --format qcow2 or raw",
            ))
        }
    };
    let create = serde_json::json!({
        "name": image_name,
        "disk_format": disk_format,
        "container_format": "bare",
        "visibility": t.visibility.clone().unwrap_or_else(|| "private".into()),
        "hw_firmware_type": "uefi",
        "hw_machine_type": "q35",
        "os_type": "linux",
        "os_distro": "debian",
        "os_version": "13",
        "ncimage_role": role,
        "ncimage_sha256": sha256,
    })
    .to_string();
    let glance_err = |what: &str, r: &http::Reply| {
        Error::upload(
            format!(
                "Glance {what} at {glance}: HTTP {}: {}",
                r.status,
                http::excerpt(&r.text())
            ),
            match r.status {
                401 | 403 => "check the OpenStack credentials and the project's image quota",
                413 => "the image is larger than the cloud's image size limit",
                _ => "see Glance's message",
            },
        )
    };
    let r = http::call(
        &agent,
        "POST",
        &format!("{glance}/v2/images"),
        &[
            auth_h.clone(),
            ("content-type".into(), "application/json".into()),
        ],
        Body::Bytes(create.as_bytes()),
    )?;
    if !r.ok() {
        return Err(glance_err("POST /v2/images", &r));
    }
    let id = r.json()?["id"].as_str().unwrap_or("").to_string();
    if id.is_empty() {
        return Err(Error::upload(
            format!("Glance at {glance} created an image without an id"),
            "check image_endpoint",
        ));
    }
    say(format!(
        "Glance image {id} created; uploading {}",
        file.display()
    ));
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("glance {id}"));
    let f = std::fs::File::open(file).map_err(Error::io("opening", file))?;
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha512::new()));
    let read_sha256 = std::sync::Arc::new(std::sync::Mutex::new(None));
    let reader = HashingReader {
        inner: f,
        hash: hasher.clone(),
        sha256: Sha256::new(),
        read: 0,
        size,
        want: sha256.to_string(),
        read_sha256: read_sha256.clone(),
        bar: bar.clone(),
    };
    let r = http::call(
        &agent,
        "PUT",
        &format!("{glance}/v2/images/{id}/file"),
        &[
            auth_h.clone(),
            ("content-type".into(), "application/octet-stream".into()),
        ],
        Body::Reader(Box::new(reader), size),
    );
    let got = read_sha256.lock().expect("sha256").clone();
    if let Some(got) = got.filter(|g| g != sha256) {
        bar.abandon();
        // The last bytes were held back; the image is deleted all the same, so that no image
        // with these bytes can become active.
        let d = http::call(
            &agent,
            "DELETE",
            &format!("{glance}/v2/images/{id}"),
            std::slice::from_ref(&auth_h),
            Body::Empty,
        );
        let outcome = match d {
            Ok(d) if d.ok() => {
                format!("its last bytes were not sent and Glance image {id} was deleted")
            }
            Ok(d) => format!(
                "its last bytes were not sent, but deleting Glance image {id} failed (HTTP {}): \
                 delete it with `openstack image delete {id}`",
                d.status
            ),
            Err(_) => format!(
                "its last bytes were not sent, but Glance could not be reached to delete image \
                 {id}: delete it with `openstack image delete {id}`"
            ),
        };
        return Err(super::differs_from_manifest(file, &got, sha256, &outcome));
    }
    let r = r?;
    if !r.ok() {
        bar.abandon();
        return Err(glance_err(&format!("PUT /v2/images/{id}/file"), &r));
    }
    bar.finish();
    let sha512 = hex::encode(hasher.lock().expect("hash").clone().finalize());
    let wait = Duration::from_secs(t.wait_minutes.unwrap_or(30) * 60);
    let poll = Duration::from_secs(t.poll_seconds.unwrap_or(5));
    let t0 = Instant::now();
    loop {
        let r = http::call(
            &agent,
            "GET",
            &format!("{glance}/v2/images/{id}"),
            std::slice::from_ref(&auth_h),
            Body::Empty,
        )?;
        if !r.ok() {
            return Err(glance_err(&format!("GET /v2/images/{id}"), &r));
        }
        let j = r.json()?;
        let status = j["status"].as_str().unwrap_or("");
        match status {
            "active" => {
                let algo = j["os_hash_algo"].as_str().unwrap_or("");
                let value = j["os_hash_value"].as_str().unwrap_or("");
                if algo == "sha512" && value != sha512 {
                    return Err(Error::upload(
                        format!(
                            "Glance image {id} holds data whose sha512 is {value}, not {sha512} as sent"
                        ),
                        "delete the image (openstack image delete) and upload again",
                    ));
                }
                return Ok(Uploaded {
                    id,
                    sha512,
                    stored_algo: algo.to_string(),
                });
            }
            "killed" | "deleted" | "pending_delete" => {
                return Err(Error::upload(
                    format!("Glance image {id} ended {status}"),
                    "see the cloud's image service logs; upload again",
                ))
            }
            _ => {}
        }
        if t0.elapsed() > wait {
            return Err(Error::upload(
                format!(
                    "Glance image {id} is still {status} after {} minutes",
                    wait.as_secs() / 60
                ),
                "look at it with `openstack image show`, or raise `wait_minutes`",
            ));
        }
        std::thread::sleep(poll);
    }
}

/// The file as the PUT's body: hashed as read (sha512 for Glance's hash, sha256 for the
/// manifest's); the read that would hand over the last byte fails instead when the sha256
/// differs from the manifest's, so Glance never receives the whole image.
struct HashingReader {
    inner: std::fs::File,
    hash: std::sync::Arc<std::sync::Mutex<Sha512>>,
    sha256: Sha256,
    read: u64,
    size: u64,
    want: String,
    /// sha256 (hex) of all `size` bytes, once read.
    read_sha256: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    bar: ProgressBar,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if crate::interrupt::interrupted() {
            return Err(std::io::Error::other("interrupted"));
        }
        let n = self.inner.read(buf)?;
        self.hash.lock().expect("hash").update(&buf[..n]);
        self.sha256.update(&buf[..n]);
        let before = self.read;
        self.read += n as u64;
        if before < self.size && self.read >= self.size {
            let got = hex::encode(self.sha256.clone().finalize());
            let differs = got != self.want;
            *self.read_sha256.lock().expect("sha256") = Some(got);
            if differs {
                return Err(std::io::Error::other("the file differs from its manifest"));
            }
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_auth_is_keystones_documented_shape_and_debug_hides_it() {
        let a = Auth::Password {
            user: "u".into(),
            user_domain: "Default".into(),
            password: Secret::new("pw-123"),
            project: Project::Name("p".into()),
            project_domain: "Default".into(),
        };
        let j = token_request(&a);
        assert_eq!(j["auth"]["identity"]["methods"][0], "password");
        assert_eq!(
            j["auth"]["identity"]["password"]["user"]["password"],
            "pw-123"
        );
        assert_eq!(j["auth"]["scope"]["project"]["domain"]["name"], "Default");
        assert!(!format!("{a:?}").contains("pw-123"));
    }

    #[test]
    fn finds_the_image_endpoint_by_interface_and_region() {
        let c = serde_json::json!({"token": {"catalog": [
            {"type": "compute", "endpoints": [{"interface": "public", "region_id": "r1", "url": "http://nova"}]},
            {"type": "image", "endpoints": [
                {"interface": "internal", "region_id": "r1", "url": "http://glance-int"},
                {"interface": "public", "region_id": "r2", "url": "http://glance-r2/"},
                {"interface": "public", "region_id": "r1", "url": "http://glance-r1"}]}]}});
        assert_eq!(
            image_endpoint(&c, "public", Some("r1")).as_deref(),
            Some("http://glance-r1")
        );
        assert_eq!(
            image_endpoint(&c, "public", Some("r2")).as_deref(),
            Some("http://glance-r2")
        );
        assert_eq!(
            image_endpoint(&c, "internal", None).as_deref(),
            Some("http://glance-int")
        );
        assert_eq!(image_endpoint(&c, "admin", None), None);
    }
}
