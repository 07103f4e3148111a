//! The guest text console: bytes the guest transmits on COM1 (the 16550 in
//! `devices/serial.rs`). Each vCPU assembles its own lines; whole lines go to the sink,
//! so output of several vCPUs does not interleave mid-line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Where guest console lines go (`--console`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// To stderr, prefixed with "guest: ".
    Stderr,
    /// To stdout, as the guest wrote them.
    Stdout,
    /// Appended to a file, as the guest wrote them.
    File(PathBuf),
    /// Kept (for error messages) but not printed.
    Off,
}

/// A `--console` value that names no sink.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: choose stderr, stdout, off or file:PATH")]
pub struct ConsoleParseError(String);

impl std::str::FromStr for ConsoleMode {
    type Err = ConsoleParseError;
    fn from_str(s: &str) -> Result<Self, ConsoleParseError> {
        match s {
            "stderr" => Ok(ConsoleMode::Stderr),
            "stdout" => Ok(ConsoleMode::Stdout),
            "off" => Ok(ConsoleMode::Off),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleMode::File(PathBuf::from(p))),
                _ => Err(ConsoleParseError(s.to_string())),
            },
        }
    }
}

const KEPT_LINES: usize = 64;
const MAX_LINE: usize = 512;

pub struct Console {
    mode: ConsoleMode,
    file: Option<Mutex<std::fs::File>>,
    recent: Mutex<Vec<String>>,
    bytes: AtomicU64,
    /// CLOCK_MONOTONIC of the guest's first console byte (0: none yet).
    first_byte_ns: AtomicU64,
}

impl Console {
    /// A console writing to `mode`'s sink. A file that cannot be opened leaves the
    /// console off (the run goes on; its lines are still kept for error messages).
    pub fn new(mode: ConsoleMode) -> Self {
        let file = match &mode {
            ConsoleMode::File(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .inspect_err(|e| {
                    eprintln!("hugevisor: warning: --console file:{}: {e}", p.display())
                })
                .ok()
                .map(Mutex::new),
            _ => None,
        };
        Console {
            mode,
            file,
            recent: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            first_byte_ns: AtomicU64::new(0),
        }
    }

    /// When the guest wrote its first console byte (CLOCK_MONOTONIC ns), if it has.
    pub fn first_byte_ns(&self) -> Option<u64> {
        Some(self.first_byte_ns.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Bytes the guest has written to the console.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        match &self.mode {
            ConsoleMode::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "guest: {text}");
            }
            ConsoleMode::Stdout => {
                let _ = writeln!(std::io::stdout().lock(), "{text}");
            }
            ConsoleMode::File(_) => {
                if let Some(f) = &self.file {
                    let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(f, "{text}");
                }
            }
            ConsoleMode::Off => {}
        }
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == KEPT_LINES {
                r.remove(0);
            }
            r.push(text);
        }
    }

    /// The most recent guest console lines.
    pub fn recent(&self) -> Vec<String> {
        self.recent.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// One vCPU's partial line.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, console: &Console, byte: u8) {
        if console.bytes.fetch_add(1, Ordering::Relaxed) == 0 {
            let _ = console.first_byte_ns.compare_exchange(
                0,
                guest_image::clock::monotonic_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if byte == b'\n' || self.buf.len() >= MAX_LINE {
            console.emit(&self.buf);
            self.buf.clear();
            if byte == b'\n' {
                return;
            }
        }
        self.buf.push(byte);
    }

    pub fn flush(&mut self, console: &Console) {
        if !self.buf.is_empty() {
            console.emit(&self.buf);
            self.buf.clear();
        }
    }
}
