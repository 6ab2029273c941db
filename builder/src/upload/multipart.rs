//! A file into a bucket as a multipart upload: parts read in order by one reader (which also
//! hashes the whole file), sent by several threads, each part's MD5 compared with the ETag the
//! server answers (and sent as Content-MD5 and SHA-256 for servers that check), the upload id
//! kept in a state file so that an interrupted upload resumes (the server's ListParts says
//! what it holds; a part is kept only when its MD5 matches the local bytes). The object only
//! appears when the bytes read hash to the manifest's sha256; afterwards its size, multipart
//! ETag and sha256 metadata are checked.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::s3::Bucket;
use crate::error::{Error, Result};

pub const MIN_PART: u64 = 5 << 20;
pub const MAX_PART: u64 = 5 << 30;
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_OBJECT: u64 = 5 << 40;

pub struct Job<'a> {
    pub bucket: &'a Bucket,
    pub key: String,
    pub file: PathBuf,
    pub size: u64,
    /// sha256 (hex) the manifest gives for the file.
    pub sha256: String,
    pub part_size: u64,
    pub threads: usize,
    /// Send x-amz-checksum-sha256 with each part.
    pub checksums: bool,
    pub quiet: bool,
    /// Folder of resume state files.
    pub state_dir: PathBuf,
}

#[derive(Debug)]
pub struct Outcome {
    pub parts: usize,
    /// Parts already on the server from an earlier, interrupted run.
    pub resumed_parts: usize,
    pub sent_bytes: u64,
    pub secs: f64,
    /// The object was already there with this size and sha256: nothing sent.
    pub already_there: bool,
    pub etag: String,
}

#[derive(Serialize, Deserialize)]
struct State {
    endpoint: String,
    bucket: String,
    key: String,
    sha256: String,
    upload_id: String,
    part_size: u64,
}

/// Part size: at least `wanted` (and 5 MiB), doubled until the file fits in 10 000 parts.
pub fn part_size(size: u64, wanted: u64) -> Result<u64> {
    let mut p = wanted.max(MIN_PART);
    while size.div_ceil(p) > MAX_PARTS {
        p *= 2;
    }
    if p > MAX_PART || size > MAX_OBJECT {
        return Err(Error::upload(
            format!(
                "{} GiB is too large for one S3 object (at most 5 TiB)",
                size >> 30
            ),
            "use a smaller disk size in the spec, or a compressed format (qcow2)",
        ));
    }
    Ok(p)
}

/// ETag S3 gives a multipart object: MD5 of the parts' MD5s, a dash, the number of parts.
pub fn multipart_etag(md5s: &[[u8; 16]]) -> String {
    let mut h = Md5::new();
    for m in md5s {
        h.update(m);
    }
    format!("{}-{}", hex::encode(h.finalize()), md5s.len())
}

fn state_path(job: &Job) -> PathBuf {
    let id = Sha256::digest(
        format!(
            "{}\n{}\n{}\n{}",
            job.bucket.endpoint, job.bucket.name, job.key, job.sha256
        )
        .as_bytes(),
    );
    job.state_dir
        .join(format!("{}.json", &hex::encode(id)[..32]))
}

fn write_state(path: &Path, s: &State) -> Result<()> {
    let dir = path.parent().expect("state file in a folder");
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s).expect("state"))
        .map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("renaming", path))
}

struct Part {
    number: u32,
    data: Vec<u8>,
    md5: [u8; 16],
    sha256: [u8; 32],
}

struct Done {
    etag: String,
    md5: [u8; 16],
    sha256: [u8; 32],
}

