//! An S3-compatible bucket: the few calls an image upload needs (multipart create, part, list,
//! complete, abort; HEAD; GET for verification; presigned GET), signed with SigV4.

use std::io::Read;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::credentials::AwsCredentials;
use super::http::{self, Body, Reply};
use super::sigv4;
use crate::error::{Error, Result};

pub struct Bucket {
    agent: ureq::Agent,
    scheme: String,
    /// host[:port] of the endpoint (without the bucket).
    host: String,
    pub name: String,
    pub region: String,
    path_style: bool,
    creds: AwsCredentials,
    /// The endpoint as given (for messages).
    pub endpoint: String,
}

/// HEAD of an object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
    /// x-amz-meta-sha256, which `ncimage upload` sets.
    pub sha256: Option<String>,
}

/// One part's bytes and their digests.
pub struct PartBody<'a> {
    pub number: u32,
    pub data: &'a [u8],
    pub md5: &'a [u8; 16],
    pub sha256: &'a [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePart {
    pub number: u32,
    pub etag: String,
    pub size: u64,
}

impl Bucket {
    /// `endpoint`: scheme://host[:port] (default: AWS's regional S3 endpoint). Path-style
    /// addressing (endpoint/bucket/key) is the default for a given endpoint, virtual-hosted
    /// (bucket.endpoint/key) for AWS.
    pub fn new(
        endpoint: Option<&str>,
        bucket: &str,
        region: &str,
        path_style: Option<bool>,
        creds: AwsCredentials,
    ) -> Result<Bucket> {
        let endpoint_s = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let url = url::Url::parse(&endpoint_s).map_err(|e| {
            Error::upload(
                format!("endpoint `{endpoint_s}` is not a URL: {e}"),
                "write it as https://host[:port] (or http:// for a local server)",
            )
        })?;
        let host = url.host_str().unwrap_or("").to_string();
        if host.is_empty() || !matches!(url.scheme(), "http" | "https") {
            return Err(Error::upload(
                format!("endpoint `{endpoint_s}` needs http:// or https:// and a host"),
                "write it as https://host[:port]",
            ));
        }
        if bucket.is_empty() || bucket.contains('/') {
            return Err(Error::upload(
                format!("bucket name `{bucket}` is not valid"),
                "give the bucket's name alone (a key prefix goes in `prefix`)",
            ));
        }
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        Ok(Bucket {
            agent: http::agent(),
            scheme: url.scheme().to_string(),
            host,
            name: bucket.to_string(),
            region: region.to_string(),
            path_style: path_style.unwrap_or(endpoint.is_some()),
            creds,
            endpoint: endpoint_s.trim_end_matches('/').to_string(),
        })
    }

    pub fn credentials(&self) -> &AwsCredentials {
        &self.creds
    }

    /// (host, canonical path) of a key ("" for the bucket itself).
    fn location(&self, key: &str) -> (String, String) {
        let key = sigv4::uri_encode(key, false);
        if self.path_style {
            (self.host.clone(), format!("/{}/{key}", self.name))
        } else {
            (format!("{}.{}", self.name, self.host), format!("/{key}"))
        }
    }

    /// The object's plain URL (s3://-less, as a provider's import call wants it).
    pub fn url_of(&self, key: &str) -> String {
        let (host, path) = self.location(key);
        format!("{}://{host}{path}", self.scheme)
    }

