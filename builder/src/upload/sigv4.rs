//! AWS Signature Version 4 (header and presigned-URL forms), with HMAC from `ring` (already
//! built for rustls) and SHA-256 from `sha2`. Checked against AWS's documented examples.

use ring::hmac;
use sha2::{Digest, Sha256};

use super::credentials::AwsCredentials;

/// The SHA-256 of an empty payload (hex).
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What a signature covers.
pub struct Request<'a> {
    pub method: &'a str,
    /// Host header value (with `:port` when not the scheme's default).
    pub host: &'a str,
    /// Canonical path, already URI-encoded (segments encoded, `/` kept).
    pub path: &'a str,
    /// Query parameters, not encoded.
    pub query: &'a [(String, String)],
    /// Headers to sign besides host, x-amz-date and x-amz-security-token (any case).
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the payload, or `UNSIGNED-PAYLOAD`.
    pub payload_sha256: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

/// Headers to add to the request: x-amz-date, x-amz-security-token (with a session token) and
/// authorization.
pub fn sign(creds: &AwsCredentials, r: &Request) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    headers.push(("host".into(), r.host.to_string()));
    headers.push(("x-amz-date".into(), r.amz_date.to_string()));
    let mut out = vec![("x-amz-date".to_string(), r.amz_date.to_string())];
    if let Some(t) = creds.session_token() {
        headers.push(("x-amz-security-token".into(), t.to_string()));
        out.push(("x-amz-security-token".into(), t.to_string()));
    }
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        r.method,
        r.path,
        canonical_query(r.query),
        canonical_headers,
        signed,
        r.payload_sha256
    );
    let day = &r.amz_date[..8];
    let scope = format!("{day}/{}/{}/aws4_request", r.region, r.service);
    let signature = signature(creds, r, &scope, &canonical);
    out.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            creds.access_key_id
        ),
    ));
    out
}

/// Query parameters of a presigned URL (host the only signed header, unsigned payload),
/// the signature last.
pub fn presign(creds: &AwsCredentials, r: &Request, expires_secs: u64) -> Vec<(String, String)> {
    let day = &r.amz_date[..8];
    let scope = format!("{day}/{}/{}/aws4_request", r.region, r.service);
    let mut query: Vec<(String, String)> = r.query.to_vec();
    query.push(("X-Amz-Algorithm".into(), "AWS4-HMAC-SHA256".into()));
    query.push((
        "X-Amz-Credential".into(),
        format!("{}/{scope}", creds.access_key_id),
    ));
    query.push(("X-Amz-Date".into(), r.amz_date.to_string()));
    query.push(("X-Amz-Expires".into(), expires_secs.to_string()));
    if let Some(t) = creds.session_token() {
        query.push(("X-Amz-Security-Token".into(), t.to_string()));
    }
    query.push(("X-Amz-SignedHeaders".into(), "host".into()));
    let canonical = format!(
        "{}\n{}\n{}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD",
        r.method,
        r.path,
        canonical_query(&query),
        r.host
    );
    let signature = signature(creds, r, &scope, &canonical);
    query.push(("X-Amz-Signature".into(), signature));
    query
}

fn signature(creds: &AwsCredentials, r: &Request, scope: &str, canonical: &str) -> String {
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        r.amz_date,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = format!("AWS4{}", creds.secret_access_key()).into_bytes();
    for part in [&r.amz_date[..8], r.region, r.service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    hex::encode(hmac_sha256(&key, to_sign.as_bytes()))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sorted, each key and value URI-encoded (`/` too).
pub fn canonical_query(q: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = q
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// AWS's URI encoding: unreserved characters kept, everything else %XX (upper case); `/` kept
/// unless `slash` is set.
pub fn uri_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` for a time (UTC).
pub fn amz_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(id: &str, secret: &str) -> AwsCredentials {
        AwsCredentials::new(id.into(), secret.into(), None)
    }

    /// AWS General Reference, "Signature Version 4 signing process", the IAM ListUsers example.
    #[test]
    fn reproduces_the_aws_general_reference_example() {
        let c = creds("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        let query = vec![
            ("Action".to_string(), "ListUsers".to_string()),
            ("Version".to_string(), "2010-05-08".to_string()),
        ];
        let headers = vec![(
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        )];
        let h = sign(
            &c,
            &Request {
                method: "GET",
                host: "iam.amazonaws.com",
                path: "/",
                query: &query,
                headers: &headers,
                payload_sha256: EMPTY_SHA256,
                region: "us-east-1",
                service: "iam",
                amz_date: "20150830T123600Z",
            },
        );
        let auth = &h.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    /// Amazon S3 API Reference, "Signature calculation: transfer payload in a single chunk",
    /// the GET Object example (Range header, empty payload).
    #[test]
    fn reproduces_the_s3_get_object_example() {
        let c = creds(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let headers = vec![
            ("Range".to_string(), "bytes=0-9".to_string()),
            ("x-amz-content-sha256".to_string(), EMPTY_SHA256.to_string()),
        ];
        let h = sign(
            &c,
            &Request {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: &[],
                headers: &headers,
                payload_sha256: EMPTY_SHA256,
                region: "us-east-1",
                service: "s3",
                amz_date: "20130524T000000Z",
            },
        );
        let auth = &h.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert!(auth.ends_with(
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        ));
    }

    /// Amazon S3 API Reference, "Authenticating requests: using query parameters", the
    /// presigned GET example (86400 s).
    #[test]
    fn reproduces_the_s3_presigned_url_example() {
        let c = creds(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let q = presign(
            &c,
            &Request {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: &[],
                headers: &[],
                payload_sha256: "UNSIGNED-PAYLOAD",
                region: "us-east-1",
                service: "s3",
                amz_date: "20130524T000000Z",
            },
            86400,
        );
        assert_eq!(
            q.last().unwrap().1,
            "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn a_session_token_is_signed_and_sent() {
        let c = AwsCredentials::new("AKID".into(), "s".into(), Some("TOKEN".into()));
        let h = sign(
            &c,
            &Request {
                method: "GET",
                host: "h",
                path: "/",
                query: &[],
                headers: &[],
                payload_sha256: EMPTY_SHA256,
                region: "r",
                service: "s3",
                amz_date: "20150830T123600Z",
            },
        );
        assert!(h.contains(&("x-amz-security-token".into(), "TOKEN".into())));
        let auth = &h.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert!(auth.contains("SignedHeaders=host;x-amz-date;x-amz-security-token"));
    }

    #[test]
    fn encodes_like_aws() {
        assert_eq!(uri_encode("a b/c~d*", false), "a%20b/c~d%2A");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(
            canonical_query(&[("b".into(), "2".into()), ("a".into(), "x y".into())]),
            "a=x%20y&b=2"
        );
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_440_938_160)),
            "20150830T123600Z"
        );
        // A leap day.
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "20240229T123456Z"
        );
    }
}
