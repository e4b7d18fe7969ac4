//! Conversions between Erlang terms and the Rust types of `macula_quic`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use macula_quic::routing::Class;
use macula_quic::settings::Congestion;
use macula_quic::tls::PkiFiles;
use macula_quic::{CloseReason, Credit, Settings};
use rustler::{Binary, Encoder, Env, Error, NifMap, NifResult, Term};

use crate::atoms;

/// An `inet:ip_address()` tuple.
pub fn decode_ip(term: Term) -> NifResult<IpAddr> {
    if let Ok((a, b, c, d)) = term.decode::<(u8, u8, u8, u8)>() {
        return Ok(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
    }
    let words = rustler::types::tuple::get_tuple(term)?;
    if words.len() != 8 {
        return Err(Error::BadArg);
    }
    let mut segments = [0u16; 8];
    for (segment, word) in segments.iter_mut().zip(words) {
        *segment = word.decode()?;
    }
    Ok(IpAddr::V6(Ipv6Addr::from(segments)))
}

/// `{Ip, Port}` with `Ip` an `inet:ip_address()` tuple.
pub fn encode_addr<'a>(env: Env<'a>, addr: SocketAddr) -> Term<'a> {
    let ip = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            (a, b, c, d).encode(env)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let terms: Vec<Term> = s.iter().map(|w| w.encode(env)).collect();
            rustler::types::tuple::make_tuple(env, &terms)
        }
    };
    (ip, addr.port()).encode(env)
}

/// A binary term holding `bytes`.
pub fn bytes<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = rustler::NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    Binary::from(bin).encode(env)
}

/// A binary term holding `text`.
pub fn text<'a>(env: Env<'a>, text: &str) -> Term<'a> {
    bytes(env, text.as_bytes())
}

/// `{error, {Kind, Message}}`.
pub fn error<'a>(env: Env<'a>, kind: rustler::Atom, message: &str) -> Term<'a> {
    (atoms::error(), (kind, text(env, message))).encode(env)
}

/// The exit reason the Erlang controller takes for `reason`; it becomes the nodedown reason.
pub fn close_reason<'a>(env: Env<'a>, reason: &CloseReason) -> Term<'a> {
    match reason {
        // A peer that crashed is, to OTP, a connection its peer closed (TCP's RST).
        CloseReason::PeerClosed | CloseReason::Unreachable(_) => atoms::connection_closed().encode(env),
        CloseReason::TimedOut => atoms::net_tick_timeout().encode(env),
        CloseReason::Local => atoms::closed().encode(env),
        CloseReason::PeerError { code, reason } => (atoms::peer_closed(), *code, text(env, reason)).encode(env),
        CloseReason::ProtocolViolation(what) => (atoms::protocol_violation(), text(env, what)).encode(env),
        CloseReason::NotAuthenticated(what) => (atoms::not_authenticated(), text(env, what)).encode(env),
        CloseReason::Transport(what) => (atoms::transport_error(), text(env, what)).encode(env),
    }
}

/// `{normal | priority, Bytes}`: the credit a `macula_data` message holds.
pub fn credit(env: Env, credit: Credit) -> Term {
    let class = match credit.class {
        Class::Normal => atoms::normal(),
        Class::Priority => atoms::priority(),
    };
    (class, credit.bytes).encode(env)
}

/// The credit the input handler hands back with `ack_data/2`.
pub fn decode_credit(term: Term) -> NifResult<Credit> {
    let (class, bytes): (rustler::Atom, u32) = term.decode()?;
    let class = if class == atoms::normal() {
        Class::Normal
    } else if class == atoms::priority() {
        Class::Priority
    } else {
        return Err(Error::BadArg);
    };
    Ok(Credit { class, bytes })
}

/// Endpoint options as `macula_dist_config:nif_options/1` builds them (all keys present).
#[derive(NifMap)]
pub struct EndpointOptions {
    pub tick_time_ms: u64,
    pub handshake_timeout_ms: u64,
    pub stream_window: u64,
    pub send_window: u64,
    pub send_queue_limit: usize,
    pub data_streams: usize,
    pub max_packet: usize,
    pub max_udp_payload: u16,
    pub delivery_window: usize,
    pub max_pending_handshakes: usize,
    pub runtime_workers: usize,
    pub congestion: rustler::Atom,
    /// PKI files as binaries; all three empty in zero-configuration mode (the Erlang
    /// side has checked that either all or none are given).
    pub certfile: String,
    pub keyfile: String,
    pub cacertfile: String,
    pub liveness_interval_ms: u64,
    /// This node's name and cookie, from which the stateless-reset key is derived; an
    /// empty cookie (a client-only node, `-nocookie`) gives a random key.
    pub node_name: String,
    pub cookie: String,
}

impl EndpointOptions {
    pub fn settings(&self) -> NifResult<Settings> {
        Ok(Settings {
            tick_time: Duration::from_millis(self.tick_time_ms),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            stream_window: self.stream_window,
            send_window: self.send_window,
            send_queue_limit: self.send_queue_limit,
            data_streams: self.data_streams,
            max_packet: self.max_packet,
            max_udp_payload: self.max_udp_payload,
            delivery_window: self.delivery_window,
            max_pending_handshakes: self.max_pending_handshakes,
            congestion: self.congestion()?,
            pki: self.pki(),
            liveness_interval: Duration::from_millis(self.liveness_interval_ms),
            restart_identity: (!self.cookie.is_empty())
                .then(|| macula_quic::reset_key::derive(self.node_name.as_bytes(), self.cookie.as_bytes())),
        })
    }

    fn congestion(&self) -> NifResult<Congestion> {
        let c = self.congestion;
        if c == atoms::bbr() {
            Ok(Congestion::Bbr)
        } else if c == atoms::cubic() {
            Ok(Congestion::Cubic)
        } else if c == atoms::new_reno() {
            Ok(Congestion::NewReno)
        } else {
            Err(Error::BadArg)
        }
    }

    fn pki(&self) -> Option<PkiFiles> {
        if self.certfile.is_empty() && self.keyfile.is_empty() && self.cacertfile.is_empty() {
            return None;
        }
        Some(PkiFiles {
            certfile: PathBuf::from(&self.certfile),
            keyfile: PathBuf::from(&self.keyfile),
            cacertfile: PathBuf::from(&self.cacertfile),
        })
    }
}
