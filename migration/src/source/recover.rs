//! Resuming a migration whose connection broke after the hand-over: the source keeps the
//! guest paused (it is the destination's), asks its VMM where to reconnect
//! ([`crate::SourceVm::handover_paused`]), joins the session again on a new main
//! connection, and learns from the destination's `Lacking` whether it started the guest
//! and which pages it still lacks — those, and nothing else, are sent again.

use super::{open, Session, State};
use crate::error::{Error, PeerError, Step};
use crate::wire::message::{Joining, Message};
use crate::wire::transport::{Connector, Uri};

impl Session<'_> {
    /// After `why` broke the migration in doubt: waits for the VMM's resume, reconnects,
    /// and returns the state to go on from. Every failed attempt goes back to the VMM;
    /// its `None` ends the migration with the last error.
    pub(super) fn recover(&mut self, why: Error) -> Result<State, Error> {
        let mut why = why;
        loop {
            self.main.shutdown();
            if let Some(u) = self.urgent.take() {
                u.shutdown();
            }
            self.urgent_conn = None;
            let Some(to) = self.vm.handover_paused(&why) else {
                return Err(why);
            };
            match self.reconnect(&to) {
                Ok(next) => {
                    self.report.recoveries += 1;
                    self.vm.handover_resumed();
                    return Ok(next);
                }
                Err(e) => why = e,
            }
        }
    }

    fn reconnect(&mut self, to: &Uri) -> Result<State, Error> {
        let step = Step::Recover;
        // The same destination through the connector this migration was given (a test
        // network, say), or the place the VMM was told to resume to.
        let connector: &dyn Connector = if *to == self.req.to {
            self.connector
        } else {
            to
        };
        let mut main = open(connector, self.auth, self.layout, self.timeouts, step)?;
        main.send(step, &self.join(Joining::Resume))?;
        let (started_at_ns, pages) = main.recv(step, |m| match m {
            Message::Lacking {
                started_at_ns,
                pages,
            } => Ok((started_at_ns, pages)),
            Message::Abort { reason } => Err(Error::peer(step, PeerError::Aborted { reason })),
            other => Err(Error::peer(
                step,
                PeerError::Unexpected {
                    index: 0,
                    expected: "the destination's Lacking",
                    got: other.kind(),
                },
            )),
        })??;
        self.report.bytes_sent += self.writer.bytes;
        (self.main, self.writer, self.reader) = (main.channel, main.writer, main.reader);
        let postcopy = self.postcopy();
        if postcopy {
            self.join_urgent(connector)?;
        }
        let missing = postcopy.then_some(pages);
        Ok(match (started_at_ns, missing) {
            (None, missing) => {
                self.send(Step::Start, &Message::Start)?;
                State::AwaitResumed { missing }
            }
            (Some(at_ns), None) => {
                self.resumed_at(at_ns);
                State::Complete
            }
            (Some(at_ns), Some(missing)) => {
                self.resumed_at(at_ns);
                State::Postcopy { missing }
            }
        })
    }
}
