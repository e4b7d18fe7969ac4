//! A graceful close, as TCP's FIN: the closing side writes out what it has queued, ends
//! each data stream it opened, then says on the control stream how many those were
//! ([`end_of_data_frame`]) and ends it (`Connection::close_gracefully`). The peer, once
//! it has read all of them to their end (streams are independent, so the control
//! stream's end may arrive first), closes the connection itself at once, without
//! waiting for acknowledgements: it sees the close half a round trip after it was made
//! and loses nothing sent before it. Either side waits at most
//! [`GRACEFUL_CLOSE_TIMEOUT`] for the other's next step.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::connection::GRACEFUL_CLOSE_TIMEOUT;

/// The control message a closing side sends last: `[END_OF_DATA, DataStreams]`.
const END_OF_DATA: u8 = 0xff;

/// The last control frame of a graceful close: how many data streams this side opened.
pub(crate) fn end_of_data_frame(streams: usize) -> [u8; 4] {
    // At most wire::MAX_DATA_STREAMS streams can be open, which fits the byte.
    [0, 2, END_OF_DATA, streams.min(usize::from(u8::MAX)) as u8]
}

/// The stream count of an end-of-data message, if `message` is one.
pub(crate) fn parse_end_of_data(message: &[u8]) -> Option<usize> {
    match message {
        [END_OF_DATA, streams] => Some(usize::from(*streams)),
        _ => None,
    }
}

/// Which of the peer's streams have ended.
pub(crate) struct PeerEnded {
    control: AtomicBool,
    data_streams: AtomicUsize,
    /// Data streams the peer said it opened (usize::MAX until it said).
    expected: AtomicUsize,
    changed: Notify,
}

impl Default for PeerEnded {
    fn default() -> Self {
        PeerEnded {
            control: AtomicBool::new(false),
            data_streams: AtomicUsize::new(0),
            expected: AtomicUsize::new(usize::MAX),
            changed: Notify::new(),
        }
    }
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

    pub(crate) fn mark_control(&self) {
        self.control.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(crate) fn mark_data_stream(&self) {
        self.data_streams.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    pub(crate) fn expect_data_streams(&self, streams: usize) {
        self.expected.store(streams, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(crate) fn control_ended(&self) -> bool {
        self.control.load(Ordering::Acquire)
    }

    /// Every data stream the peer said it opened has ended.
    pub(crate) fn all_data_ended(&self) -> bool {
        self.data_streams.load(Ordering::Acquire) >= self.expected.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_data_round_trips_and_nothing_else_parses() {
        let frame = end_of_data_frame(9);
        assert_eq!(frame, [0, 2, 0xff, 9]);
        assert_eq!(parse_end_of_data(&frame[2..]), Some(9));
        assert_eq!(parse_end_of_data(&[0xff]), None);
        assert_eq!(parse_end_of_data(&[0xfe, 9]), None);
        assert_eq!(parse_end_of_data(&[0xff, 1, 2]), None);
    }

    #[test]
    fn all_data_ended_waits_for_the_announced_count() {
        let ended = PeerEnded::default();
        ended.mark_data_stream();
        assert!(!ended.all_data_ended(), "nothing announced yet");
        ended.expect_data_streams(2);
        assert!(!ended.all_data_ended());
        ended.mark_data_stream();
        assert!(ended.all_data_ended());
    }
}
