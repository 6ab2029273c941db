//! Upload targets: named in a TOML file (`[targets.NAME]`, default
//! ~/.config/ncimage/targets.toml) or given on the command line as `s3://bucket[/prefix]`;
//! command-line flags override the file. No credential is ever read from this file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    S3,
    Aws,
    Digitalocean,
    Openstack,
    Gcp,
    Azure,
}

impl Provider {
    /// Every provider, in the order messages list them.
    pub const ALL: [Provider; 6] = [
        Provider::S3,
        Provider::Aws,
        Provider::Digitalocean,
        Provider::Openstack,
        Provider::Gcp,
        Provider::Azure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Aws => "aws",
            Provider::Digitalocean => "digitalocean",
            Provider::Openstack => "openstack",
            Provider::Gcp => "gcp",
            Provider::Azure => "azure",
        }
    }
    /// Artifact formats the provider takes, preferred first.
    pub fn formats(self) -> &'static [&'static str] {
        match self {
            Provider::S3 => &["qcow2", "raw", "vhd", "vmdk", "gce"],
            Provider::Aws => &["vmdk", "raw", "vhd"],
            // Custom images: raw, qcow2, VHDX, VDI or VMDK (DigitalOcean's API reference), not VHD.
            Provider::Digitalocean => &["qcow2", "raw", "vmdk"],
            Provider::Openstack => &["qcow2", "raw", "vmdk", "vhd"],
            Provider::Gcp => &["gce"],
            Provider::Azure => &["vhd"],
        }
    }
    /// Largest image file the provider takes (bytes), when it documents one.
    pub fn max_size(self) -> Option<u64> {
        match self {
            // Custom images: 100 GB (DigitalOcean's documented limit).
            Provider::Digitalocean => Some(100_000_000_000),
            _ => None,
        }
    }
}

/// One target as written in the targets file (every key optional but `provider`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub provider: Provider,
    /// Object storage (s3, aws, digitalocean): endpoint URL (default AWS's regional one).
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: Option<String>,
    /// endpoint/bucket/key instead of bucket.endpoint/key (default: on for a given endpoint).
    pub path_style: Option<bool>,
    /// Key prefix in the bucket (e.g. "images/").
    pub prefix: Option<String>,
    /// Profile of ~/.aws/credentials for the object storage's keys.
    pub profile: Option<String>,
    pub part_size_mib: Option<u64>,
    pub threads: Option<usize>,
    /// Send each part's SHA-256 as x-amz-checksum-sha256 (default: on for aws, off elsewhere,
    /// as some S3-compatible servers refuse it).
    pub checksum_sha256: Option<bool>,
    /// Which artifact to upload: raw, qcow2, vhd, vmdk, gce (default: the provider's first).
    pub format: Option<String>,
    /// Name of the image the provider creates (default ncimage-<role>-<first 12 of sha256>).
    pub image_name: Option<String>,
    /// Largest file to accept (GiB), below the provider's own limit.
    pub max_size_gib: Option<u64>,
    /// Minutes to wait for the provider to finish the image (import, processing).
    pub wait_minutes: Option<u64>,
    /// Seconds between two looks at a provider's progress (default 15).
    pub poll_seconds: Option<u64>,
    /// aws: EC2 API endpoint (default https://ec2.<region>.amazonaws.com).
    pub ec2_endpoint: Option<String>,
    /// aws: the VM Import service role (default vmimport).
    pub import_role: Option<String>,
    /// digitalocean: API endpoint (default https://api.digitalocean.com).
    pub api_endpoint: Option<String>,
    /// gcp: project (default: the credentials' project_id).
    pub project: Option<String>,
    /// gcp: Cloud Storage and Compute API endpoints (default Google's).
    pub storage_endpoint: Option<String>,
    pub compute_endpoint: Option<String>,
    /// azure: subscription (default AZURE_SUBSCRIPTION_ID), resource group, location.
    pub subscription: Option<String>,
    pub resource_group: Option<String>,
    pub location: Option<String>,
    /// azure: Entra ID and Resource Manager endpoints (default Microsoft's).
    pub login_endpoint: Option<String>,
    pub management_endpoint: Option<String>,
    /// openstack: Keystone v3 URL (default OS_AUTH_URL).
    pub auth_url: Option<String>,
    /// openstack: Glance URL (default: from the token's catalog).
    pub image_endpoint: Option<String>,
    /// openstack: image visibility (default private).
    pub visibility: Option<String>,
}

impl Target {
    pub fn new(provider: Provider) -> Target {
        Target {
            provider,
            endpoint: None,
            bucket: None,
            region: None,
            path_style: None,
            prefix: None,
            profile: None,
            part_size_mib: None,
            threads: None,
            checksum_sha256: None,
            format: None,
            image_name: None,
            max_size_gib: None,
            wait_minutes: None,
            poll_seconds: None,
            ec2_endpoint: None,
            import_role: None,
            api_endpoint: None,
            auth_url: None,
            subscription: None,
            resource_group: None,
            location: None,
            login_endpoint: None,
            management_endpoint: None,
            project: None,
            storage_endpoint: None,
            compute_endpoint: None,
            image_endpoint: None,
            visibility: None,
        }
    }

