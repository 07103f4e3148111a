//! A client for hugevisor's control API (HTTP/1.1 + JSON on a unix socket in Cloud
//! Hypervisor's shape, see docs/api.yaml), as the tests and the benchmark harness talk to
//! a running `hugevisor run --api-socket PATH`: one request per connection, as the server
//! serves them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A failed exchange with the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to the API socket {path}: {source} (is that `hugevisor run --api-socket` still running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the API socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API at {path} answered something that is not HTTP: {answer:?}")]
    NotHttp { path: PathBuf, answer: String },
    #[error("{method} {endpoint} at {path} answered HTTP {status}: {body}")]
    Refused {
        path: PathBuf,
        method: &'static str,
        endpoint: &'static str,
        status: u16,
        body: Value,
    },
}

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// An answer: the HTTP status and the JSON body (`null` when there is none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// One request to the API socket at `path`.
pub fn call(
    path: &Path,
    method: Method,
    endpoint: &str,
    body: Option<&Value>,
) -> Result<Answer, ApiError> {
    let io = |source| ApiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let text = body.map(Value::to_string).unwrap_or_default();
    write!(
        conn,
        "{} {endpoint} HTTP/1.1\r\nHost: hugevisor\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        method.as_str(),
        text.len()
    )
    .map_err(io)?;
    let mut response = String::new();
    conn.read_to_string(&mut response).map_err(io)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::NotHttp {
            path: path.to_path_buf(),
            answer: response.chars().take(200).collect(),
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok(Answer { status, body })
}

/// `GET /api/v1/vm.info`: the running VM's state and counters.
pub fn info(path: &Path) -> Result<Value, ApiError> {
    expect(path, Method::Get, "/api/v1/vm.info", None, 200)
}

/// `PUT /api/v1/vm.shutdown`: ends the run as its `--duration` would (the guest finishes
/// its pass, the report is printed).
pub fn shutdown(path: &Path) -> Result<(), ApiError> {
    expect(path, Method::Put, "/api/v1/vm.shutdown", None, 204).map(|_| ())
}

/// `GET /api/v1/vm.counters`: groups of integer counters.
pub fn counters(path: &Path) -> Result<Value, ApiError> {
    expect(path, Method::Get, "/api/v1/vm.counters", None, 200)
}

/// `PUT /api/v1/vm.pause`: the vCPUs stop in place.
pub fn pause(path: &Path) -> Result<(), ApiError> {
    expect(path, Method::Put, "/api/v1/vm.pause", None, 204).map(|_| ())
}

/// `PUT /api/v1/vm.resume`: the vCPUs `vm.pause` stopped run again.
pub fn resume(path: &Path) -> Result<(), ApiError> {
    expect(path, Method::Put, "/api/v1/vm.resume", None, 204).map(|_| ())
}

/// `PUT /api/v1/vm.migrate` with `request`; answers when the migration has ended.
pub fn migrate(path: &Path, request: &Value) -> Result<Value, ApiError> {
    expect(path, Method::Put, "/api/v1/vm.migrate", Some(request), 200)
}

fn expect(
    path: &Path,
    method: Method,
    endpoint: &'static str,
    body: Option<&Value>,
    status: u16,
) -> Result<Value, ApiError> {
    let answer = call(path, method, endpoint, body)?;
    if answer.status != status {
        return Err(ApiError::Refused {
            path: path.to_path_buf(),
            method: method.as_str(),
            endpoint,
            status: answer.status,
            body: answer.body,
        });
    }
    Ok(answer.body)
}
