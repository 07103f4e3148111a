//! Pre-copy rounds: when to send another round, when to help the rounds converge, and
//! when to stop and copy.
//!
//! Round 0 sends every page. After each round the pages written meanwhile are the next
//! round's, until what is left fits the downtime budget at the rate the last round of
//! dirty pages was sent (never round 0's, which moves memory in address order faster than
//! scattered pages go), counting what still sits in the socket buffers, with an allowance
//! for the switch-over itself. A guest that writes faster than the wire never gets there: when the dirty set
//! stops shrinking (by a tenth) for two rounds, or after 20 rounds, the source
//! - with `--mode auto`, switches to post-copy of what is left;
//! - otherwise throttles the vCPUs (auto-converge, as QEMU does: 20 % held back, 10 more
//!   each round that still does not fit, at most 99 %) and goes on, up to 20 more
//!   rounds;
//! - and where neither helps (a VM that cannot throttle, or 99 % that is not enough),
//!   stops and copies anyway, over its budget — and the report says so.
//!
//! Hybrid sends exactly three rounds.

use std::time::Instant;

use super::{RoundPages, Session, State};
use crate::error::{Error, HostCall, Step};
use crate::host::Phase;
use crate::report::{Converged, RoundReport};
use crate::wire::message::Message;
use crate::Mode;

pub(crate) const MAX_ROUNDS: u32 = 20;
pub(crate) const HYBRID_ROUNDS: u32 = 3;
/// Rounds allowed on top of [`MAX_ROUNDS`] once the vCPUs are throttled.
const THROTTLED_ROUNDS: u32 = 20;
/// QEMU's `cpu-throttle-initial`, `cpu-throttle-increment` and its maximum.
const THROTTLE_FIRST: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
/// What the switch-over costs beside the last pages (pausing the vCPUs, their state,
/// the destination's restore and start): ~10–15 ms measured on a loaded 2-core host with
/// 2 vCPUs, 6 ms for a 256 MiB guest. Counted in the expected downtime, so that a 50 ms
/// budget is kept rather than missed by the switch itself. A budget below it counts the
/// whole budget (not less: half of a 1 ms budget once let a single 2 MiB page "fit", and
/// the switch then took 6.3 ms): such a budget is never expected to be kept, so the
/// rounds throttle, then end over budget and say so (a zero budget fits only an empty
/// dirty set).
const SWITCH_ALLOWANCE_S: f64 = 0.015;
/// The share of the budget the expected downtime must fit in: the last round's rate is a
/// guess at the stop-and-copy's, and on a busy host the stop-and-copy ran up to a sixth
/// slower than the round before it (57 ms measured for 49.8 expected, two busy loops
/// beside a 2-vCPU guest on 2 cores).
const FIT_SHARE: f64 = 0.75;

/// What the rounds so far say about convergence.
pub(crate) struct Convergence {
    /// Bytes per second the last round was sent at.
    rate: f64,
    /// Bytes still in the socket buffers when the last round ended.
    queued: u64,
    /// The rounds of dirty pages so far (from round 1): when they began, what was in the
    /// socket buffers then, and what they sent.
    dirty_since: Option<(Instant, u64)>,
    dirty_bytes: u64,
    /// Rounds in a row whose dirty set did not shrink by a tenth.
    stalled: u32,
    /// Pages the previous round sent.
    previous: u64,
    /// The share of time the vCPUs are held back now, in percent.
    pub(crate) throttle: u32,
}

impl Default for Convergence {
    fn default() -> Self {
        Convergence {
            rate: 0.0,
            queued: 0,
            dirty_since: None,
            dirty_bytes: 0,
            stalled: 0,
            previous: u64::MAX,
            throttle: 0,
        }
    }
}

impl Convergence {
    /// Round `n` sent `bytes` from `start`, with `before` bytes in the socket buffers then
    /// and `after` now. The rate is what the peer took over every round of dirty pages so
    /// far (round 0's alone for round 0): one round's is too noisy on a busy host, where a
    /// receiver that fell behind leaves a full buffer and a round that "delivered" nothing.
    fn sent(&mut self, n: u32, bytes: u64, before: u64, after: u64, start: Instant) {
        self.queued = after;
        let (since, at_start, total) = match n {
            0 => (start, before, bytes),
            _ => {
                let (since, at_start) = *self.dirty_since.get_or_insert((start, before));
                self.dirty_bytes += bytes;
                (since, at_start, self.dirty_bytes)
            }
        };
        let delivered = (total + at_start).saturating_sub(after);
        let rate = delivered as f64 / since.elapsed().as_secs_f64().max(1e-6);
        // Nothing taken at all (a stalled peer): keep the last estimate.
        if rate > 0.0 {
            self.rate = rate;
        }
    }
}

