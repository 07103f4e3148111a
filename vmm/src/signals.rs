//! SIGINT, SIGTERM and SIGHUP end a run the way `vm.shutdown` does: the handler only
//! records the signal, and the controller, which polls it between events, stops the
//! guest, so the run still prints its summary and removes its sockets. A second signal
//! of the three ends the process at once.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

/// The first of the three signals received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    if RECEIVED.swap(signal, Ordering::AcqRel) != 0 {
        // SAFETY: _exit is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn install() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // only touches an atomic and, the second time, calls _exit, both async-signal-safe.
        let r = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(signal, &act, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(Error::Signal {
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The signal that asked the run to end, if one did.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name, for the report.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
