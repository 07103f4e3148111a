//! Migrations that survive the network and trust no one, between real hugevisor
//! processes: post-copy through a local TCP proxy that cuts the connections mid-push
//! (both, or only the urgent one), resumed with `hugevisor migrate --resume`; a source
//! killed mid-push; a destination that takes only authenticated connections; strangers
//! at a waiting destination; a run ended by SIGTERM.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::{Frame, FrameKind, FrameReader, FrameWriter, Hello, Message, Mode, Uri};
use serde_json::Value;
use tests::peers::{
    end_run, finish, migrate, scratch, spawn, start_pair, vm_info, wait_for, wait_until, Pair,
    RUN_BOUND,
};
use tests::{have_hugetlb, have_kvm};

/// Which connections the proxy cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// Main and urgent.
    Both,
    /// Only the urgent connection (the second).
    Urgent,
    /// Nothing is cut: the proxy stops forwarding, both ways, and holds the connections
    /// open (a source that stops sending).
    Stall,
}

/// A TCP proxy in front of a destination: forwards every connection both ways and, once
/// `after` bytes went from the source through the first connection, cuts what `cut`
/// says — once; the connections made after that are left alone.
struct Proxy {
    port: u16,
    forwarded: Arc<AtomicU64>,
    cut_done: Arc<AtomicBool>,
}

impl Proxy {
    fn start(to: u16, cut: Cut, after: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let forwarded = Arc::new(AtomicU64::new(0));
        let cut_done = Arc::new(AtomicBool::new(false));
        let pairs: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        // Set once a `Cut::Stall` proxy stalled: its every pump stops forwarding.
        let stalled = Arc::new(AtomicBool::new(false));
        let (f, done) = (forwarded.clone(), cut_done.clone());
        std::thread::spawn(move || {
            for (n, src) in listener.incoming().enumerate() {
                let Ok(src) = src else { return };
                let Ok(dst) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                pairs
                    .lock()
                    .unwrap()
                    .push((src.try_clone().unwrap(), dst.try_clone().unwrap()));
                let back = (dst.try_clone().unwrap(), src.try_clone().unwrap());
                let wedge = stalled.clone();
                std::thread::spawn(move || pump(back.0, back.1, &wedge, None));
                let wedge = stalled.clone();
                let counter =
                    (n == 0).then(|| (f.clone(), done.clone(), pairs.clone(), cut, after));
                std::thread::spawn(move || pump(src, dst, &wedge, counter));
            }
        });
        Proxy {
            port,
            forwarded,
            cut_done,
        }
    }

    fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }
}

type Counter = (
    Arc<AtomicU64>,
    Arc<AtomicBool>,
    Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    Cut,
    u64,
);