/// What follows a round.
enum Next {
    Round,
    /// Stop the vCPUs; the rounds ended as the report's `converged_by` says.
    Pause(Converged),
}

impl Session<'_> {
    /// Sends round `n`, then decides what follows it.
    pub(super) fn round(&mut self, n: u32, pages: RoundPages) -> Result<State, Error> {
        let step = Step::Round(n);
        let start = Instant::now();
        let queued_before = self.unsent_bytes();
        let all = self.layout.pages();
        let sent = match pages {
            RoundPages::All => self.send_pages(0..all, step, Phase::Round(n))?,
            RoundPages::Dirty(p) => self.send_pages(p.into_iter(), step, Phase::Round(n))?,
        };
        self.report.pages_precopy += sent;
        self.send(step, &Message::RoundEnd { round: n })?;
        // What the peer took: what was sent, plus what sat in the socket buffers at the
        // start, less what still sits there now (4 MiB buffers would otherwise count as
        // sent at memory speed, and a small round's rate would be several times the wire's).
        let queued = self.unsent_bytes();
        self.convergence.sent(
            n,
            sent * self.layout.page_size,
            queued_before,
            queued,
            start,
        );
        self.report.precopy_rounds = n + 1;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let dirty = self.take_dirty(step)?;
        self.report.rounds.push(RoundReport {
            pages: sent,
            ms,
            mib_per_s: self.convergence.rate / f64::from(1 << 20),
            dirty_after: dirty.len() as u64,
            throttle_percent: self.convergence.throttle,
        });
        let next = match self.req.mode {
            Mode::Hybrid if n + 1 < HYBRID_ROUNDS => Next::Round,
            Mode::Hybrid => Next::Pause(Converged::NotApplicable),
            _ => self.converging(n + 1, dirty.len() as u64, step)?,
        };
        Ok(match next {
            Next::Round => State::Round {
                n: n + 1,
                pages: RoundPages::Dirty(dirty),
            },
            Next::Pause(how) => {
                self.report.converged_by = how;
                State::Pause { pending: dirty }
            }
        })
    }

    /// Bytes written on every connection the rounds use but not yet taken by the peer.
    fn unsent_bytes(&self) -> u64 {
        self.main.unsent_bytes()
            + self
                .channels
                .iter()
                .map(|c| c.channel.unsent_bytes())
                .sum::<u64>()
    }

    /// What comes after `rounds` rounds with `dirty` pages left: another round (perhaps
    /// with the vCPUs throttled harder), or the pause.
    fn converging(&mut self, rounds: u32, dirty: u64, step: Step) -> Result<Next, Error> {
        let can_throttle = self.vm.can_throttle();
        let c = &mut self.convergence;
        // The dirty pages, and what the last round left in the socket buffers: both cross
        // the wire before the destination can start the guest.
        let left = (dirty * self.layout.page_size + c.queued) as f64;
        let budget = self.req.downtime.as_secs_f64();
        let expected = left / c.rate + SWITCH_ALLOWANCE_S.min(budget);
        self.report.expected_downtime_ms = expected * 1000.0;
        // Round 0's rate is that of memory in address order, whole extents; what is left
        // is scattered pages, which go slower. So the pause waits for a rate measured on a
        // round of dirty pages (round 1 sends them while the guest still runs), unless
        // nothing is left at all.
        let representative = rounds >= 2 || dirty == 0;
        if expected <= budget * FIT_SHARE && representative {
            return Ok(Next::Pause(if c.throttle > 0 {
                Converged::Throttle
            } else {
                Converged::Rounds
            }));
        }
        let limit = match c.throttle {
            0 => MAX_ROUNDS,
            _ => MAX_ROUNDS + THROTTLED_ROUNDS,
        };
        let stuck = rounds >= limit || c.stalled >= 2;
        if dirty * 10 >= c.previous.saturating_mul(9) {
            c.stalled += 1;
        } else {
            c.stalled = 0;
        }
        c.previous = dirty;
        let raise = match c.throttle {
            // Throttled already: each round that still does not fit holds them back more.
            t if t > 0 && t < THROTTLE_MAX && rounds < limit => {
                Some((t + THROTTLE_STEP).min(THROTTLE_MAX))
            }
            0 if stuck && self.req.mode == Mode::Precopy && can_throttle => Some(THROTTLE_FIRST),
            _ => None,
        };
        if let Some(percent) = raise {
            c.throttle = percent;
            c.stalled = 0;
            self.report.throttle_percent = percent;
            self.vm
                .throttle(percent)
                .map_err(Error::host(step, HostCall::Throttle(percent)))?;
            return Ok(Next::Round);
        }
        Ok(match (stuck, self.req.mode) {
            (false, _) => Next::Round,
            (true, Mode::Auto) => Next::Pause(Converged::Postcopy),
            (true, _) => Next::Pause(Converged::OverBudget),
        })
    }
}
