//! Live migration between two real hugevisor processes on this host (loopback TCP and
//! unix sockets), and the failure cases: a dying destination, a wrong-version peer, a
//! corrupted page frame, a peer that stops answering.

// Test code: a panic is the failure report (helpers here are not #[test] fns, which
// clippy's allow-unwrap-in-tests would cover on its own).
#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use migration::{Connector, Frame, FrameWriter, Hello, Message, Mode, Uri};
use tests::peers::{
    end_run, finish, migrate, scratch, spawn, start_pair, wait_for, wait_for_passes, Pair,
    EVENT_BOUND, RUN_BOUND,
};
use tests::{have_hugetlb, have_kvm};

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn migrate_case(backing: &str, mode: &str, uri_kind: &str) {
    migrate_case_with(backing, mode, uri_kind, "bitmap");
}

/// One migration of a 2-vCPU `verify` guest; `dirty_log` is the source's `--dirty-log`.
/// Returns the source's run report.
fn migrate_case_with(
    backing: &str,
    mode: &str,
    uri_kind: &str,
    dirty_log: &str,
) -> serde_json::Value {
    let dir = scratch(&format!("{backing}-{mode}-{}", dirty_log.replace('=', "")));
    let uri = match uri_kind {
        "unix" => format!("unix:{}", dir.join("mig.sock").display()),
        _ => format!("tcp:127.0.0.1:{}", free_tcp_port()),
    };
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
        "10s",
        "--console",
        "off",
        "--json",
    ];
    // A tcp listener takes no unauthenticated migration unless told to.
    let dst_extra: &[&str] = if uri_kind == "unix" {
        &[]
    } else {
        &["--insecure"]
    };
    let Pair { dst, src, .. } =
        start_pair(&common, &uri, &api, dst_extra, &["--dirty-log", dirty_log]);
    // Two more passes: the guest is in its steady state, writing, when the migration starts.
    wait_for_passes(&api, 4);
    let verify: &[&str] = if mode == "precopy" {
        &["--verify", "memory-hash"]
    } else {
        &[]
    };
    let mut extra = vec!["--mode", mode];
    extra.extend(verify);
    let (code, report, err) = migrate(&api, &uri, &extra);
    let what = format!("{mode} on {backing} over {uri_kind}");
    assert_eq!(code, 0, "{what}: migrate failed: {err}");
    assert_eq!(report["mode"], mode);
    let method = dirty_log.split('=').next().unwrap();
    assert_eq!(report["dirty_log"], method, "{what}: {report}");
    assert!(
        report["downtime_ms"].as_f64().unwrap() > 0.0,
        "{what}: {report}"
    );
    assert_eq!(
        report["granularity_bytes"].as_u64(),
        Some(if backing == "shmem" { 4096 } else { 2 << 20 }),
        "{what}"
    );
    let (scode, sj, serr) = finish(src);
    let (dcode, dj, derr) = finish(dst);
    assert_eq!(scode, 0, "{what}: source: {serr}");
    assert_eq!(sj["outcome"], "migrated", "{what}: {sj}");
    assert_eq!(sj["dirty_log"], method, "{what}: {sj}");
    assert_eq!(dcode, 0, "{what}: destination: {derr}");
    assert_eq!(dj["outcome"], "ok", "{what}: {dj}");
    assert_eq!(dj["integrity_errors"], 0, "{what}: {dj}");
    assert_eq!(dj["workload"], "verify");
    // The guest's own counters continued past the switch.
    let (src_passes, dst_passes) = (
        sj["passes"].as_u64().unwrap(),
        dj["passes"].as_u64().unwrap(),
    );
    assert!(
        src_passes > 0 && dst_passes > src_passes,
        "{what}: passes {src_passes} then {dst_passes}"
    );
    assert!(dj["guest_stall_ms"].as_f64().unwrap() > 0.0, "{what}: {dj}");
    // The whole run took about its --duration, across both hosts.
    let total =
        dj["incoming"]["source_elapsed_ms"].as_f64().unwrap() + dj["elapsed_ms"].as_f64().unwrap();
    assert!(
        (9500.0..20_000.0).contains(&total),
        "{what}: total run {total} ms"
    );
    match mode {
        "precopy" => {
            assert!(report["memory_hash"].as_u64().is_some(), "{what}: {report}");
            assert!(
                report["precopy_rounds"].as_u64().unwrap() >= 1,
                "{what}: {report}"
            );
            assert!(
                dj["incoming"]["pages"].as_u64().unwrap() > 0,
                "{what}: {dj}"
            );
        }
        _ => {
            // Every page arrived after the switch, on demand or pushed, then the guest
            // view was unregistered.
            let inc = &dj["incoming"];
            assert!(inc["postcopy_ms"].as_f64().is_some(), "{what}: {dj}");
            let after =
                inc["pages_demand"].as_u64().unwrap() + inc["pages_pushed"].as_u64().unwrap();
            assert!(after > 0, "{what}: {dj}");
            assert!(
                report["pages_pushed"].as_u64().unwrap() + report["pages_demand"].as_u64().unwrap()
                    > 0,
                "{what}: {report}"
            );
            if mode == "hybrid" {
                assert_eq!(
                    report["precopy_rounds"].as_u64(),
                    Some(3),
                    "{what}: {report}"
                );
            } else {
                assert_eq!(
                    report["pages_precopy"].as_u64(),
                    Some(0),
                    "{what}: {report}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    sj
}

#[test]
fn verify_keeps_running_across_precopy_postcopy_and_hybrid_on_shmem() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    migrate_case("shmem", "precopy", "tcp");
    migrate_case("shmem", "postcopy", "unix");
    migrate_case("shmem", "hybrid", "tcp");
}

#[test]
fn verify_keeps_running_across_precopy_with_the_dirty_ring_on_shmem() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    // The default ring (65536 entries per vCPU): zero integrity errors, equal memory
    // hashes, passes continued (all checked by migrate_case_with).
    migrate_case_with("shmem", "precopy", "tcp", "ring");
    // A ring of 256 entries fills many times a round: vCPUs take ring-full exits, harvest
    // their own ring and continue, and nothing written is lost.
    let sj = migrate_case_with("shmem", "precopy", "unix", "ring=256");
    assert!(
        sj["dirty_ring_full_exits"].as_u64().unwrap() > 0,
        "no ring-full exits with a 256-entry ring: {sj}"
    );
}

#[test]
fn verify_keeps_running_across_precopy_postcopy_and_hybrid_on_hugetlb_2m() {
    if !have_kvm() {
        return;
    }
    // Heavy: guest pairs, and hugetlb pool pages.
    let _heavy = tests::heavy();
    if !have_hugetlb(2048, 64) {
        return;
    }
    migrate_case("hugetlb-2m", "precopy", "unix");
    migrate_case("hugetlb-2m", "postcopy", "tcp");
    migrate_case("hugetlb-2m", "hybrid", "unix");
}

#[test]
fn source_keeps_running_when_the_destination_dies() {
    if !have_kvm() {
        return;
    }
    let _heavy = tests::heavy();
    let dir = scratch("dies");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let api = dir.join("api.sock");
    let api_s = api.to_string_lossy().to_string();
    let common = [
        "run",
        "--memory",
        "512M",
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
    let mut dst_args = common.to_vec();
    dst_args.extend(["--incoming", &uri]);
    let mut dst = spawn(&dst_args);
    let mut src_args = common.to_vec();
    src_args.extend(["--api-socket", &api_s]);
    let src = spawn(&src_args);
    wait_for(&api);
    wait_for_passes(&api, 2);
    // The destination dies while the migration is under way: the source migrates through
    // a relay that says when 16 MiB have reached the destination, and forwards no more.
    // (vm.info cannot tell: the API serves one call at a time, and vm.migrate holds it.)
    let relay = dir.join("relay.sock");
    let arrived = relay_until(&relay, &dir.join("mig.sock"), 16 << 20);
    let client = {
        let (api, to) = (api.clone(), format!("unix:{}", relay.display()));
        std::thread::spawn(move || migrate(&api, &to, &[]))
    };
    arrived
        .recv_timeout(EVENT_BOUND)
        .expect("the migration never sent 16 MiB to the destination");
    let _ = dst.kill();
    let _ = dst.wait();
    let (code, _, err) = client.join().unwrap();
    assert_eq!(code, 1, "the migration fails: {err}");
    assert!(err.contains("migration failed"), "{err}");
    // The guest kept running; the test ends it.
    end_run(&api);
    let (scode, sj, serr) = finish(src);
    assert_eq!(scode, 0, "the source guest kept running: {serr}");
    assert_eq!(sj["outcome"], "ok", "{sj}");
    assert_eq!(sj["integrity_errors"], 0);
    assert_eq!(
        sj["migration_failures"].as_array().unwrap().len(),
        1,
        "{sj}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Relays one migration connection accepted on `listen` to the destination listening on
/// `to`, and says so on the returned channel once `bytes` have gone through to it; then it
/// forwards nothing more (so the migration cannot complete, however fast the host), and
/// closes the source's side only once the destination's side is gone.
fn relay_until(listen: &std::path::Path, to: &std::path::Path, bytes: u64) -> mpsc::Receiver<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(listen).unwrap();
    let to = to.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut src, _) = listener.accept().unwrap();
        let mut dst = UnixStream::connect(&to).unwrap();
        let (mut dst_back, mut src_back) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_back, &mut src_back);
        });
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0u64;
        while sent < bytes {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
            }
        }
        let _ = tx.send(());
        let _ = back.join();
    });
    rx
}

