//! Waiting out a broken connection on the destination, once `Ready` went out: the source
//! may have handed the guest over, so this end keeps what it has, tells the VMM (whose
//! vCPUs wait for the pages they lack), and waits for the source to come back on a
//! resumed connection, which it answers with what it still lacks. A source that does not
//! come back within [`crate::Timeouts::recover`] ends the migration with an error naming
//! the pages that never arrived.

use std::time::Instant;

use super::Receiver;
use crate::bitmap::PageBitmap;
use crate::error::{Error, Step};
use crate::host::IncomingEvent;
use crate::wire::conn::Conn;
use crate::wire::message::{Joining, Message};

impl Receiver<'_> {
    /// The connections broke with `why`; `lacking` are the pages still absent of the
    /// `absent` post-copy began with. Returns with a resumed main connection in place
    /// and `Lacking` sent on it.
    pub(super) fn recover(
        &mut self,
        why: Error,
        lacking: &PageBitmap,
        absent: u64,
    ) -> Result<(), Error> {
        self.main.shutdown();
        if let Some(u) = self.urgent.take() {
            u.shutdown();
        }
        let wait = self.timeouts.recover;
        let deadline = Instant::now() + wait;
        let mut why = why;
        self.vm.note(IncomingEvent::Paused {
            why: &why,
            lacking: lacking.count(),
        });
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(conn) = self.door.joined(Joining::Resume, left) else {
                return Err(Error::Unrecovered {
                    lacking: lacking.count(),
                    absent,
                    waited: wait,
                    source: Box::new(why),
                });
            };
            let Conn {
                channel,
                writer,
                reader,
                ..
            } = conn;
            (self.main, self.writer, self.reader) = (channel, writer, reader);
            let lacks = Message::Lacking {
                started_at_ns: self.started_at_ns,
                pages: lacking.clone(),
            };
            match self.send(Step::Recover, &lacks) {
                Ok(()) => break,
                Err(e) if e.is_recoverable() => {
                    self.main.shutdown();
                    why = e;
                }
                Err(e) => return Err(e),
            }
        }
        self.report.recoveries += 1;
        self.vm.note(IncomingEvent::Resumed);
        Ok(())
    }
}
