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

#[derive(Debug)]
pub struct Rendered {
    /// Absolute path in the image.
    pub path: String,
    /// "build" or "first boot".
    pub phase: &'static str,
    pub source: String,
    pub text: String,
}

/// Renders a role's templates; first-boot ones for `node` of the spec's cluster when given
/// (its node.vars derived from the topology), else for the test node.
pub fn render(
    project: &Project,
    spec: &Spec,
    role: &str,
    node: Option<&str>,
) -> Result<Vec<Rendered>> {
    let layers = project.layers_for(role)?;
    let merged = layer::merge(&layers)?;
    let ids = Ids::new(&spec.name, role);
    let build_ctx = build_context(spec, role, &layers, &merged, &ids, &[]);
    let placeholders: std::collections::BTreeMap<String, String> = merged
        .secrets
        .iter()
        .map(|s| (s.name.clone(), format!("<secret:{}>", s.name)))
        .collect();
    let node = match node {
        None => NodeConfig {
            node: crate::vmtest::test_node(role, &merged),
            secrets: placeholders,
            cluster: serde_json::Value::Null,
            encryption: Default::default(),
        },
        Some(name) => {
            if let Some(n) = spec.nodes.iter().find(|n| n.name == name && n.role != role) {
                return Err(crate::Error::invalid(
                    format!("node `{name}` is a `{}` node, not `{role}`", n.role),
                    format!("ncimage render --role {} --node {name}", n.role),
                ));
            }
            let mut placeholders = placeholders;
            placeholders.insert(
                crate::secrets::recovery_name(name),
                format!("<secret:{}>", crate::rekey::RECOVERY_SECRET),
            );
            crate::cluster::node_config(spec, project, name, &placeholders, None)?
        }
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
        volumes: Vec::new(),
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
    fn a_cluster_node_renders_with_its_topology() {
        let project = Project::locate(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.."
        ))))
        .unwrap();
        let spec = Spec::load(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../image-specs/lab.toml"
        ))))
        .unwrap();
        let r = render(&project, &spec, "lb", Some("lb-2")).unwrap();
        let hap = r
            .iter()
            .find(|f| f.path == "/etc/haproxy/haproxy.cfg")
            .unwrap();
        assert!(
            hap.text.contains("server app1 10.77.0.21:80"),
            "{}",
            hap.text
        );
        assert!(
            hap.text.contains("server app2 10.77.0.22:80"),
            "{}",
            hap.text
        );
        let ka = r
            .iter()
            .find(|f| f.path == "/etc/keepalived/keepalived.conf")
            .unwrap();
        assert!(ka.text.contains("10.77.0.11"), "{}", ka.text);
        assert!(ka.text.contains("unicast_src_ip 10.77.0.12"), "{}", ka.text);
        let e = render(&project, &spec, "db", Some("lb-2")).unwrap_err();
        assert!(e.to_string().contains("is a `lb` node"), "{e}");
    }

    #[test]
    fn every_role_renders_and_shows_secret_names_only() {
        let project = Project::locate(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.."
        ))))
        .unwrap();
        let spec = Spec::load(None).unwrap();
        for role in project.roles() {
            let r = render(&project, &spec, &role, None).unwrap();
            assert!(
                r.iter()
                    .any(|f| f.path == "/etc/nftables.conf" && f.phase == "first boot"),
                "{role}"
            );
        }
        let r = render(&project, &spec, "redis", None).unwrap();
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
