//! A graceful close, as TCP's FIN: the closing side writes out what it has queued, ends
//! its data stream, then its control stream (`Connection::close_gracefully`). The peer,
//! once it has read both to their end, closes the connection itself at once, without
//! waiting for acknowledgements: it sees the close half a round trip after it was made
//! and loses nothing sent before it. Either side waits at most
//! [`GRACEFUL_CLOSE_TIMEOUT`] for the other's next step.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::connection::GRACEFUL_CLOSE_TIMEOUT;

/// Which of the peer's streams have ended.
#[derive(Default)]
pub(crate) struct PeerEnded {
    pub(crate) control: AtomicBool,
    pub(crate) data: AtomicBool,
    changed: Notify,
}

impl PeerEnded {
    /// Waits (at most [`GRACEFUL_CLOSE_TIMEOUT`]) until `done` holds; false on timeout.
    pub(crate) async fn wait_until(&self, done: impl Fn(&PeerEnded) -> bool) -> bool {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(GRACEFUL_CLOSE_TIMEOUT, wait).await.is_ok()
    }

    /// Records that one of the peer's streams ended.
    pub(crate) fn mark(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}
