//! Host tools: presence checks that name the Debian package, and a runner that captures
//! output so a failure reports the command and what it printed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Host programs the builder and the test harness call, with the package that ships each.
pub const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    (
        "mke2fs",
        "e2fsprogs (from bookworm-backports, 1.47.2 or later)",
    ),
    ("dumpe2fs", "e2fsprogs"),
    ("cryptsetup", "cryptsetup-bin"),
    ("swtpm", "swtpm"),
    ("sgdisk", "gdisk"),
    (
        "grub-mkimage",
        "grub-common, grub-pc-bin and grub-efi-amd64-bin (bookworm-backports)",
    ),
    ("qemu-img", "qemu-utils (bookworm-backports)"),
    ("qemu-system-x86_64", "qemu-system-x86 (bookworm-backports)"),
    ("openssl", "openssl"),
    ("ssh-keygen", "openssh-client"),
    ("gpg", "gpg"),
    ("xorriso", "xorriso"),
];

/// Finds `tool` on PATH or fails naming the package that provides it.
pub fn require(tool: &str) -> Result<PathBuf> {
    if let Some(p) = which(tool) {
        return Ok(p);
    }
    let package = TOOLS
        .iter()
        .find(|(t, _)| *t == tool)
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| tool.to_string());
    Err(Error::MissingTool {
        tool: tool.to_string(),
        package,
    })
}

/// Fails on the first missing tool of `tools`.
pub fn require_all(tools: &[&str]) -> Result<()> {
    for t in tools {
        require(t)?;
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a command to completion; on failure the error carries the command line and its output.
pub fn run(cmd: &mut Command) -> Result<String> {
    run_with_stdin(cmd, Stdio::null())
}

/// [`run`] with `stdin` as the command's standard input (a file holding a key, say: never a
/// command-line argument).
pub fn run_with_stdin(cmd: &mut Command, stdin: Stdio) -> Result<String> {
    let shown = show(cmd);
    tracing::debug!(command = %shown, "run");
    let out = cmd.stdin(stdin).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            let prog = cmd.get_program().to_string_lossy().to_string();
            require(&prog)
                .err()
                .unwrap_or(Error::Vm(format!("{prog}: {e}")))
        }
        _ => Error::Command {
            command: shown.clone(),
            status: e.to_string(),
            output: String::new(),
        },
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).to_string();
        if output.trim().is_empty() {
            output = stdout.clone();
        }
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            output: tail(&output, 40),
        });
    }
    Ok(stdout)
}

/// A command line for messages (arguments that look like secrets are never passed on a
/// command line by this crate, so printing them is safe).
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_package() {
        match require("definitely-not-a-tool-ncimage") {
            Err(Error::MissingTool { tool, package }) => {
                assert_eq!(tool, "definitely-not-a-tool-ncimage");
                assert_eq!(package, "definitely-not-a-tool-ncimage");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn failing_command_reports_output() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("boom") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }
}