/// Copies `from` into `to` until either ends; the first connection's source side counts
/// its bytes and cuts when they pass the mark.
fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool, counter: Option<Counter>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if stalled.load(Ordering::Acquire) {
            // Wedged: holds both sockets, forwards nothing, closes nothing.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((forwarded, done, pairs, cut, after)) = &counter {
            let total = forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if total >= *after && !done.swap(true, Ordering::AcqRel) {
                if *cut == Cut::Stall {
                    stalled.store(true, Ordering::Release);
                    continue;
                }
                let pairs = pairs.lock().unwrap();
                for (i, (a, b)) in pairs.iter().enumerate() {
                    if *cut == Cut::Both || i == 1 {
                        let _ = a.shutdown(Shutdown::Both);
                        let _ = b.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn state(info: &Value) -> &str {
    info["run_state"].as_str().unwrap_or("")
}

/// A 2-vCPU `verify` guest post-copied through a proxy that cuts `cut` after 8 MiB;
/// both ends pause, `--resume` completes it: no integrity error, equal memory hashes.
fn postcopy_resumes_through_a_cut(backing: &str, cut: Cut) {
    let what = format!("post-copy on {backing}, cut {cut:?}");
    let dir = scratch(&format!("cut-{backing}-{cut:?}"));
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let api = dir.join("api.sock");
    let common = [
        "run",
        "--memory",
        "64M",
        "--backing",
        backing,
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let Pair {
        mut dst,
        mut src,
        dst_api,
    } = start_pair(&common, &uri, &api, &["--insecure"], &[]);
    wait_for(&dst_api);
    let proxy = Proxy::start(port, cut, 8 << 20);
    let first = {
        let (api, to) = (api.clone(), proxy.uri());
        std::thread::spawn(move || {
            migrate(
                &api,
                &to,
                &["--mode", "postcopy", "--verify", "memory-hash"],
            )
        })
    };
    // Both ends say so once the proxy cut.
    wait_until(
        &mut src,
        &api,
        &format!("{what}: source postcopy-paused"),
        |i| state(i) == "postcopy-paused",
    );
    let paused = wait_until(
        &mut dst,
        &dst_api,
        &format!("{what}: destination postcopy-paused"),
        |i| state(i) == "postcopy-paused",
    );
    assert!(proxy.cut_done.load(Ordering::Acquire), "{what}");
    assert!(
        paused["incoming"]["lacking_pages"].as_u64().unwrap() > 0,
        "{what}: {paused}"
    );
    // A third process that connects now is refused: it cannot join, nor start anew.
    let kinds = knock(
        &uri,
        &[Message::Hello(hello(Mode::Postcopy)).to_frame().unwrap()],
    );
    assert_eq!(kinds, [FrameKind::Abort], "{what}: {kinds:?}");
    let (code, _, err) = first.join().unwrap();
    assert_eq!(code, 1, "{what}: the first call ends with the pause: {err}");
    assert!(err.contains("--resume"), "{what}: {err}");
    // Resumed through the same proxy (it cuts only once).
    let (code, report, err) = migrate(&api, &proxy.uri(), &["--mode", "postcopy", "--resume"]);
    assert_eq!(code, 0, "{what}: resume failed: {err}");
    assert_eq!(report["recoveries"], 1, "{what}: {report}");
    let hash = report["memory_hash"].as_u64();
    assert!(hash.is_some(), "{what}: {report}");
    // The guest runs on at the destination with every page: a few more passes, then end.
    let done = wait_until(
        &mut dst,
        &dst_api,
        &format!("{what}: post-copy complete"),
        |i| i["incoming"]["phase"] == "complete" && state(i) == "running",
    );
    let passes = done["passes"].as_u64().unwrap();
    wait_until(&mut dst, &dst_api, &format!("{what}: passes after"), |i| {
        i["passes"].as_u64().unwrap_or(0) >= passes + 4
    });
    end_run(&dst_api);
    let (scode, sj, serr) = finish(src);
    let (dcode, dj, derr) = finish(dst);
    assert_eq!(scode, 0, "{what}: source: {serr}");
    assert_eq!(sj["outcome"], "migrated", "{what}: {sj}");
    assert_eq!(dcode, 0, "{what}: destination: {derr}");
    assert_eq!(dj["outcome"], "ok", "{what}: {dj}");
    assert_eq!(dj["integrity_errors"], 0, "{what}: {dj}");
    assert_eq!(dj["incoming"]["recoveries"], 1, "{what}: {dj}");
    assert_eq!(dj["incoming"]["refused_connections"], 1, "{what}: {dj}");
    assert_eq!(
        dj["incoming"]["memory_hash"].as_u64(),
        hash,
        "{what}: equal memory hashes"
    );
    assert!(proxy.forwarded.load(Ordering::Relaxed) >= 8 << 20);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn postcopy_resumes_after_a_proxy_cuts_its_connections_on_shmem() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    postcopy_resumes_through_a_cut("shmem", Cut::Both);
    postcopy_resumes_through_a_cut("shmem", Cut::Urgent);
}

#[test]
fn postcopy_resumes_after_a_proxy_cuts_its_connections_on_hugetlb_2m() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    if !have_hugetlb(2048, 64) {
        return;
    }
    postcopy_resumes_through_a_cut("hugetlb-2m", Cut::Both);
    postcopy_resumes_through_a_cut("hugetlb-2m", Cut::Urgent);
}

#[test]
fn a_destination_whose_source_is_killed_mid_postcopy_ends_naming_the_missing_pages() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let dir = scratch("killed");
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let api = dir.join("api.sock");
    let common = [
        "run",
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
    ];
    let Pair {
        mut dst,
        mut src,
        dst_api,
    } = start_pair(
        &common,
        &uri,
        &api,
        &["--insecure", "--recovery-timeout", "5s"],
        &[],
    );
    wait_for(&dst_api);
    // The source is killed once 16 MiB went through (of 256): the push is under way.
    let proxy = Proxy::start(port, Cut::Urgent, u64::MAX);
    let client = {
        let (api, to) = (api.clone(), proxy.uri());
        std::thread::spawn(move || migrate(&api, &to, &["--mode", "postcopy"]))
    };
    let deadline = Instant::now() + tests::peers::EVENT_BOUND;
    while proxy.forwarded.load(Ordering::Relaxed) < 16 << 20 {
        assert!(Instant::now() < deadline, "the push never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = src.kill();
    let _ = src.wait();
    let t0 = Instant::now();
    let _ = wait_until(&mut dst, &dst_api, "the destination pausing", |i| {
        state(i) == "postcopy-paused" || i["incoming"]["phase"] == "complete"
    });
    let (code, dj, err) = finish(dst);
    assert_eq!(code, 1, "the run fails: {err}");
    assert!(
        err.contains("pages never arrived") && err.contains("never runs on pages it lacks"),
        "{err}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("hugevisor: error"))
            .count(),
        1,
        "{err}"
    );
    // The run still reports, its outcome the failure.
    assert_eq!(dj["outcome"], "migration_failed", "{dj}");
    assert!(
        dj["migration_error"]
            .as_str()
            .unwrap()
            .contains("pages never arrived"),
        "{dj}"
    );
    // Bounded: the 5 s recovery window, the vCPUs' end, the report.
    assert!(t0.elapsed() < Duration::from_secs(90), "{:?}", t0.elapsed());
    let _ = client.join();
    let _ = std::fs::remove_dir_all(dir);
}

fn hello(mode: Mode) -> Hello {
    Hello {
        version: migration::PROTOCOL_VERSION,
        memory_bytes: 32 << 20,
        backing: "shmem".into(),
        page_size: 4096,
        vcpus: 1,
        mode,
        session: None,
        channels: 1,
        boot_id: None,
    }
}

/// Connects to `uri`, sends `frames`, and returns the kinds of what comes back until
/// the peer hangs up.
fn knock(uri: &str, frames: &[Frame]) -> Vec<FrameKind> {
    let u: Uri = uri.parse().unwrap();
    let c = migration::Connector::connect(&u, Duration::from_secs(60), Duration::from_secs(30))
        .unwrap();
    let mut w = FrameWriter::new(c.try_clone().unwrap());
    for f in frames {
        let _ = w.send(f);
    }
    let _ = w.flush();
    let mut r = FrameReader::new(c);
    std::iter::from_fn(|| r.recv().ok().map(|f| f.kind)).collect()
}

fn write_key(path: &Path, byte: u8) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, [byte; 32]).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_key_protected_destination_refuses_strangers_and_wrong_keys_and_takes_its_source() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let dir = scratch("keyed");
    let (key, other) = (dir.join("key"), dir.join("other"));
    write_key(&key, 1);
    write_key(&other, 2);
    let key_s = key.to_string_lossy().to_string();
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let common = [
        "run",
        "--memory",
        "32M",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let dst_api = dir.join("dst-api.sock");
    let mut dst_args = common.to_vec();
    let dst_api_s = dst_api.to_string_lossy().to_string();
    dst_args.extend([
        "--incoming",
        &uri,
        "--migration-key",
        &key_s,
        "--api-socket",
        &dst_api_s,
    ]);
    let mut dst = spawn(&dst_args);
    wait_for(&dst_api);
    // An unauthenticated Hello gets no HelloAck, and garbage does not end the destination.
    let kinds = knock(
        &uri,
        &[Message::Hello(hello(Mode::Precopy)).to_frame().unwrap()],
    );
    assert_eq!(kinds, [FrameKind::Abort], "{kinds:?}");
    let kinds = knock(&uri, &[Frame::new(FrameKind::Page, vec![0xee; 4104])]);
    assert!(!kinds.contains(&FrameKind::HelloAck), "{kinds:?}");
    // A source with the wrong key is refused, naming the key.
    let api = dir.join("api.sock");
    let api_s = api.to_string_lossy().to_string();
    let other_s = other.to_string_lossy().to_string();
    let mut wrong_args = common.to_vec();
    wrong_args.extend(["--api-socket", &api_s, "--migration-key", &other_s]);
    let wrong = spawn(&wrong_args);
    wait_for(&api);
    let (code, _, err) = migrate(&api, &uri, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("migration key") && err.contains("--migration-key"),
        "{err}"
    );
    end_run(&api);
    let (code, sj, serr) = finish(wrong);
    assert_eq!((code, &sj["outcome"]), (0, &Value::from("ok")), "{serr}");
    let info = vm_info(&dst_api);
    assert_eq!(info["run_state"], "receiving", "{info}");
    assert!(
        info["incoming"]["refused_connections"].as_u64().unwrap() >= 3,
        "{info}"
    );
    // The real source, with the key: the migration completes.
    let mut src_args = common.to_vec();
    src_args.extend(["--api-socket", &api_s, "--migration-key", &key_s]);
    let src = spawn(&src_args);
    wait_for(&api);
    // Nothing to resume yet: refused, saying why.
    let (code, _, err) = migrate(&api, &uri, &["--resume"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no migration to resume"), "{err}");
    let (code, _, err) = migrate(&api, &uri, &["--mode", "hybrid"]);
    assert_eq!(code, 0, "{err}");
    wait_until(&mut dst, &dst_api, "the keyed migration's end", |i| {
        i["incoming"]["phase"] == "complete"
    });
    end_run(&dst_api);
    let (scode, sj, serr) = finish(src);
    let (dcode, dj, derr) = finish(dst);
    assert_eq!(
        (scode, &sj["outcome"]),
        (0, &Value::from("migrated")),
        "{serr}"
    );
    assert_eq!((dcode, &dj["outcome"]), (0, &Value::from("ok")), "{derr}");
    assert_eq!(dj["integrity_errors"], 0, "{dj}");
    assert!(
        dj["incoming"]["refused_connections"].as_u64().unwrap() >= 3,
        "{dj}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_tcp_listener_without_a_key_refuses_to_start_unless_insecure() {
    if !have_kvm() {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let r = tests::run(&[
        "run",
        "--memory",
        "32M",
        "--console",
        "off",
        "--incoming",
        &uri,
    ]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("--migration-key") && err.contains("--insecure"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // A key that others may read is refused too, naming the fix.
    let dir = scratch("loose-key");
    let key = dir.join("key");
    std::fs::write(&key, [3u8; 32]).unwrap();
    let r = tests::run(&[
        "run",
        "--migration-key",
        &key.to_string_lossy(),
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("chmod 600"), "{}", r.stderr());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_ends_a_run_with_its_report_and_removes_its_sockets() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("sigterm");
    let api = dir.join("api.sock");
    let mut child = spawn(&[
        "run",
        "--memory",
        "32M",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
        "--api-socket",
        &api.to_string_lossy(),
    ]);
    wait_until(&mut child, &api, "a pass", |i| {
        i["passes"].as_u64().unwrap_or(0) >= 1
    });
    for signal in ["TERM", "INT"] {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe {
            libc::kill(
                child.id() as i32,
                if signal == "TERM" {
                    libc::SIGTERM
                } else {
                    libc::SIGINT
                },
            )
        };
        assert_eq!(r, 0);
        let (code, j, err) = finish(child);
        assert_eq!(code, 0, "SIG{signal}: {err}");
        assert_eq!(j["outcome"], "ok", "SIG{signal}: {j}");
        assert!(j["passes"].as_u64().unwrap() >= 1, "{j}");
        assert!(!api.exists(), "SIG{signal}: the API socket is removed");
        // The next run takes the same path.
        child = spawn(&[
            "run",
            "--memory",
            "32M",
            "--workload",
            "verify",
            "--duration",
            RUN_BOUND,
            "--console",
            "off",
            "--json",
            "--api-socket",
            &api.to_string_lossy(),
        ]);
        wait_until(&mut child, &api, "the next run", |i| {
            i["passes"].as_u64().unwrap_or(0) >= 1
        });
    }
    end_run(&api);
    let (code, _, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    // A destination still waiting: SIGTERM ends it at once, its migration socket removed.
    let mig = dir.join("mig.sock");
    let waiting = spawn(&[
        "run",
        "--memory",
        "32M",
        "--console",
        "off",
        "--incoming",
        &format!("unix:{}", mig.display()),
    ]);
    wait_for(&mig);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(waiting.id() as i32, libc::SIGTERM) }, 0);
    let (code, _, err) = finish(waiting);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(!mig.exists(), "the migration socket is removed");
    let _ = std::fs::remove_dir_all(dir);
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[11] + f[12]) * 1000 / hz)
}

#[test]
fn a_starved_postcopy_destination_pauses_its_vcpus_and_ends_naming_the_missing_pages() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let dir = scratch("starved");
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let api = dir.join("api.sock");
    let common = [
        "run",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let Pair {
        mut dst,
        mut src,
        dst_api,
    } = start_pair(
        &common,
        &uri,
        &api,
        &["--insecure", "--recovery-timeout", "8s"],
        &[],
    );
    wait_for(&dst_api);
    // The source "stops sending" after 64 KiB: the guest's image and page tables (from
    // 1 MiB up) never arrive, and its vCPUs wait for them.
    let proxy = Proxy::start(port, Cut::Stall, 64 << 10);
    let client = {
        let (api, to) = (api.clone(), proxy.uri());
        std::thread::spawn(move || migrate(&api, &to, &["--mode", "postcopy"]))
    };
    let t0 = Instant::now();
    wait_until(&mut dst, &dst_api, "the starved destination pausing", |i| {
        state(i) == "postcopy-paused"
    });
    // Paused, not spinning: its vCPUs and fault thread take (almost) no CPU.
    let before = cpu_time(dst.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(dst.id()) - before;
    assert!(
        used < Duration::from_millis(600),
        "the paused destination used {used:?} of CPU in 2 s"
    );
    let (code, dj, err) = finish(dst);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("pages never arrived"), "{err}");
    assert!(!err.contains("invalid configuration"), "{err}");
    assert_eq!(dj["outcome"], "migration_failed", "{dj}");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "bounded: {:?}",
        t0.elapsed()
    );
    // The source kept the guest stopped (the destination had it) and ends when told.
    wait_until(&mut src, &api, "the source postcopy-paused", |i| {
        state(i) == "postcopy-paused"
    });
    end_run(&api);
    let (scode, sj, serr) = finish(src);
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(
        sj["outcome"], "migrated",
        "never runs the guest again: {sj}"
    );
    let _ = client.join();
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits for `child` and returns its exit code and its peak resident memory.
fn wait_with_peak_rss(child: std::process::Child) -> (i32, u64, String) {
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 on our own child's pid fills both.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as i32;
    let mut stderr = child.stderr.unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    // SAFETY: see above.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    (
        libc::WEXITSTATUS(status),
        usage.ru_maxrss as u64 * 1024,
        err,
    )
}

#[test]
fn hostile_frames_to_a_waiting_destination_are_refused_within_the_layout() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("hostile");
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let dst_api = dir.join("dst-api.sock");
    let layout_hello = || {
        let mut h = hello(Mode::Postcopy);
        h.memory_bytes = 64 << 20;
        Message::Hello(h).to_frame().unwrap()
    };
    // A header claiming `len` bytes of `kind`, with nothing behind it.
    let header = |kind: FrameKind, len: u32| {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(b"HVMF");
        h[4] = kind as u8;
        h[8..12].copy_from_slice(&len.to_le_bytes());
        h
    };
    for (kind, len, said) in [
        (FrameKind::Page, 1u32 << 30, "262152-byte limit"),
        // A SwitchOver with a 100 M-word missing-pages bitmap.
        (FrameKind::SwitchOver, 800_000_000, "-byte limit"),
    ] {
        let dst = spawn(&[
            "run",
            "--memory",
            "64M",
            "--console",
            "off",
            "--incoming",
            &uri,
            "--api-socket",
            &dst_api.to_string_lossy(),
        ]);
        wait_for(&dst_api);
        // A stranger first: refused; the destination waits on.
        let kinds = knock(&uri, &[Frame::new(FrameKind::Complete, vec![])]);
        assert_eq!(kinds, [FrameKind::Abort]);
        assert_eq!(vm_info(&dst_api)["incoming"]["refused_connections"], 1);
        // Then a source that says Hello and sends the huge frame's header.
        let u: Uri = uri.parse().unwrap();
        let c = migration::Connector::connect(&u, Duration::from_secs(10), Duration::from_secs(30))
            .unwrap();
        let mut w = FrameWriter::new(c);
        w.send(&layout_hello()).unwrap();
        w.flush().unwrap();
        w.get_mut().write_all(&header(kind, len)).unwrap();
        let (code, peak, err) = wait_with_peak_rss(dst);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(said) && err.contains("exceeds"),
            "{kind:?}: {err}"
        );
        assert!(!err.contains("invalid configuration"), "{err}");
        assert!(peak < 200 << 20, "{kind:?}: peak RSS {} MiB", peak >> 20);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unknown_check_is_refused_before_anything_moves() {
    let r = tests::run(&[
        "migrate",
        "--api-socket",
        "/nonexistent/api.sock",
        "--to",
        "unix:/nonexistent/mig.sock",
        "--verify",
        "sha256",
    ]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("sha256") && r.stderr().contains("memory-hash"),
        "{}",
        r.stderr()
    );
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (the TLS test makes its certificates with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name`-ca.pem and, signed by it, `name`-LEAF.pem/.key for each leaf (localhost,
/// 127.0.0.1; server and client use).
fn pki(dir: &Path, name: &str, leaves: &[&str]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let ca_subject = format!("/CN=hugevisor test CA {name}");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        &ca_subject,
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for leaf in leaves {
        let (key, csr, pem) = (
            format!("{name}-{leaf}.key"),
            format!("{name}-{leaf}.csr"),
            format!("{name}-{leaf}.pem"),
        );
        let subj = format!("/CN={leaf}");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
    }
}

#[test]
fn mutual_tls_over_tcp_refuses_plaintext_and_other_cas_and_carries_the_real_source() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let dir = scratch("tls");
    pki(&dir, "good", &["source", "destination"]);
    pki(&dir, "rogue", &["source"]);
    let p = |f: &str| dir.join(f).to_string_lossy().to_string();
    let tls = |leaf: &str| {
        vec![
            "--tls-cert".to_string(),
            p(&format!("{leaf}.pem")),
            "--tls-key".to_string(),
            p(&format!("{leaf}.key")),
            "--tls-ca".to_string(),
            p("good-ca.pem"),
        ]
    };
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let common = [
        "run",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "verify",
        "--duration",
        RUN_BOUND,
        "--console",
        "off",
        "--json",
    ];
    let dst_api = dir.join("dst-api.sock");
    let dst_api_s = dst_api.to_string_lossy().to_string();
    let dst_tls = tls("good-destination");
    let mut dst_args: Vec<&str> = common.to_vec();
    dst_args.extend(["--incoming", &uri, "--api-socket", &dst_api_s]);
    dst_args.extend(dst_tls.iter().map(String::as_str));
    // A tcp listener with TLS needs no --insecure.
    let mut dst = spawn(&dst_args);
    wait_for(&dst_api);
    // Plaintext: no HelloAck, nothing read as a frame.
    let kinds = knock(
        &uri,
        &[Message::Hello(hello(Mode::Precopy)).to_frame().unwrap()],
    );
    assert!(!kinds.contains(&FrameKind::HelloAck), "{kinds:?}");
    // A source whose certificate another CA signed.
    let api = dir.join("api.sock");
    let api_s = api.to_string_lossy().to_string();
    let rogue_tls = tls("rogue-source");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--api-socket", &api_s]);
    args.extend(rogue_tls.iter().map(String::as_str));
    let rogue = spawn(&args);
    wait_for(&api);
    let (code, _, err) = migrate(&api, &uri, &["--mode", "postcopy"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("fatal alert") || err.contains("TLS"), "{err}");
    end_run(&api);
    let (code, sj, serr) = finish(rogue);
    assert_eq!((code, &sj["outcome"]), (0, &Value::from("ok")), "{serr}");
    let info = vm_info(&dst_api);
    assert_eq!(info["run_state"], "receiving", "{info}");
    assert!(
        info["incoming"]["refused_connections"].as_u64().unwrap() >= 2,
        "{info}"
    );
    // The real source: post-copy over TLS, every page, no integrity error.
    let src_tls = tls("good-source");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--api-socket", &api_s]);
    args.extend(src_tls.iter().map(String::as_str));
    let mut src = spawn(&args);
    wait_until(&mut src, &api, "the source's passes", |i| {
        i["passes"].as_u64().unwrap_or(0) >= 2
    });
    let (code, report, err) = migrate(
        &api,
        &uri,
        &["--mode", "postcopy", "--verify", "memory-hash"],
    );
    assert_eq!(code, 0, "{err}");
    let done = wait_until(&mut dst, &dst_api, "post-copy over TLS complete", |i| {
        i["incoming"]["phase"] == "complete"
    });
    let passes = done["passes"].as_u64().unwrap();
    wait_until(&mut dst, &dst_api, "passes after", |i| {
        i["passes"].as_u64().unwrap_or(0) >= passes + 2
    });
    end_run(&dst_api);
    let (scode, sj, serr) = finish(src);
    let (dcode, dj, derr) = finish(dst);
    assert_eq!(
        (scode, &sj["outcome"]),
        (0, &Value::from("migrated")),
        "{serr}"
    );
    assert_eq!((dcode, &dj["outcome"]), (0, &Value::from("ok")), "{derr}");
    assert_eq!(dj["integrity_errors"], 0, "{dj}");
    assert_eq!(dj["incoming"]["memory_hash"], report["memory_hash"], "{dj}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn another_user_cannot_even_reach_a_unix_destination() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("other-user");
    // The socket's directory is open to all: only the socket's own mode keeps them out.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mig = dir.join("mig.sock");
    let dst_api = dir.join("dst-api.sock");
    let mut dst = spawn(&[
        "run",
        "--memory",
        "32M",
        "--console",
        "off",
        "--incoming",
        &format!("unix:{}", mig.display()),
        "--api-socket",
        &dst_api.to_string_lossy(),
    ]);
    wait_for(&mig);
    // An unprivileged user (nobody) tries to connect: the kernel refuses it.
    let out = {
        use std::os::unix::process::CommandExt;
        tests::hugevisor()
            .args(["migrate", "--api-socket"])
            .arg(&mig)
            .args(["--to", "unix:/nowhere"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let info = wait_until(&mut dst, &dst_api, "the destination, still waiting", |i| {
        i["run_state"] == "receiving"
    });
    assert_eq!(info["incoming"]["refused_connections"], 0, "{info}");
    let _ = dst.kill();
    let _ = dst.wait();
    let _ = std::fs::remove_dir_all(dir);
}