/// A fake source: connects to a destination, sends what the test wants, then says nothing
/// more and keeps the connection open until the destination hangs up (it refused, or
/// gave up waiting) — so the destination, not this end, decides when the exchange ends.
fn fake_source(uri: &str, frames: Vec<Frame>) {
    let u: Uri = uri.parse().unwrap();
    let s = u
        .connect(Duration::from_secs(60), Duration::from_secs(30))
        .unwrap();
    let mut w = FrameWriter::new(s);
    for f in &frames {
        w.send(f).unwrap();
    }
    w.flush().unwrap();
    until_hang_up(w.get_mut(), "the destination");
}

/// Reads (and drops) whatever the peer sends until it closes the connection; panics if it
/// has not within 120 s.
fn until_hang_up(conn: &mut impl std::io::Read, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        assert!(Instant::now() < deadline, "{peer} never hung up (120 s)");
    }
}

fn hello_frame(h: Hello) -> Frame {
    Message::Hello(h).to_frame().unwrap()
}

fn hello(version: u32) -> Hello {
    Hello {
        version,
        memory_bytes: 32 << 20,
        backing: "shmem".into(),
        page_size: 4096,
        vcpus: 1,
        mode: Mode::Precopy,
        session: None,
        channels: 1,
        boot_id: None,
    }
}

