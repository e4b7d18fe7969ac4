//! NIFs on one distribution connection. Each returns at once; waiting happens in tokio.

use std::sync::Arc;

use macula_quic::auth::Role;
use macula_quic::cert_subject;
use macula_quic::{Closed, Connection, Refusal, SendStatus};
use rustler::{Binary, Encoder, Env, LocalPid, Monitor, NifResult, Resource, ResourceArc, Term};

use crate::events::{self, send, ErlangEvents};
use crate::{atoms, errors, outgoing, priority, runtime, terms};

/// A connection as Erlang holds it. When a monitored process (the controller, or the
/// owner that connected) dies, or
/// the last reference goes, the QUIC connection is closed.
pub struct ConnResource {
    pub conn: Arc<Connection<ErlangEvents>>,
}

impl ConnResource {
    pub fn new(conn: Arc<Connection<ErlangEvents>>) -> Self {
        ConnResource { conn }
    }
}

#[rustler::resource_impl]
impl Resource for ConnResource {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        self.conn.close_gracefully();
    }
}

impl Drop for ConnResource {
    fn drop(&mut self) {
        self.conn.close_gracefully();
    }
}

type Conn = ResourceArc<ConnResource>;

/// `{error, closed}`.
fn closed(env: Env) -> Term {
    errors::error(env, errors::closed(env, Closed))
}

/// Names the connection's controller: it is monitored (its death closes the connection)
/// and gets `macula_writable` and `{macula_closed, Reason}`.
#[rustler::nif]
fn set_controller<'a>(env: Env<'a>, conn: Conn, controller: LocalPid) -> Term<'a> {
    events::set(&conn.conn.events().controller, controller);
    if env.monitor(&conn, &controller).is_none() {
        conn.conn.close();
        return closed(env);
    }
    if let (Some(reason), Some(runtime)) = (conn.conn.close_reason().cloned(), runtime::get()) {
        // Closed before it had a controller: tell this one (from a tokio thread).
        runtime.spawn(async move {
            send(&controller, |env| (atoms::macula_closed(), terms::close_reason(env, &reason)).encode(env));
        });
    }
    atoms::ok().encode(env)
}

/// Sends one handshake message on the control stream.
#[rustler::nif]
fn send_handshake<'a>(env: Env<'a>, conn: Conn, message: Term<'a>) -> NifResult<Term<'a>> {
    let message = Binary::from_iolist(message)?;
    Ok(match conn.conn.send_handshake(&message) {
        Ok(()) => atoms::ok().encode(env),
        Err(e) => errors::error(env, errors::handshake_send(env, e)),
    })
}

/// The next handshake message: `{ok, Binary}` if it has arrived, else `wait` and it
/// comes as `{macula_handshake, Binary}`.
#[rustler::nif]
fn recv_handshake(env: Env, conn: Conn) -> Term {
    events::set(&conn.conn.events().handshake_reader, env.pid());
    match conn.conn.take_handshake_frame() {
        Ok(Some(frame)) => (atoms::ok(), terms::bytes(env, &frame)).encode(env),
        Ok(None) => atoms::wait().encode(env),
        Err(Closed) => closed(env),
    }
}

/// Ends the handshake: data packets now flow to `input` as `{macula_data, Credit, [Packet]}`.
#[rustler::nif]
fn activate(env: Env, conn: Conn, input: LocalPid) -> Term {
    events::set(&conn.conn.events().input, input);
    match conn.conn.activate() {
        Ok(()) => atoms::ok().encode(env),
        Err(Closed) => closed(env),
    }
}

/// The input handler has put one `{macula_data, Credit, Packets}` message's packets into
/// the VM and returns its credit.
#[rustler::nif]
fn ack_data(conn: Conn, credit: Term) -> NifResult<rustler::Atom> {
    conn.conn.ack_data(terms::decode_credit(credit)?);
    Ok(atoms::ok())
}

/// Queues distribution packets (a list of iodata, one element per packet), each on its
/// sender's data stream. Answers `busy` when the queues are full: stop draining until
/// `macula_writable`.
#[rustler::nif]
fn send_data<'a>(env: Env<'a>, conn: Conn, packets: Term<'a>) -> NifResult<Term<'a>> {
    let Ok(mut packets) = outgoing::packets(&mut conn.conn.encoder(), packets)? else { return Ok(too_large(env)) };
    priority::apply(&mut packets);
    Ok(send_status(env, conn.conn.send_data(packets)))
}

/// As `send_data`, but every packet goes on the fixed stream, whatever its content (raw
/// packets injected through the controller's `{send, ...}` hook).
#[rustler::nif]
fn send_unrouted<'a>(env: Env<'a>, conn: Conn, packets: Term<'a>) -> NifResult<Term<'a>> {
    let Ok(mut packets) = outgoing::packets(&mut conn.conn.encoder(), packets)? else { return Ok(too_large(env)) };
    packets.iter_mut().for_each(|p| p.pin_to_fixed_stream());
    Ok(send_status(env, conn.conn.send_data(packets)))
}

fn send_status<'a>(env: Env<'a>, status: Result<SendStatus, Closed>) -> Term<'a> {
    match status {
        Ok(SendStatus::Ready) => atoms::ok().encode(env),
        Ok(SendStatus::Busy) => atoms::busy().encode(env),
        Err(Closed) => closed(env),
    }
}

/// `{error, too_large}`: a packet longer than a frame header can announce (4 GiB).
fn too_large(env: Env) -> Term {
    errors::error(env, atoms::too_large().encode(env))
}

/// The role atom of a cookie proof.
fn role(role: rustler::Atom) -> NifResult<Role> {
    if role == atoms::initiator() {
        Ok(Role::Initiator)
    } else if role == atoms::acceptor() {
        Ok(Role::Acceptor)
    } else {
        Err(rustler::Error::BadArg)
    }
}

