//! HTTP/1.1 as the control API speaks it: one request per connection, read against a
//! deadline and within fixed bounds (head size, header count, body size) before any of it
//! is looked at, and JSON answers — errors included — that close the connection.
//!
//! The bounds are what keeps a local client from costing the VMM memory or a thread for
//! long: a 1 GiB header line, a silent client or one that sends a byte a second are each
//! answered (431, 408) and closed.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The request line and headers together, at most.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Header lines, at most.
pub const MAX_HEADERS: usize = 64;
/// A request body, at most (every body this API takes is well under 1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A whole request must arrive within this, however it is split into writes.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// A client must take an answer within this.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A request, read whole and within the bounds.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// A request that cannot be served as sent.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the request line is not `METHOD PATH HTTP/1.x`: {0:?}")]
    RequestLine(String),
    #[error("the request's head is not ASCII text")]
    NotText,
    #[error("the request's line and headers are over {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("the request has more than {max} header lines")]
    TooManyHeaders { max: usize },
    #[error("header line {0:?} has no `:`")]
    Header(String),
    #[error("Content-Length {0:?} is not a byte count")]
    ContentLength(String),
    #[error("a body of {len} bytes is over this API's limit of {max}")]
    BodyTooLarge { len: u64, max: usize },
    #[error("Transfer-Encoding {0:?} is not supported; send the body with a Content-Length")]
    TransferEncoding(String),
    #[error("the request did not arrive within {0:?}; send it whole")]
    Timeout(Duration),
    #[error("the connection closed before the request was complete")]
    Truncated,
    #[error("reading the request: {0}")]
    Io(#[source] std::io::Error),
}

impl HttpError {
    /// The status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::TransferEncoding(_) => 501,
            HttpError::Timeout(_) => 408,
            _ => 400,
        }
    }
}

/// Reads one request from `conn`, all of it before `deadline`.
pub fn read_request(conn: &UnixStream, deadline: Instant) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge {
                max: MAX_HEAD_BYTES,
            });
        }
        // Never read past the head's bound: a flood is refused, not buffered.
        let want = (MAX_HEAD_BYTES - buf.len()).min(4096);
        if read_some(conn, &mut buf, want, deadline)? == 0 {
            return Err(HttpError::Truncated);
        }
    };
    let head = std::str::from_utf8(&buf[..head_end.start]).map_err(|_| HttpError::NotText)?;
    let mut lines = head.split("\r\n").flat_map(|l| l.split('\n'));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ').filter(|p| !p.is_empty());
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(HttpError::RequestLine(clip(request_line)));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || !target.starts_with('/') {
        return Err(HttpError::RequestLine(clip(request_line)));
    }
    let mut content_length = 0u64;
    let mut expect_continue = false;
    for (n, line) in lines.filter(|l| !l.is_empty()).enumerate() {
        if n >= MAX_HEADERS {
            return Err(HttpError::TooManyHeaders { max: MAX_HEADERS });
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Header(clip(line)))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| HttpError::ContentLength(clip(value)))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(HttpError::TransferEncoding(clip(value)));
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    if content_length > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge {
            len: content_length,
            max: MAX_BODY_BYTES,
        });
    }
    let len = content_length as usize;
    let (method, path) = (
        method.to_string(),
        target
            .split(['?', '#'])
            .next()
            .unwrap_or(target)
            .to_string(),
    );
    let mut body = buf.split_off(head_end.end);
    if expect_continue && body.len() < len {
        // curl asks before sending a larger body; answering lets it go on at once.
        let mut w = conn;
        let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while body.len() < len {
        let want = len - body.len();
        if read_some(conn, &mut body, want, deadline)? == 0 {
            return Err(HttpError::Truncated);
        }
    }
    body.truncate(len);
    Ok(Request { method, path, body })
}

/// Where the head ends: the blank line, and the first byte after it.
fn find_head_end(buf: &[u8]) -> Option<std::ops::Range<usize>> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i..i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i..i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.start <= b.start { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Reads at most `want` more bytes into `buf`, waiting no later than `deadline`.
fn read_some(
    mut conn: &UnixStream,
    buf: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
) -> Result<usize, HttpError> {
    let mut chunk = [0u8; 4096];
    let want = want.min(chunk.len());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout(REQUEST_WITHIN));
        }
        conn.set_read_timeout(Some(left)).map_err(HttpError::Io)?;
        match conn.read(&mut chunk[..want]) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HttpError::Timeout(REQUEST_WITHIN))
            }
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// At most 80 characters of what a client sent, for an error message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// An answer: the status, a JSON body (none for 204), and an `Allow` header for 405.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
    pub allow: Option<String>,
}

impl Answer {
    pub fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body: Some(body),
            allow: None,
        }
    }

    pub fn no_content() -> Answer {
        Answer {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// An error: `{"error": message}`, and `"field"` when one field of the body is at fault.
    pub fn error(status: u16, message: &str, field: Option<&str>) -> Answer {
        let mut body = serde_json::json!({ "error": message });
        if let Some(f) = field {
            body["field"] = Value::from(f);
        }
        Answer::json(status, body)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Writes `answer` and flushes it; the connection closes after it.
pub fn write_answer(mut conn: &UnixStream, answer: &Answer) -> std::io::Result<()> {
    conn.set_write_timeout(Some(ANSWER_WITHIN))?;
    let text = answer
        .body
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    let allow = answer
        .allow
        .as_ref()
        .map(|a| format!("Allow: {a}\r\n"))
        .unwrap_or_default();
    let content_type = if answer.body.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    write!(
        conn,
        "HTTP/1.1 {} {}\r\nServer: hugevisor\r\n{content_type}{allow}Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
        answer.status,
        reason(answer.status),
        text.len()
    )?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(raw).unwrap();
        drop(a.shutdown(std::net::Shutdown::Write));
        read_request(&b, Instant::now() + Duration::from_secs(2))
    }

    #[test]
    fn reads_a_request_with_a_body_and_drops_the_query() {
        let r =
            parse(b"PUT /api/v1/vm.pause?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PUT", "/api/v1/vm.pause")
        );
        assert_eq!(r.body, b"{}");
        let r = parse(b"GET /api/v1/vm.info HTTP/1.0\n\n").unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn refuses_what_is_out_of_bounds_naming_it() {
        let huge = format!(
            "GET /x HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(parse(huge.as_bytes()).unwrap_err().status(), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
        let e = parse(format!("GET /x HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
        assert!(matches!(e, HttpError::TooManyHeaders { .. }), "{e}");
        let e = parse(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 413);
        let e = parse(b"PUT /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n").unwrap_err();
        assert!(e.to_string().contains("ten"), "{e}");
        let e = parse(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 501);
        assert_eq!(parse(b"HELLO\r\n\r\n").unwrap_err().status(), 400);
        let e = parse(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").unwrap_err();
        assert!(matches!(e, HttpError::Truncated), "{e}");
    }

    #[test]
    fn a_silent_client_times_out() {
        let (_a, b) = UnixStream::pair().unwrap();
        let e = read_request(&b, Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.status(), 408, "{e}");
    }
}
