//! The cluster a spec describes: its settings (`[cluster]`: name, domains, private network,
//! floating IP, backup, mail relay) and its nodes (`[[nodes]]`: name, role, private address).
//! Images stay per role; this is what makes each node itself at first boot.
//!
//! What a role needs from the topology is data in its folder, not code here: role.toml's
//! `[cluster]` says how many nodes of the role a cluster has and which cluster settings it
//! needs, and `[node_vars]` derives the node's `node.vars` (Tera expressions over `cluster` and
//! `node`; a value that reads as JSON becomes JSON, an empty one is left out).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::firstboot::{Node, NodeConfig};
use crate::layer::{Merged, Project};
use crate::spec::Spec;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    pub name: String,
    /// Domain of Nextcloud (HAProxy, trusted_domains, WOPI host).
    pub files_domain: String,
    /// Domain of Collabora Online.
    pub office_domain: String,
    /// Private network of the cluster, CIDR (e.g. 10.20.0.0/24).
    pub network: String,
    /// Default route of the private network, if it has one.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub floating_ip: Option<FloatingIp>,
    #[serde(default)]
    pub backup: Backup,
    #[serde(default)]
    pub mail: Option<Mail>,
    /// SSH public keys of the operators (root logs in with them; not secrets).
    #[serde(default)]
    pub admin_ssh_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    pub address: String,
    /// `none` (the address moves by VRRP alone, as in a lab), `digitalocean`, `hetzner`, `aws`.
    pub provider: String,
    /// The provider's id of the floating IP, where its API wants one (Hetzner's id, AWS's
    /// allocation id).
    #[serde(default)]
    pub id: Option<String>,
}

