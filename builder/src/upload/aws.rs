//! aws: the artifact into S3 (multipart, as any S3 target), then EC2's VM Import
//! (ImportSnapshot from the object, waiting for the snapshot) and RegisterImage with UEFI boot
//! mode, ENA and IMDSv2. EC2 Query API (form-encoded POST, SigV4 service `ec2`).

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::credentials::AwsCredentials;
use super::http::{self, Body};
use super::sigv4;
use super::target::Target;
use crate::error::{Error, Result};

pub const API_VERSION: &str = "2016-11-15";

pub struct Ec2 {
    agent: ureq::Agent,
    url: String,
    host: String,
    region: String,
    creds: AwsCredentials,
}

impl Ec2 {
    pub fn new(endpoint: Option<&str>, region: &str, creds: AwsCredentials) -> Result<Ec2> {
        let url = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com"));
        let u = url::Url::parse(&url).map_err(|e| {
            Error::upload(
                format!("ec2_endpoint `{url}` is not a URL: {e}"),
                "write it as https://host[:port]",
            )
        })?;
        let host = match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(Error::upload(
                    format!("ec2_endpoint `{url}` has no host"),
                    "write it as https://host[:port]",
                ))
            }
        };
        Ok(Ec2 {
            agent: http::agent(),
            url: format!("{}://{host}/", u.scheme()),
            host,
            region: region.to_string(),
            creds,
        })
    }

    /// One EC2 action; returns the XML reply or the error EC2 gave, in words.
    pub fn call(&self, action: &str, params: &[(&str, String)]) -> Result<Vec<u8>> {
        let mut form: Vec<(String, String)> = vec![
            ("Action".into(), action.into()),
            ("Version".into(), API_VERSION.into()),
        ];
        form.extend(params.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let body = sigv4::canonical_query(&form);
        let ctype = "application/x-www-form-urlencoded; charset=utf-8";
        let mut headers = vec![("content-type".to_string(), ctype.to_string())];
        let date = sigv4::amz_date(std::time::SystemTime::now());
        let payload = hex::encode(Sha256::digest(body.as_bytes()));
        headers.extend(sigv4::sign(
            &self.creds,
            &sigv4::Request {
                method: "POST",
                host: &self.host,
                path: "/",
                query: &[],
                headers: &headers,
                payload_sha256: &payload,
                region: &self.region,
                service: "ec2",
                amz_date: &date,
            },
        ));
        let r = http::call(
            &self.agent,
            "POST",
            &self.url,
            &headers,
            Body::Bytes(body.as_bytes()),
        )?;
        if r.ok() {
            return Ok(r.body);
        }
        let code = http::xml_text(&r.body, "Code").unwrap_or_default();
        let message =
            http::xml_text(&r.body, "Message").unwrap_or_else(|| http::excerpt(&r.text()));
        let help = match code.as_str() {
            "AuthFailure" | "UnauthorizedOperation" | "InvalidClientTokenId" => {
                format!(
                    "check the credentials from {} and their EC2 permissions",
                    self.creds.source
                )
            }
            "InvalidParameter" if message.contains("vmimport") || message.contains("role") => {
                "create the VM Import service role (`import_role`, default vmimport) as AWS's \
                 VM Import guide describes"
                    .to_string()
            }
            _ => "see EC2's message".to_string(),
        };
        Err(Error::upload(
            format!(
                "EC2 {action} at {}: HTTP {} {code}: {message}",
                self.url, r.status
            ),
            help,
        ))
    }
}

/// What the EC2 part produced.
pub struct Registered {
    pub import_task: String,
    pub snapshot: String,
    pub image: String,
}

