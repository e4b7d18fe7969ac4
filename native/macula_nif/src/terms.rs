//! Conversions between Erlang terms and the Rust types of `macula_quic`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use macula_quic::reset_key::RestartIdentity;
use macula_quic::routing::Class;
use macula_quic::settings::Congestion;
use macula_quic::tls::PkiFiles;
use macula_quic::{CloseReason, Credit, Settings};
use rustler::{Binary, Decoder, Encoder, Env, Error, NifResult, Term};

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

/// What `listen` takes, decoded once from the map `macula_dist_config:nif_options/1`
/// builds out of its option table (every key present, every value already checked).
pub struct EndpointOptions {
    pub settings: Settings,
    /// Threads of the node's one runtime (started by the first `listen`).
    pub runtime_workers: NonZeroUsize,
}

impl<'a> Decoder<'a> for EndpointOptions {
    fn decode(map: Term<'a>) -> NifResult<Self> {
        let settings = Settings {
            tick_time: millis(map, atoms::tick_time_ms())?,
            handshake_timeout: millis(map, atoms::handshake_timeout_ms())?,
            stream_window: get(map, atoms::stream_window())?,
            send_window: get(map, atoms::send_window())?,
            send_queue_limit: get(map, atoms::send_queue_limit())?,
            data_streams: NonZeroU8::new(get(map, atoms::data_streams())?).ok_or(Error::BadArg)?,
            max_packet: get(map, atoms::max_packet())?,
            max_udp_payload: get(map, atoms::max_udp_payload())?,
            delivery_window: non_zero(map, atoms::delivery_window())?,
            max_pending_handshakes: non_zero(map, atoms::max_pending_handshakes())?,
            congestion: congestion(map.map_get(atoms::congestion())?)?,
            pki: pki(map)?,
            liveness_interval: millis(map, atoms::liveness_interval())?,
            restart_identity: restart_identity(map)?,
        };
        Ok(EndpointOptions { settings, runtime_workers: non_zero(map, atoms::runtime_workers())? })
    }
}

fn get<'a, T: Decoder<'a>>(map: Term<'a>, key: rustler::Atom) -> NifResult<T> {
    map.map_get(key)?.decode()
}

fn non_zero(map: Term, key: rustler::Atom) -> NifResult<NonZeroUsize> {
    NonZeroUsize::new(get(map, key)?).ok_or(Error::BadArg)
}

fn millis(map: Term, key: rustler::Atom) -> NifResult<Duration> {
    Ok(Duration::from_millis(get(map, key)?))
}

fn congestion(term: Term) -> NifResult<Congestion> {
    let c: rustler::Atom = term.decode()?;
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

/// PKI mode with the three files (binaries), zero-configuration mode when they are
/// `undefined` (the Erlang side has checked that either all or none are given).
fn pki(map: Term) -> NifResult<Option<PkiFiles>> {
    let file = |key| -> NifResult<Option<PathBuf>> {
        let term = map.map_get(key)?;
        if term == atoms::undefined().to_term(map.get_env()) {
            return Ok(None);
        }
        Ok(Some(PathBuf::from(term.decode::<String>()?)))
    };
    match (file(atoms::certfile())?, file(atoms::keyfile())?, file(atoms::cacertfile())?) {
        (Some(certfile), Some(keyfile), Some(cacertfile)) => Ok(Some(PkiFiles { certfile, keyfile, cacertfile })),
        (None, None, None) => Ok(None),
        _ => Err(Error::BadArg),
    }
}

/// The stateless-reset identity derived from this node's name and cookie; an empty
/// cookie (a client-only node, `-nocookie`) gives random keys instead.
fn restart_identity(map: Term) -> NifResult<Option<RestartIdentity>> {
    let name: Binary = get(map, atoms::node_name())?;
    let cookie: Binary = get(map, atoms::cookie())?;
    Ok((!cookie.is_empty()).then(|| macula_quic::reset_key::derive(name.as_slice(), cookie.as_slice())))
}
