//! Order between a packet and what was sent before it on other data streams.
//!
//! Two packets need it:
//!
//! * a packet without a known sender takes the fixed stream 0 ([`crate::routing`]),
//!   and the receiver reads all streams at once, so without more it could overtake
//!   what the process it concerns sent just before on its own stream: the `'DOWN'` of
//!   a monitor by registered name (its control message names the dead process by its
//!   name) would reach the monitoring process before the dead process's last messages,
//!   which Erlang promises it never does;
//! * the first packet of a sender that moves to another stream (it was marked or
//!   unmarked for priority) must not overtake what it sent on its old stream.
//!
//! A fence keeps the order:
//!
//! * the sender ([`FenceOut`]) puts a *fence* marker, numbered `N` (rising), on the
//!   streams that must go first (for a packet without a sender, every other stream
//!   that carried a packet since the last fence; for a move, the old stream), each in
//!   its queue order, then on the packet's stream a *wait* marker naming `N` and those
//!   streams, then the packet;
//! * each receiving reader passes a fence once it has delivered everything before it
//!   ([`FenceBoard::pass`]); a reader that meets a wait holds what follows until every
//!   stream it names has passed fence `N` ([`FenceBoard::check`]), without asking for
//!   delivery credit meanwhile, so the streams it waits for get theirs.
//!
//! Waits cannot deadlock: the sender queues every marker under one lock, so a wait
//! only names fences queued before it, and each stream's markers are in that order;
//! by induction on `N` every fence is reached. A peer that breaks this (a wait for a
//! fence it queues later) only stalls the streams of its own connection. Memory is
//! bounded whatever a peer sends: the board is one word per possible stream, a
//! reader's held bytes count against its batch limit like packets.
//!
//! A wait that names a stream the peer never opens holds that one stream for good (its
//! reader stops reading, QUIC flow control stops its sender; ticks and the other
//! streams go on): it cannot be told from a stream that is slow to open. A stream that
//! ends before the fence a wait needs is a protocol violation.

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::routing::FIXED_STREAM;
use crate::wire::MAX_DATA_STREAMS;

/// Bit `i` stands for stream `i`; every stream index is below [`MAX_DATA_STREAMS`].
type StreamSet = u64;

/// The streams a peer may name.
const ALL_STREAMS: StreamSet = (1 << MAX_DATA_STREAMS) - 1;

fn bit(stream: usize) -> StreamSet {
    1u64.checked_shl(stream as u32).unwrap_or(0)
}

/// The send side: which streams need a fence before the next packet without a sender.
#[derive(Default)]
pub(crate) struct FenceOut {
    /// Streams that carried a packet since their last fence.
    dirty: StreamSet,
    /// The last fence's number.
    last: u64,
}

/// One fence: its number, and the streams it goes on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    pub(crate) seq: u64,
    pub(crate) streams: StreamSet,
}

impl Fence {
    /// The streams the fence marker goes on.
    pub(crate) fn streams(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_DATA_STREAMS as usize).filter(|&i| self.streams & bit(i) != 0)
    }
}

impl FenceOut {
    /// A packet goes on `stream`, its sender's.
    pub(crate) fn routed(&mut self, stream: usize) {
        if stream != FIXED_STREAM {
            self.dirty |= bit(stream);
        }
    }

    /// A sender moves off `stream` (its priority mark changed): the fence for its first
    /// packet on its new stream to wait for.
    pub(crate) fn moved(&mut self, stream: usize) -> Fence {
        self.last += 1;
        Fence { seq: self.last, streams: bit(stream) }
    }

    /// A packet without a sender goes on the fixed stream: the fence to queue before
    /// it, unless no other stream carried anything since the last fence (what came
    /// before that fence, the previous wait on the fixed stream already waited for).
    pub(crate) fn unrouted(&mut self) -> Option<Fence> {
        if self.dirty == 0 {
            return None;
        }
        self.last += 1;
        Some(Fence { seq: self.last, streams: std::mem::take(&mut self.dirty) })
    }
}

/// A peer's markers that break the fence protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FenceError {
    #[error("fence names stream {0}, beyond the streams a peer may open")]
    NoSuchStream(u8),
    #[error("two data streams name themselves stream {0}")]
    Duplicate(u8),
    #[error("a data stream that named itself stream {was} names itself stream {now}")]
    Renamed { was: u8, now: u8 },
    #[error("fence {seq} after fence {last} on one stream")]
    FenceNotRising { seq: u64, last: u64 },
    #[error("wait {seq} after wait {last} on one stream")]
    WaitNotRising { seq: u64, last: u64 },
    #[error("wait {seq} names no stream or one beyond the streams a peer may open ({streams:#x})")]
    BadWaitStreams { seq: u64, streams: u64 },
    #[error("stream {stream} ended before fence {seq}, which a wait needs")]
    EndedBeforeFence { stream: u8, seq: u64 },
}

