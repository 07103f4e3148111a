//! The destination's pre-copy channels (`--channels`): the connections beyond the main
//! one that the source's rounds also send pages on, each read by a thread of its own that
//! writes what arrives in place, until the channel's `Complete`. The source sends every
//! page of a region on the same channel, so each page's copies arrive in order; and it
//! ends every channel before it sends the SwitchOver, which the main thread acts on only
//! once every channel has ended ([`Channels::wait`]).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, HostCall, PeerError, Step};
use crate::host::GuestPages;
use crate::wire::conn::Conn;
use crate::wire::message::Message;
use crate::wire::transport::Channel;

/// How the channel threads ended, as the main thread waits for them.
#[derive(Default)]
pub(crate) struct Channels {
    state: Mutex<Ended>,
    changed: Condvar,
}

#[derive(Default)]
struct Ended {
    running: usize,
    pages: u64,
    error: Option<Error>,
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ended> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn started(&self) {
        self.lock().running += 1;
    }

    fn ended(&self, result: Result<u64, Error>) {
        let mut s = self.lock();
        s.running -= 1;
        match result {
            Ok(n) => s.pages += n,
            Err(e) => {
                s.error.get_or_insert(e);
            }
        }
        self.changed.notify_all();
    }

    /// The first channel's failure, if one failed: the cause of whatever the main
    /// connection saw after it (the failing thread shut the main connection down).
    pub(crate) fn failure(&self) -> Option<Error> {
        self.lock().error.take()
    }

    /// Waits until every channel has ended; returns the pages they wrote, or the first
    /// failure. Each thread ends by its `Complete`, an error, or its I/O timeout.
    pub(crate) fn wait(&self) -> Result<u64, Error> {
        let mut s = self.lock();
        while s.running > 0 && s.error.is_none() {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        match s.error.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut s.pages)),
        }
    }
}

/// Receives pre-copy channel `k` until its `Complete`; a failure shuts `main` down, so
/// the main thread stops too.
pub(crate) fn receive(
    k: u32,
    pages: &dyn GuestPages,
    conn: Conn,
    main: Box<dyn Channel>,
    channels: &Channels,
) {
    let handle = conn.channel.try_clone();
    let result = pages_until_complete(k, pages, conn);
    if result.is_err() {
        main.shutdown();
    }
    if let Ok(h) = handle {
        h.shutdown();
    }
    channels.ended(result);
}

fn pages_until_complete(k: u32, pages: &dyn GuestPages, mut conn: Conn) -> Result<u64, Error> {
    let step = Step::Channel(k);
    let io: Duration = conn.io;
    let page_size = pages.page_size();
    let mut written = 0;
    loop {
        let frame = conn.reader.recv().map_err(Error::wire(step, io))?;
        let msg = conn.reader.decode(&frame).map_err(Error::wire(step, io))?;
        match msg {
            Message::Page { gpa, data } => {
                pages
                    .write_pages(gpa, data)
                    .map_err(Error::host(step, HostCall::WritePage(gpa)))?;
                written += data.len() as u64 / page_size;
            }
            Message::ZeroPage { gpa, pages: n } => {
                pages
                    .zero_pages(gpa, n.into())
                    .map_err(Error::host(step, HostCall::WritePage(gpa)))?;
                written += u64::from(n);
            }
            Message::Complete { demand: None } => return Ok(written),
            Message::Abort { reason } => {
                return Err(Error::peer(step, PeerError::Aborted { reason }))
            }
            other => {
                return Err(Error::peer(
                    step,
                    PeerError::Unexpected {
                        index: conn.reader.last_index(),
                        expected: "a page or the channel's Complete",
                        got: other.kind(),
                    },
                ))
            }
        }
        conn.reader.recycle(frame);
    }
}
