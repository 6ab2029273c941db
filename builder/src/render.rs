//! `ncimage render`: every template of a role rendered for review, without building. Build-time
//! templates get the build's context; first-boot templates get the test node, with each secret
//! shown as `<secret:NAME>` (no secret is generated or printed).

use crate::build::{build_context, Ids};
use crate::error::Result;
use crate::firstboot::{self, NodeConfig};
use crate::layer::{self, Project};
use crate::overlay::ImageInfo;
use crate::spec::Spec;
use crate::template;

pub struct Rendered {
    /// Absolute path in the image.
    pub path: String,
    /// "build" or "first boot".
    pub phase: &'static str,
    pub source: String,
    pub text: String,
}

pub fn render(project: &Project, spec: &Spec, role: &str) -> Result<Vec<Rendered>> {
    let layers = project.layers_for(role)?;
    let merged = layer::merge(&layers)?;
    let ids = Ids::new(&spec.name, role);
    let build_ctx = build_context(spec, role, &layers, &merged, &ids, &[]);
    let node = NodeConfig {
        node: crate::vmtest::test_node(role, &merged),
        secrets: merged
            .secrets
            .iter()
            .map(|s| (s.name.clone(), format!("<secret:{}>", s.name)))
            .collect(),
        cluster: serde_json::Value::Null,
    };
    let info = ImageInfo {
        role: role.into(),
        spec: spec.name.clone(),
        layers: layers.iter().map(|l| l.name.clone()).collect(),
        firewall: merged.firewall.clone(),
        secrets: merged.secrets.iter().map(|s| s.name.clone()).collect(),
        firstboot: vec![],
        join: Vec::new(),
        reload_after_firstboot: vec![],
        ncimage_version: env!("CARGO_PKG_VERSION").into(),
    };
    let fb_ctx = firstboot::context(&node, &info);
    let mut out = Vec::new();
    for l in &layers {
        for (phase, sub, ctx) in [
            ("build", "tree", &build_ctx),
            ("first boot", "firstboot", &fb_ctx),
        ] {
            for (rel, path) in l.files(sub)? {
                let Some(target) = rel.strip_suffix(".tera") else {
                    continue;
                };
                let source = format!("{}/{sub}/{rel}", l.source());
                let text =
                    std::fs::read_to_string(&path).map_err(crate::Error::io("reading", &path))?;
                out.push(Rendered {
                    path: format!("/{target}"),
                    phase,
                    text: template::render(&source, &text, ctx)?,
                    source,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_renders_and_shows_secret_names_only() {
        let project = Project::locate(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.."
        ))))
        .unwrap();
        let spec = Spec::load(None).unwrap();
        for role in project.roles() {
            let r = render(&project, &spec, &role).unwrap();
            assert!(
                r.iter()
                    .any(|f| f.path == "/etc/nftables.conf" && f.phase == "first boot"),
                "{role}"
            );
        }
        let r = render(&project, &spec, "redis").unwrap();
        let sessions = r
            .iter()
            .find(|f| f.path == "/etc/redis/redis-sessions.conf")
            .unwrap();
        assert!(
            sessions.text.contains("bind 10.0.2.15"),
            "{}",
            sessions.text
        );
        assert!(
            sessions.text.contains("><secret:redis_sessions_password>"),
            "{}",
            sessions.text
        );
    }
}
