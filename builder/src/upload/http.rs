//! The HTTP calls of uploads: one blocking ureq agent, replies of every status as values (the
//! caller decides what a status means), XML and JSON helpers. Nothing here logs a header value.

use std::io::Read;
use std::time::Duration;

use crate::error::{Error, Result};

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::upload(
                format!(
                    "the server's reply is not JSON ({e}): {}",
                    excerpt(&self.text())
                ),
                "check that the endpoint is the provider's API",
            )
        })
    }
}

pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A stream of a known length (sent with Content-Length).
    Reader(Box<dyn Read + Send + 'a>, u64),
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(300))
        .timeout_write(Duration::from_secs(300))
        .redirects(0)
        .build()
}

/// One request; any HTTP status is a reply, only transport failures are errors.
pub fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Body,
) -> Result<Reply> {
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = match body {
        Body::Empty => req.call(),
        Body::Bytes(b) => req.send_bytes(b),
        Body::Reader(r, len) => req.set("Content-Length", &len.to_string()).send(r),
    };
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(ureq::Error::Transport(t)) => {
            return Err(Error::upload(
                format!("{method} {}: {t}", without_query(url)),
                "check the endpoint in the target and that it is reachable from here",
            ))
        }
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
        .collect();
    let mut body = Vec::new();
    resp.into_reader()
        .take(256 << 20)
        .read_to_end(&mut body)
        .map_err(|e| {
            Error::upload(
                format!("{method} {}: reading the reply: {e}", without_query(url)),
                "run the command again",
            )
        })?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A URL without its query (presigned URLs carry signatures there): for messages.
pub fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// The first 300 characters of a reply, on one line.
pub fn excerpt(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    one.chars().take(300).collect()
}

/// Text of the first element named `tag` (local name) in an XML document.
pub fn xml_text(xml: &[u8], tag: &str) -> Option<String> {
    let text = std::str::from_utf8(xml).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    let v = doc
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == tag)
        .map(|n| n.text().unwrap_or("").to_string());
    v
}

/// For each element named `tag`, the texts of its children named in `fields`.
pub fn xml_records(xml: &[u8], tag: &str, fields: &[&str]) -> Vec<Vec<Option<String>>> {
    let Ok(text) = std::str::from_utf8(xml) else {
        return vec![];
    };
    let Ok(doc) = roxmltree::Document::parse(text) else {
        return vec![];
    };
    let v = doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == tag)
        .map(|n| {
            fields
                .iter()
                .map(|f| {
                    n.children()
                        .find(|c| c.is_element() && c.tag_name().name() == *f)
                        .map(|c| c.text().unwrap_or("").to_string())
                })
                .collect()
        })
        .collect();
    v
}

/// Escapes text for an XML element.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_xml_elements_and_records() {
        let x = br#"<?xml version="1.0"?><ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <IsTruncated>false</IsTruncated>
            <Part><PartNumber>1</PartNumber><ETag>&quot;aa&quot;</ETag><Size>5</Size></Part>
            <Part><PartNumber>2</PartNumber><ETag>"bb"</ETag><Size>3</Size></Part>
            </ListPartsResult>"#;
        assert_eq!(xml_text(x, "IsTruncated").as_deref(), Some("false"));
        let r = xml_records(x, "Part", &["PartNumber", "ETag", "Size", "Nope"]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0][1].as_deref(), Some("\"aa\""));
        assert_eq!(r[1][2].as_deref(), Some("3"));
        assert_eq!(r[1][3], None);
        assert_eq!(xml_text(b"not xml", "x"), None);
    }

    #[test]
    fn messages_drop_presigned_queries() {
        assert_eq!(
            without_query("https://h/b/k?X-Amz-Signature=abc"),
            "https://h/b/k"
        );
    }
}
