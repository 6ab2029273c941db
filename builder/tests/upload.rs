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
    /// moto checking every request's SigV4 signature (IAM auth after the first 4 actions):
    /// returns the server and a real (access key id, secret) moto issued.
    fn start_with_auth(bucket: &str) -> (Moto, String, String) {
        let port = free_port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let moto = Moto { child, port };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The four unauthenticated actions: a user, its policy, its key, the bucket.
        let setup = format!(
            "import boto3, json\n\
             kw = dict(endpoint_url='{}', aws_access_key_id='x', aws_secret_access_key='y', region_name='us-east-1')\n\
             iam = boto3.client('iam', **kw)\n\
             iam.create_user(UserName='ncimage')\n\
             iam.put_user_policy(UserName='ncimage', PolicyName='all', PolicyDocument=json.dumps(\
             {{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}}]}}))\n\
             k = iam.create_access_key(UserName='ncimage')['AccessKey']\n\
             boto3.client('s3', **kw).create_bucket(Bucket='{bucket}')\n\
             print(k['AccessKeyId'], k['SecretAccessKey'])\n",
            moto.endpoint()
        );
        let python = moto_binary().with_file_name("python");
        let out = Command::new(python).arg("-c").arg(setup).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let keys = String::from_utf8(out.stdout).unwrap();
        let (id, secret) = keys.trim().split_once(' ').unwrap();
        (moto, id.to_string(), secret.to_string())
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
                // A part whose bytes were in flight may still land: let the server settle.
                std::thread::sleep(Duration::from_secs(2));
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

#[test]
#[ignore]
fn s3_ctrl_c_stops_the_upload_keeps_its_parts_and_the_same_command_resumes() {
    let moto = Moto::start();
    let b = moto.bucket("images");
    b.create().unwrap();
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(60 << 20, 14);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
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
    let child = ncimage_cmd(d.path(), &args, true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let states = d.path().join("cache/ncimage/uploads");
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(120), "no parts appeared");
        let id = std::fs::read_dir(&states)
            .ok()
            .and_then(|mut r| r.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read(e.path()).ok())
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .and_then(|s| s["upload_id"].as_str().map(str::to_string));
        if let Some(id) = id {
            if b.list_parts("ncimage-testrole.raw", &id)
                .unwrap()
                .unwrap()
                .len()
                >= 2
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let t = fails_with(
        &out,
        &["upload interrupted with", "the same command resumes it"],
    );
    assert!(!t.contains("uploaded ncimage-testrole.raw"), "{t}");
    assert!(
        b.head_object("ncimage-testrole.raw").unwrap().is_none(),
        "no object yet"
    );
    let again = succeeds(&ncimage(d.path(), &args));
    assert!(again.contains("resuming upload"), "{again}");
    let (_, sha) = b.object_sha256("ncimage-testrole.raw").unwrap();
    assert_eq!(sha, sha256_hex(&data));
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

#[test]
#[ignore]
fn s3_signatures_are_checked_by_moto_and_a_wrong_secret_is_refused() {
    let (moto, id, secret) = Moto::start_with_auth("signed");
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(16 << 20, 10);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
    let ep = moto.endpoint();
    let args = [
        "upload",
        dir.to_str().unwrap(),
        "--to",
        "s3://signed/builds",
        "--endpoint",
        &ep,
        "--part-size-mib",
        "5",
    ];
    let run = |secret: &str| {
        ncimage_cmd(d.path(), &args, false)
            .env("AWS_ACCESS_KEY_ID", &id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .output()
            .unwrap()
    };
    // Every call (HEAD, create, 4 parts, complete, HEAD) passes moto's SigV4 check. (A key with
    // a space or `+` fails moto's check for boto3 itself too: moto's limit, so a plain key here.)
    let out = succeeds(&run(&secret));
    assert!(!out.contains(&secret), "{out}");
    assert!(out.contains("4 parts"), "{out}");
    let wrong = run("not-the-secret");
    let t = fails_with(
        &wrong,
        &[
            "the server refused the credentials from environment (HTTP 403",
            "check the access key",
        ],
    );
    assert!(!t.contains(&secret));
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
fn no_credential_appears_in_the_most_verbose_log() {
    // Any S3 call fails here (a stand-in answering 404): the HEAD of the bucket is signed and
    // sent with a session token, and logged at trace level.
    let s = StandIn::start(|_, _| (404, vec![], vec![]));
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", b"tiny image");
    let ep = s.url();
    let out = ncimage_cmd(
        d.path(),
        &[
            "-vv",
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "s3://images",
            "--endpoint",
            &ep,
        ],
        true,
    )
    .env("RUST_LOG", "trace")
    .env("AWS_SESSION_TOKEN", "session-token-never-printed")
    .output()
    .unwrap();
    let t = fails_with(&out, &["bucket `images` does not exist"]);
    assert!(t.contains("s3 request"), "the log is on: {t}");
    assert!(!t.contains("session-token-never-printed"), "{t}");
    let head = &s.requests()[0];
    assert_eq!(
        head.header("x-amz-security-token"),
        Some("session-token-never-printed")
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

// ---------------------------------------------------------------------------------------------
// A provider stand-in: an HTTP/1.1 server on 127.0.0.1 that records every request and answers
// from a handler (one request per connection).

#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    /// Path and query as sent.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    }
    /// The form-encoded body as pairs.
    fn form(&self) -> std::collections::BTreeMap<String, String> {
        String::from_utf8_lossy(&self.body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

type Reply = (u16, Vec<(String, String)>, Vec<u8>);
type Log = Arc<std::sync::Mutex<Vec<Recorded>>>;

struct StandIn {
    port: u16,
    log: Log,
}

impl StandIn {
    /// `handler(request, all requests so far)` answers each request.
    fn start(handler: impl Fn(&Recorded, &[Recorded]) -> Reply + Send + Sync + 'static) -> StandIn {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let log: Log = Arc::default();
        let log2 = log.clone();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { break };
                let Some(req) = read_request(&mut c) else {
                    continue;
                };
                let (status, headers, body) = {
                    let mut log = log2.lock().unwrap();
                    let r = handler(&req, &log);
                    log.push(req);
                    r
                };
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&body);
            }
        });
        StandIn { port, log }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

fn read_request(c: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        body.resize(len.parse().ok()?, 0);
        c.read_exact(&mut body).ok()?;
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut r = std::io::BufReader::new(c.try_clone().ok()?);
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut r, &mut line).ok()?;
            let n = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Recorded {
        method,
        target,
        headers,
        body,
    })
}

fn xml(body: &str) -> Reply {
    (
        200,
        vec![("Content-Type".into(), "text/xml".into())],
        body.as_bytes().to_vec(),
    )
}

fn json(status: u16, v: serde_json::Value) -> Reply {
    (
        status,
        vec![("Content-Type".into(), "application/json".into())],
        v.to_string().into_bytes(),
    )
}

/// Recomputes the SigV4 signature of a recorded EC2 request, as AWS would on receipt.
fn ec2_signature_checks_out(r: &Recorded, host: &str) -> bool {
    use sha2::Digest;
    let auth = r.header("authorization").unwrap();
    let date = r.header("x-amz-date").unwrap();
    let headers = vec![(
        "content-type".to_string(),
        r.header("content-type").unwrap().to_string(),
    )];
    let creds = AwsCredentials::new(KEY_ID.into(), SECRET.into(), None);
    let again = ncimage::upload::sigv4::sign(
        &creds,
        &ncimage::upload::sigv4::Request {
            method: &r.method,
            host,
            path: r.path(),
            query: &[],
            headers: &headers,
            payload_sha256: &hex::encode(sha2::Sha256::digest(&r.body)),
            region: "us-east-1",
            service: "ec2",
            amz_date: date,
        },
    );
    again.iter().any(|(k, v)| k == "authorization" && v == auth)
}

// ---------------------------------------------------------------------------------------------
// aws: S3 on moto, EC2 on a stand-in

fn aws_targets(d: &Path, moto: &Moto, ec2: &StandIn) -> PathBuf {
    let targets = d.join("targets.toml");
    std::fs::write(
        &targets,
        format!(
            "[targets.aws-test]\nprovider = \"aws\"\nendpoint = \"{}\"\nbucket = \"imports\"\n\
             prefix = \"amis/\"\nregion = \"us-east-1\"\nec2_endpoint = \"{}\"\npoll_seconds = 0\n\
             format = \"raw\"\n",
            moto.endpoint(),
            ec2.url()
        ),
    )
    .unwrap();
    targets
}

#[test]
#[ignore]
fn aws_import_snapshot_and_register_image_match_ec2s_documented_requests_on_a_local_stand_in() {
    let moto = Moto::start();
    moto.bucket("imports").create().unwrap();
    let ec2 = StandIn::start(|r, before| {
        let action = r.form().get("Action").cloned().unwrap_or_default();
        match action.as_str() {
            "ImportSnapshot" => xml(
                "<ImportSnapshotResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                 <requestId>r1</requestId><importTaskId>import-snap-0123456789abcdef0</importTaskId>\
                 <snapshotTaskDetail><status>active</status></snapshotTaskDetail></ImportSnapshotResponse>",
            ),
            "DescribeImportSnapshotTasks" => {
                let polls = before
                    .iter()
                    .filter(|b| b.form().get("Action").map(String::as_str) == Some(action.as_str()))
                    .count();
                if polls == 0 {
                    xml("<DescribeImportSnapshotTasksResponse><importSnapshotTaskSet><item>\
                         <importTaskId>import-snap-0123456789abcdef0</importTaskId><snapshotTaskDetail>\
                         <progress>42</progress><status>active</status><statusMessage>converting</statusMessage>\
                         </snapshotTaskDetail></item></importSnapshotTaskSet></DescribeImportSnapshotTasksResponse>")
                } else {
                    xml("<DescribeImportSnapshotTasksResponse><importSnapshotTaskSet><item>\
                         <importTaskId>import-snap-0123456789abcdef0</importTaskId><snapshotTaskDetail>\
                         <snapshotId>snap-0abc0abc0abc0abc0</snapshotId><status>completed</status>\
                         </snapshotTaskDetail></item></importSnapshotTaskSet></DescribeImportSnapshotTasksResponse>")
                }
            }
            "RegisterImage" => xml(
                "<RegisterImageResponse><requestId>r3</requestId><imageId>ami-0def0def0def0def0</imageId></RegisterImageResponse>",
            ),
            _ => (400, vec![], b"<Response><Errors><Error><Code>InvalidAction</Code></Error></Errors></Response>".to_vec()),
        }
    });
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(24 << 20, 5);
    let sha = sha256_hex(&data);
    let dir = image_dir(d.path(), "ncimage-testrole.raw", "raw", &data);
    let targets = aws_targets(d.path(), &moto, &ec2);
    let out = succeeds(&ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "aws-test",
            "--targets",
            targets.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("AWS image ami-0def0def0def0def0"), "{out}");
    assert!(out.contains("snap-0abc0abc0abc0abc0"), "{out}");
    // The object the import reads is the file.
    let (_, got) = moto
        .bucket("imports")
        .object_sha256("amis/ncimage-testrole.raw")
        .unwrap();
    assert_eq!(got, sha);

    let reqs = ec2.requests();
    let actions: Vec<String> = reqs.iter().map(|r| r.form()["Action"].clone()).collect();
    assert_eq!(
        actions,
        [
            "ImportSnapshot",
            "DescribeImportSnapshotTasks",
            "DescribeImportSnapshotTasks",
            "RegisterImage"
        ]
    );
    let host = format!("127.0.0.1:{}", ec2.port);
    for r in &reqs {
        // EC2 Query API: form-encoded POST to /, API version 2016-11-15, SigV4 for ec2.
        assert_eq!((r.method.as_str(), r.path()), ("POST", "/"));
        assert_eq!(
            r.header("content-type"),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        assert_eq!(r.form()["Version"], "2016-11-15");
        let auth = r.header("authorization").unwrap();
        assert!(
            auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/")),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="), "{auth}");
        assert!(
            ec2_signature_checks_out(r, &host),
            "signature does not match the request: {r:?}"
        );
        let all = format!("{:?}{}", r.headers, String::from_utf8_lossy(&r.body));
        assert!(!all.contains(SECRET), "the secret key was sent");
    }
    let import = reqs[0].form();
    assert_eq!(import["DiskContainer.Format"], "RAW");
    assert_eq!(import["DiskContainer.UserBucket.S3Bucket"], "imports");
    assert_eq!(
        import["DiskContainer.UserBucket.S3Key"],
        "amis/ncimage-testrole.raw"
    );
    assert_eq!(import["RoleName"], "vmimport");
    assert_eq!(import["ClientToken"], format!("ncimage-{}", &sha[..32]));
    assert_eq!(
        reqs[1].form()["ImportTaskId.1"],
        "import-snap-0123456789abcdef0"
    );
    let reg = reqs[3].form();
    for (k, v) in [
        ("Name", format!("ncimage-testrole-{}", &sha[..12])),
        ("BootMode", "uefi".into()),
        ("Architecture", "x86_64".into()),
        ("VirtualizationType", "hvm".into()),
        ("EnaSupport", "true".into()),
        ("RootDeviceName", "/dev/xvda".into()),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda".into()),
        (
            "BlockDeviceMapping.1.Ebs.SnapshotId",
            "snap-0abc0abc0abc0abc0".into(),
        ),
    ] {
        assert_eq!(reg.get(k), Some(&v), "RegisterImage {k}: {reg:?}");
    }
}

#[test]
#[ignore]
fn aws_failed_import_task_is_a_clear_error_on_a_local_stand_in() {
    let moto = Moto::start();
    moto.bucket("imports").create().unwrap();
    let ec2 = StandIn::start(|r, _| {
        match r.form()["Action"].as_str() {
        "ImportSnapshot" => xml("<ImportSnapshotResponse><importTaskId>import-snap-1</importTaskId></ImportSnapshotResponse>"),
        _ => xml("<DescribeImportSnapshotTasksResponse><importSnapshotTaskSet><item><snapshotTaskDetail>\
                  <status>deleted</status><statusMessage>ClientError: Disk validation failed [Unsupported specified file format]</statusMessage>\
                  </snapshotTaskDetail></item></importSnapshotTaskSet></DescribeImportSnapshotTasksResponse>"),
    }
    });
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(
        d.path(),
        "ncimage-testrole.raw",
        "raw",
        &random_bytes(1 << 20, 6),
    );
    let targets = aws_targets(d.path(), &moto, &ec2);
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "aws-test",
            "--targets",
            targets.to_str().unwrap(),
        ],
    );
    fails_with(
        &out,
        &[
            "EC2 import task import-snap-1 failed",
            "Disk validation failed",
            "VM Import",
        ],
    );
    assert!(!ec2
        .requests()
        .iter()
        .any(|r| r.form()["Action"] == "RegisterImage"));
}

// ---------------------------------------------------------------------------------------------
// digitalocean: Spaces on moto, the API on a stand-in

#[test]
#[ignore]
fn digitalocean_custom_image_from_spaces_matches_the_documented_request_on_a_local_stand_in() {
    let moto = Moto::start();
    moto.bucket("space1").create().unwrap();
    let api = StandIn::start(|r, before| match (r.method.as_str(), r.path()) {
        ("POST", "/v2/images") => json(
            202,
            serde_json::json!({"image": {"id": 123456, "name": r.json()["name"], "status": "NEW"}}),
        ),
        ("GET", "/v2/images/123456") => {
            let polls = before.iter().filter(|b| b.method == "GET").count();
            let status = if polls == 0 { "pending" } else { "available" };
            json(
                200,
                serde_json::json!({"image": {"id": 123456, "status": status}}),
            )
        }
        _ => json(
            404,
            serde_json::json!({"id": "not_found", "message": "nope"}),
        ),
    });
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(12 << 20, 7);
    let sha = sha256_hex(&data);
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", &data);
    let targets = d.path().join("targets.toml");
    std::fs::write(
        &targets,
        format!(
            "[targets.do]\nprovider = \"digitalocean\"\nregion = \"fra1\"\nbucket = \"space1\"\n\
             prefix = \"images\"\nendpoint = \"{}\"\napi_endpoint = \"{}\"\npoll_seconds = 0\n",
            moto.endpoint(),
            api.url()
        ),
    )
    .unwrap();
    let token = "dop_v1_test_token_never_printed";
    let out = ncimage_cmd(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "do",
            "--targets",
            targets.to_str().unwrap(),
        ],
        true,
    )
    .env("DIGITALOCEAN_TOKEN", token)
    .output()
    .unwrap();
    let out_text = succeeds(&out);
    assert!(!out_text.contains(token), "{out_text}");
    assert!(
        out_text.contains("DigitalOcean custom image 123456"),
        "{out_text}"
    );
    assert!(out_text.contains("is available in fra1"), "{out_text}");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    let create = &reqs[0];
    assert_eq!(
        (create.method.as_str(), create.path()),
        ("POST", "/v2/images")
    );
    assert_eq!(
        create.header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(create.header("content-type"), Some("application/json"));
    let j = create.json();
    assert_eq!(j["name"], format!("ncimage-testrole-{}", &sha[..12]));
    assert_eq!(j["distribution"], "Debian");
    assert_eq!(j["region"], "fra1");
    assert_eq!(j["tags"][0], "ncimage");
    // The URL DigitalOcean fetches: a presigned GET of the object in the Space (region fra1).
    let url = j["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!(
            "{}/space1/images/ncimage-testrole.qcow2?X-Amz-Algorithm=AWS4-HMAC-SHA256",
            moto.endpoint()
        )),
        "{url}"
    );
    assert!(url.contains("%2Ffra1%2Fs3%2Faws4_request"), "{url}");
    assert!(!url.contains(SECRET));
    let mut fetched = Vec::new();
    ureq::get(url)
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut fetched)
        .unwrap();
    assert_eq!(sha256_hex(&fetched), sha);
    assert_eq!(reqs[1].path(), "/v2/images/123456");
    assert_eq!(
        reqs[1].header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
}

#[test]
fn digitalocean_without_a_token_is_a_clear_error_before_any_upload() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", b"tiny");
    let targets = d.path().join("targets.toml");
    std::fs::write(
        &targets,
        "[targets.do]\nprovider = \"digitalocean\"\nregion = \"fra1\"\nbucket = \"b\"\n\
         endpoint = \"http://127.0.0.1:9\"\n",
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
    fails_with(&out, &["no DigitalOcean API token", "DIGITALOCEAN_TOKEN"]);
}

#[test]
fn digitalocean_refuses_a_vhd_before_any_upload() {
    let d = tempfile::tempdir().unwrap();
    let mut vhd = vec![0u8; (1 << 20) + 512];
    vhd[1 << 20..(1 << 20) + 8].copy_from_slice(b"conectix");
    let dir = image_dir(d.path(), "ncimage-testrole.vhd", "vhd", &vhd);
    let targets = d.path().join("targets.toml");
    std::fs::write(
        &targets,
        "[targets.do]\nprovider = \"digitalocean\"\nregion = \"fra1\"\nbucket = \"b\"\n\
         endpoint = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let args = |format: Option<&str>| {
        let mut a = vec![
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "do",
            "--targets",
            targets.to_str().unwrap(),
        ];
        a.extend(format.iter().flat_map(|f| ["--format", *f]));
        ncimage_cmd(d.path(), &a, true)
            .env("DIGITALOCEAN_TOKEN", "dop_v1_test")
            .output()
            .unwrap()
    };
    // Asked for: refused, with the formats DigitalOcean takes.
    fails_with(
        &args(Some("vhd")),
        &["digitalocean does not take vhd images", "qcow2, raw, vmdk"],
    );
    // The only artifact: not picked either.
    fails_with(
        &args(None),
        &[
            "the image has no artifact digitalocean takes",
            "ncimage-testrole.vhd",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// openstack: Keystone and Glance on one stand-in

/// What the Glance stand-in reports as the hash of the data it stored.
#[derive(Clone, Copy)]
enum GlanceHash {
    /// os_hash_algo sha512 with the sha512 of the data received.
    Sha512,
    /// os_hash_algo sha512 with another value.
    Wrong,
    /// os_hash_algo sha256 (a deployment's choice), with the data's sha256.
    Sha256,
    /// No os_hash_algo nor value (an older Glance).
    Missing,
}

fn openstack_standin(hash: GlanceHash) -> StandIn {
    use sha2::Digest;
    StandIn::start(move |r, before| {
        let base = format!("http://{}", r.header("host").unwrap());
        match (r.method.as_str(), r.path()) {
            ("POST", "/identity/v3/auth/tokens") => {
                let mut reply = json(
                    201,
                    serde_json::json!({"token": {"catalog": [
                    {"type": "image", "endpoints": [
                        {"interface": "public", "region_id": "OtherRegion", "url": "http://127.0.0.1:9/wrong"},
                        {"interface": "public", "region_id": "RegionOne", "url": format!("{base}/image")}]}]}}),
                );
                reply
                    .1
                    .push(("X-Subject-Token".into(), "gAAAA-test-token".into()));
                reply
            }
            ("POST", "/image/v2/images") => json(
                201,
                serde_json::json!({"id": "7c0b3e4a-img", "status": "queued"}),
            ),
            ("PUT", "/image/v2/images/7c0b3e4a-img/file") => (204, vec![], vec![]),
            ("GET", "/image/v2/images/7c0b3e4a-img") => {
                let put = before
                    .iter()
                    .find(|b| b.method == "PUT")
                    .expect("data before GET");
                let h = hex::encode(sha2::Sha512::digest(&put.body));
                let (algo, value) = match hash {
                    GlanceHash::Sha512 => (Some("sha512"), Some(h)),
                    GlanceHash::Wrong => (Some("sha512"), Some(h.replace('a', "b"))),
                    GlanceHash::Sha256 => (Some("sha256"), Some(sha256_hex(&put.body))),
                    GlanceHash::Missing => (None, None),
                };
                json(
                    200,
                    serde_json::json!({"id": "7c0b3e4a-img", "status": "active",
                    "os_hash_algo": algo, "os_hash_value": value}),
                )
            }
            ("DELETE", "/image/v2/images/7c0b3e4a-img") => (204, vec![], vec![]),
            _ => json(404, serde_json::json!({"error": "no route"})),
        }
    })
}

/// `ncimage upload` of `dir` to the stand-in, through a targets file in `d`.
fn openstack_run(d: &Path, s: &StandIn, dir: &Path) -> Output {
    std::fs::write(
        d.join("targets.toml"),
        "[targets.os]\nprovider = \"openstack\"\npoll_seconds = 0\n",
    )
    .unwrap();
    // The most verbose log: no token or password may appear in it either.
    ncimage_cmd(
        d,
        &[
            "-vv",
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "os",
            "--targets",
            d.join("targets.toml").to_str().unwrap(),
        ],
        false,
    )
    .env("RUST_LOG", "trace")
    .env("OS_AUTH_URL", format!("{}/identity/v3", s.url()))
    .env("OS_USERNAME", "builder")
    .env("OS_PASSWORD", "os-password-never-printed")
    .env("OS_PROJECT_NAME", "images")
    .env("OS_USER_DOMAIN_NAME", "Default")
    .env("OS_PROJECT_DOMAIN_NAME", "Default")
    .env("OS_REGION_NAME", "RegionOne")
    .output()
    .unwrap()
}

#[test]
fn openstack_glance_upload_matches_keystone_and_glance_documented_requests_on_a_local_stand_in() {
    let s = openstack_standin(GlanceHash::Sha512);
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(6 << 20, 8);
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", &data);
    let out = openstack_run(d.path(), &s, &dir);
    let t = succeeds(&out);
    assert!(
        !t.contains("os-password-never-printed") && !t.contains("gAAAA-test-token"),
        "{t}"
    );
    assert!(t.contains("OpenStack image 7c0b3e4a-img"), "{t}");
    assert!(t.contains("verified: Glance's sha512"), "{t}");
    let reqs = s.requests();
    let calls: Vec<(String, String)> = reqs
        .iter()
        .map(|r| (r.method.clone(), r.path().to_string()))
        .collect();
    assert_eq!(
        calls,
        [
            ("POST".to_string(), "/identity/v3/auth/tokens".to_string()),
            ("POST".into(), "/image/v2/images".into()),
            ("PUT".into(), "/image/v2/images/7c0b3e4a-img/file".into()),
            ("GET".into(), "/image/v2/images/7c0b3e4a-img".into()),
        ]
    );
    // Keystone v3 password authentication scoped to a project (the documented body).
    let auth = reqs[0].json();
    assert_eq!(
        auth["auth"]["identity"]["methods"],
        serde_json::json!(["password"])
    );
    let user = &auth["auth"]["identity"]["password"]["user"];
    assert_eq!(user["name"], "builder");
    assert_eq!(user["domain"]["name"], "Default");
    assert_eq!(user["password"], "os-password-never-printed");
    assert_eq!(auth["auth"]["scope"]["project"]["name"], "images");
    assert_eq!(
        auth["auth"]["scope"]["project"]["domain"]["name"],
        "Default"
    );
    // Glance v2 with the issued token.
    for r in &reqs[1..] {
        assert_eq!(r.header("x-auth-token"), Some("gAAAA-test-token"));
    }
    let create = reqs[1].json();
    assert_eq!(create["disk_format"], "qcow2");
    assert_eq!(create["container_format"], "bare");
    assert_eq!(create["visibility"], "private");
    assert_eq!(create["hw_firmware_type"], "uefi");
    assert!(create["name"]
        .as_str()
        .unwrap()
        .starts_with("ncimage-testrole-"));
    assert_eq!(
        reqs[2].header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(sha256_hex(&reqs[2].body), sha256_hex(&data));
}

#[test]
fn openstack_image_whose_stored_hash_differs_is_reported_on_a_local_stand_in() {
    let s = openstack_standin(GlanceHash::Wrong);
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(
        d.path(),
        "ncimage-testrole.qcow2",
        "qcow2",
        &random_bytes(1 << 20, 9),
    );
    let out = openstack_run(d.path(), &s, &dir);
    fails_with(
        &out,
        &[
            "Glance image 7c0b3e4a-img holds data whose sha512 is",
            "upload again",
        ],
    );
}

#[test]
fn openstack_file_that_differs_from_its_manifest_is_deleted_before_it_is_active_on_a_local_stand_in(
) {
    let s = openstack_standin(GlanceHash::Sha512);
    let d = tempfile::tempdir().unwrap();
    let data = random_bytes(3 << 20, 10);
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", &data);
    // One byte changes after the build (same size).
    let mut changed = data.clone();
    changed[2 << 20] ^= 1;
    std::fs::write(dir.join("ncimage-testrole.qcow2"), &changed).unwrap();
    let out = openstack_run(d.path(), &s, &dir);
    fails_with(
        &out,
        &[
            "ncimage-testrole.qcow2 differs from its manifest",
            &sha256_hex(&changed),
            "Glance image 7c0b3e4a-img was deleted",
            "build or export the image again",
        ],
    );
    let calls: Vec<(String, String)> = s
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path().to_string()))
        .collect();
    // The PUT never completed (its last bytes held back: the stand-in records whole requests
    // only), the image was never looked at as active, and it was deleted.
    assert_eq!(
        calls,
        [
            ("POST".to_string(), "/identity/v3/auth/tokens".to_string()),
            ("POST".into(), "/image/v2/images".into()),
            ("DELETE".into(), "/image/v2/images/7c0b3e4a-img".into()),
        ]
    );
}

#[test]
fn openstack_without_sha512_from_glance_says_what_was_not_compared_on_a_local_stand_in() {
    for (hash, says) in [
        (
            GlanceHash::Missing,
            "not compared: Glance reports no hash of the stored data",
        ),
        (
            GlanceHash::Sha256,
            "not compared: Glance reports only sha256 of the stored data",
        ),
    ] {
        let s = openstack_standin(hash);
        let d = tempfile::tempdir().unwrap();
        let dir = image_dir(
            d.path(),
            "ncimage-testrole.qcow2",
            "qcow2",
            &random_bytes(1 << 20, 14),
        );
        let t = succeeds(&openstack_run(d.path(), &s, &dir));
        assert!(t.contains(says), "{t}");
        assert!(
            t.contains("verified: sha256 of every byte sent matches the manifest"),
            "{t}"
        );
        assert!(!t.contains("Glance's sha512"), "{t}");
    }
}

#[test]
fn openstack_without_credentials_names_the_variables() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.qcow2", "qcow2", b"tiny");
    std::fs::write(
        d.path().join("targets.toml"),
        "[targets.os]\nprovider = \"openstack\"\nauth_url = \"http://127.0.0.1:9/v3\"\n",
    )
    .unwrap();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "os",
            "--targets",
            d.path().join("targets.toml").to_str().unwrap(),
        ],
    );
    fails_with(&out, &["no OpenStack credentials", "OS_USERNAME", "openrc"]);
}

