//! The receive side of a connection's data streams: delivery credit and batching.
//!
//! Every data stream has a reader task; all of them deliver to the one Erlang input
//! handler (only it may call `dist_ctrl_put_data/2`). What sits in its mailbox is
//! bounded in bytes, not messages: a reader may deliver a batch only against credit
//! for its size, which the input handler returns once it has put the packets into the
//! VM. That bound is also the longest a small message waits there behind other
//! senders' bulk data, so it is kept small (`delivery_window`), and the priority
//! stream has credit of its own, and the input handler takes its batches first.
//!
//! A reader holds back what follows a fence wait ([`crate::fence`]) until the streams
//! it waits for have delivered; meanwhile it asks for no credit, so they get it.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use tokio::sync::{AcquireError, Semaphore};

use crate::fence::{FenceBoard, FenceError, FenceReader};
use crate::frame::{Frame, PacketBuf, FENCE_LEN, WAIT_LEN};
use crate::routing::Class;

/// Credit of the priority stream: small messages of prioritised processes.
const PRIORITY_WINDOW: usize = 256 << 10;

/// A batch costs at least this share of its pool's window, so the input handler's
/// mailbox holds at most this many batches per pool however small they are.
const MAX_BATCHES_PER_POOL: usize = 16;

/// Largest pending delivery, in stream bytes, before a reader pauses for credit.
pub(crate) const MAX_BATCH: usize = 1 << 20;

/// Credit a delivered batch holds until the input handler returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    pub class: Class,
    pub bytes: u32,
}

/// The two credit pools.
pub(crate) struct Delivery {
    normal: Semaphore,
    priority: Semaphore,
    window: usize,
}

impl Delivery {
    /// Pools with no credit until [`Delivery::open`].
    pub(crate) fn new(window: NonZeroUsize) -> Self {
        Delivery { normal: Semaphore::new(0), priority: Semaphore::new(0), window: window.get() }
    }

    /// Grants the initial credit (the handshake is over).
    pub(crate) fn open(&self) {
        self.normal.add_permits(self.window);
        self.priority.add_permits(PRIORITY_WINDOW);
    }

    /// Wakes every waiting reader for good (the connection closed).
    pub(crate) fn close(&self) {
        self.normal.close();
        self.priority.close();
    }

    fn pool(&self, class: Class) -> (&Semaphore, usize) {
        match class {
            Class::Normal => (&self.normal, self.window),
            Class::Priority => (&self.priority, PRIORITY_WINDOW),
        }
    }

    /// Waits for credit to deliver `bytes` of `class` data. A batch larger than the
    /// whole window takes all of it, so it waits for everything before it.
    pub(crate) async fn acquire(&self, class: Class, bytes: usize) -> Result<Credit, AcquireError> {
        let (pool, window) = self.pool(class);
        // The window is at most a few tens of MiB, so the cost fits a u32.
        let cost = bytes.clamp((window / MAX_BATCHES_PER_POOL).max(1), window) as u32;
        pool.acquire_many(cost).await?.forget();
        Ok(Credit { class, bytes: cost })
    }

    /// The input handler is done with a batch.
    pub(crate) fn release(&self, credit: Credit) {
        let (pool, window) = self.pool(credit.class);
        // Never grow a pool beyond its window, whatever the Erlang side sends back.
        let grant = (credit.bytes as usize).min(window.saturating_sub(pool.available_permits()));
        pool.add_permits(grant);
    }
}

/// What one stream's reader decoded and has not delivered yet, in stream order: packets
/// to deliver, and behind a wait not yet satisfied, everything held back by it (see
/// [`crate::fence`]).
pub(crate) struct Inbound<'a, P> {
    /// Packets ready for delivery once there is credit, and their framed bytes.
    ready: Vec<P>,
    ready_bytes: usize,
    /// The last fence among the ready packets: passed once they are delivered.
    fence: Option<(u8, u64)>,
    /// From the first unsatisfied wait on.
    held: VecDeque<Held<P>>,
    /// Stream bytes read and not yet delivered or consumed (a partial frame included).
    bytes: usize,
    marks: FenceReader<'a>,
}

enum Held<P> {
    Packet(P),
    Fence(u8, u64),
    Wait(u64, u64),
}

impl<'a, P: PacketBuf> Inbound<'a, P> {
    pub(crate) fn new(board: &'a FenceBoard) -> Self {
        Inbound {
            ready: Vec::new(),
            ready_bytes: 0,
            fence: None,
            held: VecDeque::new(),
            bytes: 0,
            marks: FenceReader::new(board),
        }
    }