pub fn upload(job: &Job) -> Result<Outcome> {
    let t0 = Instant::now();
    let b = job.bucket;
    let place = format!("s3://{}/{}", b.name, job.key);
    if let Some(o) = b.head_object(&job.key)? {
        if o.size == job.size && o.sha256.as_deref() == Some(job.sha256.as_str()) {
            return Ok(Outcome {
                parts: 0,
                resumed_parts: 0,
                sent_bytes: 0,
                secs: t0.elapsed().as_secs_f64(),
                already_there: true,
                etag: o.etag,
            });
        }
    }
    let spath = state_path(job);
    let mut existing: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    let mut resumed: Option<(String, u64)> = None;
    if let Ok(text) = std::fs::read(&spath) {
        if let Ok(s) = serde_json::from_slice::<State>(&text) {
            if s.sha256 == job.sha256 && s.key == job.key && s.bucket == b.name {
                match b.list_parts(&job.key, &s.upload_id)? {
                    Some(parts) => {
                        for p in parts {
                            existing.insert(p.number, (p.etag, p.size));
                        }
                        resumed = Some((s.upload_id, s.part_size));
                    }
                    None => tracing::info!("the earlier upload is gone; starting anew"),
                }
            }
        }
    }
    let (upload_id, part_size) = match resumed {
        Some(r) => r,
        None => {
            let part_size = part_size(job.size, job.part_size)?;
            let id = b.create_multipart(&job.key, &job.sha256, job.checksums)?;
            write_state(
                &spath,
                &State {
                    endpoint: b.endpoint.clone(),
                    bucket: b.name.clone(),
                    key: job.key.clone(),
                    sha256: job.sha256.clone(),
                    upload_id: id.clone(),
                    part_size,
                },
            )?;
            (id, part_size)
        }
    };
    let nparts = job.size.div_ceil(part_size).max(1) as u32;
    let bar = if job.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(job.size)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("upload {place}"));
    if !existing.is_empty() {
        say(
            &bar,
            format!(
                "resuming upload {}: the server holds {} of {nparts} parts",
                short(&upload_id),
                existing.len()
            ),
        );
    }

    let done: Mutex<BTreeMap<u32, Done>> = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let mut kept = 0usize;
    let mut whole = Sha256::new();
    let file = std::fs::File::open(&job.file).map_err(Error::io("opening", &job.file))?;
    let (tx, rx) = mpsc::sync_channel::<Part>(job.threads.max(1));
    let rx = Mutex::new(rx);
    let read_result: Result<()> = std::thread::scope(|s| {
        for _ in 0..job.threads.max(1) {
            s.spawn(|| loop {
                let part = match rx.lock().expect("queue").recv() {
                    Ok(p) => p,
                    Err(_) => break,
                };
                if stop.load(Ordering::SeqCst) {
                    continue;
                }
                match send_part(job, &upload_id, &part, &bar) {
                    Ok(etag) => {
                        bar.inc(part.data.len() as u64);
                        sent.fetch_add(part.data.len() as u64, Ordering::SeqCst);
                        done.lock().expect("done").insert(
                            part.number,
                            Done {
                                etag,
                                md5: part.md5,
                                sha256: part.sha256,
                            },
                        );
                    }
                    Err(e) => {
                        stop.store(true, Ordering::SeqCst);
                        failure.lock().expect("failure").get_or_insert(e);
                    }
                }
            });
        }
        let r = (|| {
            for n in 1..=nparts {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                crate::interrupt::check()?;
                let off = (n as u64 - 1) * part_size;
                let len = part_size.min(job.size - off) as usize;
                let mut data = vec![0u8; len];
                file.read_exact_at(&mut data, off)
                    .map_err(Error::io("reading", &job.file))?;
                whole.update(&data);
                let md5: [u8; 16] = Md5::digest(&data).into();
                let sha256: [u8; 32] = Sha256::digest(&data).into();
                if let Some((etag, size)) = existing.get(&n) {
                    if *size == len as u64 && *etag == hex::encode(md5) {
                        kept += 1;
                        bar.inc(len as u64);
                        done.lock().expect("done").insert(
                            n,
                            Done {
                                etag: etag.clone(),
                                md5,
                                sha256,
                            },
                        );
                        continue;
                    }
                }
                let part = Part {
                    number: n,
                    data,
                    md5,
                    sha256,
                };
                if tx.send(part).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(tx);
        if r.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        r
    });
    let failure = failure.into_inner().expect("failure");
    let done = done.into_inner().expect("done");
    if let Err(e) = read_result.and(failure.map_or(Ok(()), Err)) {
        bar.abandon_with_message("stopped");
        let e = match e {
            Error::Upload { what, help } => Error::upload(
                format!(
                    "{what} ({} of {nparts} parts of {place} are on the server)",
                    done.len()
                ),
                format!("{help}; the same command resumes the upload"),
            ),
            Error::Interrupted => Error::upload(
                format!(
                    "upload interrupted with {} of {nparts} parts of {place} on the server",
                    done.len()
                ),
                format!(
                    "the same command resumes it (the upload id is kept in {})",
                    job.state_dir.display()
                ),
            ),
            other => other,
        };
        return Err(e);
    }
    let got = hex::encode(whole.finalize());
    if got != job.sha256 {
        bar.abandon_with_message("aborted");
        let _ = b.abort(&job.key, &upload_id);
        let _ = std::fs::remove_file(&spath);
        return Err(Error::upload(
            format!(
                "{} has sha256 {got}, but its manifest says {}: the upload to {place} was \
                 aborted and nothing was stored",
                job.file.display(),
                job.sha256
            ),
            "the file changed after it was built: build or export the image again",
        ));
    }
    if done.len() != nparts as usize {
        return Err(Error::upload(
            format!(
                "only {} of {nparts} parts of {place} were uploaded",
                done.len()
            ),
            "run the same command again to resume",
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let list: Vec<(u32, String, Option<String>)> = done
        .iter()
        .map(|(n, d)| {
            (
                *n,
                d.etag.clone(),
                job.checksums.then(|| b64.encode(d.sha256)),
            )
        })
        .collect();
    bar.set_message("completing");
    b.complete(&job.key, &upload_id, &list)?;
    let md5s: Vec<[u8; 16]> = done.values().map(|d| d.md5).collect();
    let expected_etag = multipart_etag(&md5s);
    let info = b.head_object(&job.key)?.ok_or_else(|| {
        Error::upload(
            format!("{place} is missing after its upload completed"),
            "run the same command again",
        )
    })?;
    let _ = std::fs::remove_file(&spath);
    if info.size != job.size {
        return Err(Error::upload(
            format!(
                "{place} holds {} bytes after the upload, not {}",
                info.size, job.size
            ),
            "delete the object and upload again",
        ));
    }
    if info.etag.contains('-') && info.etag != expected_etag {
        return Err(Error::upload(
            format!(
                "{place} has ETag {} but its parts' MD5s give {expected_etag}: the stored \
                 bytes differ from the file",
                info.etag
            ),
            "delete the object and upload again",
        ));
    }
    if info.sha256.as_deref() != Some(job.sha256.as_str()) {
        tracing::warn!("the server did not keep the sha256 metadata of {place}");
    }
    bar.finish_with_message("verified");
    Ok(Outcome {
        parts: nparts as usize,
        resumed_parts: kept,
        sent_bytes: sent.into_inner(),
        secs: t0.elapsed().as_secs_f64(),
        already_there: false,
        etag: info.etag,
    })
}

/// Sends one part, up to 4 times: again after a transport error, a 5xx, a checksum the server
/// rejects, or an ETag that is not the MD5 of the bytes read (corrupted on the way).
fn send_part(job: &Job, upload_id: &str, p: &Part, bar: &ProgressBar) -> Result<String> {
    let want = hex::encode(p.md5);
    let mut last = None;
    for attempt in 1..=4 {
        if attempt > 1 {
            std::thread::sleep(std::time::Duration::from_millis(500 * attempt));
        }
        let r = match job.bucket.upload_part(
            &job.key,
            upload_id,
            super::s3::PartBody {
                number: p.number,
                data: &p.data,
                md5: &p.md5,
                sha256: &p.sha256,
            },
            job.checksums,
        ) {
            Ok(r) => r,
            Err(e) => {
                say(bar, format!("part {}: {e}; sending it again", p.number));
                last = Some(e);
                continue;
            }
        };
        if r.ok() {
            let etag = super::s3::unquote(r.header("etag").unwrap_or(""));
            if etag == want || (etag.len() != 32 && !etag.is_empty()) {
                // A 32-hex ETag is the part's MD5; others (encrypted buckets) are opaque.
                return Ok(etag);
            }
            let msg = format!(
                "part {}: the server stored bytes whose MD5 is {etag}, not {want} as read \
                 (corrupted on the way)",
                p.number
            );
            say(bar, format!("{msg}; sending it again"));
            last = Some(Error::upload(msg, "check the network path to the server"));
            continue;
        }
        let code = super::http::xml_text(&r.body, "Code").unwrap_or_default();
        let transient = r.status >= 500
            || matches!(
                code.as_str(),
                "BadDigest" | "InvalidDigest" | "XAmzContentSHA256Mismatch" | "RequestTimeout"
            );
        let e = job
            .bucket
            .error(&format!("uploading part {}", p.number), &job.key, &r);
        if !transient {
            return Err(e);
        }
        say(bar, format!("{e}; sending it again"));
        last = Some(e);
    }
    Err(last.expect("an attempt"))
}

/// A line above the bar, or on stderr when the bar is hidden (not a terminal, --quiet).
fn say(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_fit_s3s_limits() {
        assert_eq!(part_size(100 << 20, 16 << 20).unwrap(), 16 << 20);
        assert_eq!(part_size(100 << 20, 1 << 20).unwrap(), MIN_PART);
        // 1 TiB in 16 MiB parts is 65 536 parts: doubled to 128 MiB (8 192 parts).
        assert_eq!(part_size(1 << 40, 16 << 20).unwrap(), 128 << 20);
        let err = part_size(6 << 40, 16 << 20).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn multipart_etag_is_md5_of_md5s() {
        // Two parts "a" and "b": md5(md5("a") || md5("b")) with "-2".
        let a: [u8; 16] = Md5::digest(b"a").into();
        let b: [u8; 16] = Md5::digest(b"b").into();
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        assert_eq!(
            multipart_etag(&[a, b]),
            format!("{}-2", hex::encode(Md5::digest(&cat)))
        );
        assert_eq!(
            hex::encode(Md5::digest(b"a")),
            "0cc175b9c0f1b6a831c399e269772661"
        );
    }
}
