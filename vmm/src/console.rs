//! The guest text console: bytes the guest writes to the 16550 data port (0x3f8).
//! Each vCPU assembles its own lines; whole lines go to the sink, so output of several
//! vCPUs does not interleave mid-line.

use std::io::Write;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsoleMode {
    /// Guest console lines go to stderr, prefixed with "guest: ".
    Stderr,
    /// Guest console lines are kept (for error messages) but not printed.
    Off,
}

const KEPT_LINES: usize = 64;
const MAX_LINE: usize = 512;

pub struct Console {
    mode: ConsoleMode,
    recent: Mutex<Vec<String>>,
}

impl Console {
    pub fn new(mode: ConsoleMode) -> Self {
        Console {
            mode,
            recent: Mutex::new(Vec::new()),
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        if self.mode == ConsoleMode::Stderr {
            let _ = writeln!(std::io::stderr().lock(), "guest: {text}");
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