    /// `n` more stream bytes were read (their frames follow through [`Inbound::push`]).
    pub(crate) fn read(&mut self, n: usize) {
        self.bytes += n;
    }

    /// Takes one decoded frame.
    pub(crate) fn push(&mut self, frame: Frame<P>) -> Result<(), FenceError> {
        let item = match frame {
            Frame::Packet(packet) => Held::Packet(packet),
            Frame::Fence { stream, seq } => {
                self.marks.fence(stream, seq)?;
                Held::Fence(stream, seq)
            }
            Frame::Wait { seq, streams } => {
                self.marks.wait(seq, streams)?;
                Held::Wait(seq, streams)
            }
            // Only the control stream has ticks.
            Frame::Tick => return Ok(()),
        };
        if self.held.is_empty() {
            self.place(item);
        } else {
            self.held.push_back(item);
        }
        Ok(())
    }

    fn place(&mut self, item: Held<P>) {
        match item {
            Held::Packet(packet) => {
                self.ready_bytes += packet.len() + 4;
                self.ready.push(packet);
            }
            Held::Fence(stream, seq) => {
                self.bytes = self.bytes.saturating_sub(FENCE_LEN);
                if self.ready.is_empty() {
                    self.marks.board().pass(stream, seq);
                } else {
                    self.fence = Some((stream, seq));
                }
            }
            wait @ Held::Wait(..) => self.held.push_back(wait),
        }
    }

    /// Lets through what satisfied waits held back; stops at the first wait that still
    /// waits. An error when a stream a wait needs ended before its fence.
    pub(crate) fn settle(&mut self) -> Result<(), FenceError> {
        while let Some(front) = self.held.front() {
            if let Held::Wait(seq, streams) = *front {
                if !self.marks.board().check(seq, streams)? {
                    break;
                }
                self.bytes = self.bytes.saturating_sub(WAIT_LEN);
                self.held.pop_front();
                continue;
            }
            if let Some(item) = self.held.pop_front() {
                self.place(item);
            }
        }
        Ok(())
    }

    /// True when packets wait for credit.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The framed bytes of the packets ready for delivery.
    pub(crate) fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    /// Hands the ready packets to `deliver`, then passes the fence that followed them.
    pub(crate) fn deliver(&mut self, deliver: impl FnOnce(Vec<P>)) {
        self.bytes = self.bytes.saturating_sub(std::mem::take(&mut self.ready_bytes));
        deliver(std::mem::take(&mut self.ready));
        if let Some((stream, seq)) = self.fence.take() {
            self.marks.board().pass(stream, seq);
        }
    }

    /// True while a wait holds packets back (after [`Inbound::settle`]).
    pub(crate) fn waits(&self) -> bool {
        !self.held.is_empty()
    }

