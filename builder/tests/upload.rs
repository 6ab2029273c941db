//! `ncimage upload` through the real binary. S3: against moto's S3 server (installed by
//! scripts/setup-host) started by each test on 127.0.0.1, `#[ignore]` (scripts/test runs them).
//! Clouds: no cloud is reachable from these machines, so each provider's API is a local
//! stand-in on 127.0.0.1 that records every request; the tests compare the recorded requests
//! with the request shapes the provider documents.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ncimage::upload::credentials::AwsCredentials;
use ncimage::upload::s3::Bucket;

const KEY_ID: &str = "AKIDNCIMAGETEST";
const SECRET: &str = "test-secret-never-printed-7f3a";

// ---------------------------------------------------------------------------------------------
// Helpers

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn moto_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NCIMAGE_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("NCIMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ncimage"));
    let p = cache.join("tools/moto/bin/moto_server");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-host (it installs moto's S3 server)",
        p.display()
    );
    p
}

/// moto's server on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn bucket(&self, name: &str) -> Bucket {
        bucket_at(&self.endpoint(), name)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bucket_at(endpoint: &str, name: &str) -> Bucket {
    Bucket::new(
        Some(endpoint),
        name,
        "us-east-1",
        None,
        AwsCredentials::new(KEY_ID.into(), SECRET.into(), None),
    )
    .unwrap()
}

/// A fast deterministic pseudo-random fill (xorshift), so the parts differ.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// An image folder shaped like out/<role>/: one artifact and its manifest.
fn image_dir(root: &Path, file: &str, format: &str, data: &[u8]) -> PathBuf {
    let dir = root.join("img");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), data).unwrap();
    write_manifest(&dir, file, format, data.len() as u64, &sha256_hex(data));
    dir
}

fn write_manifest(dir: &Path, file: &str, format: &str, size: u64, sha: &str) {
    let m = serde_json::json!({
        "role": "testrole",
        "artifacts": [{"file": file, "format": format, "size_bytes": size,
                       "allocated_bytes": size, "sha256": sha}]
    });
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

/// The binary with a clean environment: test credentials only, HOME and caches in `home`.
fn ncimage_cmd(home: &Path, args: &[&str], creds: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ncimage"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("NO_COLOR", "1");
    if creds {
        c.env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET);
    }
    c
}

fn ncimage(home: &Path, args: &[&str]) -> Output {
    ncimage_cmd(home, args, true).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn succeeds(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "failed:\n{t}");
    assert!(!t.contains(SECRET), "the secret key was printed:\n{t}");
    t
}

fn fails_with(o: &Output, needles: &[&str]) -> String {
    let t = text(o);
    assert!(!o.status.success(), "succeeded:\n{t}");
    for n in needles {
        assert!(t.contains(n), "output lacks {n:?}:\n{t}");
    }
    assert!(!t.contains("panicked"), "{t}");
    assert!(!t.contains(SECRET), "the secret key was printed:\n{t}");
    t
}

// ---------------------------------------------------------------------------------------------
// S3 against moto

