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
    std::fs::write(d.path().join("t.toml"), "[luks]\nkey_bits = \"lots\"\n").unwrap();
    fails_with(
        &ncimage(&["build", "--role", "redis", "--spec", "t.toml"], d.path()),
        &["t.toml:2:12", "invalid type"],
    );
    // A spec from before keyslots used PBKDF2: the removed key is named, with why and what to do.
    std::fs::write(
        d.path().join("o.toml"),
        "[luks]\ncipher = \"aes-xts-plain64\"\npbkdf_memory_kib = 65536\n",
    )
    .unwrap();
    fails_with(
        &ncimage(&["build", "--role", "redis", "--spec", "o.toml"], d.path()),
        &[
            "o.toml:3:1",
            "`pbkdf_memory_kib`: [luks] pbkdf settings are gone",
            "PBKDF2 with 1000 iterations",
            "remove pbkdf, pbkdf_memory_kib, pbkdf_iterations and pbkdf_parallel from [luks]",
        ],
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

/// A copy of the project's layers to break on purpose.
fn project_copy(dir: &Path) -> std::path::PathBuf {
    let proj = dir.join("project");
    std::fs::create_dir_all(&proj).unwrap();
    for sub in ["roles", "overlays"] {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(sub))
            .arg(&proj)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    proj
}

#[test]
fn a_role_folder_with_a_missing_template() {
    let d = tempfile::tempdir().unwrap();
    let proj = project_copy(d.path());
    std::fs::remove_file(
        proj.join("roles/app/firstboot/etc/php/8.4/fpm/pool.d/nextcloud.conf.tera"),
    )
    .unwrap();
    for args in [
        &["build", "--role", "app", "--out", "out"][..],
        &["render", "--role", "app"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ncimage"))
            .args(args)
            .current_dir(d.path())
            .env("NCIMAGE_PROJECT", &proj)
            .env("NCIMAGE_CACHE", d.path().join("cache"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        fails_with(
            &out,
            &[
                "roles/app/role.toml",
                "/etc/php/8.4/fpm/pool.d/nextcloud.conf",
                "is missing",
            ],
        );
    }
    no_artifacts(d.path());
}

#[test]
fn a_role_whose_archive_the_spec_does_not_give() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("spec.toml"), "name = \"no-archives\"\n").unwrap();
    let out = ncimage(
        &[
            "build",
            "--role",
            "app",
            "--spec",
            "spec.toml",
            "--out",
            "out",
        ],
        d.path(),
    );
    fails_with(
        &out,
        &[
            "roles/app/role.toml",
            "needs the archive `nextcloud`",
            "[archives.nextcloud]",
        ],
    );
    no_artifacts(d.path());
}

#[test]
fn a_wrong_archive_checksum_stops_the_build() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("image.tar"), b"not the pinned bytes").unwrap();
    std::fs::write(
        d.path().join("spec.toml"),
        format!(
            "name = \"x\"\n[archives.collabora-image]\npath = \"image.tar\"\nsha256 = \"{}\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let out = ncimage(
        &[
            "build",
            "--role",
            "collabora",
            "--spec",
            "spec.toml",
            "--out",
            "out",
        ],
        d.path(),
    );
    fails_with(
        &out,
        &[
            "[archives.collabora-image]",
            "image.tar",
            &format!("the spec pins {}", "ab".repeat(32)),
        ],
    );
    no_artifacts(d.path());
    let cached: Vec<_> = std::fs::read_dir(d.path().join("cache/archives"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached.is_empty(),
        "unverified bytes kept in the cache: {cached:?}"
    );
}

#[test]
fn a_misspelt_archive_name_in_the_spec() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("spec.toml"),
        format!(
            "[archives.nextclod]\npath = \"x\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let out = ncimage(
        &[
            "build",
            "--role",
            "redis",
            "--spec",
            "spec.toml",
            "--out",
            "out",
        ],
        d.path(),
    );
    fails_with(
        &out,
        &[
            "[archives.nextclod] is not an archive any role declares",
            "nextcloud",
        ],
    );
    no_artifacts(d.path());
}

fn lab_spec() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../image-specs/lab.toml").to_string()
}

