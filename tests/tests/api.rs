//! The control API as its users meet it: Cloud Hypervisor's paths and bodies through a
//! plain HTTP client (curl --unix-socket), every documented route served, and the
//! server's bounds — an oversized request, a slow client beside a fast one, 200
//! connections at once, two migrations at once.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::have_kvm;
use tests::peers::{finish, scratch, spawn, wait_for, EVENT_BOUND, RUN_BOUND};

/// One request through curl: (status, JSON body or null).
fn curl(sock: &Path, method: &str, endpoint: &str, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "600", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let out = cmd
        .arg(format!("http://localhost/api/v1/{endpoint}"))
        .output()
        .expect("running curl (apt-get install curl; .ci/run does)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {endpoint}: no status: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn get(sock: &Path, endpoint: &str) -> Value {
    let (status, body) = curl(sock, "GET", endpoint, None);
    assert_eq!(status, 200, "GET {endpoint}: {body}");
    body
}

fn put(sock: &Path, endpoint: &str, body: Option<&Value>) -> (u16, Value) {
    curl(sock, "PUT", endpoint, body)
}

/// Polls `vm.info` through curl until `done` holds; panics naming `what` past the bound
/// or if the VM exits first.
fn until(child: &mut Child, sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + EVENT_BOUND;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} never happened: the VM exited first ({status})");
        }
        let info = get(sock, "vm.info");
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VMM with a memory layout and no guest: it waits for vm.receive-migration.
fn waiting_vmm(dir: &Path, memory: &str, vcpus: &str) -> (Child, std::path::PathBuf) {
    let sock = dir.join("dst.sock");
    let s = sock.to_string_lossy().to_string();
    let child = spawn(&[
        "run",
        "--api-socket",
        &s,
        "--memory",
        memory,
        "--vcpus",
        vcpus,
        "--console",
        "off",
        "--json",
    ]);
    wait_for(&sock);
    (child, sock)
}

#[test]
fn a_run_driven_with_cloud_hypervisor_calls_only() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    for memory_mode in ["Precopy", "Postcopy"] {
        lifecycle(memory_mode);
    }
}

