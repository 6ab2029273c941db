//! Joining the cluster, in the guest: `ncimage join` runs the role's join steps (roles/<role>/
//! join/*.sh, installed under /usr/share/ncimage/join/<layer>/) in order after first boot. A
//! step waits for what it needs (with a timeout and a message), does its part (seed a replica,
//! install Nextcloud on the first app server, ...) and is idempotent: every boot runs the steps
//! again and a step that finds its work done returns at once. A node without a cluster (booted
//! alone by `ncimage test`) has nothing to join.
//!
//! Progress goes to /run/ncimage/join.json; `ncimage status` prints it as one line, and the
//! outcome is printed on the serial console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::firstboot::Paths;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Joining,
    Joined,
    Failed,
    /// No cluster in the seed: nothing to join.
    Alone,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub role: String,
    pub cluster: Option<String>,
    pub state: State,
    /// The step running, or the one that failed.
    pub step: Option<String>,
    pub message: String,
    pub steps_done: usize,
    pub steps: usize,
    pub seconds: f64,
}

impl Status {
    pub fn line(&self) -> String {
        let what = match self.state {
            State::Joining => format!(
                "joining ({}/{}: {})",
                self.steps_done,
                self.steps,
                self.step.as_deref().unwrap_or("")
            ),
            State::Joined => format!("joined in {:.0} s", self.seconds),
            State::Failed => format!(
                "join failed at {}: {}",
                self.step.as_deref().unwrap_or("?"),
                self.message
            ),
            State::Alone => "alone (no cluster in the seed)".into(),
        };
        format!(
            "ncimage: {} ({}) of {}: {what}",
            self.node,
            self.role,
            self.cluster.as_deref().unwrap_or("-")
        )
    }
}

pub fn status_path(root: &Path) -> PathBuf {
    root.join("run/ncimage/join.json")
}

fn write_status(root: &Path, s: &Status) -> Result<()> {
    let p = status_path(root);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(Error::io("creating", d))?;
    }
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s).expect("serialisable"))
        .map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, &p).map_err(Error::io("writing", &p))
}

/// Runs the join steps of this node. Each step's output goes to the journal (inherited
/// stdout/stderr); its last line of stderr becomes the failure message. `progress` gets the
/// status line as each step starts (the CLI prints it on the serial console, where `ncimage lab
/// up` reads it without running anything in the guest).
pub fn run(p: &Paths, progress: &dyn Fn(&str)) -> Result<Status> {
    let (info, node) = crate::firstboot::load(p)?;
    let cluster = node.cluster["name"].as_str().map(str::to_string);
    let t = Instant::now();
    let mut s = Status {
        node: node.node.name.clone(),
        role: node.node.role.clone(),
        cluster: cluster.clone(),
        state: State::Joining,
        step: None,
        message: String::new(),
        steps_done: 0,
        steps: info.join.len(),
        seconds: 0.0,
    };
    if cluster.is_none() {
        s.state = State::Alone;
        write_status(&p.root, &s)?;
        return Ok(s);
    }
    for step in &info.join {
        let name = step
            .trim_start_matches('/')
            .trim_start_matches(crate::overlay::JOIN_DIR)
            .trim_start_matches('/')
            .to_string();
        s.step = Some(name.clone());
        s.seconds = t.elapsed().as_secs_f64();
        write_status(&p.root, &s)?;
        progress(&s.line());
        let out = Command::new("bash")
            .arg(p.root.join(step.trim_start_matches('/')))
            .env("NCIMAGE_NODE", &p.node)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(Error::io("running", step))?;
        let err = String::from_utf8_lossy(&out.stderr);
        eprint!("{err}");
        if !out.status.success() {
            s.state = State::Failed;
            s.message = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(no message)")
                .trim()
                .to_string();
            s.seconds = t.elapsed().as_secs_f64();
            write_status(&p.root, &s)?;
            return Ok(s);
        }
        s.steps_done += 1;
    }
    s.state = State::Joined;
    s.step = None;
    s.seconds = t.elapsed().as_secs_f64();
    write_status(&p.root, &s)?;
    Ok(s)
}

/// The status as the last `ncimage join` left it.
pub fn status(root: &Path) -> Result<Status> {
    let p = status_path(root);
    let text = std::fs::read_to_string(&p).map_err(|e| {
        Error::invalid(
            format!("no join status ({}: {e})", p.display()),
            "the join has not started yet: see `systemctl status ncimage-join.service`",
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{}: {e}", p.display()), "run `ncimage join` again"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(steps: &[(&str, &str)], cluster: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc/ncimage")).unwrap();
        let mut join = Vec::new();
        for (name, body) in steps {
            let p = format!("/usr/share/ncimage/join/r/{name}");
            std::fs::create_dir_all(root.join("usr/share/ncimage/join/r")).unwrap();
            std::fs::write(root.join(p.trim_start_matches('/')), body).unwrap();
            join.push(p);
        }
        let info = serde_json::json!({
            "role": "r", "spec": "s", "layers": ["r"], "firewall": {}, "secrets": [],
            "firstboot": [], "join": join, "reload_after_firstboot": [], "ncimage_version": "0"
        });
        std::fs::write(root.join("etc/ncimage/image.json"), info.to_string()).unwrap();
        let node = serde_json::json!({
            "node": {"name": "n-1", "role": "r", "address": "10.0.0.2", "network": "10.0.0.0/24"},
            "secrets": {},
            "cluster": if cluster { serde_json::json!({"name": "lab"}) } else { serde_json::Value::Null },
        });
        std::fs::write(root.join("etc/ncimage/node.json"), node.to_string()).unwrap();
        d
    }

    #[test]
    fn steps_run_in_order_and_report() {
        let d = setup(
            &[
                ("10-a.sh", "echo a >> \"$(dirname \"$NCIMAGE_NODE\")/log\""),
                ("20-b.sh", "echo b >> \"$(dirname \"$NCIMAGE_NODE\")/log\""),
            ],
            true,
        );
        let s = run(&Paths::under(d.path()), &|_| {}).unwrap();
        assert_eq!(s.state, State::Joined);
        assert_eq!(s.steps_done, 2);
        assert_eq!(
            std::fs::read_to_string(d.path().join("etc/ncimage/log")).unwrap(),
            "a\nb\n"
        );
        assert!(status(d.path())
            .unwrap()
            .line()
            .contains("n-1 (r) of lab: joined"));
    }

    #[test]
    fn a_failing_step_stops_the_join_with_its_message() {
        let d = setup(
            &[
                ("10-a.sh", "echo 'waited 300 s for db-1:3306' >&2; exit 1"),
                ("20-b.sh", "touch /nonexistent-should-not-run"),
            ],
            true,
        );
        let s = run(&Paths::under(d.path()), &|_| {}).unwrap();
        assert_eq!(s.state, State::Failed);
        assert_eq!(s.steps_done, 0);
        assert!(
            s.line()
                .contains("join failed at r/10-a.sh: waited 300 s for db-1:3306"),
            "{}",
            s.line()
        );
    }

    #[test]
    fn a_node_alone_has_nothing_to_join() {
        let d = setup(&[("10-a.sh", "exit 1")], false);
        assert_eq!(
            run(&Paths::under(d.path()), &|_| {}).unwrap().state,
            State::Alone
        );
    }
}