    /// A required key, or an error naming the target and the key.
    pub fn need<'a>(&'a self, name: &str, key: &str, v: &'a Option<String>) -> Result<&'a str> {
        v.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
            Error::upload(
                format!("target `{name}` ({}) has no `{key}`", self.provider.name()),
                format!(
                    "add `{key} = \"...\"` to [targets.{name}] in the targets file, or pass --{}",
                    key.replace('_', "-")
                ),
            )
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetsFile {
    #[serde(default)]
    targets: BTreeMap<String, Target>,
}

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub format: Option<String>,
    pub part_size_mib: Option<u64>,
    pub threads: Option<usize>,
    pub profile: Option<String>,
}

pub fn default_targets_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/ncimage/targets.toml"))
}

/// Resolves `to` (a name in the targets file, or s3://bucket[/prefix]) into (name, target).
pub fn resolve(to: &str, file: Option<&Path>, o: &Overrides) -> Result<(String, Target)> {
    let (name, mut t) = if let Some(rest) = to.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut t = Target::new(Provider::S3);
        t.bucket = Some(bucket.to_string());
        t.prefix = Some(prefix.to_string());
        (to.to_string(), t)
    } else {
        let path = file.map(Path::to_path_buf).or_else(default_targets_file);
        let Some(path) = path else {
            return Err(unknown(to, "no targets file (HOME is not set)", &[]));
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unknown(
                    to,
                    &format!("the targets file {} does not exist", path.display()),
                    &[],
                ))
            }
            Err(e) => return Err(Error::io("reading", &path)(e)),
        };
        let shown = path.display().to_string();
        let f: TargetsFile = toml::from_str(&text).map_err(|e| {
            Error::toml(
                &shown,
                &text,
                &e,
                "see `ncimage upload --help` and README.md (Uploading) for the keys of a target",
            )
        })?;
        match f.targets.get(to) {
            Some(t) => (to.to_string(), t.clone()),
            None => {
                let names: Vec<&str> = f.targets.keys().map(String::as_str).collect();
                return Err(unknown(
                    to,
                    &format!("{shown} has no [targets.{to}]"),
                    &names,
                ));
            }
        }
    };
    if o.endpoint.is_some() {
        t.endpoint = o.endpoint.clone();
    }
    if o.region.is_some() {
        t.region = o.region.clone();
    }
    if o.path_style {
        t.path_style = Some(true);
    }
    if o.format.is_some() {
        t.format = o.format.clone();
    }
    if o.part_size_mib.is_some() {
        t.part_size_mib = o.part_size_mib;
    }
    if o.threads.is_some() {
        t.threads = o.threads;
    }
    if o.profile.is_some() {
        t.profile = o.profile.clone();
    }
    Ok((name, t))
}

fn unknown(to: &str, why: &str, names: &[&str]) -> Error {
    Error::upload(
        format!("unknown upload target `{to}`: {why}"),
        if names.is_empty() {
            let providers: Vec<&str> = Provider::ALL.iter().map(|p| p.name()).collect();
            format!(
                "define it as [targets.NAME] with `provider = \"...\"` (one of: {}) in the \
                 targets file (--targets, default ~/.config/ncimage/targets.toml), or give \
                 s3://bucket/prefix",
                providers.join(", ")
            )
        } else {
            format!("targets defined there: {}", names.join(", "))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn reads_a_named_target_and_applies_flags() {
        let f = file(
            "[targets.lab]\nprovider = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\n\
             bucket = \"img\"\nregion = \"eu\"\nthreads = 2\n",
        );
        let o = Overrides {
            threads: Some(8),
            ..Default::default()
        };
        let (name, t) = resolve("lab", Some(f.path()), &o).unwrap();
        assert_eq!(name, "lab");
        assert_eq!(t.provider, Provider::S3);
        assert_eq!(t.bucket.as_deref(), Some("img"));
        assert_eq!(t.threads, Some(8));
    }

    #[test]
    fn an_unknown_target_names_the_defined_ones() {
        let f = file("[targets.a]\nprovider = \"aws\"\n[targets.b]\nprovider = \"openstack\"\n");
        let e = resolve("c", Some(f.path()), &Overrides::default()).unwrap_err();
        let shown = format!("{:?}", miette::Report::new(e));
        assert!(shown.contains("unknown upload target `c`"), "{shown}");
        assert!(shown.contains("a, b"), "{shown}");
    }

    /// Without a targets file, the help names every provider, each one a file can declare.
    #[test]
    fn an_unknown_target_without_a_file_names_every_provider() {
        let e = resolve(
            "c",
            Some(Path::new("/nonexistent/t.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        let Error::Upload { help, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(
            help.contains("(one of: s3, aws, digitalocean, openstack, gcp, azure)"),
            "{help}"
        );
        for p in Provider::ALL {
            let f = file(&format!("[targets.x]\nprovider = \"{}\"\n", p.name()));
            let (_, t) = resolve("x", Some(f.path()), &Overrides::default()).unwrap();
            assert_eq!(t.provider, p);
        }
    }

    #[test]
    fn a_misspelt_key_is_located() {
        let f = file("[targets.a]\nprovider = \"s3\"\nbukket = \"x\"\n");
        let e = resolve("a", Some(f.path()), &Overrides::default()).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains(":3:"), "{shown}");
        assert!(shown.contains("bukket"), "{shown}");
    }

    #[test]
    fn s3_urls_need_no_file() {
        let (_, t) = resolve(
            "s3://bucket/some/prefix/",
            Some(Path::new("/nonexistent")),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(t.bucket.as_deref(), Some("bucket"));
        assert_eq!(t.prefix.as_deref(), Some("some/prefix/"));
    }
}
