//! Noticing a dead peer in milliseconds rather than after a tick time.
//!
//! QUIC runs over UDP, so a crashed peer sends nothing like TCP's FIN or RST. Its host,
//! though, answers our next packet (at the latest the keep-alive, see
//! [`crate::Settings::keep_alive`]) with ICMP port unreachable, which
//! [`crate::icmp_socket`] turns into an [`Unreachable`] report. Anyone on the path can
//! forge such a message, so a report only starts a **probe**: ack-eliciting ticks on the
//! control stream for [`probe_window`]. If the peer sends anything in that window it is
//! alive and nothing happens; if it stays silent the connection is closed as
//! [`CloseReason::Unreachable`], which the controller reports as `connection_closed`.
//! Without ICMP (a silent host, a firewall that drops) nothing changes: ticks judge.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::connection::{CloseReason, Connection, Events};
use crate::icmp_socket::Unreachable;
use crate::wire::close_code;

/// A peer acknowledges within its `max_ack_delay` (QUIC's default, which quinn uses).
const PEER_ACK_DELAY: Duration = Duration::from_millis(25);
/// The shortest probe: a peer on a loaded host (or a loaded host here) may take tens of
/// milliseconds to be scheduled, and a wrong verdict costs a connection.
const MIN_PROBE_WINDOW: Duration = Duration::from_millis(100);
/// Ticks sent per probe, spread over the window, so one lost packet is no verdict.
const PROBE_TICKS: u32 = 3;

/// How long a probe waits for the peer: three round trips plus the peer's ack delay,
/// at least [`MIN_PROBE_WINDOW`]. 100 ms on a LAN, ~3.5 × RTT on a long path.
pub fn probe_window(rtt: Duration) -> Duration {
    (rtt * 3 + PEER_ACK_DELAY).max(MIN_PROBE_WINDOW)
}

/// Watches `reports` for the connection's peer address until the connection closes.
pub(crate) async fn watch<E: Events>(conn: Arc<Connection<E>>, mut reports: broadcast::Receiver<Unreachable>) {
    loop {
        let report = tokio::select! {
            report = reports.recv() => report,
            _ = conn.quic().closed() => return,
        };
        let why = match report {
            Ok(report) if report.is_about(conn.remote_address()) => report.to_string(),
            Ok(_) => continue,
            // Reports were dropped for lack of room; one may have been ours.
            Err(RecvError::Lagged(_)) => format!("unreachable reports lost, probing {}", conn.remote_address()),
            Err(RecvError::Closed) => return,
        };
        if probe(&conn).await {
            // The peer answered: what came in meanwhile was answered by the same probe.
            while let Ok(_) | Err(TryRecvError::Lagged(_)) = reports.try_recv() {}
            continue;
        }
        conn.close_with(CloseReason::Unreachable(why), close_code::SHUTDOWN, b"peer unreachable");
        return;
    }
}

/// True if the peer sent anything within the probe window.
async fn probe<E: Events>(conn: &Connection<E>) -> bool {
    conn.count_probe();
    let heard = || conn.quic().stats().udp_rx.datagrams;
    let before = heard();
    let step = probe_window(conn.quic().rtt()) / PROBE_TICKS;
    for _ in 0..PROBE_TICKS {
        conn.tick();
        tokio::time::sleep(step).await;
        if heard() != before {
            return true;
        }
        if conn.close_reason().is_some() {
            return true; // Closed meanwhile for another reason; that one stands.
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_window_follows_the_round_trip_above_a_floor() {
        assert_eq!(probe_window(Duration::from_micros(200)), MIN_PROBE_WINDOW);
        assert_eq!(probe_window(Duration::from_millis(100)), Duration::from_millis(325));
    }
}
