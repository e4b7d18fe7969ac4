//! The receive side of a connection's data streams: delivery credit and batching.
//!
//! Every data stream has a reader task; all of them deliver to the one Erlang input
//! handler (only it may call `dist_ctrl_put_data/2`). What sits in its mailbox is
//! bounded in bytes, not messages: a reader may deliver a batch only against credit
//! for its size, which the input handler returns once it has put the packets into the
//! VM. That bound is also the longest a small message waits there behind other
//! senders' bulk data, so it is kept small (`delivery_window`), and the priority
//! stream has credit of its own, and the input handler takes its batches first.

use std::num::NonZeroUsize;

use tokio::sync::{AcquireError, Semaphore};

use crate::frame::Frame;
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

/// Packets decoded and not yet delivered.
pub(crate) struct Batch<P> {
    pub(crate) packets: Vec<P>,
    /// Stream bytes read since the last delivery.
    pub(crate) bytes: usize,
}

impl<P> Default for Batch<P> {
    fn default() -> Self {
        Batch { packets: Vec::new(), bytes: 0 }
    }
}

impl<P> Batch<P> {
    pub(crate) fn push(&mut self, frame: Frame<P>) {
        if let Frame::Packet(packet) = frame {
            self.packets.push(packet);
        }
    }

    /// True when another read may add to the batch: reading stops only while complete
    /// packets wait, so a packet larger than MAX_BATCH still gets read to its end.
    pub(crate) fn has_room(&self) -> bool {
        self.packets.is_empty() || self.bytes < MAX_BATCH
    }

    /// The packets, and the stream bytes they took.
    pub(crate) fn take(&mut self) -> (Vec<P>, usize) {
        (std::mem::take(&mut self.packets), std::mem::take(&mut self.bytes))
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
