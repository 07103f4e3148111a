//! Every mode, end to end between the fakes: the destination ends with the source's
//! memory and VM state, and both ends made their host calls in order.

use std::time::Duration;

use guest_mm::Gpa;

use super::fakes::{FakeDestination, FakeSource};
use super::net::TestNet;
use super::{pair, request, timeouts, MIB};
use crate::{destination, source, Listener, Mode, PushOrder, Uri, Verify};

const POSTCOPY_CALLS: [&str; 5] = [
    "restore",
    "begin_postcopy",
    "start",
    "resumed_after_migration",
    "end_postcopy",
];

fn assert_same_guest(src: &FakeSource, dst: &FakeDestination) {
    let (a, b) = (src.ram.snapshot(), dst.ram.snapshot());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(first_diff.is_none(), "RAM differs at {first_diff:x?}");
    let m = src.mailbox;
    assert!(b[m.start.0 as usize..m.end.0 as usize]
        .iter()
        .all(|&x| x == 0xee));
    assert_eq!(dst.restored.lock().unwrap().as_ref(), Some(&src.state));
}

#[test]
fn precopy_rounds_until_the_dirty_set_stops_shrinking_then_hands_over() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Precopy);
    // Nothing fits a zero budget: the rounds stop because 8 dirty pages a round never
    // shrink (two stalled rounds after round 1).
    req.downtime = Duration::ZERO;
    req.verify = Some(Verify::MemoryHash);
    let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_same_guest(&src, &dst);
    assert_eq!(s.precopy_rounds, 4, "{s:?}");
    assert!(s.pages_precopy >= 1024 + 3 * 8 + 8, "{s:?}");
    assert_eq!(d.pages, s.pages_precopy);
    // Each round in the report: round 0 all of RAM, then what the one before left.
    let sent: Vec<u64> = s.rounds.iter().map(|r| r.pages).collect();
    assert_eq!(sent.len(), 4, "{s:?}");
    assert_eq!(sent[0], 1024, "{s:?}");
    for w in s.rounds.windows(2) {
        assert_eq!(w[1].pages, w[0].dirty_after, "{s:?}");
    }
    assert!(s.rounds.iter().all(|r| r.mib_per_s > 0.0), "{s:?}");
    assert!(s.memory_hash.is_some());
    assert!(
        s.bytes_sent < 3 * MIB,
        "zero pages travel as addresses: {s:?}"
    );
    assert_eq!((s.mode.as_str(), d.mode.as_str()), ("precopy", "precopy"));
    assert!(s.downtime_ms >= 0.0 && s.total_ms > 0.0);
    assert_eq!(src.calls(), ["start_dirty_log", "pause", "stop_dirty_log"]);
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}

#[test]
fn precopy_over_four_channels_ends_with_every_page_and_its_last_copy() {
    // 16 MiB: 8 regions over 4 channels; the fake dirties pages every round, so the
    // same pages travel again, each time on its region's channel.
    let src = FakeSource::new(16 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(16 * MIB, 4096, "shmem");
    let mut req = request(Mode::Precopy);
    req.downtime = Duration::ZERO;
    req.verify = Some(Verify::MemoryHash);
    req.channels = 4;
    let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_same_guest(&src, &dst);
    assert_eq!(s.channels, 4, "{s:?}");
    assert!(s.precopy_rounds >= 2, "{s:?}");
    assert_eq!(
        d.pages, s.pages_precopy,
        "every channel's pages are counted"
    );
    assert_eq!(d.memory_hash, s.memory_hash);
    assert_eq!(dst.calls(), ["restore", "start", "resumed_after_migration"]);
}

#[test]
fn precopy_stops_after_the_first_round_of_dirty_pages_when_the_rest_fits_the_budget() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let (s, _) = pair(
        &src,
        &dst,
        &request(Mode::Precopy),
        &TestNet::new(),
        &timeouts(),
    );
    // Round 0's rate (memory in order) does not say what scattered pages cost: round 1
    // sends the dirty ones while the guest runs and measures that.
    assert_eq!(s.unwrap().precopy_rounds, 2);
    assert_same_guest(&src, &dst);
}