#[test]
fn secrets_init_is_private_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let spec = lab_spec();
    let out = ncimage(
        &["secrets", "init", "--spec", &spec, "--out", "s/lab.toml"],
        d.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = d.path().join("s/lab.toml");
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&f).unwrap();
    let again = ncimage(
        &["secrets", "init", "--spec", &spec, "--out", "s/lab.toml"],
        d.path(),
    );
    fails_with(&again, &["exists: refusing to overwrite"]);
    assert_eq!(std::fs::read(&f).unwrap(), before);
    // A seed needs the secrets file private.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let seed = ncimage(
        &[
            "seed",
            "--spec",
            &spec,
            "--secrets",
            "s/lab.toml",
            "--node",
            "app-1",
        ],
        d.path(),
    );
    fails_with(&seed, &["readable by others", "chmod 600"]);
}

#[test]
fn seeds_carry_the_node_and_only_its_roles_secrets() {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let spec = lab_spec();
    assert!(ncimage(
        &["secrets", "init", "--spec", &spec, "--out", "s.toml"],
        d.path()
    )
    .status
    .success());
    let secrets: toml::Value =
        toml::from_str(&std::fs::read_to_string(d.path().join("s.toml")).unwrap()).unwrap();
    let value = |k: &str| secrets["secrets"][k].as_str().unwrap().to_string();
    let out = ncimage(
        &[
            "seed",
            "--spec",
            &spec,
            "--secrets",
            "s.toml",
            "--node",
            "app-2",
            "--format",
            "user-data",
            "--out",
            "app-2.ud",
        ],
        d.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ud = std::fs::read_to_string(d.path().join("app-2.ud")).unwrap();
    assert!(ud.starts_with("#cloud-config\n"));
    let b64 = ud
        .split("content: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let node: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(node["node"]["name"], "app-2");
    assert_eq!(node["node"]["vars"]["db_host"], "10.77.0.31");
    assert_eq!(
        node["secrets"]["redis_sessions_password"],
        value("redis_sessions_password").as_str()
    );
    for other in ["db_replication_password", "vrrp_password", "backup_ssh_key"] {
        assert!(node["secrets"].get(other).is_none(), "app seed has {other}");
        assert!(
            !ud.contains(&value(other)),
            "app seed holds {other}'s value"
        );
    }
    let out = ncimage(
        &[
            "seed",
            "--spec",
            &spec,
            "--secrets",
            "s.toml",
            "--node",
            "db-2",
            "--mac",
            "52:54:00:aa:bb:02",
        ],
        d.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = d.path().join("db-2.seed.img");
    assert_eq!(
        std::fs::metadata(&img).unwrap().permissions().mode() & 0o777,
        0o600
    );
    fails_with(
        &ncimage(
            &[
                "seed",
                "--spec",
                &spec,
                "--secrets",
                "s.toml",
                "--node",
                "web-1",
            ],
            d.path(),
        ),
        &["no node named `web-1`", "app-1"],
    );
}

#[test]
fn a_bad_unlock_policy_is_refused_with_where_and_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("enc.toml"),
        "[encryption]\ntpm2 = true\nthreshold = 2\n",
    )
    .unwrap();
    let out = ncimage(
        &["build", "--role", "redis", "--spec", "enc.toml"],
        d.path(),
    );
    fails_with(
        &out,
        &[
            "enc.toml",
            "[encryption]",
            "threshold = 2",
            "set threshold between 1 and 1",
        ],
    );
    no_artifacts(d.path());
    std::fs::write(
        d.path().join("enc2.toml"),
        "[roles.db.encryption]\ntang = [{ url = \"10.0.0.5:7500\" }]\n",
    )
    .unwrap();
    let out = ncimage(
        &["build", "--role", "redis", "--spec", "enc2.toml"],
        d.path(),
    );
    fails_with(&out, &["[roles.db.encryption]", "not an http(s) URL"]);
    std::fs::write(
        d.path().join("enc3.toml"),
        "[encryption]\non_missing_tpm2 = \"maybe\"\n",
    )
    .unwrap();
    let out = ncimage(
        &["build", "--role", "redis", "--spec", "enc3.toml"],
        d.path(),
    );
    fails_with(&out, &["enc3.toml:2:"]);
}

#[test]
fn inspect_refuses_what_is_not_an_image() {
    let d = tempfile::tempdir().unwrap();
    let out = ncimage(&["inspect", "nothing.qcow2"], d.path());
    fails_with(&out, &["nothing.qcow2 does not exist"]);
    std::fs::write(d.path().join("junk.raw"), vec![0u8; 64 << 10]).unwrap();
    let out = ncimage(&["inspect", "junk.raw"], d.path());
    fails_with(&out, &["not a GPT disk"]);
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let out = ncimage(&["inspect", "empty"], d.path());
    fails_with(&out, &["holds no ncimage-*.qcow2 or .raw"]);
}

#[test]
fn an_unknown_format_is_named_with_the_known_ones() {
    let d = tempfile::tempdir().unwrap();
    fails_with(
        &ncimage(
            &["build", "--role", "redis", "--format", "qcow2,vdi"],
            d.path(),
        ),
        &["unknown format `vdi`", "qcow2, raw, vhd, vmdk, gce"],
    );
    no_artifacts(d.path());
    std::fs::create_dir(d.path().join("img")).unwrap();
    fails_with(
        &ncimage(&["export", "img", "--format", "ova"], d.path()),
        &["unknown format `ova`"],
    );
    fails_with(&ncimage(&["export", "img"], d.path()), &["--format"]);
    std::fs::write(d.path().join("s.toml"), "[image]\nformats = [\"vdi\"]\n").unwrap();
    fails_with(
        &ncimage(&["build", "--role", "redis", "--spec", "s.toml"], d.path()),
        &["s.toml:2:", "vdi"],
    );
}

/// A folder shaped like `ncimage build`'s output for role `t`: a small raw disk (data and
/// holes), its manifest and SHA256SUMS. Returns the raw's sha256.
fn fake_output(dir: &Path) -> String {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).unwrap();
    let raw = dir.join("ncimage-t.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(b"ncimage test disk", 1 << 20).unwrap();
    let sha = String::from_utf8(Command::new("sha256sum").arg(&raw).output().unwrap().stdout)
        .unwrap()[..64]
        .to_string();
    let manifest = serde_json::json!({
        "role": "t",
        "artifacts": [{"file": "ncimage-t.raw", "format": "raw", "size_bytes": 4 << 20,
                       "allocated_bytes": 4096, "sha256": sha}],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), format!("{sha}  ncimage-t.raw\n")).unwrap();
    sha
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn export_of_a_folder_that_is_not_an_ncimage_output() {
    let d = tempfile::tempdir().unwrap();
    fails_with(
        &ncimage(&["export", "nowhere", "--format", "vhd"], d.path()),
        &["nowhere is not an ncimage output folder: no such folder"],
    );
    std::fs::create_dir(d.path().join("empty")).unwrap();
    fails_with(
        &ncimage(&["export", "empty", "--format", "vhd"], d.path()),
        &[
            "empty is not an ncimage output folder: it has no manifest.json",
            "out/redis",
        ],
    );
    std::fs::write(d.path().join("empty/manifest.json"), "{ not json").unwrap();
    fails_with(
        &ncimage(&["export", "empty", "--format", "vhd"], d.path()),
        &["manifest.json is not JSON"],
    );
    std::fs::write(d.path().join("empty/manifest.json"), "{\"role\": \"t\"}").unwrap();
    fails_with(
        &ncimage(&["export", "empty", "--format", "vhd"], d.path()),
        &["no valid artifacts list"],
    );
    // Only a VHD: nothing to export from.
    std::fs::write(
        d.path().join("empty/manifest.json"),
        r#"{"role": "t", "artifacts": [{"file": "ncimage-t.vhd", "format": "vhd", "size_bytes": 1, "allocated_bytes": 1, "sha256": "00"}]}"#,
    )
    .unwrap();
    fails_with(
        &ncimage(&["export", "empty", "--format", "gce"], d.path()),
        &["neither a raw nor a qcow2 disk", "rebuild the image"],
    );
    // Nothing was written beside the folder.
    assert!(!entries(d.path()).iter().any(|e| e.starts_with('.')));
}

#[test]
fn export_refuses_a_disk_changed_after_the_build_and_leaves_the_folder_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("out/t");
    fake_output(&img);
    let before = entries(&img);
    let manifest = std::fs::read(img.join("manifest.json")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(img.join("ncimage-t.raw"))
            .unwrap();
        f.write_all_at(b"tampered", 2 << 20).unwrap();
    }
    fails_with(
        &ncimage(&["export", "out/t", "--format", "vhd"], d.path()),
        &[
            "ncimage-t.raw: its sha256 differs from manifest.json",
            "rebuild",
        ],
    );
    assert_eq!(entries(&img), before);
    assert_eq!(std::fs::read(img.join("manifest.json")).unwrap(), manifest);
    assert_eq!(entries(&d.path().join("out")), ["t"]);
    std::fs::remove_file(img.join("ncimage-t.raw")).unwrap();
    fails_with(
        &ncimage(&["export", "out/t", "--format", "vhd"], d.path()),
        &["the manifest lists ncimage-t.raw but the file is missing"],
    );
}

#[test]
fn export_adds_formats_to_the_manifest_and_sha256sums() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("out/t");
    let raw_sha = fake_output(&img);
    let out = ncimage(&["export", "out/t", "--format", "vhd,qcow2"], d.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        entries(&img),
        [
            "SHA256SUMS",
            "manifest.json",
            "ncimage-t.qcow2",
            "ncimage-t.raw",
            "ncimage-t.vhd"
        ]
    );
    // Nothing left beside the folder (the temporary one was renamed into place).
    assert_eq!(entries(&d.path().join("out")), ["t"]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("manifest.json")).unwrap()).unwrap();
    let arts = m["artifacts"].as_array().unwrap();
    let formats: Vec<&str> = arts.iter().map(|a| a["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["qcow2", "raw", "vhd"]);
    assert_eq!(arts[1]["sha256"], raw_sha.as_str(), "raw untouched");
    let vhd = arts.iter().find(|a| a["format"] == "vhd").unwrap();
    assert_eq!(vhd["size_bytes"], (4 << 20) + 512);
    assert_eq!(vhd["disk_bytes"], 4 << 20);
    let sums = std::fs::read_to_string(img.join("SHA256SUMS")).unwrap();
    for f in [
        "ncimage-t.qcow2",
        "ncimage-t.raw",
        "ncimage-t.vhd",
        "manifest.json",
    ] {
        assert!(sums.contains(&format!("  {f}\n")), "{sums}");
    }
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn a_malformed_cloud_toml_is_located_before_any_bootstrap() {
    let d = tempfile::tempdir().unwrap();
    let proj = project_copy(d.path());
    std::fs::write(
        proj.join("overlays/base/cloud.toml"),
        "datasources = [\"NoCloud\"]\n[drivers.nvme]\ninitramfs = [\"nvme\"]\nmodules = [\"x\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ncimage"))
        .args(["build", "--role", "redis", "--out", "out/redis"])
        .current_dir(d.path())
        .env("NCIMAGE_PROJECT", &proj)
        .env("NCIMAGE_CACHE", d.path().join("cache"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    fails_with(
        &out,
        &[
            "overlays/base/cloud.toml:4:1",
            "modules",
            "initramfs, kernel",
        ],
    );
    assert!(
        !d.path().join("cache/rootfs").exists(),
        "bootstrapped before the check"
    );
    no_artifacts(d.path());
}