/// The receive side of one connection: how far each of the peer's streams has
/// delivered.
pub(crate) struct FenceBoard {
    /// The last fence each stream passed.
    passed: [AtomicU64; MAX_DATA_STREAMS as usize],
    /// Streams some reader named itself.
    claimed: AtomicU64,
    /// Named streams whose reader is gone.
    ended: AtomicU64,
    changed: Notify,
}

impl Default for FenceBoard {
    fn default() -> Self {
        FenceBoard {
            passed: std::array::from_fn(|_| AtomicU64::new(0)),
            claimed: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }
}

impl FenceBoard {
    /// Resolves after the next [`FenceBoard::pass`] or end of a stream; take it before
    /// checking, so a change in between is not missed.
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Wakes every reader held by a wait (the connection closed).
    pub(crate) fn wake_all(&self) {
        self.changed.notify_waiters();
    }

    /// Stream `stream` has delivered everything before its fence `seq`.
    pub(crate) fn pass(&self, stream: u8, seq: u64) {
        // `stream` was checked by the reader that claimed it.
        if let Some(passed) = self.passed.get(usize::from(stream)) {
            passed.fetch_max(seq, Ordering::Release);
        }
        self.changed.notify_waiters();
    }

    /// The reader of stream `stream` is gone (its stream ended or broke).
    fn end(&self, stream: u8) {
        self.ended.fetch_or(bit(usize::from(stream)), Ordering::Release);
        self.changed.notify_waiters();
    }

    fn claim(&self, stream: u8) -> Result<(), FenceError> {
        let claimed = bit(usize::from(stream));
        if claimed & ALL_STREAMS == 0 {
            return Err(FenceError::NoSuchStream(stream));
        }
        if self.claimed.fetch_or(claimed, Ordering::AcqRel) & claimed != 0 {
            return Err(FenceError::Duplicate(stream));
        }
        Ok(())
    }

    /// True once every stream in `streams` passed fence `seq`; an error when one of
    /// them ended before it.
    pub(crate) fn check(&self, seq: u64, streams: StreamSet) -> Result<bool, FenceError> {
        // Read before the passes: a stream passes its last fences before it ends.
        let ended = self.ended.load(Ordering::Acquire);
        for stream in (Fence { seq, streams }).streams() {
            if self.passed[stream].load(Ordering::Acquire) >= seq {
                continue;
            }
            if ended & bit(stream) != 0 {
                // `stream` < MAX_DATA_STREAMS, which fits a u8.
                return Err(FenceError::EndedBeforeFence { stream: stream as u8, seq });
            }
            return Ok(false);
        }
        Ok(true)
    }
}

/// One reader's checks of its stream's markers; marks the stream ended when dropped.
pub(crate) struct FenceReader<'a> {
    board: &'a FenceBoard,
    /// The stream this one named itself in its first fence.
    named: Option<u8>,
    last_fence: u64,
    last_wait: u64,
}

impl<'a> FenceReader<'a> {
    pub(crate) fn new(board: &'a FenceBoard) -> Self {
        FenceReader { board, named: None, last_fence: 0, last_wait: 0 }
    }

    pub(crate) fn board(&self) -> &'a FenceBoard {
        self.board
    }

    /// Checks fence `seq` of stream `stream`, read from this reader's stream.
    pub(crate) fn fence(&mut self, stream: u8, seq: u64) -> Result<(), FenceError> {
        match self.named {
            None => {
                self.board.claim(stream)?;
                self.named = Some(stream);
            }
            Some(was) if was != stream => return Err(FenceError::Renamed { was, now: stream }),
            Some(_) => {}
        }
        if seq <= self.last_fence {
            return Err(FenceError::FenceNotRising { seq, last: self.last_fence });
        }
        self.last_fence = seq;
        Ok(())
    }

    /// Checks a wait for fence `seq` of `streams`, read from this reader's stream.
    pub(crate) fn wait(&mut self, seq: u64, streams: u64) -> Result<(), FenceError> {
        if streams == 0 || streams & !ALL_STREAMS != 0 {
            return Err(FenceError::BadWaitStreams { seq, streams });
        }
        if seq <= self.last_wait {
            return Err(FenceError::WaitNotRising { seq, last: self.last_wait });
        }
        self.last_wait = seq;
        Ok(())
    }
}

