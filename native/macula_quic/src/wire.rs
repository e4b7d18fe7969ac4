//! Constants both ends of a connection must agree on: what the peer sees on the wire.
//!
//! Kept apart from the code that uses them so the endpoint, the connection and the TLS
//! setup all depend on this module and never on each other for a number.

/// ALPN protocol name; a peer that does not speak it is refused during the TLS handshake.
/// The version suffix changes whenever the stream layout or framing changes.
pub const ALPN: &[u8] = b"macula-dist/3";

/// The SNI every client sends. Certificates are bound to node names above TLS (see
/// [`crate::tls`]), so the TLS layer needs no per-node server name.
pub const SERVER_NAME: &str = "macula";

/// Application close codes sent in QUIC CONNECTION_CLOSE frames.
pub mod close_code {
    /// The distribution connection was taken down on purpose.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the framing or stream protocol.
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The peer did not prove it knows the cookie.
    pub const NOT_AUTHENTICATED: u32 = 2;
    /// The peer's node name is not one this node accepts (checked before its proof).
    pub const BAD_NODE_NAME: u32 = 3;
}

/// QUIC send priorities (higher goes first). Ticks and the handshake must never wait
/// behind data, and traffic of prioritised processes must overtake bulk transfers.
pub mod urgency {
    /// The control stream: handshake, then ticks.
    pub const CONTROL: i32 = 2;
    /// The data stream of processes marked with `macula_dist:prioritize/1`.
    pub const PRIORITY_DATA: i32 = 1;
    /// Every other data stream.
    pub const DATA: i32 = 0;
}

/// The first byte of every data stream: what it carries.
pub mod stream_kind {
    /// Traffic of ordinary processes (and packets without a known sender).
    pub const NORMAL: u8 = 0;
    /// Traffic of processes marked with `macula_dist:prioritize/1`.
    pub const PRIORITY: u8 = 1;
}

/// The most data streams one side may open (the peer's `data_streams` plus its priority
/// stream); the transport parameters allow this many, whatever this side's own setting.
pub const MAX_DATA_STREAMS: u32 = 33;
