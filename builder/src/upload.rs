//! `ncimage upload`: one artifact of a built image (out/<role>/, listed with its sha256 in
//! manifest.json) to a target: S3-compatible object storage, then, for a cloud, the calls that
//! turn the object into an image. Providers: upload/<provider>.rs.

pub mod aws;
pub mod azure;
pub mod credentials;
pub mod digitalocean;
pub mod gcp;
pub mod http;
pub mod multipart;
pub mod openstack;
pub mod s3;
pub mod sigv4;
pub mod target;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use target::{Overrides, Provider, Target};

pub struct Options {
    /// Folder of the built image (manifest.json and the artifacts).
    pub image_dir: PathBuf,
    /// `--to`: a target name or s3://bucket[/prefix].
    pub to: String,
    pub targets_file: Option<PathBuf>,
    pub overrides: Overrides,
    pub quiet: bool,
    /// Resume state (default ~/.cache/ncimage/uploads).
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestArtifact {
    pub file: String,
    pub format: String,
    pub size_bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    role: String,
    artifacts: Vec<ManifestArtifact>,
}

/// What an upload did (printed by the CLI).
#[derive(Debug)]
pub struct Report {
    pub lines: Vec<String>,
}

pub fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("ncimage/uploads")
}

/// The role and artifacts of a built image folder.
pub fn read_manifest(dir: &Path) -> Result<(String, Vec<ManifestArtifact>)> {
    let path = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::upload(
            format!("{} has no manifest.json", dir.display()),
            "build the image first (ncimage build --role R), or name the folder of a built image",
        )),
        Err(e) => return Err(Error::io("reading", &path)(e)),
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|e| {
        Error::upload(
            format!("{}: not an ncimage manifest: {e}", path.display()),
            "build the image again",
        )
    })?;
    Ok((m.role, m.artifacts))
}

/// The artifact of `format` (or the provider's preferred one present).
pub fn choose_artifact(
    artifacts: &[ManifestArtifact],
    provider: Provider,
    format: Option<&str>,
) -> Result<ManifestArtifact> {
    let matches = |a: &ManifestArtifact, f: &str| {
        a.format == f || a.file.ends_with(&format!(".{}", extension(f)))
    };
    let present: Vec<String> = artifacts.iter().map(|a| a.file.clone()).collect();
    if let Some(f) = format {
        if !provider.formats().contains(&f) {
            return Err(Error::upload(
                format!("{} does not take {f} images", provider.name()),
                format!("use one of: {}", provider.formats().join(", ")),
            ));
        }
        return artifacts
            .iter()
            .find(|a| matches(a, f))
            .cloned()
            .ok_or_else(|| {
                Error::upload(
                    format!(
                        "the image has no {f} artifact (it has: {})",
                        present.join(", ")
                    ),
                    format!("build or export it in {f} first"),
                )
            });
    }
    provider
        .formats()
        .iter()
        .find_map(|f| artifacts.iter().find(|a| matches(a, f)))
        .cloned()
        .ok_or_else(|| {
            Error::upload(
                format!(
                    "the image has no artifact {} takes (it has: {})",
                    provider.name(),
                    present.join(", ")
                ),
                format!(
                    "build or export it as one of: {}",
                    provider.formats().join(", ")
                ),
            )
        })
}

