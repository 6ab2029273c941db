//! azure: managed-disk direct upload of the fixed VHD: a service principal's token
//! (AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID), a disk created for upload with the
//! VHD's size, write access granted (a SAS URL), the VHD written as 4 MiB pages in parallel,
//! all-zero ranges skipped, each with Content-MD5 (Azure refuses a page whose bytes do not
//! match), access revoked, then an image (Hyper-V generation 2, i.e. UEFI) from the disk, only
//! when every byte read hashes to the manifest's sha256 (else the disk is deleted).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use md5::{Digest, Md5};
use sha2::Sha256;

use super::credentials::{env_secret, Secret};
use super::http::{self, Body, Reply};
use super::target::Target;
use crate::error::{Error, Result};

pub const DISK_API: &str = "2023-04-02";
pub const IMAGE_API: &str = "2023-07-01";
pub const PAGE: u64 = 4 << 20;

/// A fixed VHD as Azure wants it: a whole number of MiB plus the 512-byte footer ("conectix").
pub fn check_vhd(file: &Path, size: u64) -> Result<()> {
    let bad = |why: String| {
        Error::upload(
            format!("{} is not a fixed VHD Azure takes: {why}", file.display()),
            "export the image as an Azure VHD (fixed, a whole number of MiB plus the footer)",
        )
    };
    if size < 512 || !(size - 512).is_multiple_of(1 << 20) {
        return Err(bad(format!(
            "{size} bytes is not a whole number of MiB plus 512"
        )));
    }
    let f = std::fs::File::open(file).map_err(Error::io("opening", file))?;
    let mut footer = [0u8; 8];
    f.read_exact_at(&mut footer, size - 512)
        .map_err(Error::io("reading", file))?;
    if &footer != b"conectix" {
        return Err(bad("no VHD footer (conectix) in its last 512 bytes".into()));
    }
    Ok(())
}

struct Azure {
    agent: ureq::Agent,
    mgmt: String,
    token: Secret,
}

impl Azure {
    fn call(&self, method: &str, url: &str, body: Option<&serde_json::Value>) -> Result<Reply> {
        let mut h = vec![(
            "authorization".to_string(),
            format!("Bearer {}", self.token.expose()),
        )];
        let text = body.map(|b| b.to_string());
        let b = match &text {
            Some(t) => {
                h.push(("content-type".into(), "application/json".into()));
                Body::Bytes(t.as_bytes())
            }
            None if method == "POST" => Body::Bytes(&[]),
            None => Body::Empty,
        };
        http::call(&self.agent, method, url, &h, b)
    }