impl Drop for FenceReader<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.named {
            self.board.end(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_streams_used_since_the_last_fence_are_fenced() {
        let mut out = FenceOut::default();
        assert_eq!(out.unrouted(), None, "nothing sent anywhere else: no fence");
        out.routed(FIXED_STREAM);
        assert_eq!(out.unrouted(), None, "the fixed stream keeps its own order");
        out.routed(3);
        out.routed(8);
        out.routed(3);
        let fence = out.unrouted().unwrap();
        assert_eq!(fence, Fence { seq: 1, streams: 0b1_0000_1000 });
        assert_eq!(fence.streams().collect::<Vec<_>>(), vec![3, 8]);
        assert_eq!(out.unrouted(), None, "a second unrouted packet right after needs none");
        out.routed(5);
        assert_eq!(out.unrouted(), Some(Fence { seq: 2, streams: 1 << 5 }));
    }

    #[test]
    fn a_wait_holds_until_every_named_stream_passed_its_fence() {
        let board = FenceBoard::default();
        let mut a = FenceReader::new(&board);
        let mut b = FenceReader::new(&board);
        a.fence(3, 1).unwrap();
        b.fence(8, 1).unwrap();
        let streams = bit(3) | bit(8);
        assert_eq!(board.check(1, streams), Ok(false));
        board.pass(3, 1);
        assert_eq!(board.check(1, streams), Ok(false));
        board.pass(8, 1);
        assert_eq!(board.check(1, streams), Ok(true));
        // A later fence passed satisfies an earlier wait too (fences rise per stream).
        a.fence(3, 5).unwrap();
        board.pass(3, 5);
        assert_eq!(board.check(4, bit(3)), Ok(true));
        assert_eq!(board.check(6, bit(3)), Ok(false));
    }

    #[test]
    fn a_stream_that_ends_short_of_the_fence_fails_the_wait() {
        let board = FenceBoard::default();
        let mut a = FenceReader::new(&board);
        a.fence(2, 7).unwrap();
        board.pass(2, 7);
        drop(a);
        assert_eq!(board.check(7, bit(2)), Ok(true), "passed before it ended");
        assert_eq!(board.check(8, bit(2)), Err(FenceError::EndedBeforeFence { stream: 2, seq: 8 }));
        // A stream nobody named yet may still open: the wait just holds.
        assert_eq!(board.check(8, bit(4)), Ok(false));
    }

    #[test]
    fn a_stream_may_carry_fences_and_waits() {
        // The priority stream is fenced before a 'DOWN' by name and waits when a marked
        // sender moves onto it.
        let board = FenceBoard::default();
        let mut old = FenceReader::new(&board);
        let mut prio = FenceReader::new(&board);
        prio.fence(4, 1).unwrap();
        old.fence(2, 2).unwrap();
        prio.wait(2, bit(2)).unwrap();
        prio.fence(4, 3).unwrap();
        assert_eq!(board.check(2, bit(2)), Ok(false));
        board.pass(2, 2);
        assert_eq!(board.check(2, bit(2)), Ok(true));
    }

    #[test]
    fn a_move_fences_only_the_old_stream() {
        let mut out = FenceOut::default();
        out.routed(3);
        out.routed(5);
        assert_eq!(out.moved(3), Fence { seq: 1, streams: bit(3) });
        assert_eq!(out.unrouted(), Some(Fence { seq: 2, streams: bit(3) | bit(5) }), "numbers keep rising");
    }

    #[test]
    fn hostile_markers_are_refused_by_name() {
        let board = FenceBoard::default();
        let mut a = FenceReader::new(&board);
        assert_eq!(a.fence(33, 1), Err(FenceError::NoSuchStream(33)));
        assert_eq!(a.fence(200, 1), Err(FenceError::NoSuchStream(200)));
        a.fence(1, 4).unwrap();
        assert_eq!(a.fence(2, 5), Err(FenceError::Renamed { was: 1, now: 2 }));
        assert_eq!(a.fence(1, 4), Err(FenceError::FenceNotRising { seq: 4, last: 4 }));
        let mut b = FenceReader::new(&board);
        assert_eq!(b.fence(1, 9), Err(FenceError::Duplicate(1)));
        let mut w = FenceReader::new(&board);
        assert_eq!(w.wait(1, 0), Err(FenceError::BadWaitStreams { seq: 1, streams: 0 }));
        assert_eq!(w.wait(1, 1 << 33), Err(FenceError::BadWaitStreams { seq: 1, streams: 1 << 33 }));
        w.wait(3, bit(1)).unwrap();
        assert_eq!(w.wait(2, bit(1)), Err(FenceError::WaitNotRising { seq: 2, last: 3 }));
    }
}