pub fn run(o: &Options) -> Result<Report> {
    let (name, t) = target::resolve(&o.to, o.targets_file.as_deref(), &o.overrides)?;
    let (role, artifacts) = read_manifest(&o.image_dir)?;
    let a = choose_artifact(&artifacts, t.provider, t.format.as_deref())?;
    let file = o.image_dir.join(&a.file);
    let meta = std::fs::metadata(&file).map_err(Error::io("reading", &file))?;
    if meta.len() != a.size_bytes {
        return Err(Error::upload(
            format!(
                "{} is {} bytes, but its manifest says {}",
                file.display(),
                meta.len(),
                a.size_bytes
            ),
            "the file changed after it was built: build or export the image again",
        ));
    }
    let limit = t
        .max_size_gib
        .map(|g| g << 30)
        .into_iter()
        .chain(t.provider.max_size())
        .min();
    if let Some(limit) = limit {
        if a.size_bytes > limit {
            return Err(Error::upload(
                format!(
                    "{} is {:.1} GiB, larger than target `{name}` takes ({:.1} GiB)",
                    a.file,
                    a.size_bytes as f64 / (1u64 << 30) as f64,
                    limit as f64 / (1u64 << 30) as f64
                ),
                "use a smaller disk in the spec, or a compressed format (qcow2) where the \
                 provider takes one",
            ));
        }
    }
    let image_name = t
        .image_name
        .clone()
        .unwrap_or_else(|| "ncimage-{role}-{sha12}".into())
        .replace("{role}", &role)
        .replace("{sha12}", &a.sha256[..12]);
    let say = |m: String| eprintln!("{m}");
    let format = artifact_format(&a, t.provider);
    match t.provider {
        Provider::S3 => {
            let (_, _, lines) = upload_object(&name, &t, &o.image_dir, &a, o)?;
            Ok(Report { lines })
        }
        Provider::Aws => {
            // EC2 needs the region: check it before spending time on the upload.
            t.need(&name, "region", &t.region)?;
            let (bucket, key, mut lines) = upload_object(&name, &t, &o.image_dir, &a, o)?;
            let r = aws::import_and_register(
                &name,
                &t,
                bucket.credentials().clone(),
                &bucket.name,
                &key,
                &format,
                &image_name,
                &a.sha256,
                &say,
            )?;
            lines.push(format!(
                "AWS image {} ({image_name}, UEFI) registered from snapshot {} (import task {})",
                r.image, r.snapshot, r.import_task
            ));
            Ok(Report { lines })
        }
        Provider::Digitalocean => {
            // Check the token before spending time on the upload.
            let token = digitalocean::token()?;
            let mut t = t.clone();
            let region = t.need(&name, "region", &t.region)?.to_string();
            if t.endpoint.is_none() {
                t.endpoint = Some(digitalocean::spaces_endpoint(&region));
            }
            let (bucket, key, mut lines) = upload_object(&name, &t, &o.image_dir, &a, o)?;
            // DigitalOcean fetches the object through a presigned URL (the Space stays private).
            let url = bucket.presigned_get(&key, 6 * 3600);
            let c = digitalocean::create_image(
                &name,
                &t,
                &token,
                &url,
                &image_name,
                &role,
                &a.sha256,
                &say,
            )?;
            lines.push(format!(
                "DigitalOcean custom image {} ({image_name}) is {} in {region}",
                c.id, c.status
            ));
            Ok(Report { lines })
        }
        Provider::Openstack => {
            let u = openstack::upload(
                &name,
                &t,
                &file,
                a.size_bytes,
                &format,
                &image_name,
                &role,
                &a.sha256,
                o.quiet,
                &say,
            )?;
            let stored = if u.stored_algo == "sha512" {
                format!(
                    "verified: Glance's sha512 of the stored data matches the file's ({}...)",
                    &u.sha512[..16]
                )
            } else {
                format!(
                    "not compared: Glance reports {} of the stored data, not sha512, so what it \
                     stored was not checked against the file",
                    if u.stored_algo.is_empty() {
                        "no hash".to_string()
                    } else {
                        format!("only {}", u.stored_algo)
                    }
                )
            };
            Ok(Report {
                lines: vec![
                    format!(
                        "OpenStack image {} ({image_name}, {format}, UEFI) is active",
                        u.id
                    ),
                    format!(
                        "verified: sha256 of every byte sent matches the manifest ({}...)",
                        &a.sha256[..16]
                    ),
                    stored,
                ],
            })
        }
        Provider::Gcp => {
            let g = gcp::upload_and_insert(
                &name,
                &t,
                &file,
                a.size_bytes,
                &a.sha256,
                &image_name,
                o.quiet,
                &o.state_dir,
                &say,
            )?;
            Ok(Report {
                lines: vec![format!(
                    "GCP image {} (UEFI_COMPATIBLE) created from {}",
                    g.image, g.object
                )],
            })
        }
        Provider::Azure => {
            let c = azure::upload_and_create(
                &name,
                &t,
                &file,
                a.size_bytes,
                &a.sha256,
                &image_name,
                o.quiet,
                &say,
            )?;
            Ok(Report {
                lines: vec![
                    format!(
                        "Azure image {} (Hyper-V generation 2, UEFI) created from disk {}",
                        c.image_id, c.disk_id
                    ),
                    format!(
                        "verified: sha256 of every byte read matches the manifest ({}...)",
                        &a.sha256[..16]
                    ),
                    format!(
                        "{} pages of 4 MiB written with Content-MD5, {} all-zero pages skipped",
                        c.pages, c.skipped
                    ),
                ],
            })
        }
    }
}

