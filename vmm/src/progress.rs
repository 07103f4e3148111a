//! A migration source's progress: on its terminal, one line rewritten at most five
//! times a second (bytes sent, rate, phase), only when stderr is a terminal; and for
//! `vm.info`, the phase and bytes as they are now ([`Tracker`]).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use migration::{Phase, Progress};

use guest_image::clock::monotonic_ns;

pub struct Terminal {
    start_ns: u64,
    last_ns: AtomicU64,
    shown: std::sync::atomic::AtomicBool,
    on: bool,
}

impl Terminal {
    pub fn new() -> Terminal {
        Terminal {
            start_ns: monotonic_ns(),
            last_ns: AtomicU64::new(0),
            shown: Default::default(),
            on: std::io::stderr().is_terminal(),
        }
    }
}

impl Default for Terminal {
    fn default() -> Self {
        Terminal::new()
    }
}

impl Progress for Terminal {
    fn update(&self, phase: Phase, bytes_sent: u64) {
        if !self.on {
            return;
        }
        let now = monotonic_ns();
        if now.saturating_sub(self.last_ns.load(Ordering::Relaxed)) < 200_000_000 {
            return;
        }
        self.last_ns.store(now, Ordering::Relaxed);
        self.shown.store(true, Ordering::Relaxed);
        let secs = (now - self.start_ns) as f64 / 1e9;
        let mib = bytes_sent as f64 / (1 << 20) as f64;
        let rate = if secs > 0.0 { mib / secs } else { 0.0 };
        eprint!(
            "\rmigration: {:<10} {mib:>8.1} MiB sent, {rate:>7.1} MiB/s, {secs:>5.1} s   ",
            phase.to_string()
        );
    }

    fn finished(&self) {
        if self.shown.load(Ordering::Relaxed) {
            eprintln!();
        }
    }
}

/// Where a migration source is, for `vm.info`, told the same updates as the terminal.
pub struct Tracker {
    terminal: Terminal,
    phase: Mutex<Option<Phase>>,
    bytes_sent: AtomicU64,
}

/// A [`Tracker`]'s reading.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    /// None until the first round (connecting, the handshake).
    pub phase: Option<Phase>,
    pub bytes_sent: u64,
    pub elapsed_ns: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            terminal: Terminal::new(),
            phase: Mutex::new(None),
            bytes_sent: AtomicU64::new(0),
        }
    }

    pub fn read(&self) -> Reading {
        Reading {
            phase: *self.phase.lock().unwrap_or_else(|e| e.into_inner()),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            elapsed_ns: monotonic_ns().saturating_sub(self.terminal.start_ns),
        }
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Progress for Tracker {
    fn update(&self, phase: Phase, bytes_sent: u64) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = Some(phase);
        self.bytes_sent.store(bytes_sent, Ordering::Relaxed);
        self.terminal.update(phase, bytes_sent);
    }

    fn finished(&self) {
        self.terminal.finished();
    }
}