#[allow(clippy::too_many_arguments)]
pub fn import_and_register(
    name: &str,
    t: &Target,
    creds: AwsCredentials,
    bucket: &str,
    key: &str,
    format: &str,
    image_name: &str,
    sha256: &str,
    say: &dyn Fn(String),
) -> Result<Registered> {
    let region = t.need(name, "region", &t.region)?;
    let ec2 = Ec2::new(t.ec2_endpoint.as_deref(), region, creds)?;
    let disk_format = match format {
        "raw" => "RAW",
        "vmdk" => "VMDK",
        "vhd" => "VHD",
        other => {
            return Err(Error::upload(
                format!("EC2 cannot import {other} images"),
                "use --format raw, vmdk or vhd",
            ))
        }
    };
    let description = format!("{image_name} (sha256 {sha256})");
    let reply = ec2.call(
        "ImportSnapshot",
        &[
            ("Description", description.clone()),
            ("DiskContainer.Description", description.clone()),
            ("DiskContainer.Format", disk_format.into()),
            ("DiskContainer.UserBucket.S3Bucket", bucket.into()),
            ("DiskContainer.UserBucket.S3Key", key.into()),
            (
                "RoleName",
                t.import_role.clone().unwrap_or_else(|| "vmimport".into()),
            ),
            // The same artifact imports once, however often the command runs.
            ("ClientToken", format!("ncimage-{}", &sha256[..32])),
        ],
    )?;
    let task = http::xml_text(&reply, "importTaskId").ok_or_else(|| {
        Error::upload(
            "EC2 ImportSnapshot: no importTaskId in the reply",
            "check that ec2_endpoint is EC2",
        )
    })?;
    say(format!(
        "EC2 import task {task}: importing s3://{bucket}/{key} as a snapshot"
    ));
    let wait = Duration::from_secs(t.wait_minutes.unwrap_or(120) * 60);
    let poll = Duration::from_secs(t.poll_seconds.unwrap_or(15));
    let t0 = Instant::now();
    let snapshot =
        loop {
            crate::interrupt::check()?;
            let r = ec2.call(
                "DescribeImportSnapshotTasks",
                &[("ImportTaskId.1", task.clone())],
            )?;
            let status = http::xml_text(&r, "status").unwrap_or_default();
            let message = http::xml_text(&r, "statusMessage").unwrap_or_default();
            match status.as_str() {
                "completed" => {
                    break http::xml_text(&r, "snapshotId")
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| {
                            Error::upload(
                                format!("EC2 import task {task} completed without a snapshot id"),
                                "see the task with aws ec2 describe-import-snapshot-tasks",
                            )
                        })?
                }
                "deleted" | "deleting" | "cancelled" => return Err(Error::upload(
                    format!("EC2 import task {task} failed: {status}: {message}"),
                    "the image format or the vmimport role's access to the bucket is the usual \
                     cause; see AWS's VM Import troubleshooting",
                )),
                _ => {}
            }
            if t0.elapsed() > wait {
                return Err(Error::upload(
                    format!(
                        "EC2 import task {task} is still {status} after {} minutes",
                        wait.as_secs() / 60
                    ),
                    "run the same command later (the import goes on; ClientToken finds it again), \
                 or raise `wait_minutes`",
                ));
            }
            std::thread::sleep(poll);
        };
    say(format!("EC2 snapshot {snapshot} imported"));
    let reply = ec2.call(
        "RegisterImage",
        &[
            ("Name", image_name.into()),
            ("Description", description),
            ("Architecture", "x86_64".into()),
            ("BootMode", "uefi".into()),
            ("VirtualizationType", "hvm".into()),
            ("EnaSupport", "true".into()),
            ("ImdsSupport", "v2.0".into()),
            ("RootDeviceName", "/dev/xvda".into()),
            ("BlockDeviceMapping.1.DeviceName", "/dev/xvda".into()),
            ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.clone()),
            ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3".into()),
            (
                "BlockDeviceMapping.1.Ebs.DeleteOnTermination",
                "true".into(),
            ),
        ],
    )?;
    let image = http::xml_text(&reply, "imageId").ok_or_else(|| {
        Error::upload(
            "EC2 RegisterImage: no imageId in the reply",
            "check that ec2_endpoint is EC2",
        )
    })?;
    Ok(Registered {
        import_task: task,
        snapshot,
        image,
    })
}
