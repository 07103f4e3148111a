//! Helpers for tests that run several hugevisor processes: a destination and a source
//! with a control socket, and the `hugevisor migrate` client.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::hugevisor;

/// A fresh scratch directory for one test case.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hv-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating the test scratch directory");
    d
}

pub fn spawn(args: &[&str]) -> Child {
    hugevisor()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning hugevisor")
}

pub fn finish(child: Child) -> (i32, serde_json::Value, String) {
    let out = child.wait_with_output().expect("waiting for hugevisor");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The bound of every wait for an event in these tests: generous, so that a busy host
/// makes a test slow, never wrong; reaching it fails the test saying what never happened.
pub const EVENT_BOUND: Duration = Duration::from_secs(300);

/// Waits until `path` (a socket the VMM binds) exists.
pub fn wait_for(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /api/v1/vm.info` over the control socket.
pub fn vm_info(api: &std::path::Path) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(api).expect("connecting to the API socket");
    c.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: hugevisor\r\nConnection: close\r\n\r\n")
        .expect("writing to the API socket");
    let mut resp = String::new();
    c.read_to_string(&mut resp).expect("reading the API answer");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// Waits until the guest behind `api` has finished `passes` passes (summed over vCPUs), so
/// that a migration starts with counters to continue from, however loaded the host is.
pub fn wait_for_passes(api: &std::path::Path, passes: u64) {
    let deadline = Instant::now() + EVENT_BOUND;
    loop {
        let info = vm_info(api);
        if info["passes"].as_u64().unwrap_or(0) >= passes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "guest never reached {passes} passes: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn migrate(
    api: &std::path::Path,
    to: &str,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut cmd = Command::new(crate::hugevisor_path());
    cmd.arg("migrate")
        .arg("--api-socket")
        .arg(api)
        .args(["--to", to, "--json"])
        .args(extra);
    let out = cmd.output().expect("running hugevisor migrate");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A destination (`run --incoming uri`) and a source (`run --api-socket api`) running the
/// same `run` arguments, the source's guest warm (two passes done) when this returns.
pub struct Pair {
    pub dst: Child,
    pub src: Child,
}

/// Starts a [`Pair`]: `common` are the `run` arguments both share; `dst_extra` and
/// `src_extra` are added to one side each.
pub fn start_pair(
    common: &[&str],
    uri: &str,
    api: &std::path::Path,
    dst_extra: &[&str],
    src_extra: &[&str],
) -> Pair {
    let api_s = api.to_string_lossy().to_string();
    let mut dst_args = common.to_vec();
    dst_args.extend(["--incoming", uri]);
    dst_args.extend(dst_extra);
    let dst = spawn(&dst_args);
    let mut src_args = common.to_vec();
    src_args.extend(["--api-socket", &api_s]);
    src_args.extend(src_extra);
    let src = spawn(&src_args);
    wait_for(api);
    wait_for_passes(api, 2);
    Pair { dst, src }
}