// ---------------------------------------------------------------------------------------------
// gcp: token endpoint, Cloud Storage and Compute on one stand-in

/// Which Cloud Storage call of the gcp stand-in fails, once.
#[derive(Clone, Copy, PartialEq)]
enum GcsFault {
    None,
    /// The second chunk: 503, nothing stored.
    SecondChunk,
    /// The last chunk: stored (the object is complete), but the reply is a 503, as when a run
    /// stops after sending it.
    LastChunkReply,
}

/// A gcp target on one stand-in (token endpoint, Cloud Storage, Compute) with a service
/// account key made here (openssl), and an image folder holding `data`.
struct Gcp {
    d: tempfile::TempDir,
    s: StandIn,
    sa: PathBuf,
    /// The service account's public key (DER).
    pubder: Vec<u8>,
    /// The bytes Cloud Storage holds.
    stored: Arc<std::sync::Mutex<Vec<u8>>>,
    dir: PathBuf,
}

impl Gcp {
    fn start(fault: GcsFault, bucket: &str, data: &[u8]) -> Gcp {
        use base64::Engine;
        use sha2::Digest;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("sa.pem");
        assert!(Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out"
            ])
            .arg(&key)
            .output()
            .unwrap()
            .status
            .success());
        let pubder = Command::new("openssl")
            .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
            .arg(&key)
            .output()
            .unwrap()
            .stdout;
        let stored = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let armed = Arc::new(AtomicBool::new(fault != GcsFault::None));
        let st = stored.clone();
        let s = StandIn::start(move |r, _| {
            let base = format!("http://{}", r.header("host").unwrap());
            let path = r.path().to_string();
            match (r.method.as_str(), path.as_str()) {
                ("POST", "/token") => json(
                    200,
                    serde_json::json!({"access_token": "ya29.test-token", "expires_in": 3599, "token_type": "Bearer"}),
                ),
                ("POST", "/upload/storage/v1/b/gbucket/o") => (
                    200,
                    vec![("Location".into(), format!("{base}/session/1"))],
                    vec![],
                ),
                // Cloud Storage's answer for a bucket that does not exist.
                ("POST", p) if p.starts_with("/upload/storage/v1/b/") => json(
                    404,
                    serde_json::json!({"error": {"code": 404, "message": "The specified bucket does not exist."}}),
                ),
                ("PUT", "/session/1") => {
                    let range = r.header("content-range").unwrap().to_string();
                    let mut data = st.lock().unwrap();
                    let total: usize = range.rsplit('/').next().unwrap().parse().unwrap();
                    let mut lost_reply = false;
                    if let Some(span) = range.strip_prefix("bytes ").filter(|s| !s.starts_with('*'))
                    {
                        let start: usize = span.split('-').next().unwrap().parse().unwrap();
                        if fault == GcsFault::SecondChunk
                            && start > 0
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            return (503, vec![], b"backend error".to_vec());
                        }
                        assert_eq!(start, data.len(), "chunks are contiguous");
                        data.extend_from_slice(&r.body);
                        lost_reply = fault == GcsFault::LastChunkReply
                            && data.len() == total
                            && armed.swap(false, Ordering::SeqCst);
                    }
                    if lost_reply {
                        (503, vec![], b"backend error".to_vec())
                    } else if data.len() == total {
                        let md5 = base64::engine::general_purpose::STANDARD
                            .encode(md5::Md5::digest(&*data));
                        json(
                            200,
                            serde_json::json!({"name": "images/ncimage-testrole.gce.tar.gz", "size": total.to_string(), "md5Hash": md5}),
                        )
                    } else {
                        (
                            308,
                            vec![("Range".into(), format!("bytes=0-{}", data.len() - 1))],
                            vec![],
                        )
                    }
                }
                // Cancelling a resumable upload (Cloud Storage answers 499).
                ("DELETE", "/session/1") => (499, vec![], vec![]),
                ("DELETE", "/storage/v1/b/gbucket/o/images%2Fncimage-testrole.gce.tar.gz") => {
                    st.lock().unwrap().clear();
                    (204, vec![], vec![])
                }
                ("POST", "/compute/v1/projects/proj-1/global/images") => json(
                    200,
                    serde_json::json!({"name": "operation-1", "status": "RUNNING"}),
                ),
                ("GET", "/compute/v1/projects/proj-1/global/operations/operation-1") => json(
                    200,
                    serde_json::json!({"name": "operation-1", "status": "DONE"}),
                ),
                _ => json(404, serde_json::json!({"error": {"message": "no route"}})),
            }
        });
        let sa = d.path().join("sa.json");
        std::fs::write(
            &sa,
            serde_json::json!({"type": "service_account", "project_id": "proj-1",
                "client_email": "builder@proj-1.iam.gserviceaccount.com",
                "private_key": std::fs::read_to_string(&key).unwrap(),
                "token_uri": format!("{}/token", s.url())})
            .to_string(),
        )
        .unwrap();
        let dir = image_dir(d.path(), "ncimage-testrole.gce.tar.gz", "gce", data);
        std::fs::write(
            d.path().join("targets.toml"),
            format!(
                "[targets.gcp]\nprovider = \"gcp\"\nbucket = \"{bucket}\"\nprefix = \"images\"\n\
                 storage_endpoint = \"{0}\"\ncompute_endpoint = \"{0}\"\npoll_seconds = 0\n",
                s.url()
            ),
        )
        .unwrap();
        Gcp {
            d,
            s,
            sa,
            pubder,
            stored,
            dir,
        }
    }

    fn run(&self) -> Output {
        ncimage_cmd(
            self.d.path(),
            &[
                "-vv",
                "upload",
                self.dir.to_str().unwrap(),
                "--to",
                "gcp",
                "--targets",
                self.d.path().join("targets.toml").to_str().unwrap(),
            ],
            false,
        )
        .env("RUST_LOG", "trace")
        .env("GOOGLE_APPLICATION_CREDENTIALS", &self.sa)
        .output()
        .unwrap()
    }

    fn inserts(&self) -> usize {
        self.s
            .requests()
            .iter()
            .filter(|r| r.path().ends_with("/global/images"))
            .count()
    }
}

