//! Bad input through the real binary: each gets a clear error, a failing exit, and no artifact.

use std::path::Path;
use std::process::{Command, Output};

fn ncimage(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ncimage"))
        .args(args)
        .current_dir(dir)
        .env(
            "NCIMAGE_PROJECT",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.."),
        )
        .env("NCIMAGE_CACHE", dir.join("cache"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn no_artifacts(dir: &Path) {
    let out = dir.join("out");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind in out/: {left:?}");
}

#[test]
fn unknown_role_lists_known_roles() {
    let d = tempfile::tempdir().unwrap();
    let out = ncimage(&["build", "--role", "mailserver"], d.path());
    fails_with(
        &out,
        &["unknown role `mailserver`", "known roles:", "redis"],
    );
    no_artifacts(d.path());
}

#[test]
fn malformed_spec_names_file_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("bad.toml"),
        "name = \"x\"\n[image]\nroot_size = \"2G\n",
    )
    .unwrap();
    let out = ncimage(
        &["build", "--role", "redis", "--spec", "bad.toml"],
        d.path(),
    );
    fails_with(&out, &["bad.toml:3:"]);
    no_artifacts(d.path());
}

#[test]
fn wrong_type_and_unknown_key_in_spec() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("t.toml"),
        "[luks]\npbkdf_memory_kib = \"lots\"\n",
    )
    .unwrap();
    fails_with(
        &ncimage(&["build", "--role", "redis", "--spec", "t.toml"], d.path()),
        &["t.toml:2:20", "invalid type"],
    );
    std::fs::write(d.path().join("k.toml"), "[image]\nrootsize = \"2G\"\n").unwrap();
    fails_with(
        &ncimage(&["build", "--role", "redis", "--spec", "k.toml"], d.path()),
        &[
            "k.toml:2:1",
            "unknown field `rootsize`",
            "image-specs/default.toml",
        ],
    );
    fails_with(
        &ncimage(
            &["build", "--role", "redis", "--spec", "missing.toml"],
            d.path(),
        ),
        &["reading the spec", "missing.toml"],
    );
    no_artifacts(d.path());
}

#[test]
fn unwritable_output_folder() {
    let d = tempfile::tempdir().unwrap();
    let out = ncimage(
        &[
            "build",
            "--role",
            "redis",
            "--out",
            "/proc/ncimage-nope/redis",
        ],
        d.path(),
    );
    fails_with(
        &out,
        &["/proc/ncimage-nope", "choose a writable folder with --out"],
    );
}

#[test]
fn missing_host_tool_names_its_package() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ncimage"))
        .args(["build", "--role", "redis"])
        .current_dir(d.path())
        .env("PATH", d.path().join("empty"))
        .env(
            "NCIMAGE_PROJECT",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.."),
        )
        .env("NCIMAGE_CACHE", d.path().join("cache"))
        .output()
        .unwrap();
    fails_with(
        &out,
        &[
            "host tool `mmdebstrap` is missing",
            "install the Debian package `mmdebstrap`",
            "scripts/setup-host",
        ],
    );
    no_artifacts(d.path());
}

#[test]
fn test_without_an_image_says_to_build_it() {
    let d = tempfile::tempdir().unwrap();
    fails_with(
        &ncimage(&["test", "--role", "redis"], d.path()),
        &["no image for role `redis`", "ncimage build --role redis"],
    );
}

#[test]
fn roles_are_listed() {
    let d = tempfile::tempdir().unwrap();
    let out = ncimage(&["roles"], d.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("redis\t")));
}

#[test]
fn build_needs_a_role_or_all() {
    let d = tempfile::tempdir().unwrap();
    fails_with(&ncimage(&["build"], d.path()), &["--role"]);
    fails_with(
        &ncimage(&["build", "--all", "--role", "redis"], d.path()),
        &["cannot be used with"],
    );
    no_artifacts(d.path());
}
