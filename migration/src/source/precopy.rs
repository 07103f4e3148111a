//! Pre-copy rounds: when to send another round and when to stop and copy.
//!
//! Round 0 sends every page. After each round the pages written meanwhile are the next
//! round's, until what is left fits the downtime budget at the rate the last round was
//! sent, or the dirty set stops shrinking (by a tenth) for two rounds — a guest that
//! writes faster than the wire would otherwise never converge — or 20 rounds were sent.
//! Hybrid sends exactly three rounds.

use std::time::Instant;

use super::{RoundPages, Session, State};
use crate::error::{Error, Step};
use crate::host::Phase;
use crate::wire::message::Message;
use crate::Mode;

pub(crate) const MAX_ROUNDS: u32 = 20;
pub(crate) const HYBRID_ROUNDS: u32 = 3;

/// What the rounds so far say about convergence.
pub(crate) struct Convergence {
    /// Bytes per second the last round was sent at.
    rate: f64,
    /// Rounds in a row whose dirty set did not shrink by a tenth.
    stalled: u32,
    /// Pages the previous round sent.
    previous: u64,
}

impl Default for Convergence {
    fn default() -> Self {
        Convergence {
            rate: 0.0,
            stalled: 0,
            previous: u64::MAX,
        }
    }
}

impl Session<'_> {
    /// Sends round `n`, then decides what follows it.
    pub(super) fn round(&mut self, n: u32, pages: RoundPages) -> Result<State, Error> {
        let step = Step::Round(n);
        let start = Instant::now();
        let all = self.layout.pages();
        let sent = match pages {
            RoundPages::All => self.send_pages(0..all, step, Phase::Round(n))?,
            RoundPages::Dirty(p) => self.send_pages(p.into_iter(), step, Phase::Round(n))?,
        };
        self.report.pages_precopy += sent;
        self.send(step, &Message::RoundEnd { round: n })?;
        self.convergence.rate =
            (sent * self.layout.page_size) as f64 / start.elapsed().as_secs_f64().max(1e-6);
        self.report.precopy_rounds = n + 1;
        let dirty = self.take_dirty(step)?;
        let another = match self.req.mode {
            Mode::Hybrid => n + 1 < HYBRID_ROUNDS,
            _ => self.converging(n + 1, dirty.len() as u64),
        };
        Ok(if another {
            State::Round {
                n: n + 1,
                pages: RoundPages::Dirty(dirty),
            }
        } else {
            State::Pause { pending: dirty }
        })
    }

    /// Whether another round is worth it, after `rounds` rounds with `dirty` pages left.
    fn converging(&mut self, rounds: u32, dirty: u64) -> bool {
        let c = &mut self.convergence;
        let left = (dirty * self.layout.page_size) as f64;
        let budget = self.req.downtime.as_secs_f64();
        let another = rounds < MAX_ROUNDS && c.stalled < 2 && left / c.rate > budget;
        if another {
            if dirty * 10 >= c.previous.saturating_mul(9) {
                c.stalled += 1;
            } else {
                c.stalled = 0;
            }
            c.previous = dirty;
        }
        another
    }
}
