//! Build-time validation: every layer's `[[validate]]` command runs in the finished root tree
//! (unpacked into the build's scratch folder and entered with chroot), after the first-boot
//! templates were rendered there for a sample node, so node-specific files are checked by their
//! daemon's own checker too (sshd -t, nft -c, haproxy -c, nginx -t, ...). A failing checker
//! stops the build with its message. The sample node's secrets are random and never leave the
//! scratch folder.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::firstboot::{self, NodeConfig};
use crate::layer::Layer;
use crate::secrets::Secrets;
use crate::tools;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Validate {
    pub name: String,
    /// Shell command run as root in the image tree (chroot); exit 0 means valid.
    pub run: String,
}

/// Runs the layers' validations; a no-op when none is declared.
pub fn run(
    root_tar: &Path,
    layers: &[Layer],
    merged: &crate::layer::Merged,
    role: &str,
    work: &Path,
) -> Result<usize> {
    let checks: Vec<(&str, &Validate)> = layers
        .iter()
        .flat_map(|l| {
            l.manifest
                .validate
                .iter()
                .map(move |v| (l.name.as_str(), v))
        })
        .collect();
    if checks.is_empty() {
        return Ok(0);
    }
    tools::require("tar")?;
    let tree = tempfile::Builder::new()
        .prefix("tree-")
        .tempdir_in(work)
        .map_err(Error::io("creating a folder in", work))?;
    tools::run(
        Command::new("tar")
            .arg("-xf")
            .arg(root_tar)
            .arg("-C")
            .arg(tree.path())
            .args(["--numeric-owner", "--same-permissions"]),
    )?;
    let node = NodeConfig {
        node: crate::vmtest::test_node(role, merged),
        secrets: Secrets::generate(&merged.secrets)?.0,
        cluster: serde_json::Value::Null,
        encryption: Default::default(),
    };
    let node_json = tree.path().join("etc/ncimage/node.json");
    std::fs::write(&node_json, serde_json::to_vec(&node).expect("serialisable"))
        .map_err(Error::io("writing", &node_json))?;
    firstboot::run(&firstboot::Paths::under(tree.path()), false)?;
    for (layer, v) in &checks {
        crate::interrupt::check()?;
        tools::run(
            Command::new("chroot")
                .arg(tree.path())
                .args(["/bin/sh", "-c", &v.run])
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
        .map_err(|e| {
            let output = match e {
                Error::Command { output, status, .. } => format!("{status}\n{output}"),
                other => other.to_string(),
            };
            Error::invalid(
                format!(
                    "{layer}: validation `{}` failed in the image tree: {}",
                    v.name,
                    secrets_free(&output, &node)
                ),
                format!(
                    "fix the files of layer {layer} that `{}` checks (its output is above)",
                    v.name
                ),
            )
        })?;
    }
    Ok(checks.len())
}

fn secrets_free(text: &str, node: &NodeConfig) -> String {
    Secrets(node.secrets.clone()).redact(text)
}