pub const PROVIDERS: &[&str] = &["none", "digitalocean", "hetzner", "aws"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// systemd OnCalendar expression.
    #[serde(default = "d_schedule")]
    pub schedule: String,
    #[serde(default = "d_retention")]
    pub retention_days: u32,
}
impl Default for Backup {
    fn default() -> Self {
        Backup {
            schedule: d_schedule(),
            retention_days: d_retention(),
        }
    }
}
fn d_schedule() -> String {
    "*-*-* 02:30:00".into()
}
fn d_retention() -> u32 {
    14
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mail {
    /// Relay host (submission, STARTTLS).
    pub relay: String,
    #[serde(default = "d_port")]
    pub port: u16,
    #[serde(default)]
    pub user: Option<String>,
    pub from: String,
    pub to: String,
    /// STARTTLS to the relay (off only for a lab's mail sink).
    #[serde(default = "d_true")]
    pub tls: bool,
}
fn d_true() -> bool {
    true
}
fn d_port() -> u16 {
    587
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub role: String,
    pub address: String,
    /// Values of node.vars that win over what the role derives.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Memory of the node's VM in `ncimage lab` (MiB).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// This node's unlock policy, replacing its role's (`[encryption]` keys).
    #[serde(default)]
    pub encryption: Option<crate::rekey::UnlockPolicy>,
}

/// A role's place in a cluster (role.toml `[cluster]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleCluster {
    #[serde(default)]
    pub min_nodes: Option<usize>,
    #[serde(default)]
    pub max_nodes: Option<usize>,
    /// Cluster settings the role cannot do without: "floating_ip", "mail".
    #[serde(default)]
    pub needs: Vec<String>,
    /// Roles whose nodes this role's join waits for: `ncimage lab` boots those first.
    #[serde(default)]
    pub joins_after: Vec<String>,
}

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> Option<Net> {
        let (a, p) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 30)?;
        let net = Net {
            base: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        };
        (net.base == addr).then_some(net)
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask(self.prefix) == u32::from(self.base)
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) | !mask(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// A host name as cloud-init and NFSv4 client ids want it: lowercase letters, digits, dashes.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// Checks of the topology that need no role folder (done when a spec is parsed). `line` maps a
/// needle (e.g. `name = "app-2"`) to its "file:line: " prefix.
pub fn validate(spec: &Spec, line: &dyn Fn(&str) -> String) -> Result<()> {
    let bad = |at: &str, what: String, help: &str| {
        Err(Error::invalid(format!("{}{what}", line(at)), help))
    };
    let Some(c) = &spec.cluster else {
        if let Some(n) = spec.nodes.first() {
            return bad(
                &format!("name = \"{}\"", n.name),
                "[[nodes]] without a [cluster] table".into(),
                "add [cluster] with name, files_domain, office_domain and network",
            );
        }
        return Ok(());
    };
    let Some(net) = Net::parse(&c.network) else {
        return bad(
            "network =",
            format!("cluster.network `{}` is not an IPv4 network", c.network),
            "write it in CIDR notation with the host bits zero, e.g. \"10.20.0.0/24\"",
        );
    };
    if spec.nodes.is_empty() {
        return bad(
            "[cluster]",
            "the cluster has no [[nodes]]".into(),
            "list each node: [[nodes]] name = \"db-1\", role = \"db\", address = \"10.20.0.21\"",
        );
    }
    let mut names = BTreeSet::new();
    let mut addrs: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let gateway = match &c.gateway {
        None => None,
        Some(g) => match g.parse::<Ipv4Addr>() {
            Ok(a) if net.contains(a) => Some(a),
            _ => {
                return bad(
                    "gateway =",
                    format!("cluster.gateway `{g}` is not an address in {}", c.network),
                    "give the router's address in the private network, or leave gateway out",
                )
            }
        },
    };
    for n in &spec.nodes {
        let at = format!("name = \"{}\"", n.name);
        if !valid_name(&n.name) {
            return bad(
                &at,
                format!("node name `{}` is not a host name", n.name),
                "use lowercase letters, digits and dashes (e.g. app-2)",
            );
        }
        if !names.insert(n.name.as_str()) {
            return bad(
                &at,
                format!("two nodes are named `{}`", n.name),
                "give every node its own name",
            );
        }
        let Ok(a) = n.address.parse::<Ipv4Addr>() else {
            return bad(
                &at,
                format!(
                    "node `{}`: address `{}` is not an IPv4 address",
                    n.name, n.address
                ),
                "write the node's private address without a prefix, e.g. \"10.20.0.21\"",
            );
        };
        if !net.contains(a) || a == net.base || a == net.broadcast() {
            return bad(
                &at,
                format!(
                    "node `{}`: address {a} is outside the private network {} (or is its network or broadcast address)",
                    n.name, c.network
                ),
                "give the node a host address inside cluster.network",
            );
        }
        if Some(a) == gateway {
            return bad(
                &at,
                format!("node `{}`: address {a} is the gateway's", n.name),
                "give the node another address",
            );
        }
        if let Some(other) = addrs.insert(a, &n.name) {
            return bad(
                &at,
                format!("nodes `{other}` and `{}` have the same address {a}", n.name),
                "give every node its own address",
            );
        }
    }
    if let Some(f) = &c.floating_ip {
        let ok = f.address.parse::<Ipv4Addr>();
        if ok.is_err() {
            return bad(
                "[cluster.floating_ip]",
                format!(
                    "cluster.floating_ip.address `{}` is not an IPv4 address",
                    f.address
                ),
                "give the floating IP's address",
            );
        }
        if !PROVIDERS.contains(&f.provider.as_str()) {
            return bad(
                "[cluster.floating_ip]",
                format!("cluster.floating_ip.provider `{}` is not known", f.provider),
                &format!("one of: {}", PROVIDERS.join(", ")),
            );
        }
        if f.provider == "hetzner" && f.id.is_none() {
            return bad(
                "[cluster.floating_ip]",
                "cluster.floating_ip: Hetzner's API needs the floating IP's id".into(),
                "set id = \"<floating IP id>\" (hcloud floating-ip list)",
            );
        }
        if f.provider == "aws" && !f.id.as_deref().is_some_and(|i| i.starts_with("eipalloc-")) {
            return bad(
                "[cluster.floating_ip]",
                "cluster.floating_ip: AWS needs the Elastic IP's allocation id".into(),
                "set id = \"eipalloc-...\" (aws ec2 describe-addresses)",
            );
        }
        let a: Ipv4Addr = ok.expect("checked");
        if addrs.contains_key(&a) {
            return bad(
                "[cluster.floating_ip]",
                format!("the floating IP {a} is also a node's address"),
                "the floating IP must be an address of its own",
            );
        }
    }
    Ok(())
}

/// Checks that need the roles: known roles, node counts, needed settings.
pub fn check_roles(spec: &Spec, project: &Project) -> Result<()> {
    let Some(c) = &spec.cluster else {
        return Err(Error::invalid(
            format!("{}: no [cluster] in this spec", spec.source),
            "use a cluster spec such as image-specs/lab.toml",
        ));
    };
    let known = project.roles();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &spec.nodes {
        if !known.contains(&n.role) {
            return Err(Error::invalid(
                format!(
                    "{}: node `{}` has the unknown role `{}`",
                    spec.source, n.name, n.role
                ),
                format!("known roles: {}", known.join(", ")),
            ));
        }
        *count.entry(n.role.as_str()).or_default() += 1;
    }
    for role in &known {
        let layers = project.layers_for(role)?;
        let rc = &layers.last().expect("role layer").manifest.cluster;
        let n = count.get(role.as_str()).copied().unwrap_or(0);
        let (min, max) = (
            rc.min_nodes.unwrap_or(0),
            rc.max_nodes.unwrap_or(usize::MAX),
        );
        if n < min || n > max {
            let range = match (rc.min_nodes, rc.max_nodes) {
                (Some(a), Some(b)) if a == b => format!("exactly {a}"),
                (Some(a), Some(b)) => format!("{a} to {b}"),
                (Some(a), None) => format!("at least {a}"),
                (None, Some(b)) => format!("at most {b}"),
                (None, None) => unreachable!(),
            };
            return Err(Error::invalid(
                format!(
                    "{}: the cluster has {n} `{role}` node(s); roles/{role}/role.toml asks for {range}",
                    spec.source
                ),
                "the cluster survives the loss of any one server only with every pair complete: add or remove [[nodes]]",
            ));
        }
        if n == 0 {
            continue;
        }
        for need in &rc.needs {
            let present = match need.as_str() {
                "floating_ip" => c.floating_ip.is_some(),
                "mail" => c.mail.is_some(),
                other => {
                    return Err(Error::invalid(
                        format!("roles/{role}/role.toml: [cluster] needs `{other}`, which is not a cluster setting"),
                        "needs takes \"floating_ip\" and \"mail\"",
                    ))
                }
            };
            if !present {
                return Err(Error::invalid(
                    format!(
                        "{}: the `{role}` role needs [cluster.{need}], and the spec has none",
                        spec.source
                    ),
                    match need.as_str() {
                        "floating_ip" => "add [cluster.floating_ip] with address and provider (none, digitalocean, hetzner, aws)",
                        _ => "add [cluster.mail] with relay, from and to",
                    },
                ));
            }
        }
    }
    Ok(())
}

/// The spec's node indexes in boot order: first the nodes of roles that others wait for
/// (role.toml `[cluster] joins_after`), each after what it waits for, then the nodes nobody
/// waits for, also in dependency order; spec order otherwise. On few cores, booting the
/// critical path first shortens a cold start.
pub fn boot_order(spec: &Spec, project: &Project) -> Result<Vec<usize>> {
    let known = project.roles();
    let mut after: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for role in spec.nodes.iter().map(|n| &n.role) {
        if after.contains_key(role) {
            continue;
        }
        let layers = project.layers_for(role)?;
        let rc = &layers.last().expect("role layer").manifest.cluster;
        for other in &rc.joins_after {
            if !known.contains(other) {
                return Err(Error::invalid(
                    format!("roles/{role}/role.toml: [cluster] joins_after names `{other}`, which is not a role"),
                    format!("known roles: {}", known.join(", ")),
                ));
            }
        }
        after.insert(role.clone(), rc.joins_after.clone());
    }
    fn depth(
        role: &str,
        after: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
    ) -> Result<usize> {
        if let Some(i) = path.iter().position(|r| r == role) {
            let mut cycle = path[i..].to_vec();
            cycle.push(role.to_string());
            return Err(Error::invalid(
                format!(
                    "roles/{role}/role.toml: [cluster] joins_after makes a cycle: {}",
                    cycle.join(" → ")
                ),
                "a role cannot wait, directly or not, for itself: remove one of these joins_after entries",
            ));
        }
        path.push(role.to_string());
        let mut d = 0;
        for other in after.get(role).into_iter().flatten() {
            // A role the spec has no node of waits for nothing.
            if after.contains_key(other) {
                d = d.max(1 + depth(other, after, path)?);
            }
        }
        path.pop();
        Ok(d)
    }
    let waited_for: BTreeSet<&String> = after.values().flatten().collect();
    let mut keyed = Vec::new();
    for (i, n) in spec.nodes.iter().enumerate() {
        let leaf = !waited_for.contains(&n.role);
        keyed.push((leaf, depth(&n.role, &after, &mut Vec::new())?, i));
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, _, i)| i).collect())
}