#[test]
fn gcp_resumable_upload_and_images_insert_match_googles_documented_requests_on_a_local_stand_in() {
    use base64::Engine;
    let data = random_bytes(20 << 20, 11);
    let g = Gcp::start(GcsFault::SecondChunk, "gbucket", &data);
    let (s, pubder, stored) = (&g.s, &g.pubder, &g.stored);
    let run = || g.run();
    // The second chunk fails: the upload stops and says how to go on.
    fails_with(&run(), &["HTTP 503", "the same command resumes"]);
    let out = succeeds(&run());
    assert!(
        out.contains(
            "resuming the upload to gs://gbucket/images/ncimage-testrole.gce.tar.gz at 8 MiB"
        ),
        "{out}"
    );
    assert!(out.contains("GCP image ncimage-testrole-"), "{out}");
    assert!(
        !out.contains("ya29.test-token") && !out.contains("PRIVATE KEY"),
        "{out}"
    );
    assert_eq!(sha256_hex(&stored.lock().unwrap()), sha256_hex(&data));

    let reqs = s.requests();
    // OAuth 2.0 for service accounts: a JWT bearer grant, RS256 over header.claims.
    let tok = reqs.iter().find(|r| r.path() == "/token").unwrap().form();
    assert_eq!(
        tok["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let parts: Vec<&str> = tok["assertion"].split('.').collect();
    let dec = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    };
    let claims: serde_json::Value = serde_json::from_slice(&dec(parts[1])).unwrap();
    assert_eq!(claims["iss"], "builder@proj-1.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], format!("{}/token", s.url()));
    assert!(claims["scope"]
        .as_str()
        .unwrap()
        .contains("devstorage.read_write"));
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, pubder)
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &dec(parts[2]),
        )
        .expect("the JWT verifies with the service account's public key");
    // Resumable upload: initiation with the object's name and length, chunks in 256 KiB multiples.
    let init = reqs
        .iter()
        .find(|r| r.path() == "/upload/storage/v1/b/gbucket/o")
        .unwrap();
    assert!(
        init.target.contains("uploadType=resumable"),
        "{}",
        init.target
    );
    assert!(
        init.target
            .contains("name=images%2Fncimage-testrole.gce.tar.gz"),
        "{}",
        init.target
    );
    assert_eq!(
        init.header("x-upload-content-length"),
        Some((20u64 << 20).to_string().as_str())
    );
    assert_eq!(init.header("authorization"), Some("Bearer ya29.test-token"));
    assert_eq!(init.json()["metadata"]["sha256"], sha256_hex(&data));
    for r in reqs
        .iter()
        .filter(|r| r.path() == "/session/1" && !r.body.is_empty())
    {
        assert_eq!(
            r.body.len() % (256 << 10),
            0,
            "chunk of {} bytes",
            r.body.len()
        );
    }
    // images.insert from the object, UEFI.
    let ins = reqs
        .iter()
        .find(|r| r.path().ends_with("/global/images"))
        .unwrap();
    assert_eq!(ins.header("authorization"), Some("Bearer ya29.test-token"));
    let j = ins.json();
    assert_eq!(
        j["rawDisk"]["source"],
        "https://storage.googleapis.com/gbucket/images/ncimage-testrole.gce.tar.gz"
    );
    assert!(j["guestOsFeatures"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({"type": "UEFI_COMPATIBLE"})));
    assert!(j["name"].as_str().unwrap().starts_with("ncimage-testrole-"));
}