/// The error when the bytes read from an artifact (and sent) do not hash to its manifest's
/// sha256; `outcome` says what became of the upload.
pub fn differs_from_manifest(file: &Path, got: &str, want: &str, outcome: &str) -> Error {
    Error::upload(
        format!(
            "{} differs from its manifest: the bytes read have sha256 {got}, the manifest says \
             {want}; {outcome}",
            file.display()
        ),
        "the file changed after it was built: build or export the image again",
    )
}

/// File name suffix of a format's artifact (as `ncimage build` names them).
fn extension(format: &str) -> &str {
    match format {
        "gce" => "gce.tar.gz",
        f => f,
    }
}

/// The format name of an artifact (raw, qcow2, vhd, vmdk, gce).
fn artifact_format(a: &ManifestArtifact, p: Provider) -> String {
    p.formats()
        .iter()
        .chain(Provider::S3.formats())
        .find(|f| a.format == **f || a.file.ends_with(&format!(".{}", extension(f))))
        .map(|f| f.to_string())
        .unwrap_or_else(|| a.format.clone())
}

/// The S3 part every object-storage target shares: returns the bucket, the key and report lines.
pub fn upload_object(
    name: &str,
    t: &Target,
    dir: &Path,
    a: &ManifestArtifact,
    o: &Options,
) -> Result<(s3::Bucket, String, Vec<String>)> {
    let bucket_name = t.need(name, "bucket", &t.bucket)?;
    let region = t.region.clone().unwrap_or_else(|| "us-east-1".into());
    let creds = credentials::AwsCredentials::load(t.profile.as_deref())?;
    let bucket = s3::Bucket::new(
        t.endpoint.as_deref(),
        bucket_name,
        &region,
        t.path_style,
        creds,
    )?;
    bucket.head_bucket()?;
    let prefix = t.prefix.clone().unwrap_or_default();
    let key = if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{}", a.file)
    } else {
        format!("{prefix}/{}", a.file)
    };
    let job = multipart::Job {
        bucket: &bucket,
        key: key.clone(),
        file: dir.join(&a.file),
        size: a.size_bytes,
        sha256: a.sha256.clone(),
        part_size: t.part_size_mib.unwrap_or(16) << 20,
        threads: t.threads.unwrap_or(4).clamp(1, 32),
        // x-amz-checksum-sha256: AWS takes it; other servers may refuse it (opt in). Content-MD5,
        // the signed payload hash and the ETag check hold everywhere.
        checksums: t.checksum_sha256.unwrap_or(t.provider == Provider::Aws),
        quiet: o.quiet,
        state_dir: o.state_dir.clone(),
    };
    let out = multipart::upload(&job)?;
    let place = format!("s3://{}/{key}", bucket.name);
    let mut lines = vec![];
    if out.already_there {
        lines.push(format!(
            "{place} already holds {} (same size and sha256): nothing sent",
            a.file
        ));
    } else {
        lines.push(format!(
            "uploaded {} to {place} ({} at {}): {} parts{}, {:.0} MiB sent in {:.1} s ({:.1} MiB/s)",
            a.file,
            bucket.endpoint,
            bucket.region,
            out.parts,
            if out.resumed_parts > 0 {
                format!(" ({} already there from an interrupted upload)", out.resumed_parts)
            } else {
                String::new()
            },
            out.sent_bytes as f64 / (1 << 20) as f64,
            out.secs,
            out.sent_bytes as f64 / (1 << 20) as f64 / out.secs.max(0.001)
        ));
        lines.push(format!(
            "verified: sha256 {} of every byte read matches the manifest; the object's size and \
             multipart ETag {} match the parts' MD5s",
            a.sha256, out.etag
        ));
    }
    Ok((bucket, key, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(file: &str, format: &str) -> ManifestArtifact {
        ManifestArtifact {
            file: file.into(),
            format: format.into(),
            size_bytes: 1,
            sha256: "0".repeat(64),
        }
    }

    /// The artifacts as `ncimage build` names them: each provider gets the one it takes.
    #[test]
    fn each_provider_gets_the_format_it_takes() {
        let all = [
            artifact("ncimage-r.qcow2", "qcow2"),
            artifact("ncimage-r.raw", "raw"),
            artifact("ncimage-r.vhd", "vhd"),
            artifact("ncimage-r.vmdk", "vmdk"),
            artifact("ncimage-r.gce.tar.gz", "gce"),
        ];
        let pick = |p, f| choose_artifact(&all, p, f).map(|a| a.file);
        assert_eq!(pick(Provider::Aws, None).unwrap(), "ncimage-r.vmdk");
        assert_eq!(pick(Provider::Gcp, None).unwrap(), "ncimage-r.gce.tar.gz");
        assert_eq!(pick(Provider::Azure, None).unwrap(), "ncimage-r.vhd");
        assert_eq!(
            pick(Provider::Digitalocean, None).unwrap(),
            "ncimage-r.qcow2"
        );
        assert_eq!(pick(Provider::Openstack, None).unwrap(), "ncimage-r.qcow2");
        assert_eq!(
            pick(Provider::S3, Some("gce")).unwrap(),
            "ncimage-r.gce.tar.gz"
        );
        assert_eq!(pick(Provider::Aws, Some("raw")).unwrap(), "ncimage-r.raw");
        let e = pick(Provider::Gcp, Some("vhd")).unwrap_err().to_string();
        assert!(e.contains("gcp does not take vhd images"), "{e}");
        // DigitalOcean's custom images are raw, qcow2, VHDX, VDI or VMDK: a fixed VHD is not one.
        let e = pick(Provider::Digitalocean, Some("vhd")).unwrap_err();
        let shown = format!("{:?}", miette::Report::new(e));
        assert!(
            shown.contains("digitalocean does not take vhd images"),
            "{shown}"
        );
        assert!(shown.contains("qcow2, raw, vmdk"), "{shown}");
        // Today's two-format images: aws falls back to raw, gcp says what to export.
        let two = [
            artifact("ncimage-r.qcow2", "qcow2"),
            artifact("ncimage-r.raw", "raw"),
        ];
        assert_eq!(
            choose_artifact(&two, Provider::Aws, None).unwrap().file,
            "ncimage-r.raw"
        );
        let e = choose_artifact(&two, Provider::Gcp, None).unwrap_err();
        assert!(format!("{e:?}").contains("gce"), "{e:?}");
        assert_eq!(
            artifact_format(&artifact("x.gce.tar.gz", "gce"), Provider::Gcp),
            "gce"
        );
    }
}