    /// A presigned GET URL valid for `secs`.
    pub fn presigned_get(&self, key: &str, secs: u64) -> String {
        let (host, path) = self.location(key);
        let date = sigv4::amz_date(std::time::SystemTime::now());
        let q = sigv4::presign(
            &self.creds,
            &sigv4::Request {
                method: "GET",
                host: &host,
                path: &path,
                query: &[],
                headers: &[],
                payload_sha256: "UNSIGNED-PAYLOAD",
                region: &self.region,
                service: "s3",
                amz_date: &date,
            },
            secs,
        );
        let query: Vec<String> = q
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    sigv4::uri_encode(k, true),
                    sigv4::uri_encode(v, true)
                )
            })
            .collect();
        format!("{}://{host}{path}?{}", self.scheme, query.join("&"))
    }

    fn send(
        &self,
        method: &str,
        key: &str,
        query: &[(String, String)],
        mut headers: Vec<(String, String)>,
        body: Body,
        payload_sha256: &str,
    ) -> Result<Reply> {
        let (host, path) = self.location(key);
        headers.push(("x-amz-content-sha256".into(), payload_sha256.into()));
        let date = sigv4::amz_date(std::time::SystemTime::now());
        let signed = sigv4::sign(
            &self.creds,
            &sigv4::Request {
                method,
                host: &host,
                path: &path,
                query,
                headers: &headers,
                payload_sha256,
                region: &self.region,
                service: "s3",
                amz_date: &date,
            },
        );
        headers.extend(signed);
        let mut url = format!("{}://{host}{path}", self.scheme);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&sigv4::canonical_query(query));
        }
        tracing::debug!(method, url = %url, "s3 request");
        http::call(&self.agent, method, &url, &headers, body)
    }

    /// The error a failed reply means, in words.
    pub fn error(&self, what: &str, key: &str, r: &Reply) -> Error {
        let code = http::xml_text(&r.body, "Code").unwrap_or_default();
        let message = http::xml_text(&r.body, "Message").unwrap_or_default();
        let place = if key.is_empty() {
            format!("bucket `{}` at {}", self.name, self.endpoint)
        } else {
            format!("s3://{}/{key} at {}", self.name, self.endpoint)
        };
        match (r.status, code.as_str()) {
            (404, "NoSuchBucket") | (404, "") if key.is_empty() || code == "NoSuchBucket" => {
                Error::upload(
                    format!("{what}: bucket `{}` does not exist at {}", self.name, self.endpoint),
                    "create the bucket first, or fix `bucket`, `endpoint` and `region` in the target",
                )
            }
            (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" | "InvalidToken"
            | "ExpiredToken")
            | (401 | 403, _) => Error::upload(
                format!(
                    "{what} {place}: the server refused the credentials from {} (HTTP {} {code}{})",
                    self.creds.source,
                    r.status,
                    if message.is_empty() { String::new() } else { format!(": {message}") }
                ),
                "check the access key, its secret and its permissions on the bucket",
            ),
            (301, _) | (_, "PermanentRedirect" | "AuthorizationHeaderMalformed") => Error::upload(
                format!("{what} {place}: {} {code}: {message}", r.status),
                "the bucket is in another region: set `region` in the target to the bucket's",
            ),
            _ => Error::upload(
                format!(
                    "{what} {place}: HTTP {} {code}{}",
                    r.status,
                    if message.is_empty() {
                        format!(" {}", http::excerpt(&r.text()))
                    } else {
                        format!(": {message}")
                    }
                ),
                "see the server's message; run again to retry",
            ),
        }
    }

    pub fn head_bucket(&self) -> Result<()> {
        let r = self.send("HEAD", "", &[], vec![], Body::Empty, sigv4::EMPTY_SHA256)?;
        if r.ok() {
            Ok(())
        } else {
            Err(self.error("checking the bucket", "", &r))
        }
    }

    pub fn head_object(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let r = self.send("HEAD", key, &[], vec![], Body::Empty, sigv4::EMPTY_SHA256)?;
        match r.status {
            404 => Ok(None),
            _ if r.ok() => Ok(Some(ObjectInfo {
                size: r
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                etag: unquote(r.header("etag").unwrap_or("")),
                sha256: r.header("x-amz-meta-sha256").map(str::to_string),
            })),
            _ => Err(self.error("reading the object's metadata", key, &r)),
        }
    }

    /// Starts a multipart upload whose object records the artifact's sha256 as metadata.
    pub fn create_multipart(&self, key: &str, sha256: &str, checksums: bool) -> Result<String> {
        let mut headers = vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("x-amz-meta-sha256".into(), sha256.to_string()),
        ];
        if checksums {
            headers.push(("x-amz-checksum-algorithm".into(), "SHA256".into()));
        }
        let q = vec![("uploads".to_string(), String::new())];
        let r = self.send("POST", key, &q, headers, Body::Empty, sigv4::EMPTY_SHA256)?;
        if !r.ok() {
            return Err(self.error("starting the upload", key, &r));
        }
        http::xml_text(&r.body, "UploadId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Error::upload(
                    format!(
                        "starting the upload of s3://{}/{key}: no UploadId in the reply: {}",
                        self.name,
                        http::excerpt(&r.text())
                    ),
                    "check that the endpoint is an S3-compatible server",
                )
            })
    }

    /// Uploads one part with its MD5 (Content-MD5), its SHA-256 as the signed payload hash and,
    /// with `checksums`, as x-amz-checksum-sha256. Returns the server's reply (ETag in it).
    pub fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part: PartBody,
        checksums: bool,
    ) -> Result<Reply> {
        let PartBody {
            number,
            data,
            md5,
            sha256,
        } = part;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut headers = vec![("content-md5".into(), b64.encode(md5))];
        if checksums {
            headers.push(("x-amz-checksum-sha256".into(), b64.encode(sha256)));
        }
        let q = vec![
            ("partNumber".to_string(), number.to_string()),
            ("uploadId".to_string(), upload_id.to_string()),
        ];
        self.send(
            "PUT",
            key,
            &q,
            headers,
            Body::Bytes(data),
            &hex::encode(sha256),
        )
    }

    /// The parts the server holds for an upload; None when the upload no longer exists.
    pub fn list_parts(&self, key: &str, upload_id: &str) -> Result<Option<Vec<RemotePart>>> {
        let mut parts = Vec::new();
        let mut marker = String::new();
        loop {
            let mut q = vec![("uploadId".to_string(), upload_id.to_string())];
            if !marker.is_empty() {
                q.push(("part-number-marker".to_string(), marker.clone()));
            }
            let r = self.send("GET", key, &q, vec![], Body::Empty, sigv4::EMPTY_SHA256)?;
            if r.status == 404 {
                return Ok(None);
            }
            if !r.ok() {
                return Err(self.error("listing the uploaded parts", key, &r));
            }
            for rec in http::xml_records(&r.body, "Part", &["PartNumber", "ETag", "Size"]) {
                if let [Some(n), Some(e), Some(s)] = &rec[..] {
                    if let (Ok(n), Ok(s)) = (n.parse(), s.parse()) {
                        parts.push(RemotePart {
                            number: n,
                            etag: unquote(e),
                            size: s,
                        });
                    }
                }
            }
            let truncated = http::xml_text(&r.body, "IsTruncated").as_deref() == Some("true");
            let next = http::xml_text(&r.body, "NextPartNumberMarker").unwrap_or_default();
            if !truncated || next.is_empty() || next == marker {
                break;
            }
            marker = next;
        }
        Ok(Some(parts))
    }

    /// Completes an upload from (number, ETag, base64 SHA-256 when checksums are on).
    pub fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String, Option<String>)],
    ) -> Result<String> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag, sha) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag>",
                http::xml_escape(etag)
            ));
            if let Some(s) = sha {
                xml.push_str(&format!("<ChecksumSHA256>{s}</ChecksumSHA256>"));
            }
            xml.push_str("</Part>");
        }
        xml.push_str("</CompleteMultipartUpload>");
        let sha = hex::encode(Sha256::digest(xml.as_bytes()));
        let q = vec![("uploadId".to_string(), upload_id.to_string())];
        let headers = vec![("content-type".into(), "application/xml".into())];
        let r = self.send("POST", key, &q, headers, Body::Bytes(xml.as_bytes()), &sha)?;
        // S3 may answer 200 with an <Error> body.
        if !r.ok() || http::xml_text(&r.body, "Code").is_some() {
            return Err(self.error("completing the upload", key, &r));
        }
        Ok(unquote(
            &http::xml_text(&r.body, "ETag").unwrap_or_default(),
        ))
    }

    pub fn abort(&self, key: &str, upload_id: &str) -> Result<()> {
        let q = vec![("uploadId".to_string(), upload_id.to_string())];
        let r = self.send("DELETE", key, &q, vec![], Body::Empty, sigv4::EMPTY_SHA256)?;
        if r.ok() || r.status == 404 {
            Ok(())
        } else {
            Err(self.error("aborting the upload", key, &r))
        }
    }

    /// Reads the whole object back: (size, sha256 hex).
    pub fn object_sha256(&self, key: &str) -> Result<(u64, String)> {
        let (host, path) = self.location(key);
        let date = sigv4::amz_date(std::time::SystemTime::now());
        let mut headers = vec![(
            "x-amz-content-sha256".to_string(),
            sigv4::EMPTY_SHA256.to_string(),
        )];
        headers.extend(sigv4::sign(
            &self.creds,
            &sigv4::Request {
                method: "GET",
                host: &host,
                path: &path,
                query: &[],
                headers: &headers,
                payload_sha256: sigv4::EMPTY_SHA256,
                region: &self.region,
                service: "s3",
                amz_date: &date,
            },
        ));
        let url = format!("{}://{host}{path}", self.scheme);
        let mut req = self.agent.get(&url);
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        let resp = req.call().map_err(|e| match e {
            ureq::Error::Status(code, _) => Error::upload(
                format!("reading s3://{}/{key} back: HTTP {code}", self.name),
                "check that the object exists",
            ),
            ureq::Error::Transport(t) => Error::upload(
                format!("reading s3://{}/{key} back: {t}", self.name),
                "check the endpoint",
            ),
        })?;
        let mut reader = resp.into_reader();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = reader.read(&mut buf).map_err(|e| {
                Error::upload(
                    format!("reading s3://{}/{key} back: {e}", self.name),
                    "run again",
                )
            })?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        Ok((n, hex::encode(h.finalize())))
    }

    /// PUT of a small object in one request (tests, markers).
    pub fn put_object(&self, key: &str, data: &[u8]) -> Result<()> {
        let sha = hex::encode(Sha256::digest(data));
        let r = self.send("PUT", key, &[], vec![], Body::Bytes(data), &sha)?;
        if r.ok() {
            Ok(())
        } else {
            Err(self.error("writing the object", key, &r))
        }
    }

    /// Creates the bucket (tests against a local server).
    pub fn create(&self) -> Result<()> {
        let r = self.send("PUT", "", &[], vec![], Body::Empty, sigv4::EMPTY_SHA256)?;
        if r.ok() {
            Ok(())
        } else {
            Err(self.error("creating the bucket", "", &r))
        }
    }
}