    /// True when nothing is left to deliver.
    pub(crate) fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.held.is_empty()
    }

    /// True when another read may add to what is pending: reading stops only while
    /// something waits (for credit or for a fence) and MAX_BATCH bytes are read, so a
    /// packet larger than MAX_BATCH still gets read to its end.
    pub(crate) fn has_room(&self) -> bool {
        self.is_empty() || self.bytes < MAX_BATCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credit_is_bounded_in_bytes_and_per_class() {
        let delivery = Delivery::new(NonZeroUsize::new(1000).unwrap());
        delivery.open();
        let big = delivery.acquire(Class::Normal, 5000).await.unwrap();
        assert_eq!(big.bytes, 1000, "a batch beyond the window takes the whole window");
        // No normal credit left, but the priority pool is separate.
        let normal = tokio::time::timeout(std::time::Duration::from_millis(50), delivery.acquire(Class::Normal, 1));
        assert!(normal.await.is_err());
        let prio = delivery.acquire(Class::Priority, 10).await.unwrap();
        assert_eq!(
            prio,
            Credit { class: Class::Priority, bytes: (PRIORITY_WINDOW / 16) as u32 },
            "the least a batch costs"
        );
        delivery.release(big);
        assert_eq!(delivery.acquire(Class::Normal, 600).await.unwrap().bytes, 600);
        // At most 16 batches per pool, however small.
        let mut small = Vec::new();
        for _ in 0..6 {
            small.push(delivery.acquire(Class::Normal, 1).await.unwrap());
        }
        assert!(small.iter().all(|c| c.bytes == 1000 / 16));
        // A forged, oversized release cannot raise the window.
        delivery.release(Credit { class: Class::Normal, bytes: u32::MAX });
        assert_eq!(delivery.normal.available_permits(), 1000);
    }

    fn packet(byte: u8, len: usize) -> Frame<Vec<u8>> {
        Frame::Packet(vec![byte; len])
    }

    fn delivered(inbound: &mut Inbound<'_, Vec<u8>>) -> Vec<u8> {
        let mut out = Vec::new();
        inbound.deliver(|packets| out = packets.iter().map(|p| p[0]).collect());
        out
    }

    #[test]
    fn a_wait_holds_what_follows_until_the_fence_is_passed() {
        let board = FenceBoard::default();
        let mut fixed = Inbound::new(&board);
        let mut other = Inbound::new(&board);
        // The other stream: a packet, then fence 1 (it names itself stream 4).
        other.read(4 + 10 + FENCE_LEN);
        other.push(packet(b'a', 10)).unwrap();
        other.push(Frame::Fence { stream: 4, seq: 1 }).unwrap();
        // The fixed stream: a packet, the wait for fence 1 of stream 4, a packet.
        fixed.read(2 * (4 + 3) + WAIT_LEN);
        fixed.push(packet(b'x', 3)).unwrap();
        fixed.push(Frame::Wait { seq: 1, streams: 1 << 4 }).unwrap();
        fixed.push(packet(b'y', 3)).unwrap();
        fixed.settle().unwrap();
        assert_eq!(fixed.ready_bytes(), 7, "what came before the wait goes at once");
        assert_eq!(delivered(&mut fixed), b"x");
        fixed.settle().unwrap();
        assert!(fixed.waits() && !fixed.has_ready(), "held: it asks for no credit");
        // The fence is passed only once the packet before it is delivered.
        other.settle().unwrap();
        fixed.settle().unwrap();
        assert!(fixed.waits());
        assert_eq!(delivered(&mut other), b"a");
        fixed.settle().unwrap();
        assert!(!fixed.waits());
        assert_eq!(delivered(&mut fixed), b"y");
        assert!(fixed.is_empty() && other.is_empty());
        assert_eq!((fixed.bytes, other.bytes), (0, 0), "every byte read was delivered or consumed");
    }

    #[test]
    fn held_bytes_count_against_the_batch_limit() {
        let board = FenceBoard::default();
        let mut fixed: Inbound<'_, Vec<u8>> = Inbound::new(&board);
        fixed.push(Frame::Wait { seq: 1, streams: 1 << 2 }).unwrap();
        fixed.read(WAIT_LEN);
        // A peer may send waits without end: reading stops at MAX_BATCH bytes held.
        let mut seq = 2;
        while fixed.has_room() {
            fixed.push(Frame::Wait { seq, streams: 1 << 2 }).unwrap();
            fixed.read(WAIT_LEN);
            seq += 1;
        }
        assert_eq!(seq as usize, MAX_BATCH / WAIT_LEN + 2);
        fixed.settle().unwrap();
        assert!(fixed.waits());
        // Fences that never wait for anything are consumed as they come.
        let mut other: Inbound<'_, Vec<u8>> = Inbound::new(&board);
        for seq in 1..100_000 {
            other.read(FENCE_LEN);
            other.push(Frame::Fence { stream: 2, seq }).unwrap();
            assert!(other.is_empty());
        }
        fixed.settle().unwrap();
        assert!(fixed.is_empty(), "fence 99999 satisfies every wait before it");
    }

    #[test]
    fn a_stream_that_ends_short_of_its_fence_fails_the_wait() {
        let board = FenceBoard::default();
        let mut fixed = Inbound::new(&board);
        let mut other: Inbound<'_, Vec<u8>> = Inbound::new(&board);
        other.push(Frame::Fence { stream: 1, seq: 1 }).unwrap();
        fixed.push(Frame::Wait { seq: 2, streams: 1 << 1 }).unwrap();
        fixed.push(packet(b'z', 1)).unwrap();
        fixed.settle().unwrap();
        drop(other);
        assert_eq!(fixed.settle(), Err(FenceError::EndedBeforeFence { stream: 1, seq: 2 }));
    }

    #[tokio::test]
    async fn closing_wakes_waiting_readers() {
        let delivery = std::sync::Arc::new(Delivery::new(NonZeroUsize::new(10).unwrap()));
        let waiter = {
            let d = delivery.clone();
            tokio::spawn(async move { d.acquire(Class::Normal, 5).await })
        };
        tokio::task::yield_now().await;
        delivery.close();
        assert!(waiter.await.unwrap().is_err());
    }
}