#[test]
fn gcp_upload_finished_by_a_run_that_stopped_before_forgetting_it_goes_on_to_the_image_on_a_local_stand_in(
) {
    let data = random_bytes(20 << 20, 15);
    let g = Gcp::start(GcsFault::LastChunkReply, "gbucket", &data);
    // The last chunk is stored, but its reply is lost: the run stops and keeps the session.
    fails_with(&g.run(), &["HTTP 503", "the same command resumes"]);
    assert_eq!(sha256_hex(&g.stored.lock().unwrap()), sha256_hex(&data));
    let before = g.s.requests().len();
    // The next run asks the session, which says the upload is complete (200 with the object),
    // sends nothing again, and creates the image from the object.
    let out = succeeds(&g.run());
    assert!(
        out.contains(
            "gs://gbucket/images/ncimage-testrole.gce.tar.gz was uploaded completely by an earlier run"
        ),
        "{out}"
    );
    assert!(out.contains("matches the file"), "{out}");
    assert!(out.contains("GCP image ncimage-testrole-"), "{out}");
    let again: Vec<Recorded> = g.s.requests()[before..].to_vec();
    let puts: Vec<&Recorded> = again.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1, "one status query: {again:?}");
    assert_eq!(
        puts[0].header("content-range"),
        Some(format!("bytes */{}", 20 << 20).as_str())
    );
    assert!(puts[0].body.is_empty());
    assert_eq!(g.inserts(), 1);
}