/// pause → resume → counters → send-migration → shutdown, with Cloud Hypervisor's
/// paths and bodies only; the destination is told to receive through its API.
fn lifecycle(memory_mode: &str) {
    let dir = scratch(&format!("ch-{memory_mode}"));
    let (mut dst, dst_sock) = waiting_vmm(&dir, "256M", "2");
    let src_sock = dir.join("src.sock");
    let mut src = spawn(&[
        "run",
        "--api-socket",
        &src_sock.to_string_lossy(),
        "--memory",
        "256M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ]);
    wait_for(&src_sock);
    let ping = get(&dst_sock, "vmm.ping");
    assert!(ping["version"].is_string(), "{ping}");
    let info = get(&dst_sock, "vm.info");
    assert_eq!(info["state"], "Created", "{info}");
    assert_eq!(info["config"]["memory"]["size"], 256u64 << 20, "{info}");
    until(&mut src, &src_sock, "two passes", |i| {
        i["passes"].as_u64() >= Some(2)
    });

    // Paused in place: nothing moves until vm.resume.
    assert_eq!(put(&src_sock, "vm.pause", None).0, 204);
    let paused = get(&src_sock, "vm.info");
    assert_eq!(paused["state"], "Paused", "{paused}");
    let counters = get(&src_sock, "vm.counters");
    assert_eq!(counters["guest"]["passes"], paused["passes"], "{counters}");
    let (status, again) = put(&src_sock, "vm.pause", None);
    assert_eq!(status, 409, "{again}");
    assert!(
        again["error"].as_str().unwrap().contains("paused"),
        "{again}"
    );
    // A paused guest does not migrate.
    let to = format!("unix:{}", dir.join("mig.sock").display());
    let send = json!({ "destination_url": to, "memory_mode": memory_mode });
    assert_eq!(put(&src_sock, "vm.send-migration", Some(&send)).0, 409);
    assert_eq!(put(&src_sock, "vm.resume", None).0, 204);
    let at = paused["passes"].as_u64().unwrap();
    until(&mut src, &src_sock, "passes after vm.resume", |i| {
        i["state"] == "Running" && i["passes"].as_u64() > Some(at)
    });

    let counters = get(&src_sock, "vm.counters");
    assert_eq!(counters["memory"]["size_bytes"], 256u64 << 20, "{counters}");
    assert_eq!(
        counters["memory"]["present_bytes"],
        256u64 << 20,
        "{counters}"
    );
    assert_eq!(counters["guest"]["vcpus"], 2, "{counters}");
    for group in counters.as_object().unwrap().values() {
        assert!(
            group.as_object().unwrap().values().all(Value::is_u64),
            "{counters}"
        );
    }

    // The destination listens once told; its answer comes when every page is there.
    let receiver = {
        let (sock, body) = (dst_sock.clone(), json!({ "receiver_url": to }));
        std::thread::spawn(move || put(&sock, "vm.receive-migration", Some(&body)))
    };
    until(&mut dst, &dst_sock, "the destination listening", |i| {
        i["run_state"] == "receiving"
    });
    let (status, body) = put(&src_sock, "vm.send-migration", Some(&send));
    assert_eq!(status, 204, "{memory_mode}: {body}");
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{memory_mode}: {body}");
    let (code, sj, err) = finish(src);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sj["outcome"], "migrated", "{sj}");
    let mode = memory_mode.to_lowercase();
    assert_eq!(sj["migration"]["mode"], mode.as_str(), "{sj}");

    let arrived = get(&dst_sock, "vm.info");
    assert_eq!(arrived["state"], "Running", "{arrived}");
    assert_eq!(arrived["workload"], "verify", "{arrived}");
    let at = arrived["passes"].as_u64().unwrap();
    until(&mut dst, &dst_sock, "passes on the destination", |i| {
        i["passes"].as_u64() > Some(at + 2)
    });
    assert_eq!(put(&dst_sock, "vm.shutdown", None).0, 204);
    let (code, dj, err) = finish(dst);
    assert_eq!(code, 0, "{memory_mode}: {err}");
    assert_eq!(dj["outcome"], "ok", "{dj}");
    assert_eq!(dj["integrity_errors"], 0, "{dj}");
    assert_eq!(dj["incoming"]["mode"], mode.as_str(), "{dj}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `docs/api.yaml`'s (method, path) pairs.
fn documented() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for (p, item) in doc["paths"].as_mapping().unwrap() {
        for (m, _) in item.as_mapping().unwrap() {
            let m = m.as_str().unwrap().to_uppercase();
            out.push((m, p.as_str().unwrap().trim_start_matches('/').to_string()));
        }
    }
    out
}

#[test]
fn every_documented_route_is_served_and_errors_are_json_naming_the_field() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("routes");
    let (child, sock) = waiting_vmm(&dir, "32M", "1");
    let routes = documented();
    assert!(routes.len() >= 10, "{routes:?}");
    // vmm.shutdown ends the VMM: last.
    let (last, others): (Vec<_>, Vec<_>) =
        routes.into_iter().partition(|(_, p)| p == "vmm.shutdown");
    for (method, path) in others.iter().chain(&last) {
        let (status, body) = curl(&sock, method, path, Some(&json!({})));
        assert!(
            ![404, 405].contains(&status),
            "{method} {path}: {status} {body}"
        );
        if status >= 400 {
            assert!(
                body["error"].is_string(),
                "{method} {path}: {status} {body}"
            );
        }
    }
    let (code, j, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["outcome"], "no_guest", "{j}");

    let (child, sock) = waiting_vmm(&dir, "32M", "1");
    // (vm.snapshot, the example here before, is served since issue 15.)
    let (status, body) = curl(&sock, "GET", "vm.resize", None);
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("docs/api.yaml"),
        "{body}"
    );
    assert_eq!(curl(&sock, "POST", "vm.info", None).0, 405);
    for (endpoint, body, field) in [
        (
            "vm.send-migration",
            json!({ "destination_url": "unix:/x", "downtime_ms": 0 }),
            "downtime_ms",
        ),
        (
            "vm.send-migration",
            json!({ "destination_url": "unix:/x", "local": true }),
            "local",
        ),
        (
            "vm.send-migration",
            json!({ "destination_url": "unix:/x", "tls_dir": "/etc" }),
            "tls_dir",
        ),
        (
            "vm.send-migration",
            json!({ "destination_url": "unix:/x", "frobnicate": 1 }),
            "frobnicate",
        ),
        (
            "vm.receive-migration",
            json!({ "receiver_url": "carrier-pigeon" }),
            "receiver_url",
        ),
        ("vm.receive-migration", json!({}), "receiver_url"),
    ] {
        let (status, answer) = put(&sock, endpoint, Some(&body));
        assert_eq!(status, 400, "{endpoint} {body}: {answer}");
        assert_eq!(answer["field"], field, "{endpoint} {body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    // A tcp listener without authentication: refused, naming the fix; still waiting.
    let (status, answer) = put(
        &sock,
        "vm.receive-migration",
        Some(&json!({ "receiver_url": "tcp:127.0.0.1:0" })),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("--migration-key"),
        "{answer}"
    );
    // Wrong state: nothing to pause, migrate or shut down yet.
    for endpoint in ["vm.pause", "vm.resume", "vm.shutdown"] {
        let (status, answer) = put(&sock, endpoint, None);
        assert_eq!(status, 409, "{endpoint}: {answer}");
    }
    let send = json!({ "destination_url": "unix:/nowhere" });
    assert_eq!(put(&sock, "vm.send-migration", Some(&send)).0, 409);
    assert_eq!(put(&sock, "vmm.shutdown", None).0, 204);
    let (code, _, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `raw` on a new connection and reads the answer until the server closes.
fn raw_exchange(sock: &Path, raw: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    // The server may answer and close before it has read everything sent.
    let _ = c.write_all(raw);
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn oversized_slow_and_concurrent_clients_are_bounded() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("bounds");
    let (child, sock) = waiting_vmm(&dir, "32M", "1");
    let rss_before = vm_rss_kib(child.id());

    // A 64 MiB header line: refused once the head's bound is reached, not buffered.
    let mut huge = b"GET /api/v1/vm.info HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(64 << 20, b'a');
    let answer = raw_exchange(&sock, &huge);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let headers: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    let answer = raw_exchange(
        &sock,
        format!("GET /api/v1/vm.info HTTP/1.1\r\n{headers}\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw_exchange(
        &sock,
        b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n{",
    );
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("\"error\""),
        "{answer}"
    );
    let rss_after = vm_rss_kib(child.id());
    eprintln!("VMM RSS before/after the oversized requests: {rss_before} / {rss_after} KiB");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{rss_before} → {rss_after} KiB"
    );

    // A slow client (half a request line, then silence) beside a fast one: the fast one
    // is answered while the slow one still waits, which is then answered 408.
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"GET /api/v1/vm.in").unwrap();
    let t0 = Instant::now();
    let ping = get(&sock, "vmm.ping");
    let fast = t0.elapsed();
    assert!(ping["pid"].is_u64(), "{ping}");
    slow.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(slow.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow client was answered before the fast one was served"
    );
    slow.set_nonblocking(false).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    let slow_answered = t0.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    eprintln!("fast client answered in {fast:?}; the slow one cut off after {slow_answered:?}");

    // A client that drips its request a byte at a time is cut off when the whole
    // request is late, not kept alive by each byte.
    let dripper = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = UnixStream::connect(&sock).unwrap();
            let request = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: a-slow-client.example\r\n\r\n";
            for b in request {
                if c.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            let mut a = String::new();
            let _ = c.read_to_string(&mut a);
            a
        })
    };
    let answer = dripper.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // 200 connections open at once, then each sends vm.info: every one is answered.
    let conns: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let t0 = Instant::now();
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut a = String::new();
                c.read_to_string(&mut a).unwrap();
                a
            })
        })
        .collect();
    let answers: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let ok = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    eprintln!(
        "200 concurrent vm.info: {ok} answered 200 in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        ok,
        200,
        "{:?}",
        answers.iter().find(|a| !a.starts_with("HTTP/1.1 200"))
    );

    // A silent client does not hold up the end: vmm.shutdown, and the VMM is gone.
    let mut silent = UnixStream::connect(&sock).unwrap();
    let t0 = Instant::now();
    assert_eq!(put(&sock, "vmm.shutdown", None).0, 204);
    let (code, _, err) = finish(child);
    eprintln!(
        "vmm.shutdown beside a silent client: exited after {:?}",
        t0.elapsed()
    );
    assert_eq!(code, 0, "{err}");
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    assert!(!sock.exists(), "the API socket was left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_second_migration_while_one_runs_is_refused_409() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("two-migrations");
    let sock = dir.join("src.sock");
    let mut src = spawn(&[
        "run",
        "--api-socket",
        &sock.to_string_lossy(),
        "--memory",
        "32M",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ]);
    wait_for(&sock);
    // A destination that accepts and says nothing: the first migration waits in its
    // handshake until the source gives up on it.
    let mute = dir.join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let holder = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    });
    let body = json!({ "destination_url": format!("unix:{}", mute.display()) });
    let first = {
        let (sock, body) = (sock.clone(), body.clone());
        std::thread::spawn(move || put(&sock, "vm.send-migration", Some(&body)))
    };
    let info = until(&mut src, &sock, "the first migration running", |i| {
        i["run_state"] == "migrating"
    });
    assert_eq!(info["migration"]["role"], "source", "{info}");
    let (status, answer) = put(&sock, "vm.send-migration", Some(&body));
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("already"),
        "{answer}"
    );
    let (status, answer) = put(&sock, "vm.pause", None);
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = first.join().unwrap();
    assert_eq!(
        status, 500,
        "the mute destination fails the first: {answer}"
    );
    assert!(answer["error"].is_string(), "{answer}");
    assert_eq!(put(&sock, "vm.shutdown", None).0, 204);
    let (code, j, err) = finish(src);
    assert_eq!(code, 0, "the guest kept running: {err}");
    assert_eq!(j["outcome"], "ok", "{j}");
    holder.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