fn destination(dir: &std::path::Path) -> (Child, String) {
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let child = spawn(&[
        "run",
        "--memory",
        "32M",
        "--console",
        "off",
        "--incoming",
        &uri,
    ]);
    (child, uri)
}

#[test]
fn destination_refuses_a_wrong_version_a_corrupt_frame_and_a_silent_peer() {
    if !have_kvm() {
        return;
    }
    // Wrong version.
    let dir = scratch("version");
    let (dst, uri) = destination(&dir);
    fake_source(&uri, vec![hello_frame(hello(99))]);
    let (code, _, err) = finish(dst);
    assert_eq!(code, 1);
    assert!(
        err.contains("version 99") && err.lines().count() == 1,
        "{err}"
    );

    // Another guest layout.
    let (dst, uri) = destination(&dir);
    let mut h = hello(migration::PROTOCOL_VERSION);
    h.memory_bytes = 64 << 20;
    fake_source(&uri, vec![hello_frame(h)]);
    let (code, _, err) = finish(dst);
    assert_eq!(code, 1);
    assert!(err.contains("memory") && err.contains("--memory"), "{err}");

    // A page frame whose data was corrupted in transit.
    let (dst, uri) = destination(&dir);
    let mut bad = FrameWriter::new(Vec::new());
    let page = Message::Page {
        gpa: guest_mm::Gpa(0x40_0000),
        data: &[0xab; 4096],
    };
    bad.send(&page.to_frame().unwrap()).unwrap();
    let mut bytes = bad.get_mut().clone();
    let n = bytes.len();
    bytes[n - 7] ^= 0x10;
    let u: Uri = uri.parse().unwrap();
    {
        let s = u
            .connect(Duration::from_secs(60), Duration::from_secs(30))
            .unwrap();
        let mut w = FrameWriter::new(s);
        w.send(&hello_frame(hello(migration::PROTOCOL_VERSION)))
            .unwrap();
        use std::io::Write;
        w.get_mut().write_all(&bytes).unwrap();
        w.flush().unwrap();
        until_hang_up(w.get_mut(), "the destination");
    }
    let (code, _, err) = finish(dst);
    assert_eq!(code, 1);
    assert!(err.contains("checksum") && err.contains("frame 1"), "{err}");

    // A source that says hello, then nothing: bounded wait, clear error.
    let (dst, uri) = destination(&dir);
    let t0 = Instant::now();
    let uri2 = uri.clone();
    let silent = std::thread::spawn(move || {
        fake_source(&uri2, vec![hello_frame(hello(migration::PROTOCOL_VERSION))])
    });
    let (code, _, err) = finish(dst);
    assert_eq!(code, 1);
    assert!(err.contains("did not answer"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "bounded: {:?}",
        t0.elapsed()
    );
    silent.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_destination_that_never_answers_fails_the_migration_not_the_guest() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("mute");
    let api = dir.join("api.sock");
    let api_s = api.to_string_lossy().to_string();
    let mute = dir.join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    // Accepts, then stays mute until the source gives up and hangs up.
    let holder = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        until_hang_up(&mut c, "the source");
    });
    let src = spawn(&[
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
        &api_s,
    ]);
    wait_for(&api);
    let t0 = Instant::now();
    let (code, _, err) = migrate(&api, &format!("unix:{}", mute.display()), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not answer"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(13), "{:?}", t0.elapsed());
    // The guest kept running; the test ends it.
    end_run(&api);
    let (scode, sj, serr) = finish(src);
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(sj["outcome"], "ok");
    holder.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