#[test]
fn gcp_file_that_differs_from_its_manifest_makes_no_object_and_no_image_on_a_local_stand_in() {
    let data = random_bytes(20 << 20, 16);
    let mut changed = data.clone();
    changed[3 << 20] ^= 1;
    // A fresh upload: the last chunk is never sent and the session is cancelled.
    let g = Gcp::start(GcsFault::None, "gbucket", &data);
    std::fs::write(g.dir.join("ncimage-testrole.gce.tar.gz"), &changed).unwrap();
    fails_with(
        &g.run(),
        &[
            "ncimage-testrole.gce.tar.gz differs from its manifest",
            &sha256_hex(&changed),
            "its last chunk was not sent and the upload session was cancelled",
            "build or export the image again",
        ],
    );
    assert_eq!(
        g.stored.lock().unwrap().len(),
        16 << 20,
        "two chunks of three"
    );
    assert!(g
        .s
        .requests()
        .iter()
        .any(|r| r.method == "DELETE" && r.path() == "/session/1"));
    assert_eq!(g.inserts(), 0);

    // An upload an earlier run finished, of a file that changed since: the object is deleted.
    let g = Gcp::start(GcsFault::LastChunkReply, "gbucket", &data);
    fails_with(&g.run(), &["HTTP 503"]);
    std::fs::write(g.dir.join("ncimage-testrole.gce.tar.gz"), &changed).unwrap();
    fails_with(
        &g.run(),
        &[
            "ncimage-testrole.gce.tar.gz differs from its manifest",
            "gs://gbucket/images/ncimage-testrole.gce.tar.gz was deleted and no image was made",
        ],
    );
    assert!(g.stored.lock().unwrap().is_empty(), "the object is gone");
    let del =
        g.s.requests()
            .into_iter()
            .find(|r| r.method == "DELETE" && r.path().starts_with("/storage/v1/b/gbucket/o/"))
            .expect("the object is deleted");
    assert_eq!(del.header("authorization"), Some("Bearer ya29.test-token"));
    assert_eq!(g.inserts(), 0);
}

