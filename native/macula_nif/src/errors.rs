//! The core's errors as Erlang terms a caller can match (the shapes are the types in
//! `src/macula_dist_nif.erl`). The human text is made on the Erlang side
//! (`macula_dist_nif:format_error/1`); binaries appear only for free text from a
//! library or the peer (a PEM parser's complaint, a QUIC close reason).

use std::io;

use macula_quic::endpoint::SocketError;
use macula_quic::icmp_socket::UnreachableKind;
use macula_quic::node_name::{NameError, ResolveError};
use macula_quic::tls::{PeerNameError, TlsError};
use macula_quic::{AcceptError, BindError, Closed, ConnectError, HandshakeSendError};
use rustler::{Atom, Encoder, Env, Term};

use crate::{atoms, terms};

/// `{error, Reason}`.
pub fn error<'a>(env: Env<'a>, reason: Term<'a>) -> Term<'a> {
    (atoms::error(), reason).encode(env)
}

/// An `inet:posix()` atom (`eaddrinuse`, ...) for an OS error, else the error's text.
pub fn posix<'a>(env: Env<'a>, e: &io::Error) -> Term<'a> {
    let name =
        e.raw_os_error().map(nix::errno::Errno::from_raw).filter(|errno| *errno != nix::errno::Errno::UnknownErrno);
    match name.and_then(|errno| Atom::from_str(env, &format!("{errno:?}").to_lowercase()).ok()) {
        Some(atom) => atom.encode(env),
        None => terms::text(env, &e.to_string()),
    }
}

/// `{bind, {Ip, Port}, Posix}`.
pub fn socket<'a>(env: Env<'a>, e: &SocketError) -> Term<'a> {
    (atoms::bind(), terms::encode_addr(env, e.addr), posix(env, &e.source)).encode(env)
}

/// `{bind, {Ip, Port}, Posix} | {tls, TlsError}`.
pub fn bind<'a>(env: Env<'a>, e: &BindError) -> Term<'a> {
    match e {
        BindError::Socket(e) => socket(env, e),
        BindError::Tls(e) => (atoms::tls(), tls(env, e)).encode(env),
    }
}

/// `{file, Option, Path, Why} | {key_mismatch, Certfile, Keyfile} | {setup, Why}`.
fn tls<'a>(env: Env<'a>, e: &TlsError) -> Term<'a> {
    match e {
        TlsError::File { option, path, reason } => {
            let option =
                Atom::from_str(env, option).map(|a| a.encode(env)).unwrap_or_else(|_| terms::text(env, option));
            (atoms::file(), option, terms::text(env, path), terms::text(env, reason)).encode(env)
        }
        TlsError::Verifier { path, reason } => {
            (atoms::file(), atoms::cacertfile(), terms::text(env, path), terms::text(env, reason)).encode(env)
        }
        TlsError::KeyMismatch { certfile, keyfile } => {
            (atoms::key_mismatch(), terms::text(env, certfile), terms::text(env, keyfile)).encode(env)
        }
        TlsError::CertGen(_) | TlsError::Rustls(_) | TlsError::Quic(_) => {
            (atoms::setup(), terms::text(env, &e.to_string())).encode(env)
        }
    }
}

/// `{bad_host, Host}`.
pub fn bad_host<'a>(env: Env<'a>, host: &str, _e: &NameError) -> Term<'a> {
    (atoms::bad_host(), terms::text(env, host)).encode(env)
}

/// `{resolve, Host, no_address | Why}`.
pub fn resolve<'a>(env: Env<'a>, host: &str, e: &ResolveError) -> Term<'a> {
    let why = match e {
        ResolveError::NoAddress => atoms::no_address().encode(env),
        ResolveError::Lookup(e) => terms::text(env, &e.to_string()),
    };
    (atoms::resolve(), terms::text(env, host), why).encode(env)
}

/// `{tls, {alert, Alert, Why}} | {unreachable, {Kind, {Ip, Port}}} | {connect, timeout | Why}`.
pub fn connect<'a>(env: Env<'a>, e: &ConnectError) -> Term<'a> {
    if let Some(alert) = e.tls_alert() {
        return (atoms::tls(), (atoms::alert(), alert, terms::text(env, &e.to_string()))).encode(env);
    }
    match e {
        ConnectError::Unreachable(report) => {
            let kind = match report.kind {
                UnreachableKind::Port => atoms::port(),
                UnreachableKind::Host => atoms::host(),
                UnreachableKind::Network => atoms::network(),
                UnreachableKind::Prohibited => atoms::prohibited(),
                UnreachableKind::Other => atoms::other(),
            };
            (atoms::unreachable(), (kind, terms::encode_addr(env, report.peer))).encode(env)
        }
        ConnectError::TimedOut => (atoms::connect(), atoms::timeout()).encode(env),
        ConnectError::Start(inner) => (atoms::connect(), terms::text(env, &inner.to_string())).encode(env),
        ConnectError::Connection(inner) => (atoms::connect(), terms::text(env, &inner.to_string())).encode(env),
    }
}

/// Why an incoming connection was refused: `overloaded | handshake_timeout |
/// {handshake, Why}`.
pub fn accept<'a>(env: Env<'a>, e: &AcceptError) -> Term<'a> {
    match e {
        AcceptError::Overloaded => atoms::overloaded().encode(env),
        AcceptError::TimedOut => atoms::handshake_timeout().encode(env),
        AcceptError::Connection(inner) => (atoms::handshake(), terms::text(env, &inner.to_string())).encode(env),
    }
}

/// `no_peer_certificate | {bad_peer_certificate, Why}`.
pub fn peer_name<'a>(env: Env<'a>, e: &PeerNameError) -> Term<'a> {
    match e {
        PeerNameError::NoCertificate => atoms::no_peer_certificate().encode(env),
        PeerNameError::BadCertificate(why) => (atoms::bad_peer_certificate(), terms::text(env, why)).encode(env),
    }
}

/// `closed`.
pub fn closed(env: Env, _e: Closed) -> Term {
    atoms::closed().encode(env)
}

/// `closed | handshake_over | too_large`.
pub fn handshake_send(env: Env, e: HandshakeSendError) -> Term {
    match e {
        HandshakeSendError::Closed(_) => atoms::closed(),
        HandshakeSendError::HandshakeOver => atoms::handshake_over(),
        HandshakeSendError::TooLarge(_) => atoms::too_large(),
    }
    .encode(env)
}
