//! The client side of the control API, for `hugevisor migrate`: one request per
//! connection, as the server serves them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest answer read (a migration report is a few KiB).
const MAX_ANSWER_BYTES: u64 = 16 << 20;

/// One request to the API socket at `path`; returns (status, JSON body or null).
pub fn call(
    path: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| Error::Io { what, source }
    };
    let mut conn = UnixStream::connect(path).map_err(io("connecting to the API socket"))?;
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        conn,
        "{method} {endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .map_err(io("writing to"))?;
    let mut response = String::new();
    (&mut conn)
        .take(MAX_ANSWER_BYTES)
        .read_to_string(&mut response)
        .map_err(io("reading from"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::ApiAnswer {
            path: path.to_path_buf(),
            what: "no HTTP status line".into(),
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}