    fn err(&self, what: &str, r: &Reply) -> Error {
        let j = r.json().ok();
        let code = j
            .as_ref()
            .and_then(|j| j["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        let msg = j
            .as_ref()
            .and_then(|j| j["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| http::excerpt(&r.text()));
        Error::upload(
            format!("Azure {what}: HTTP {} {code}: {msg}", r.status),
            match r.status {
                401 | 403 => {
                    "check the service principal and its role (Contributor on the resource group)"
                }
                404 => "check `subscription`, `resource_group` and `location`",
                _ => "see Azure's message",
            },
        )
    }

    /// Waits for an asynchronous operation (Location / Azure-AsyncOperation) to finish; returns
    /// its final body.
    fn wait_async(&self, what: &str, r: &Reply, t: &Target) -> Result<serde_json::Value> {
        let Some(url) = r
            .header("azure-asyncoperation")
            .or_else(|| r.header("location"))
            .map(str::to_string)
        else {
            return Ok(r.json().unwrap_or(serde_json::Value::Null));
        };
        let poll = Duration::from_secs(t.poll_seconds.unwrap_or(5));
        let t0 = Instant::now();
        loop {
            crate::interrupt::check()?;
            let r = self.call("GET", &url, None)?;
            if r.status == 202 {
            } else if r.ok() {
                let j = r.json().unwrap_or(serde_json::Value::Null);
                match j["status"].as_str() {
                    Some("Succeeded") | None => return Ok(j),
                    Some("Failed") | Some("Canceled") => {
                        return Err(Error::upload(
                            format!(
                                "Azure {what} failed: {}",
                                j["error"]["message"].as_str().unwrap_or("")
                            ),
                            "see Azure's message",
                        ))
                    }
                    _ => {}
                }
            } else {
                return Err(self.err(what, &r));
            }
            if t0.elapsed() > Duration::from_secs(t.wait_minutes.unwrap_or(30) * 60) {
                return Err(Error::upload(
                    format!("Azure {what} did not finish"),
                    "raise `wait_minutes`",
                ));
            }
            std::thread::sleep(poll);
        }
    }

    /// GETs a resource until its provisioningState is Succeeded.
    fn wait_provisioned(&self, what: &str, url: &str, t: &Target) -> Result<serde_json::Value> {
        let poll = Duration::from_secs(t.poll_seconds.unwrap_or(5));
        let t0 = Instant::now();
        loop {
            crate::interrupt::check()?;
            let r = self.call("GET", url, None)?;
            if !r.ok() {
                return Err(self.err(what, &r));
            }
            let j = r.json()?;
            match j["properties"]["provisioningState"].as_str().unwrap_or("") {
                "Succeeded" => return Ok(j),
                "Failed" | "Canceled" => {
                    return Err(Error::upload(
                        format!("Azure {what}: provisioning failed"),
                        "see the resource in the portal",
                    ))
                }
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(t.wait_minutes.unwrap_or(30) * 60) {
                return Err(Error::upload(
                    format!("Azure {what} is not provisioned yet"),
                    "raise `wait_minutes`",
                ));
            }
            std::thread::sleep(poll);
        }
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn token(agent: &ureq::Agent, login: &str, mgmt: &str) -> Result<Secret> {
    let missing = |v: &str| {
        Error::upload(
            format!("no Azure credentials: {v} is not set"),
            "create a service principal (az ad sp create-for-rbac) and export AZURE_CLIENT_ID, \
             AZURE_CLIENT_SECRET, AZURE_TENANT_ID and AZURE_SUBSCRIPTION_ID",
        )
    };
    let tenant = env("AZURE_TENANT_ID").ok_or_else(|| missing("AZURE_TENANT_ID"))?;
    let id = env("AZURE_CLIENT_ID").ok_or_else(|| missing("AZURE_CLIENT_ID"))?;
    let secret =
        env_secret(&["AZURE_CLIENT_SECRET"]).ok_or_else(|| missing("AZURE_CLIENT_SECRET"))?;
    let form = vec![
        ("client_id".to_string(), id),
        ("client_secret".to_string(), secret.expose().to_string()),
        ("grant_type".to_string(), "client_credentials".to_string()),
        (
            "scope".to_string(),
            format!("{}/.default", mgmt.trim_end_matches('/')),
        ),
    ];
    let body = super::sigv4::canonical_query(&form);
    let url = format!("{login}/{tenant}/oauth2/v2.0/token");
    let r = http::call(
        agent,
        "POST",
        &url,
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
            .and_then(|j| j["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        return Err(Error::upload(
            format!(
                "Microsoft Entra ID refused the service principal at {url}: HTTP {} {why}",
                r.status
            ),
            "check AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID",
        ));
    }
    let t = r.json()?["access_token"].as_str().unwrap_or("").to_string();
    if t.is_empty() {
        return Err(Error::upload(
            format!("{url} gave no access_token"),
            "check login_endpoint",
        ));
    }
    Ok(Secret::new(t))
}

pub struct Created {
    pub disk_id: String,
    pub image_id: String,
    pub pages: u64,
    pub skipped: u64,
}

#[allow(clippy::too_many_arguments)]
pub fn upload_and_create(
    name: &str,
    t: &Target,
    file: &Path,
    size: u64,
    sha256: &str,
    image_name: &str,
    quiet: bool,
    say: &dyn Fn(String),
) -> Result<Created> {
    check_vhd(file, size)?;
    let rg = t.need(name, "resource_group", &t.resource_group)?;
    let location = t.need(name, "location", &t.location)?;
    let sub = t
        .subscription
        .clone()
        .or_else(|| env("AZURE_SUBSCRIPTION_ID"))
        .ok_or_else(|| {
            Error::upload(
                format!("target `{name}` (azure) has no `subscription` and AZURE_SUBSCRIPTION_ID is not set"),
                "export AZURE_SUBSCRIPTION_ID or add `subscription` to the target",
            )
        })?;
    let login = t
        .login_endpoint
        .clone()
        .unwrap_or_else(|| "https://login.microsoftonline.com".into());
    let mgmt = t
        .management_endpoint
        .clone()
        .unwrap_or_else(|| "https://management.azure.com".into());
    let mgmt = mgmt.trim_end_matches('/').to_string();
    let agent = http::agent();
    let token = token(
        &agent,
        login.trim_end_matches('/'),
        "https://management.azure.com",
    )?;
    let az = Azure {
        agent,
        mgmt: mgmt.clone(),
        token,
    };
    let group = format!(
        "{}/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute",
        az.mgmt
    );
    let disk_name = format!("{image_name}-osdisk");
    let disk_url = format!("{group}/disks/{disk_name}?api-version={DISK_API}");
    let r = az.call(
        "PUT",
        &disk_url,
        Some(&serde_json::json!({
            "location": location,
            "sku": {"name": "Standard_LRS"},
            "properties": {
                "osType": "Linux",
                "hyperVGeneration": "V2",
                "creationData": {"createOption": "Upload", "uploadSizeBytes": size}
            }
        })),
    )?;
    if !r.ok() {
        return Err(az.err(&format!("creating disk {disk_name}"), &r));
    }
    let disk = az.wait_provisioned(&format!("disk {disk_name}"), &disk_url, t)?;
    let disk_id = disk["id"].as_str().unwrap_or("").to_string();
    let r = az.call(
        "POST",
        &format!("{group}/disks/{disk_name}/beginGetAccess?api-version={DISK_API}"),
        Some(&serde_json::json!({"access": "Write", "durationInSeconds": 86400})),
    )?;
    if !r.ok() {
        return Err(az.err("granting write access to the disk", &r));
    }
    let grant = az.wait_async("granting write access", &r, t)?;
    let sas = grant["accessSAS"]
        .as_str()
        .or(grant["properties"]["output"]["accessSAS"].as_str())
        .unwrap_or("")
        .to_string();
    if sas.is_empty() {
        return Err(Error::upload(
            "Azure granted access without a SAS URL",
            "check management_endpoint",
        ));
    }
    say(format!(
        "Azure disk {disk_name} created for upload; writing pages"
    ));
    let written = write_pages(
        &az.agent,
        &sas,
        file,
        size,
        t.threads.unwrap_or(4).clamp(1, 32),
        quiet,
    );
    // Revoke access whatever happened: a disk in upload state cannot be used or deleted.
    let r = az.call(
        "POST",
        &format!("{group}/disks/{disk_name}/endGetAccess?api-version={DISK_API}"),
        None,
    )?;
    let revoked = if r.ok() {
        az.wait_async("revoking access", &r, t).map(|_| ())
    } else {
        Err(az.err("revoking access", &r))
    };
    let (pages, skipped, got) = written?;
    revoked?;
    if got != sha256 {
        // No image from these bytes: the disk goes too.
        let outcome = match az.call("DELETE", &disk_url, None) {
            Ok(r) if r.ok() => format!("no image was created and disk {disk_name} was deleted"),
            Ok(r) => format!(
                "no image was created, but deleting disk {disk_name} failed (HTTP {}): delete \
                 it with `az disk delete -g {rg} -n {disk_name}`",
                r.status
            ),
            Err(_) => format!(
                "no image was created, but Azure could not be reached to delete disk \
                 {disk_name}: delete it with `az disk delete -g {rg} -n {disk_name}`"
            ),
        };
        return Err(super::differs_from_manifest(file, &got, sha256, &outcome));
    }
    let image_url = format!("{group}/images/{image_name}?api-version={IMAGE_API}");
    let r = az.call(
        "PUT",
        &image_url,
        Some(&serde_json::json!({
            "location": location,
            "properties": {
                "hyperVGeneration": "V2",
                "storageProfile": {"osDisk": {
                    "osType": "Linux", "osState": "Generalized",
                    "managedDisk": {"id": disk_id}}}
            }
        })),
    )?;
    if !r.ok() {
        return Err(az.err(&format!("creating image {image_name}"), &r));
    }
    let image = az.wait_provisioned(&format!("image {image_name}"), &image_url, t)?;
    Ok(Created {
        disk_id,
        image_id: image["id"].as_str().unwrap_or("").to_string(),
        pages,
        skipped,
    })
}

/// Writes every non-zero 4 MiB range of the file as a page (Put Page with Content-MD5);
/// returns (pages written, zero pages skipped, sha256 of every byte read).
fn write_pages(
    agent: &ureq::Agent,
    sas: &str,
    file: &Path,
    size: u64,
    threads: usize,
    quiet: bool,
) -> Result<(u64, u64, String)> {
    let f = std::fs::File::open(file).map_err(Error::io("opening", file))?;
    let mut sha = Sha256::new();
    let bar = crate::progress::transfer_bar(size, "azure pages", quiet);
    let sep = if sas.contains('?') { '&' } else { '?' };
    let url = format!("{sas}{sep}comp=page");
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
    let rx = Mutex::new(rx);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let (written, skipped) = (AtomicU64::new(0), AtomicU64::new(0));
    let read: Result<()> = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Ok((off, data)) = rx.lock().expect("queue").recv() else {
                    break;
                };
                if stop.load(Ordering::SeqCst) {
                    continue;
                }
                let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&data));
                let headers = vec![
                    ("x-ms-page-write".to_string(), "update".to_string()),
                    (
                        "x-ms-range".to_string(),
                        format!("bytes={off}-{}", off + data.len() as u64 - 1),
                    ),
                    ("x-ms-version".to_string(), "2021-08-06".to_string()),
                    ("x-ms-blob-type".to_string(), "PageBlob".to_string()),
                    ("content-md5".to_string(), md5.clone()),
                ];
                let mut last = None;
                for _attempt in 0..3 {
                    match http::call(agent, "PUT", &url, &headers, Body::Bytes(&data)) {
                        Ok(r) if r.ok() => {
                            last = None;
                            break;
                        }
                        Ok(r) => {
                            last = Some(Error::upload(
                                format!(
                                    "Azure page write at {off}: HTTP {}: {}",
                                    r.status,
                                    http::excerpt(&r.text())
                                ),
                                "run the command again (a new disk is created)",
                            ));
                            if r.status < 500 && r.status != 400 {
                                break;
                            }
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match last {
                    None => {
                        written.fetch_add(1, Ordering::SeqCst);
                        bar.inc(data.len() as u64);
                    }
                    Some(e) => {
                        stop.store(true, Ordering::SeqCst);
                        failure.lock().expect("failure").get_or_insert(e);
                    }
                }
            });
        }
        let r = (|| {
            let mut off = 0u64;
            while off < size {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                crate::interrupt::check()?;
                let n = PAGE.min(size - off) as usize;
                let mut data = vec![0u8; n];
                f.read_exact_at(&mut data, off)
                    .map_err(Error::io("reading", file))?;
                sha.update(&data);
                if data.iter().all(|b| *b == 0) {
                    skipped.fetch_add(1, Ordering::SeqCst);
                    bar.inc(n as u64);
                } else if tx.send((off, data)).is_err() {
                    break;
                }
                off += n as u64;
            }
            Ok(())
        })();
        drop(tx);
        r
    });
    bar.finish();
    read?;
    if let Some(e) = failure.into_inner().expect("failure") {
        return Err(e);
    }
    Ok((
        written.into_inner(),
        skipped.into_inner(),
        hex::encode(sha.finalize()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fixed_vhds_of_whole_mib_pass() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.vhd");
        let mut v = vec![0u8; (2 << 20) + 512];
        v[2 << 20..(2 << 20) + 8].copy_from_slice(b"conectix");
        std::fs::write(&p, &v).unwrap();
        check_vhd(&p, v.len() as u64).unwrap();
        let e = check_vhd(&p, (2 << 20) + 1024).unwrap_err().to_string();
        assert!(e.contains("whole number of MiB"), "{e}");
        v[2 << 20] = b'x';
        std::fs::write(&p, &v).unwrap();
        let e = check_vhd(&p, v.len() as u64).unwrap_err().to_string();
        assert!(e.contains("conectix"), "{e}");
    }
}
