//! digitalocean: the artifact into Spaces (S3-compatible, multipart as any S3 target), then a
//! custom image from a presigned URL of the object (POST /v2/images), waiting until it is
//! available. The API token comes from DIGITALOCEAN_TOKEN or DIGITALOCEAN_ACCESS_TOKEN.

use std::time::{Duration, Instant};

use super::credentials::{env_secret, Secret};
use super::http::{self, Body};
use super::target::Target;
use crate::error::{Error, Result};

pub const TOKEN_VARS: &[&str] = &["DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN"];

pub fn token() -> Result<Secret> {
    env_secret(TOKEN_VARS).ok_or_else(|| {
        Error::upload(
            "no DigitalOcean API token: DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN) is not set",
            "create a token with write scope in the control panel (API, Tokens) and export it \
             as DIGITALOCEAN_TOKEN",
        )
    })
}

/// Spaces' endpoint for a region.
pub fn spaces_endpoint(region: &str) -> String {
    format!("https://{region}.digitaloceanspaces.com")
}

pub struct Created {
    pub id: u64,
    pub status: String,
}

/// Creates the custom image from `url` and waits until DigitalOcean has it.
#[allow(clippy::too_many_arguments)]
pub fn create_image(
    name: &str,
    t: &Target,
    token: &Secret,
    url: &str,
    image_name: &str,
    role: &str,
    sha256: &str,
    say: &dyn Fn(String),
) -> Result<Created> {
    let region = t.need(name, "region", &t.region)?;
    let api = t
        .api_endpoint
        .clone()
        .unwrap_or_else(|| "https://api.digitalocean.com".into());
    let api = api.trim_end_matches('/');
    let agent = http::agent();
    let headers = vec![
        (
            "authorization".to_string(),
            format!("Bearer {}", token.expose()),
        ),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let body = serde_json::json!({
        "name": image_name,
        "url": url,
        "distribution": "Debian",
        "region": region,
        "description": format!("ncimage {role} image, sha256 {sha256}"),
        "tags": ["ncimage", format!("ncimage-{role}")],
    })
    .to_string();
    let r = http::call(
        &agent,
        "POST",
        &format!("{api}/v2/images"),
        &headers,
        Body::Bytes(body.as_bytes()),
    )?;
    let fail = |what: &str, r: &http::Reply| {
        let msg = r
            .json()
            .ok()
            .and_then(|j| j["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| http::excerpt(&r.text()));
        Error::upload(
            format!("DigitalOcean {what} at {api}: HTTP {}: {msg}", r.status),
            match r.status {
                401 | 403 => "check DIGITALOCEAN_TOKEN (a token with write scope)",
                422 => "see DigitalOcean's message (name, region or URL refused)",
                _ => "see DigitalOcean's message; run again to retry",
            },
        )
    };
    if !r.ok() {
        return Err(fail("POST /v2/images", &r));
    }
    let j = r.json()?;
    let id = j["image"]["id"].as_u64().ok_or_else(|| {
        Error::upload(
            format!(
                "DigitalOcean POST /v2/images: no image id in {}",
                http::excerpt(&r.text())
            ),
            "check that api_endpoint is DigitalOcean's API",
        )
    })?;
    say(format!(
        "DigitalOcean custom image {id}: importing from the Space"
    ));
    let wait = Duration::from_secs(t.wait_minutes.unwrap_or(60) * 60);
    let poll = Duration::from_secs(t.poll_seconds.unwrap_or(15));
    let t0 = Instant::now();
    loop {
        crate::interrupt::check()?;
        let r = http::call(
            &agent,
            "GET",
            &format!("{api}/v2/images/{id}"),
            &headers[..1],
            Body::Empty,
        )?;
        if !r.ok() {
            return Err(fail(&format!("GET /v2/images/{id}"), &r));
        }
        let j = r.json()?;
        let status = j["image"]["status"].as_str().unwrap_or("").to_string();
        match status.as_str() {
            "available" => return Ok(Created { id, status }),
            "deleted" => {
                return Err(Error::upload(
                    format!(
                        "DigitalOcean could not import image {id}: {}",
                        j["image"]["error_message"].as_str().unwrap_or("no message")
                    ),
                    "check the image format and that the URL was reachable",
                ))
            }
            _ => {}
        }
        if t0.elapsed() > wait {
            return Err(Error::upload(
                format!(
                    "DigitalOcean image {id} is still {status} after {} minutes",
                    wait.as_secs() / 60
                ),
                "it goes on importing: look at it in the control panel, or raise `wait_minutes`",
            ));
        }
        std::thread::sleep(poll);
    }
}