#[test]
#[ignore]
fn s3_multipart_upload_of_300_mib_is_verified_and_idempotent() {
    let moto = Moto::start();
    moto.bucket("images").create().unwrap();
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(300 << 20, 1);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
    let ep = moto.endpoint();
    let args = [
        "upload",
        dir.to_str().unwrap(),
        "--to",
        "s3://images/builds",
        "--endpoint",
        &ep,
        "--part-size-mib",
        "8",
        "--threads",
        "4",
    ];
    let out = succeeds(&ncimage(d.path(), &args));
    assert!(out.contains("38 parts"), "{out}");
    assert!(out.contains("verified: sha256"), "{out}");
    // The stored object is the file, byte for byte.
    let b = moto.bucket("images");
    let (size, sha) = b.object_sha256("builds/ncimage-testrole.raw").unwrap();
    assert_eq!((size, sha), (data.len() as u64, sha256_hex(&data)));
    let info = b
        .head_object("builds/ncimage-testrole.raw")
        .unwrap()
        .unwrap();
    assert!(info.etag.ends_with("-38"), "{info:?}");
    assert_eq!(info.sha256.as_deref(), Some(sha256_hex(&data).as_str()));
    // Again: nothing to send.
    let again = succeeds(&ncimage(d.path(), &args));
    assert!(again.contains("nothing sent"), "{again}");
    // No resume state is left behind.
    let left: Vec<_> = std::fs::read_dir(d.path().join("cache/ncimage/uploads"))
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
#[ignore]
fn s3_upload_killed_midway_resumes_from_the_parts_on_the_server() {
    let moto = Moto::start();
    let b = moto.bucket("images");
    b.create().unwrap();
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(200 << 20, 2);
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", &data);
    let ep = moto.endpoint();
    let args = [
        "upload",
        dir.to_str().unwrap(),
        "--to",
        "s3://images",
        "--endpoint",
        &ep,
        "--part-size-mib",
        "5",
        "--threads",
        "1",
    ];
    let mut child = ncimage_cmd(d.path(), &args, true)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the server holds a few parts, then kill the upload (SIGKILL: no clean-up).
    let states = d.path().join("cache/ncimage/uploads");
    let t = Instant::now();
    let held = loop {
        assert!(t.elapsed() < Duration::from_secs(120), "no parts appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        let state = std::fs::read_dir(&states)
            .ok()
            .and_then(|mut r| r.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read(e.path()).ok())
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok());
        if let Some(s) = state {
            let id = s["upload_id"].as_str().unwrap().to_string();
            let parts = b
                .list_parts("ncimage-testrole.qcow2", &id)
                .unwrap()
                .unwrap();
            if parts.len() >= 4 {
                child.kill().unwrap();
                child.wait().unwrap();
                break b
                    .list_parts("ncimage-testrole.qcow2", &id)
                    .unwrap()
                    .unwrap()
                    .len();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(b.head_object("ncimage-testrole.qcow2").unwrap().is_none());
    let out = succeeds(&ncimage(d.path(), &args));
    assert!(out.contains("resuming upload"), "{out}");
    assert!(
        out.contains(&format!("the server holds {held} of 40 parts")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "({held} already there from an interrupted upload)"
        )),
        "{out}"
    );
    let (size, sha) = b.object_sha256("ncimage-testrole.qcow2").unwrap();
    assert_eq!((size, sha), (data.len() as u64, sha256_hex(&data)));
}

/// A TCP proxy to `target` that flips one byte, once, 1 MiB into the first connection that
/// carries that much (a part's body): corruption on the way, which TCP's checksum missed.
fn corrupting_proxy(target: u16) -> (u16, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let flipped = Arc::new(AtomicBool::new(false));
    let f = flipped.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut client) = c else { break };
            let mut server = TcpStream::connect(("127.0.0.1", target)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            let f = f.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = 0usize;
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let at = 1 << 20;
                    if seen <= at && at < seen + n && !f.swap(true, Ordering::SeqCst) {
                        buf[at - seen] ^= 0x55;
                    }
                    seen += n;
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, flipped)
}

#[test]
#[ignore]
fn s3_part_corrupted_on_the_way_is_detected_and_sent_again() {
    let moto = Moto::start();
    moto.bucket("images").create().unwrap();
    let (port, flipped) = corrupting_proxy(moto.port);
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(40 << 20, 3);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
    let ep = format!("http://127.0.0.1:{port}");
    let out = succeeds(&ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "s3://images",
            "--endpoint",
            &ep,
            "--part-size-mib",
            "5",
        ],
    ));
    assert!(
        flipped.load(Ordering::SeqCst),
        "the proxy corrupted nothing"
    );
    assert!(out.contains("corrupted on the way"), "{out}");
    assert!(out.contains("sending it again"), "{out}");
    let (_, sha) = moto
        .bucket("images")
        .object_sha256("ncimage-testrole.raw")
        .unwrap();
    assert_eq!(sha, sha256_hex(&data));
}