#[test]
fn gcp_bucket_not_found_is_a_clear_error_on_a_local_stand_in() {
    let g = Gcp::start(GcsFault::None, "nobucket", b"tiny");
    fails_with(
        &g.run(),
        &[
            "Cloud Storage bucket `nobucket` does not exist",
            "The specified bucket does not exist.",
            "gcloud storage buckets create gs://nobucket",
        ],
    );
    assert_eq!(g.inserts(), 0);
}

#[test]
fn gcp_without_credentials_says_where_they_are_looked_for() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.gce.tar.gz", "gce", b"tiny");
    std::fs::write(
        d.path().join("targets.toml"),
        "[targets.gcp]\nprovider = \"gcp\"\nbucket = \"b\"\n",
    )
    .unwrap();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "gcp",
            "--targets",
            d.path().join("targets.toml").to_str().unwrap(),
        ],
    );
    fails_with(
        &out,
        &[
            "no Google credentials",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "application_default_credentials.json does not exist",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// azure: Entra ID, Resource Manager and the disk's page blob on one stand-in

const AZURE_SUB: &str = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Compute";

/// Entra ID, Resource Manager and the disk's page blob; the disk's bytes land in `disk`.
fn azure_standin(disk: Arc<std::sync::Mutex<Vec<u8>>>) -> StandIn {
    let dk = disk;
    let sub = AZURE_SUB;
    StandIn::start(move |r, before| {
        let base = format!("http://{}", r.header("host").unwrap());
        let p = r.path().to_string();
        let disk_path = format!("{sub}/disks/ncimage-testrole-osdisk");
        match (r.method.as_str(), p.as_str()) {
            ("POST", "/tenant-1/oauth2/v2.0/token") => json(
                200,
                serde_json::json!({"access_token": "eyJ0.mgmt-token", "token_type": "Bearer", "expires_in": 3599}),
            ),
            ("PUT", x) if x == disk_path => {
                let size = r.json()["properties"]["creationData"]["uploadSizeBytes"]
                    .as_u64()
                    .unwrap() as usize;
                dk.lock().unwrap().resize(size, 0);
                json(
                    202,
                    serde_json::json!({"properties": {"provisioningState": "Updating"}}),
                )
            }
            ("GET", x) if x == disk_path => json(
                200,
                serde_json::json!({
                "id": disk_path, "properties": {"provisioningState": "Succeeded", "diskState": "ReadyToUpload"}}),
            ),
            ("POST", x) if x == format!("{disk_path}/beginGetAccess") => (
                202,
                vec![("Location".into(), format!("{base}/ops/grant"))],
                vec![],
            ),
            ("GET", "/ops/grant") => json(
                200,
                serde_json::json!({"accessSAS": format!("{base}/blob/md-abc/abcd?sv=2018-03-28&sr=b&sig=SASSIG")}),
            ),
            ("PUT", "/blob/md-abc/abcd") => {
                let range = r.header("x-ms-range").unwrap();
                let (a, _) = range
                    .strip_prefix("bytes=")
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                let a: usize = a.parse().unwrap();
                dk.lock().unwrap()[a..a + r.body.len()].copy_from_slice(&r.body);
                (201, vec![], vec![])
            }
            ("POST", x) if x == format!("{disk_path}/endGetAccess") => (
                202,
                vec![("Location".into(), format!("{base}/ops/revoke"))],
                vec![],
            ),
            ("GET", "/ops/revoke") => (200, vec![], vec![]),
            ("DELETE", x) if x == disk_path => (200, vec![], vec![]),
            ("PUT", x) if x == format!("{sub}/images/ncimage-testrole") => json(
                201,
                serde_json::json!({"properties": {"provisioningState": "Creating"}}),
            ),
            ("GET", x) if x == format!("{sub}/images/ncimage-testrole") => {
                let _ = before;
                json(
                    200,
                    serde_json::json!({"id": x, "properties": {"provisioningState": "Succeeded"}}),
                )
            }
            _ => json(
                404,
                serde_json::json!({"error": {"code": "NotFound", "message": p}}),
            ),
        }
    })
}

/// A fixed VHD: 24 MiB of disk with data in two places, then the footer.
fn azure_vhd() -> Vec<u8> {
    let mut vhd = vec![0u8; (24 << 20) + 512];
    vhd[..1 << 20].copy_from_slice(&random_bytes(1 << 20, 12));
    vhd[13 << 20..14 << 20].copy_from_slice(&random_bytes(1 << 20, 13));
    vhd[24 << 20..(24 << 20) + 8].copy_from_slice(b"conectix");
    vhd
}

/// `ncimage upload` of `dir` to the stand-in with a service principal's variables.
fn azure_run(d: &Path, s: &StandIn, dir: &Path) -> Output {
    std::fs::write(
        d.join("targets.toml"),
        format!(
            "[targets.az]\nprovider = \"azure\"\nresource_group = \"rg-1\"\nlocation = \"westeurope\"\n\
             image_name = \"ncimage-{{role}}\"\nlogin_endpoint = \"{0}\"\nmanagement_endpoint = \"{0}\"\npoll_seconds = 0\n",
            s.url()
        ),
    )
    .unwrap();
    ncimage_cmd(
        d,
        &[
            "-vv",
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "az",
            "--targets",
            d.join("targets.toml").to_str().unwrap(),
        ],
        false,
    )
    .env("RUST_LOG", "trace")
    .env("AZURE_TENANT_ID", "tenant-1")
    .env("AZURE_CLIENT_ID", "client-1")
    .env("AZURE_CLIENT_SECRET", "azure-secret-never-printed")
    .env("AZURE_SUBSCRIPTION_ID", "sub-1")
    .output()
    .unwrap()
}

#[test]
fn azure_direct_upload_matches_the_documented_managed_disk_requests_on_a_local_stand_in() {
    use base64::Engine;
    use sha2::Digest;
    let disk = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let s = azure_standin(disk.clone());
    let sub = AZURE_SUB;
    let vhd = azure_vhd();
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.vhd", "vhd", &vhd);
    let out = azure_run(d.path(), &s, &dir);
    let t = succeeds(&out);
    assert!(
        t.contains("verified: sha256 of every byte read matches the manifest"),
        "{t}"
    );
    assert!(
        !t.contains("azure-secret-never-printed")
            && !t.contains("SASSIG")
            && !t.contains("mgmt-token"),
        "{t}"
    );
    assert!(
        t.contains("3 pages of 4 MiB written with Content-MD5, 4 all-zero pages skipped"),
        "{t}"
    );
    assert_eq!(
        sha256_hex(&disk.lock().unwrap()),
        sha256_hex(&vhd),
        "the disk holds the VHD"
    );

    let reqs = s.requests();
    let tok = reqs[0].form();
    assert_eq!(tok["grant_type"], "client_credentials");
    assert_eq!(tok["client_id"], "client-1");
    assert_eq!(tok["scope"], "https://management.azure.com/.default");
    let create = reqs
        .iter()
        .find(|r| r.method == "PUT" && r.path().ends_with("/disks/ncimage-testrole-osdisk"))
        .unwrap();
    assert!(create.target.contains("api-version=2023-04-02"));
    let j = create.json();
    assert_eq!(j["properties"]["creationData"]["createOption"], "Upload");
    assert_eq!(
        j["properties"]["creationData"]["uploadSizeBytes"],
        vhd.len() as u64
    );
    assert_eq!(j["properties"]["hyperVGeneration"], "V2");
    assert_eq!(j["location"], "westeurope");
    let grant = reqs
        .iter()
        .find(|r| r.path().ends_with("/beginGetAccess"))
        .unwrap();
    assert_eq!(grant.json()["access"], "Write");
    let pages: Vec<&Recorded> = reqs
        .iter()
        .filter(|r| r.path() == "/blob/md-abc/abcd")
        .collect();
    assert_eq!(pages.len(), 3);
    for p in &pages {
        assert!(
            p.target.contains("sig=SASSIG") && p.target.ends_with("&comp=page"),
            "{}",
            p.target
        );
        assert_eq!(p.header("x-ms-page-write"), Some("update"));
        assert_eq!(
            p.header("authorization"),
            None,
            "the SAS alone authorises page writes"
        );
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&p.body));
        assert_eq!(p.header("content-md5"), Some(md5.as_str()));
        let range = p.header("x-ms-range").unwrap();
        let (a, b) = range
            .strip_prefix("bytes=")
            .unwrap()
            .split_once('-')
            .unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(a % 512, 0);
        assert_eq!((b + 1) % 512, 0);
        assert!(b - a < 4 << 20);
    }
    let revoke_at = reqs
        .iter()
        .position(|r| r.path().ends_with("/endGetAccess"))
        .unwrap();
    let image_at = reqs
        .iter()
        .position(|r| r.method == "PUT" && r.path().ends_with("/images/ncimage-testrole"))
        .unwrap();
    assert!(
        reqs.iter()
            .rposition(|r| r.path() == "/blob/md-abc/abcd")
            .unwrap()
            < revoke_at
    );
    assert!(
        revoke_at < image_at,
        "access is revoked before the image is made"
    );
    let img = reqs[image_at].json();
    assert_eq!(img["properties"]["hyperVGeneration"], "V2");
    assert_eq!(
        img["properties"]["storageProfile"]["osDisk"]["osState"],
        "Generalized"
    );
    assert_eq!(
        img["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"],
        format!("{sub}/disks/ncimage-testrole-osdisk")
    );
    for r in reqs
        .iter()
        .filter(|r| r.path().starts_with("/subscriptions/"))
    {
        assert_eq!(r.header("authorization"), Some("Bearer eyJ0.mgmt-token"));
    }
}