/// The topology as templates see it: settings, every node with its 1-based index within its
/// role, and `roles.<role>` listing that role's nodes in spec order.
pub fn topology(spec: &Spec) -> serde_json::Value {
    let Some(c) = &spec.cluster else {
        return serde_json::Value::Null;
    };
    let mut idx: BTreeMap<&str, usize> = BTreeMap::new();
    let mut nodes = Vec::new();
    let mut roles: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for n in &spec.nodes {
        let i = idx.entry(n.role.as_str()).or_default();
        *i += 1;
        let v = serde_json::json!({ "name": n.name, "role": n.role, "address": n.address, "index": *i });
        roles.entry(n.role.as_str()).or_default().push(v.clone());
        nodes.push(v);
    }
    let mut t = serde_json::to_value(c).expect("serialisable");
    t["nodes"] = serde_json::Value::Array(nodes);
    t["roles"] = serde_json::to_value(roles).expect("serialisable");
    t
}

/// node.vars of one node: the role's `[node_vars]` evaluated over the topology, then the
/// node's own `vars` from the spec.
pub fn node_vars(
    spec: &Spec,
    node: &NodeSpec,
    merged: &Merged,
) -> Result<BTreeMap<String, serde_json::Value>> {
    let topo = topology(spec);
    let me = topo["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == node.name.as_str()))
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let ctx = serde_json::json!({ "cluster": topo, "node": me });
    let mut vars = BTreeMap::new();
    for (k, expr) in &merged.node_vars {
        let name = format!("roles/{}/role.toml [node_vars] {k}", node.role);
        let out = crate::template::render(&name, expr, &ctx)?;
        let out = out.trim();
        if out.is_empty() {
            continue;
        }
        let v = serde_json::from_str(out)
            .unwrap_or_else(|_| serde_json::Value::String(out.to_string()));
        vars.insert(k.clone(), v);
    }
    vars.extend(node.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(vars)
}

/// The node's configuration as its seed carries it: identity, topology, derived vars, and only
/// the secrets its role declares (taken from the cluster's secrets).
pub fn node_config(
    spec: &Spec,
    project: &Project,
    name: &str,
    secrets: &BTreeMap<String, String>,
    mac: Option<String>,
) -> Result<NodeConfig> {
    check_roles(spec, project)?;
    let c = spec.cluster.as_ref().expect("checked");
    let node = spec.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        Error::invalid(
            format!("{}: no node named `{name}`", spec.source),
            format!(
                "nodes: {}",
                spec.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let layers = project.layers_for(&node.role)?;
    let merged = crate::layer::merge(&layers)?;
    let mut own = BTreeMap::new();
    for d in &merged.secrets {
        let v = secrets.get(&d.name).ok_or_else(|| {
            Error::invalid(
                format!(
                    "the cluster's secrets lack `{}` (role {})",
                    d.name, node.role
                ),
                "the secrets file is older than the roles: add it with `ncimage secrets init --spec S --add-missing`",
            )
        })?;
        own.insert(d.name.clone(), v.clone());
    }
    let rk = crate::secrets::recovery_name(&node.name);
    let recovery = secrets.get(&rk).ok_or_else(|| {
        Error::invalid(
            format!("the cluster's secrets lack `{rk}` (the recovery key of {})", node.name),
            "the secrets file is older than this node or than per-node recovery keys: make a new one with `ncimage secrets init`",
        )
    })?;
    own.insert(crate::rekey::RECOVERY_SECRET.to_string(), recovery.clone());
    Ok(NodeConfig {
        node: Node {
            name: node.name.clone(),
            role: node.role.clone(),
            address: node.address.clone(),
            network: c.network.clone(),
            gateway: c.gateway.clone(),
            mac,
            vars: node_vars(spec, node, &merged)?,
        },
        secrets: own,
        cluster: topology(spec),
        encryption: crate::rekey::NodeEncryption {
            policy: spec.unlock_policy(&node.role, node.encryption.as_ref()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain() {
        let n = Net::parse("10.20.0.0/24").unwrap();
        assert!(n.contains("10.20.0.7".parse().unwrap()));
        assert!(!n.contains("10.20.1.7".parse().unwrap()));
        assert_eq!(n.broadcast(), "10.20.0.255".parse::<Ipv4Addr>().unwrap());
        assert!(Net::parse("10.20.0.1/24").is_none(), "host bits set");
        assert!(Net::parse("10.20.0.0").is_none());
        assert!(Net::parse("10.20.0.0/33").is_none());
    }

    const LAB: &str = include_str!("../../image-specs/lab.toml");

    fn project() -> Project {
        Project::locate(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.."
        ))))
        .unwrap()
    }

    fn lab() -> Spec {
        Spec::parse("lab.toml", LAB).unwrap()
    }

    /// The lab spec with one text replacement; the error it gives.
    fn err(from: &str, to: &str) -> String {
        assert!(LAB.contains(from), "{from}");
        let text = LAB.replacen(from, to, 1);
        match Spec::parse("lab.toml", &text).and_then(|s| check_roles(&s, &project())) {
            Err(e) => format!("{e} | {}", help(&e)),
            Ok(_) => panic!("accepted: {from} -> {to}"),
        }
    }

    fn help(e: &Error) -> String {
        match e {
            Error::Invalid { help, .. } => help.clone(),
            _ => String::new(),
        }
    }

    #[test]
    fn lab_and_pilot_specs_are_valid_clusters() {
        check_roles(&lab(), &project()).unwrap();
        let pilot =
            Spec::parse("pilot.toml", include_str!("../../image-specs/pilot.toml")).unwrap();
        check_roles(&pilot, &project()).unwrap();
        assert_eq!(pilot.nodes.len(), lab().nodes.len());
    }

    #[test]
    fn bad_cluster_specs_are_clear_errors() {
        let e = err("name = \"app-2\"", "name = \"app-1\"");
        assert!(
            e.contains("two nodes are named `app-1`") && e.starts_with("lab.toml:"),
            "{e}"
        );
        let e = err("address = \"10.77.0.22\"", "address = \"10.77.0.21\"");
        assert!(e.contains("same address 10.77.0.21"), "{e}");
        let e = err("address = \"10.77.0.22\"", "address = \"10.78.0.22\"");
        assert!(
            e.contains("outside the private network 10.77.0.0/24"),
            "{e}"
        );
        let e = err("address = \"10.77.0.22\"", "address = \"10.77.0.255\"");
        assert!(e.contains("broadcast"), "{e}");
        let e = err("role = \"redis\"", "role = \"memcached\"");
        assert!(
            e.contains("unknown role `memcached`") && e.contains("known roles:"),
            "{e}"
        );
        let e = err(
            "name = \"db-2\"\nrole = \"db\"",
            "name = \"db-2\"\nrole = \"app\"",
        );
        assert!(
            e.contains("1 `db` node(s)") && e.contains("exactly 2"),
            "{e}"
        );
        let e = err("network = \"10.77.0.0/24\"", "network = \"10.77.0.1/24\"");
        assert!(e.contains("is not an IPv4 network"), "{e}");
        let e = err("provider = \"none\"", "provider = \"ovh\"");
        assert!(e.contains("provider `ovh` is not known"), "{e}");
        let e = err("provider = \"none\"", "provider = \"hetzner\"");
        assert!(e.contains("needs the floating IP's id"), "{e}");
        let e = err("provider = \"none\"", "provider = \"aws\"");
        assert!(e.contains("allocation id"), "{e}");
        let e = err("[cluster.floating_ip]\naddress = \"10.77.0.10\"\n# No provider in a lab: the address moves by VRRP alone.\nprovider = \"none\"\n", "");
        assert!(
            e.contains("the `lb` role needs [cluster.floating_ip]"),
            "{e}"
        );
        let e = err("name = \"app-2\"", "name = \"App_2\"");
        assert!(e.contains("not a host name"), "{e}");
    }

    #[test]
    fn node_vars_come_from_the_topology() {
        let spec = lab();
        let p = project();
        let secrets: BTreeMap<String, String> = crate::secrets::cluster_decls(&spec, &p)
            .unwrap()
            .into_iter()
            .map(|d| (d.name.clone(), format!("value-of-{}", d.name)))
            .chain(spec.nodes.iter().map(|n| {
                (
                    crate::secrets::recovery_name(&n.name),
                    format!("recovery-of-{}", n.name),
                )
            }))
            .collect();
        let cfg = |n: &str| node_config(&spec, &p, n, &secrets, None).unwrap();
        let app1 = cfg("app-1");
        assert_eq!(app1.node.vars["run_cron"], true);
        assert_eq!(cfg("app-2").node.vars["run_cron"], false);
        assert_eq!(app1.node.vars["db_host"], "10.77.0.31");
        assert_eq!(app1.node.vars["nfs_server"], "10.77.0.41");
        assert_eq!(
            app1.node.vars["lb_addresses"],
            serde_json::json!(["10.77.0.11", "10.77.0.12"])
        );
        let lb2 = cfg("lb-2");
        assert_eq!(lb2.node.vars["lb_peers"], serde_json::json!(["10.77.0.11"]));
        assert_eq!(
            lb2.node.vars["app_servers"],
            serde_json::json!(["10.77.0.21", "10.77.0.22"])
        );
        assert_eq!(lb2.node.vars["vrrp_priority"], 100);
        assert_eq!(cfg("lb-1").node.vars["vrrp_priority"], 150);
        assert!(
            !lb2.node.vars.contains_key("floating_ip_id"),
            "empty values are left out"
        );
        assert_eq!(cfg("db-1").node.vars["db_replica"], false);
        assert_eq!(cfg("db-2").node.vars["db_replica"], true);
        assert_eq!(cfg("db-2").node.vars["server_id"], 2);
        assert_eq!(cfg("nfs-1").node.vars["nfs_secondary"], "10.77.0.42");
        assert!(!cfg("nfs-2").node.vars.contains_key("nfs_secondary"));
        assert_eq!(cfg("backup-1").node.vars["db_replica"], "10.77.0.32");
        assert_eq!(cfg("backup-1").node.vars["mail_relay"], "10.77.0.5");
        assert_eq!(app1.cluster["roles"]["db"][1]["name"], "db-2");
    }

    #[test]
    fn a_seed_carries_only_its_roles_secrets() {
        let spec = lab();
        let p = project();
        let secrets: BTreeMap<String, String> = crate::secrets::cluster_decls(&spec, &p)
            .unwrap()
            .into_iter()
            .map(|d| (d.name.clone(), format!("value-of-{}", d.name)))
            .chain(spec.nodes.iter().map(|n| {
                (
                    crate::secrets::recovery_name(&n.name),
                    format!("recovery-of-{}", n.name),
                )
            }))
            .collect();
        let app = node_config(&spec, &p, "app-1", &secrets, None).unwrap();
        let seed = crate::seed::nocloud(&app, "i", &[]);
        let text = serde_json::to_string(&app).unwrap() + &seed.user_data;
        for other in [
            "db_replication_password",
            "vrrp_password",
            "floating_ip_token",
            "backup_ssh_key",
            "tls_pem",
            "redis_cache_password",
        ] {
            assert!(!app.secrets.contains_key(other), "app receives {other}");
            assert!(
                !text.contains(&format!("value-of-{other}")),
                "app seed holds {other}"
            );
        }
        assert_eq!(
            app.secrets["redis_sessions_password"],
            "value-of-redis_sessions_password"
        );
        // Its own recovery key, no other node's; its role's unlock policy.
        assert_eq!(
            app.secrets[crate::rekey::RECOVERY_SECRET],
            "recovery-of-app-1"
        );
        assert!(!text.contains("recovery-of-app-2") && !text.contains("recovery-of-db-1"));
        assert_eq!(app.encryption.policy, spec.unlock_policy("app", None));
        let mut no_key = secrets.clone();
        no_key.remove(&crate::secrets::recovery_name("app-1"));
        let e = node_config(&spec, &p, "app-1", &no_key, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("luks-recovery:app-1"), "{e}");
        let db = node_config(&spec, &p, "db-2", &secrets, None).unwrap();
        assert!(db.secrets.contains_key("db_replication_password"));
        assert!(!db.secrets.contains_key("nextcloud_secret"));
        let missing = node_config(&spec, &p, "app-9", &secrets, None).unwrap_err();
        assert!(
            missing.to_string().contains("no node named `app-9`"),
            "{missing}"
        );
    }

    #[test]
    fn lab_boots_what_others_wait_for_first() {
        let spec = lab();
        let order: Vec<&str> = boot_order(&spec, &project())
            .unwrap()
            .into_iter()
            .map(|i| spec.nodes[i].name.as_str())
            .collect();
        let pos = |n: &str| order.iter().position(|x| *x == n).unwrap();
        assert_eq!(order.len(), spec.nodes.len());
        for dep in ["db-1", "db-2", "nfs-1", "nfs-2", "redis-1"] {
            assert!(pos(dep) < pos("app-1"), "{order:?}");
        }
        assert!(pos("db-1") < pos("db-2"), "spec order within a role");
        assert!(pos("app-2") < pos("lb-1"), "{order:?}");
        assert_eq!(*order.last().unwrap(), "lb-2", "{order:?}");
    }

    /// A copy of the project whose `role`'s role.toml gets `line` in its `[cluster]` table.
    fn project_with(role: &str, line: &str) -> (tempfile::TempDir, Project) {
        let d = tempfile::tempdir().unwrap();
        let root = project().root.clone();
        for sub in ["roles", "overlays"] {
            let st = std::process::Command::new("cp")
                .arg("-r")
                .arg(root.join(sub))
                .arg(d.path())
                .status()
                .unwrap();
            assert!(st.success());
        }
        let p = d.path().join("roles").join(role).join("role.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\n[cluster]\n"), "{role}");
        std::fs::write(
            &p,
            text.replacen("\n[cluster]\n", &format!("\n[cluster]\n{line}\n"), 1),
        )
        .unwrap();
        let pr = Project::locate(Some(d.path())).unwrap();
        (d, pr)
    }

    #[test]
    fn boot_order_errors_name_the_role_file() {
        let (_d, p) = project_with("redis", "joins_after = [\"app\"]");
        let e = boot_order(&lab(), &p).unwrap_err().to_string();
        assert!(
            e.contains("joins_after makes a cycle")
                && (e.contains("app → redis → app") || e.contains("redis → app → redis")),
            "{e}"
        );
        let (_d, p) = project_with("redis", "joins_after = [\"memcached\"]");
        let e = boot_order(&lab(), &p).unwrap_err();
        assert!(
            e.to_string()
                .contains("roles/redis/role.toml: [cluster] joins_after names `memcached`"),
            "{e}"
        );
    }

    #[test]
    fn host_names() {
        assert!(valid_name("app-2"));
        assert!(!valid_name("App_2"));
        assert!(!valid_name("-x"));
        assert!(!valid_name(""));
    }
}