#[test]
#[ignore]
fn s3_file_that_differs_from_its_manifest_is_not_stored() {
    let moto = Moto::start();
    let b = moto.bucket("images");
    b.create().unwrap();
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(12 << 20, 4);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
    // One byte changes after the build (same size).
    let mut changed = data.clone();
    changed[7 << 20] ^= 1;
    std::fs::write(dir.join("ncimage-testrole.raw"), &changed).unwrap();
    let ep = moto.endpoint();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "s3://images",
            "--endpoint",
            &ep,
        ],
    );
    fails_with(
        &out,
        &[
            "but its manifest says",
            "was aborted and nothing was stored",
            "build or export the image again",
        ],
    );
    assert!(b.head_object("ncimage-testrole.raw").unwrap().is_none());
}

#[test]
#[ignore]
fn s3_bucket_not_found_is_a_clear_error() {
    let moto = Moto::start();
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", b"tiny image");
    let ep = moto.endpoint();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "s3://nosuchbucket",
            "--endpoint",
            &ep,
        ],
    );
    fails_with(
        &out,
        &[
            "bucket `nosuchbucket` does not exist at http://127.0.0.1:",
            "create the bucket first",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input that needs no server

#[test]
fn upload_without_credentials_says_where_they_are_looked_for() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", b"tiny image");
    let out = ncimage_cmd(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "s3://images",
            "--endpoint",
            "http://127.0.0.1:9",
        ],
        false,
    )
    .output()
    .unwrap();
    fails_with(
        &out,
        &[
            "no AWS-style credentials",
            "AWS_ACCESS_KEY_ID",
            ".aws/credentials",
        ],
    );
}

#[test]
fn upload_to_an_unknown_target_lists_the_defined_ones() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", b"tiny image");
    let targets = d.path().join("targets.toml");
    std::fs::write(
        &targets,
        "[targets.lab]\nprovider = \"s3\"\nbucket = \"b\"\n\n[targets.prod]\nprovider = \"aws\"\n",
    )
    .unwrap();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "staging",
            "--targets",
            targets.to_str().unwrap(),
        ],
    );
    fails_with(&out, &["unknown upload target `staging`", "lab, prod"]);
    // Without a targets file at all.
    let out = ncimage(
        d.path(),
        &["upload", dir.to_str().unwrap(), "--to", "staging"],
    );
    fails_with(
        &out,
        &[
            "unknown upload target `staging`",
            "targets.toml does not exist",
        ],
    );
}

#[test]
fn upload_of_an_image_too_large_for_the_target_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("img");
    std::fs::create_dir_all(&dir).unwrap();
    // A sparse 101 GiB raw image: larger than DigitalOcean's 100 GB custom-image limit.
    let f = std::fs::File::create(dir.join("ncimage-testrole.raw")).unwrap();
    f.set_len(101 << 30).unwrap();
    write_manifest(
        &dir,
        "ncimage-testrole.raw",
        "raw",
        101 << 30,
        &"0".repeat(64),
    );
    let targets = d.path().join("targets.toml");
    std::fs::write(
        &targets,
        "[targets.do]\nprovider = \"digitalocean\"\nbucket = \"b\"\nregion = \"fra1\"\n",
    )
    .unwrap();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "do",
            "--targets",
            targets.to_str().unwrap(),
        ],
    );
    fails_with(
        &out,
        &["ncimage-testrole.raw is 101.0 GiB, larger than target `do` takes"],
    );
}

#[test]
fn upload_of_a_folder_without_a_manifest_says_to_build_first() {
    let d = tempfile::tempdir().unwrap();
    let out = ncimage(
        d.path(),
        &["upload", "--role", "nosuchrole", "--to", "s3://images"],
    );
    fails_with(&out, &["has no manifest.json", "ncimage build --role"]);
}