#[test]
fn azure_file_that_differs_from_its_manifest_makes_no_image_on_a_local_stand_in() {
    let disk = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let s = azure_standin(disk.clone());
    let vhd = azure_vhd();
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.vhd", "vhd", &vhd);
    // One byte changes after the build (same size, still a fixed VHD).
    let mut changed = vhd.clone();
    changed[13 << 20] ^= 1;
    std::fs::write(dir.join("ncimage-testrole.vhd"), &changed).unwrap();
    let out = azure_run(d.path(), &s, &dir);
    fails_with(
        &out,
        &[
            "ncimage-testrole.vhd differs from its manifest",
            &sha256_hex(&changed),
            "no image was created and disk ncimage-testrole-osdisk was deleted",
            "build or export the image again",
        ],
    );
    let reqs = s.requests();
    assert!(
        !reqs.iter().any(|r| r.path().contains("/images/")),
        "no image call: {reqs:?}"
    );
    let revoke_at = reqs
        .iter()
        .position(|r| r.path().ends_with("/endGetAccess"))
        .unwrap();
    let delete_at = reqs
        .iter()
        .position(|r| {
            r.method == "DELETE" && r.path() == format!("{AZURE_SUB}/disks/ncimage-testrole-osdisk")
        })
        .expect("the disk is deleted");
    assert!(
        revoke_at < delete_at,
        "access is revoked, then the disk deleted"
    );
}