pub fn unquote(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(endpoint: Option<&str>, path_style: Option<bool>) -> Bucket {
        Bucket::new(
            endpoint,
            "images",
            "eu-central-1",
            path_style,
            AwsCredentials::new("AKID".into(), "secret".into(), None),
        )
        .unwrap()
    }

    #[test]
    fn addresses_objects_path_style_or_virtual_hosted() {
        let local = bucket(Some("http://127.0.0.1:9000"), None);
        assert_eq!(
            local.url_of("a b/x.raw"),
            "http://127.0.0.1:9000/images/a%20b/x.raw"
        );
        let aws = bucket(None, None);
        assert_eq!(
            aws.url_of("x.raw"),
            "https://images.s3.eu-central-1.amazonaws.com/x.raw"
        );
        let spaces = bucket(Some("https://fra1.example.test"), Some(false));
        assert_eq!(spaces.url_of("k"), "https://images.fra1.example.test/k");
    }

    #[test]
    fn presigned_urls_carry_a_signature_and_no_secret() {
        let b = bucket(Some("http://127.0.0.1:9000"), None);
        let u = b.presigned_get("x.qcow2", 3600);
        assert!(
            u.starts_with("http://127.0.0.1:9000/images/x.qcow2?X-Amz-Algorithm=AWS4-HMAC-SHA256")
        );
        assert!(u.contains("X-Amz-Expires=3600"));
        assert!(u.contains("&X-Amz-Signature="));
        assert!(!u.contains("secret"));
    }

    #[test]
    fn bad_endpoints_and_buckets_are_refused() {
        let c = || AwsCredentials::new("A".into(), "s".into(), None);
        assert!(Bucket::new(Some("ftp://h"), "b", "r", None, c()).is_err());
        assert!(Bucket::new(Some("not a url"), "b", "r", None, c()).is_err());
        assert!(Bucket::new(None, "b/c", "r", None, c()).is_err());
    }
}