/// This side's cookie proof for the connection's TLS session.
#[rustler::nif]
fn auth_proof<'a>(
    env: Env<'a>,
    conn: Conn,
    cookie: Binary<'a>,
    role_atom: rustler::Atom,
    node_name: Binary<'a>,
) -> NifResult<Term<'a>> {
    Ok(match conn.conn.prove(&cookie, role(role_atom)?, &node_name) {
        Ok(proof) => (atoms::ok(), terms::bytes(env, &proof)).encode(env),
        Err(Closed) => closed(env),
    })
}

/// Checks the peer's cookie proof: `true` authenticates the peer.
#[rustler::nif]
fn auth_verify<'a>(
    env: Env<'a>,
    conn: Conn,
    cookie: Binary<'a>,
    role_atom: rustler::Atom,
    node_name: Binary<'a>,
    proof: Binary<'a>,
) -> NifResult<Term<'a>> {
    Ok(match conn.conn.verify_peer(&cookie, role(role_atom)?, &node_name, &proof) {
        Ok(valid) => valid.encode(env),
        Err(Closed) => closed(env),
    })
}

/// Closes a connection whose peer did not authenticate: close code 2 for
/// `not_authenticated`, 3 for `bad_node_name`; `why` is the reason phrase it sees.
#[rustler::nif]
fn refuse(conn: Conn, kind: rustler::Atom, why: String) -> NifResult<rustler::Atom> {
    let refusal = if kind == atoms::not_authenticated() {
        Refusal::NotAuthenticated
    } else if kind == atoms::bad_node_name() {
        Refusal::BadNodeName
    } else {
        return Err(rustler::Error::BadArg);
    };
    conn.conn.refuse(refusal, &why);
    Ok(atoms::ok())
}

/// Queues a tick on the control stream.
#[rustler::nif]
fn tick(conn: Conn) -> rustler::Atom {
    conn.conn.tick();
    atoms::ok()
}

/// `{Received, Sent, PendingBytes}` for `mf_getstat`.
#[rustler::nif]
fn stats(conn: Conn) -> (u64, u64, u64) {
    let stats = conn.conn.stats();
    (stats.received, stats.sent, stats.pending)
}

/// Closes the connection normally.
#[rustler::nif]
fn close(conn: Conn) -> rustler::Atom {
    conn.conn.close();
    atoms::ok()
}

/// Facts about the connection: addresses, TLS, path, traffic counters. One read of
/// quinn's statistics, no waiting. (Per-stream facts belong here too, as a `streams`
/// entry, once a connection has more than one data stream.)
#[rustler::nif]
fn info(env: Env, conn: Conn) -> NifResult<Term> {
    let c = &conn.conn;
    let quic = c.quic();
    let stats = quic.stats();
    let path = stats.path;
    let frames = c.stats();
    let local = quic.local_ip().map(|ip| ip.to_string()).unwrap_or_default();
    let subject = match macula_quic::tls::peer_certificate(quic).and_then(|cert| cert_subject::subject(&cert)) {
        Some(subject) => terms::text(env, &subject),
        None => atoms::undefined().encode(env),
    };
    let pairs: Vec<(Term, Term)> = vec![
        (atoms::peer().encode(env), terms::encode_addr(env, c.remote_address())),
        (atoms::local().encode(env), terms::text(env, &local)),
        (atoms::protocol().encode(env), atoms::quic().encode(env)),
        (atoms::tls_version().encode(env), terms::text(env, macula_quic::tls::TLS_VERSION)),
        (atoms::cipher_suite().encode(env), terms::text(env, macula_quic::tls::CIPHER_SUITE)),
        (atoms::alpn().encode(env), terms::bytes(env, macula_quic::wire::ALPN)),
        (atoms::peer_subject().encode(env), subject),
        (atoms::rtt_us().encode(env), (quic.rtt().as_micros() as u64).encode(env)),
        (atoms::mtu().encode(env), path.current_mtu.encode(env)),
        (atoms::congestion_window().encode(env), path.cwnd.encode(env)),
        (atoms::congestion_events().encode(env), path.congestion_events.encode(env)),
        (atoms::sent_packets().encode(env), path.sent_packets.encode(env)),
        (atoms::lost_packets().encode(env), path.lost_packets.encode(env)),
        (atoms::lost_bytes().encode(env), path.lost_bytes.encode(env)),
        (atoms::bytes_sent().encode(env), stats.udp_tx.bytes.encode(env)),
        (atoms::bytes_received().encode(env), stats.udp_rx.bytes.encode(env)),
        (atoms::datagrams_sent().encode(env), stats.udp_tx.datagrams.encode(env)),
        (atoms::datagrams_received().encode(env), stats.udp_rx.datagrams.encode(env)),
        (atoms::frames_sent().encode(env), frames.sent.encode(env)),
        (atoms::frames_received().encode(env), frames.received.encode(env)),
        (atoms::initiator().encode(env), c.is_initiator().encode(env)),
        (atoms::probes().encode(env), c.probes().encode(env)),
        (atoms::data_streams().encode(env), data_streams(env, c.data_streams())),
        (atoms::send_queued().encode(env), c.stats().pending.encode(env)),
    ];
    Term::map_from_pairs(env, &pairs)
}

/// `#{pool => N, out => Opened, in => OpenedByPeer}`.
fn data_streams(env: Env, (out, into, pool): (usize, usize, usize)) -> Term {
    let pairs = [(atoms::pool(), pool), (atoms::out(), out), (atoms::r#in(), into)];
    let pairs: Vec<(Term, Term)> = pairs.iter().map(|(k, v)| (k.encode(env), v.encode(env))).collect();
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| pool.encode(env))
}