#[test]
fn azure_without_credentials_names_the_variables() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.vhd", "vhd", &azure_vhd());
    let targets = d.path().join("targets.toml");
    let run = |target: &str| {
        std::fs::write(
            &targets,
            format!(
                "[targets.az]\nprovider = \"azure\"\nresource_group = \"rg\"\nlocation = \"l\"\n\
                 login_endpoint = \"http://127.0.0.1:9\"\n{target}"
            ),
        )
        .unwrap();
        ncimage(
            d.path(),
            &[
                "upload",
                dir.to_str().unwrap(),
                "--to",
                "az",
                "--targets",
                targets.to_str().unwrap(),
            ],
        )
    };
    fails_with(
        &run(""),
        &[
            "target `az` (azure) has no `subscription` and AZURE_SUBSCRIPTION_ID is not set",
            "export AZURE_SUBSCRIPTION_ID",
        ],
    );
    fails_with(
        &run("subscription = \"sub-1\"\n"),
        &[
            "no Azure credentials: AZURE_TENANT_ID is not set",
            "AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID",
        ],
    );
}

#[test]
fn azure_refuses_a_file_that_is_not_a_fixed_vhd() {
    let d = tempfile::tempdir().unwrap();
    let dir = image_dir(d.path(), "ncimage-testrole.vhd", "vhd", &vec![0u8; 3 << 20]);
    std::fs::write(
        d.path().join("targets.toml"),
        "[targets.az]\nprovider = \"azure\"\nresource_group = \"rg\"\nlocation = \"l\"\n",
    )
    .unwrap();
    let out = ncimage(
        d.path(),
        &[
            "upload",
            dir.to_str().unwrap(),
            "--to",
            "az",
            "--targets",
            d.path().join("targets.toml").to_str().unwrap(),
        ],
    );
    fails_with(
        &out,
        &[
            "is not a fixed VHD Azure takes",
            "whole number of MiB plus 512",
        ],
    );
}
