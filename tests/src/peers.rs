//! Helpers for tests that run hugevisor processes with a control socket: a destination
//! and a source, the `hugevisor migrate` client, and waits for events the control API
//! reports (`vm.info`) — never for the clock.
//!
//! A run whose `--duration` must outlast an event is started with [`RUN_BOUND`] as its
//! duration (a bound, not a length), watched with [`wait_until`] and ended with
//! [`end_run`] (`vm.shutdown`) once the event happened.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{api, hugevisor, Run};

/// The bound of every wait for an event in these tests: generous, so that a busy host
/// makes a test slow, never wrong; reaching it fails the test saying what never happened.
pub const EVENT_BOUND: Duration = Duration::from_secs(300);

/// `--duration` of a run the test ends itself once what it waits for happened: only a
/// bound (the run also ends there if the test never ends it).
pub const RUN_BOUND: &str = "600s";

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

/// Waits until `path` (a socket the VMM binds) exists.
pub fn wait_for(path: &Path) {
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

/// `GET /api/v1/vm.info` over the control socket; `null` if the VM does not answer.
pub fn vm_info(api: &Path) -> Value {
    api::info(api).unwrap_or(Value::Null)
}

/// Polls `vm.info` of the VM `child` serves on `api` until `done` holds for it, and
/// returns that answer. Panics — saying `what` never happened, with the last answer — if
/// [`EVENT_BOUND`] passes first, or if the VM exits first (with its stderr). A VM that
/// does not answer yet (its socket not bound, a destination still receiving) is waited for.
pub fn wait_until(
    child: &mut Child,
    api: &Path,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + EVENT_BOUND;
    let mut last: String;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("{what} never happened: the VM exited first ({status}); stderr:\n{err}");
        }
        match api::info(api) {
            Ok(info) if done(&info) => return info,
            Ok(info) => last = info.to_string(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            // Not left running for the rest of its bound behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} never happened within {EVENT_BOUND:?}; last vm.info: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PUT /api/v1/vm.shutdown`: the run ends as its `--duration` would.
pub fn end_run(api: &Path) {
    if let Err(e) = api::shutdown(api) {
        panic!("ending the run through {}: {e}", api.display());
    }
}

/// Runs `hugevisor ARGS --api-socket S`, waits until `done` holds for its `vm.info`
/// (see [`wait_until`]), ends it with `vm.shutdown` and returns its report. `args` give
/// a `--duration` of [`RUN_BOUND`], or whatever bounds the run.
pub fn run_until(args: &[&str], what: &str, done: impl FnMut(&Value) -> bool) -> Run {
    let dir = scratch(&format!("run-until-{}", unique()));
    let sock = dir.join("api.sock");
    let mut child = hugevisor()
        .args(args)
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning hugevisor");
    wait_until(&mut child, &sock, what, done);
    end_run(&sock);
    let output = child.wait_with_output().expect("waiting for hugevisor");
    let _ = std::fs::remove_dir_all(&dir);
    let json = serde_json::from_slice(&output.stdout).ok();
    Run { output, json }
}

/// A number no other call in this process returns (scratch directories of parallel tests).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Waits until the guest behind `api` has finished `passes` passes (summed over vCPUs), so
/// that a migration starts with counters to continue from, however loaded the host is.
pub fn wait_for_passes(api: &Path, passes: u64) {
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

/// Whether a destination's `vm.info` says its migration has fully arrived (post-copy,
/// if any, has every page) and its collapse engine, if it runs one, has nothing left to
/// do: no fill or sweep queued, no retry pending.
pub fn incoming_settled(info: &Value) -> bool {
    info["incoming"]["phase"] == "complete"
        && (info["collapse"].is_null() || info["collapse"]["idle"] == true)
}

pub fn migrate(api: &Path, to: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut cmd = crate::hugevisor();
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

/// A destination (`run --incoming uri --api-socket dst_api`) and a source (`run
/// --api-socket api`) running the same `run` arguments, the source's guest warm (two
/// passes done) when this returns.
pub struct Pair {
    pub dst: Child,
    pub src: Child,
    /// The destination's control socket, beside the source's: `dst-api.sock`.
    pub dst_api: PathBuf,
}

/// Starts a [`Pair`]: `common` are the `run` arguments both share; `dst_extra` and
/// `src_extra` are added to one side each; `api` is the source's control socket.
pub fn start_pair(
    common: &[&str],
    uri: &str,
    api: &Path,
    dst_extra: &[&str],
    src_extra: &[&str],
) -> Pair {
    let api_s = api.to_string_lossy().to_string();
    let dst_api = api.with_file_name("dst-api.sock");
    let dst_api_s = dst_api.to_string_lossy().to_string();
    let mut dst_args = common.to_vec();
    dst_args.extend(["--incoming", uri, "--api-socket", &dst_api_s]);
    dst_args.extend(dst_extra);
    let dst = spawn(&dst_args);
    let mut src_args = common.to_vec();
    src_args.extend(["--api-socket", &api_s]);
    src_args.extend(src_extra);
    let src = spawn(&src_args);
    wait_for(api);
    wait_for_passes(api, 2);
    Pair { dst, src, dst_api }
}