#[test]
fn postcopy_pages_on_demand_first_and_pushes_on_from_the_request() {
    let mut src = FakeSource::new(MIB, 4096, "shmem");
    // A slow push (256 pages, 2 ms each) that a demand request overtakes.
    src.read_delay_after_pause = Duration::from_millis(2);
    let dst = FakeDestination::new(MIB, 4096, "shmem");
    let req = request(Mode::Postcopy);
    let (s, d, pos) = std::thread::scope(|scope| {
        let vcpu = scope.spawn(|| {
            assert!(dst.wait_started(Duration::from_secs(10)));
            let pager = dst.ram.pager().expect("begin_postcopy before start");
            pager.request(Gpa(200 * 4096 + 123));
            let wait = Duration::from_secs(10);
            let pos = dst.ram.wait_installed(200, wait).unwrap();
            dst.ram.wait_installed(202, wait).unwrap();
            pos
        });
        let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
        let pos = vcpu.join().unwrap();
        (s, d, pos)
    });
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_same_guest(&src, &dst);
    let installs = dst.ram.installs.lock().unwrap().clone();
    // It overtook the push: at most a batch of pushed pages (64 of 4 KiB) came first.
    assert!(pos < 64, "the demanded page came first (install #{pos})");
    // The rest of its extent (201..=215) came behind it on the urgent channel, unasked
    // (prefetch): what arrived in between had been pushed before the request was seen.
    let next = installs.iter().position(|&p| p == 201).unwrap();
    assert!(
        next > pos && installs[pos + 1..next].iter().all(|&p| p < 200),
        "{installs:?}"
    );
    assert_eq!(installs[next..next + 15], (201..216).collect::<Vec<_>>());
    // The push went on from the request: the first pushed page past it is 216.
    let pushed_after = installs
        .iter()
        .find(|&&p| p > 200 && !(201..216).contains(&p));
    assert_eq!(pushed_after, Some(&216), "{installs:?}");
    assert_eq!((s.pages_demand, d.pages_demand), (1, 1), "{s:?} {d:?}");
    assert_eq!(s.pages_prefetched, 15);
    assert_eq!((s.pages_pushed, d.pages_pushed), (240, 255));
    assert!(s.demand_fault_us_max >= 1000.0, "{s:?}");
    assert_eq!(s.demand_fault_us_max, d.demand_fault_us_max);
    assert_eq!(s.precopy_rounds, 0);
    assert_eq!(s.push_order, "sequential");
    assert!(d.postcopy_ms.is_some());
    assert_eq!(src.calls(), ["start_dirty_log", "pause", "stop_dirty_log"]);
    assert_eq!(dst.calls(), POSTCOPY_CALLS);
}

#[test]
fn hybrid_sends_three_rounds_then_only_what_was_dirtied_since() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let (s, d) = pair(
        &src,
        &dst,
        &request(Mode::Hybrid),
        &TestNet::new(),
        &timeouts(),
    );
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_same_guest(&src, &dst);
    assert_eq!(s.precopy_rounds, 3);
    let after = s.pages_pushed + s.pages_demand;
    // What the guest wrote after round 1's take (three bursts of 8 here) and the
    // mailbox page, at most.
    assert!((1..=25).contains(&after), "{s:?}");
    assert_eq!(dst.ram.installs.lock().unwrap().len() as u64, after);
    assert_eq!(d.pages, s.pages_precopy);
    assert_eq!(dst.calls(), POSTCOPY_CALLS);
    assert_eq!(src.calls(), ["start_dirty_log", "pause", "stop_dirty_log"]);
}

#[test]
fn huge_backing_pages_travel_whole_in_every_mode() {
    for (mode, order) in [
        (Mode::Precopy, PushOrder::Sequential),
        (Mode::Postcopy, PushOrder::FewestMissingFirst),
        (Mode::Hybrid, PushOrder::Sequential),
    ] {
        let src = FakeSource::new(8 * MIB, 2 * MIB, "hugetlb-2m");
        let dst = FakeDestination::new(8 * MIB, 2 * MIB, "hugetlb-2m");
        let mut req = request(mode);
        req.push_order = order;
        let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
        let (s, _) = (s.unwrap(), d.unwrap());
        assert_same_guest(&src, &dst);
        assert_eq!(s.granularity_bytes, 2 * MIB);
        if mode == Mode::Postcopy {
            assert_eq!(
                (s.pages_pushed, s.push_order.as_str()),
                (4, "fewest-missing-first")
            );
        }
    }
}

#[test]
fn fewest_missing_first_pushes_every_page_once() {
    let src = FakeSource::new(4 * MIB, 4096, "shmem");
    let dst = FakeDestination::new(4 * MIB, 4096, "shmem");
    let mut req = request(Mode::Postcopy);
    req.push_order = PushOrder::FewestMissingFirst;
    let (s, d) = pair(&src, &dst, &req, &TestNet::new(), &timeouts());
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_same_guest(&src, &dst);
    assert_eq!((s.pages_pushed, d.pages_pushed), (1024, 1024));
}

#[test]
fn over_a_real_unix_socket_with_the_default_timeouts() {
    let dir = std::env::temp_dir().join(format!("hv-mig-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uri: Uri = format!("unix:{}", dir.join("m.sock").display())
        .parse()
        .unwrap();
    let listener = Listener::bind(&uri).unwrap();
    for mode in [Mode::Precopy, Mode::Postcopy] {
        let src = FakeSource::new(2 * MIB, 4096, "shmem");
        let dst = FakeDestination::new(2 * MIB, 4096, "shmem");
        let mut req = request(mode);
        req.to = uri.clone();
        let (s, d) = std::thread::scope(|scope| {
            let d = scope.spawn(|| destination::receive(&listener, &dst, &timeouts()));
            (
                source::migrate(&src, &req, &source::Options::default(), &crate::NoProgress),
                d.join().unwrap(),
            )
        });
        let (s, d) = (s.unwrap(), d.unwrap());
        assert_same_guest(&src, &dst);
        assert_eq!(s.to, uri.to_string());
        assert_eq!(d.mode, mode.name());
    }
    drop(listener);
    std::fs::remove_dir_all(dir).unwrap();
}
