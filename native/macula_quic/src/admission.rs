//! Admission of connections whose peer has not proved the cookie yet.
//!
//! A connection is on probation from its first packet until the Erlang side checks the
//! peer's cookie proof and opens the connection's [`Gate`]. The endpoint keeps at most a
//! fixed number on probation ([`Probation`]), evicting the oldest, so a flood of
//! connections that never authenticate cannot lock out a node that does.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quinn::{RecvStream, SendStream};
use tokio::sync::{broadcast, Notify};

use crate::icmp_socket::Unreachable;

/// A QUIC connection whose handshake completed, with its control stream.
pub struct Established {
    pub quic: quinn::Connection,
    pub control: (SendStream, RecvStream),
    /// Opened once the peer has proved it knows the cookie.
    pub gate: Arc<Gate>,
    /// ICMP reports of the endpoint's socket, for the connection's liveness probes.
    pub unreachable: broadcast::Receiver<Unreachable>,
}

/// Opened when a peer has authenticated; until then its connection is on probation.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicBool,
    opened: Notify,
}

impl Gate {
    /// Marks the peer as authenticated.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_one();
    }

    /// True once opened.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once the gate is open.
    pub(crate) async fn wait(&self) {
        while !self.is_open() {
            self.opened.notified().await;
        }
    }
}

/// The connections on probation, oldest first.
pub(crate) struct Probation {
    limit: usize,
    next_id: AtomicU64,
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

impl Probation {
    pub(crate) fn new(limit: NonZeroUsize) -> Self {
        Probation { limit: limit.get(), next_id: AtomicU64::new(0), queue: Mutex::new(VecDeque::new()) }
    }

    /// Registers a new connection, evicting the oldest if the limit is reached. The
    /// returned notification fires when this one is evicted.
    pub(crate) fn admit(&self) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.len() >= self.limit {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.notify_one();
            }
        }
        queue.push_back((id, evicted.clone()));
        (id, evicted)
    }

    /// Ends the probation of `id` (authenticated, refused or gone).
    pub(crate) fn release(&self, id: u64) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != id);
    }
}
