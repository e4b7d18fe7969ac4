//! Tunables of an endpoint and its connections, with their defaults and the QUIC
//! transport configuration derived from them.

use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use quinn::{AckFrequencyConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::reset_key::RestartIdentity;
use crate::tls::PkiFiles;
use crate::wire::MAX_DATA_STREAMS;

/// The congestion controller of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// Model-based: does not read random loss as congestion. quinn's implementation
    /// recovers slowly (seconds) after a peer was frozen for tens of seconds.
    Bbr,
    /// Loss-based, quinn's default and ours.
    Cubic,
    /// Loss-based, the RFC 9002 reference.
    NewReno,
}

/// Every tunable. A node's come from the option table of `macula_dist_config`, checked
/// there and decoded once by the NIF; nothing here checks or clamps them again.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `net_ticktime` at start. Liveness is judged by `dist_util`'s ticks (which follow
    /// `net_kernel:set_net_ticktime/1`); the QUIC idle timeout is only a backstop (see
    /// [`Settings::idle_timeout`]), so a later, longer tick time is honoured too.
    pub tick_time: Duration,
    /// `net_setuptime`: the longest a QUIC + TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Receive window of each data stream. Bounds what a peer can make us buffer.
    pub stream_window: u64,
    /// Unacknowledged bytes in flight per connection.
    pub send_window: u64,
    /// Bytes queued in front of QUIC, on all data streams together, before `send_data`
    /// answers `busy`.
    pub send_queue_limit: usize,
    /// Normal data streams: 1 is single-stream mode (one ordered stream, the atom cache
    /// allowed); more routes each sending process to its own stream and adds a priority
    /// stream (the Erlang side then rejects the atom cache and fragmentation).
    pub data_streams: NonZeroU8,
    /// Largest distribution packet accepted from a peer.
    pub max_packet: usize,
    /// Upper bound for path MTU discovery (UDP payload bytes); at least 1200, the QUIC
    /// minimum.
    pub max_udp_payload: u16,
    /// Bytes of data delivered to the input handler and not yet put into the VM: the
    /// longest a small message waits there behind other senders' bulk data.
    pub delivery_window: NonZeroUsize,
    /// Congestion controller.
    pub congestion: Congestion,
    /// QUIC handshakes allowed to be in progress at once.
    pub max_pending_handshakes: NonZeroUsize,
    /// PKI mode (mutual TLS against a CA) with these files; zero-configuration mode
    /// (ephemeral self-signed certificates) without.
    pub pki: Option<PkiFiles>,
    /// Longest idle time before a QUIC keep-alive (also bounded by the tick time): a
    /// crashed peer is noticed within about this time when its host answers with ICMP.
    pub liveness_interval: Duration,
    /// Stateless-reset key and connection-ID key shared by every incarnation of this
    /// node (`crate::reset_key`); random ones per start without.
    pub restart_identity: Option<RestartIdentity>,
}

/// For tests only (unit tests and the integration tests in `tests/`): the table's defaults,
/// so tests run with what a node runs. A node's settings always come through the NIF.
impl Default for Settings {
    fn default() -> Self {
        Settings {
            tick_time: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(7),
            stream_window: 8 << 20,
            send_window: 32 << 20,
            send_queue_limit: 8 << 20,
            data_streams: NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN),
            max_packet: 1 << 30,
            max_udp_payload: 6500,
            delivery_window: NonZeroUsize::new(2 << 20).unwrap_or(NonZeroUsize::MIN),
            max_pending_handshakes: NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            congestion: Congestion::Cubic,
            pki: None,
            liveness_interval: Duration::from_millis(500),
            restart_identity: None,
        }
    }
}

/// The longest a peer may wait before acknowledging ack-eliciting packets.
const MAX_ACK_DELAY: Duration = Duration::from_millis(1);

/// The QUIC idle timeout is at least this many times the boot-time tick time...
const IDLE_TIMEOUT_FACTOR: u32 = 4;
/// ...and at least this long, so `net_kernel:set_net_ticktime/1` can raise the tick time
/// well beyond its boot value without QUIC giving up on a silent peer first.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

impl Settings {
    /// QUIC transport parameters for every connection of an endpoint.
    pub fn transport(&self) -> Arc<TransportConfig> {
        let mut transport = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout()).unwrap_or(IdleTimeout::from(VarInt::MAX));
        transport
            .max_idle_timeout(Some(idle))
            // Keeps NAT bindings fresh and the path validated between ticks.
            .keep_alive_interval(Some(self.keep_alive()))
            .stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX))
            // Streams are few and each is bounded by its own window, so the
            // connection-level window never lets one stream's bulk data starve the
            // control stream or another data stream.
            .receive_window(VarInt::MAX)
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            // Enough for any peer's pool, whatever this side's own `data_streams`.
            .max_concurrent_uni_streams(VarInt::from_u32(MAX_DATA_STREAMS))
            .datagram_receive_buffer_size(None);
        let congestion: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match self.congestion {
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        };
        transport.congestion_controller_factory(congestion);
        // Ask the peer to acknowledge within 1 ms instead of QUIC's default 25 ms: a lone
        // small message that is lost is then declared lost (PTO) a few RTTs after it was
        // sent, not 25 ms later; a bulk transfer is acknowledged every other packet anyway.
        let mut ack_frequency = AckFrequencyConfig::default();
        ack_frequency.max_ack_delay(Some(MAX_ACK_DELAY));
        transport.ack_frequency_config(Some(ack_frequency));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        transport.mtu_discovery_config(Some(mtu));
        Arc::new(transport)
    }

    /// The QUIC idle timeout: a backstop only, ticks detect dead peers first.
    pub fn idle_timeout(&self) -> Duration {
        (self.tick_time * IDLE_TIMEOUT_FACTOR).max(MIN_IDLE_TIMEOUT)
    }

    /// Idle time before a QUIC keep-alive: frequent enough that a crashed peer's host
    /// answers with ICMP soon after the crash (`crate::liveness`).
    pub fn keep_alive(&self) -> Duration {
        self.liveness_interval.min(self.tick_time / 8)
    }
}
