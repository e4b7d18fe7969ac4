//! NIFs on a node's endpoint: open it, accept on it, connect from it, close it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use macula_quic::node_name::{Host, NodeAddress};
use macula_quic::tls;
use macula_quic::{Connection, Endpoint};
use rustler::{Encoder, Env, LocalPid, NifResult, Resource, ResourceArc, Term};

use crate::connection_nif::ConnResource;
use crate::events::{send, ErlangEvents};
use crate::terms::{self, EndpointOptions};
use crate::{atoms, errors, runtime, shutdown};

/// A bound endpoint, held by `macula_dist` as its listen handle.
pub struct EndpointResource {
    endpoint: Arc<Endpoint>,
    accepting: AtomicBool,
}

#[rustler::resource_impl]
impl Resource for EndpointResource {}

/// How long `close_endpoint` lets CONNECTION_CLOSE frames drain before it reports.
/// They go out at once; waiting for quinn's full drain (three probe timeouts) would
/// hold up the node's exit by seconds for a connect that never got an answer (its probe
/// timeout starts from a 333 ms RTT guess), and keep the port taken from the next
/// incarnation that much longer (the socket is closed after it, see `Endpoint::release_port`).
const CLOSE_DRAIN: Duration = Duration::from_millis(100);

/// Binds the node's UDP endpoint on a runtime thread; the caller gets
/// `{macula_listen, {ok, Endpoint} | {error, Reason}}` (`errors::bind`). (Binding runs off the
/// scheduler thread because quinn seeds a thread-local RNG there, and the VM's exit
/// path cannot destroy thread-locals of a library on its own threads safely.)
#[rustler::nif]
fn start_listen<'a>(env: Env<'a>, ip: Term<'a>, port: u16, options: EndpointOptions) -> NifResult<Term<'a>> {
    let addr = SocketAddr::new(terms::decode_ip(ip)?, port);
    let runtime = match runtime::get_or_start(options.runtime_workers) {
        Ok(runtime) => runtime,
        Err(e) => return Ok(errors::error(env, (atoms::runtime(), errors::posix(env, &e)).encode(env))),
    };
    let caller = env.pid();
    let settings = options.settings;
    runtime.spawn(async move {
        // A previous incarnation's endpoint (init:restart/0 keeps this library and its
        // runtime) may still be draining on this port: it has given up, so it goes first.
        for old in shutdown::closed_endpoints() {
            old.release_port().await;
        }
        let result = Endpoint::bind(addr, settings);
        send(&caller, |env| {
            let reply = match result {
                Ok(endpoint) => {
                    let endpoint = Arc::new(endpoint);
                    shutdown::register(&endpoint);
                    let resource = ResourceArc::new(EndpointResource { endpoint, accepting: AtomicBool::new(false) });
                    (atoms::ok(), resource).encode(env)
                }
                Err(e) => errors::error(env, errors::bind(env, &e)),
            };
            (atoms::macula_listen(), reply).encode(env)
        });
    });
    Ok(atoms::ok().encode(env))
}

/// `{ok, {Ip, Port}}`, the bound address, or `{error, Posix}`.
#[rustler::nif]
fn endpoint_address<'a>(env: Env<'a>, endpoint: ResourceArc<EndpointResource>) -> Term<'a> {
    match endpoint.endpoint.local_addr() {
        Ok(addr) => (atoms::ok(), terms::encode_addr(env, addr)).encode(env),
        Err(e) => errors::error(env, errors::posix(env, &e)),
    }
}

/// Starts accepting. `acceptor` gets `{macula_incoming, Conn, PeerAddr}` for each
/// connection whose QUIC handshake completed, and `{macula_refused, PeerAddr, Why}` for
/// each one that did not (`Why` as `errors::accept` makes it). Only the first call
/// starts the loop; `{error, not_listening}` when no endpoint was ever opened.
#[rustler::nif]
fn accept(env: Env, endpoint: ResourceArc<EndpointResource>, acceptor: LocalPid) -> Term {
    let Some(runtime) = runtime::get() else { return not_listening(env) };
    if endpoint.accepting.swap(true, Ordering::AcqRel) {
        return atoms::ok().encode(env);
    }
    let endpoint = endpoint.endpoint.clone();
    runtime.spawn(async move {
        let settings = endpoint.settings().clone();
        let on_connection = move |established: macula_quic::Established| {
            let peer = established.quic.remote_address();
            let conn = Connection::start(established, false, ErlangEvents::default(), settings.clone());
            let resource = ResourceArc::new(ConnResource::new(conn));
            send(&acceptor, |env| (atoms::macula_incoming(), resource, terms::encode_addr(env, peer)).encode(env));
        };
        let on_refused = move |peer: SocketAddr, why: macula_quic::AcceptError| {
            send(&acceptor, |env| {
                (atoms::macula_refused(), terms::encode_addr(env, peer), errors::accept(env, &why)).encode(env)
            });
        };
        endpoint.accept_loop(on_connection, on_refused).await;
    });
    atoms::ok().encode(env)
}

fn not_listening(env: Env) -> Term {
    errors::error(env, atoms::not_listening().encode(env))
}

/// Connects to `Port@Host` in the background. The caller gets `{macula_connect,
/// {ok, Conn}}` or `{macula_connect, {error, Reason}}` (`errors::connect`); `owner` (the
/// process that runs the handshake) is monitored and gets the connection's events until
/// `set_controller` names the controller.
#[rustler::nif]
fn connect(env: Env, endpoint: ResourceArc<EndpointResource>, host: String, port: u16, owner: LocalPid) -> Term {
    let Some(runtime) = runtime::get() else { return not_listening(env) };
    let caller = env.pid();
    let endpoint = endpoint.endpoint.clone();
    runtime.spawn(async move {
        let reply = |build: &dyn for<'b> Fn(Env<'b>) -> Term<'b>| {
            send(&caller, |env| (atoms::macula_connect(), build(env)).encode(env));
        };
        let address = match Host::parse(&host) {
            Ok(host) => NodeAddress { port, host },
            Err(e) => return reply(&|env| errors::error(env, errors::bad_host(env, &host, &e))),
        };
        let addr = match address.resolve().await {
            Ok(addr) => addr,
            Err(e) => return reply(&|env| errors::error(env, errors::resolve(env, &host, &e))),
        };
        match endpoint.connect(addr).await {
            Ok(established) => {
                let conn = Connection::start(
                    established,
                    true,
                    ErlangEvents::reporting_to(owner),
                    endpoint.settings().clone(),
                );
                let resource = ResourceArc::new(ConnResource::new(conn));
                if resource.monitor(None, &owner).is_none() {
                    resource.conn.close();
                }
                reply(&|env| (atoms::ok(), resource.clone()).encode(env));
            }
            Err(e) => reply(&|env| errors::error(env, errors::connect(env, &e))),
        }
    });
    atoms::ok().encode(env)
}

/// Closes every connection and the socket; the caller gets `macula_endpoint_closed` once
/// the close frames are out (or after a short drain time) and the port is free again,
/// however long the VM keeps the endpoint's terms.
#[rustler::nif]
fn close_endpoint(env: Env, endpoint: ResourceArc<EndpointResource>) -> rustler::Atom {
    let endpoint = endpoint.endpoint.clone();
    endpoint.close();
    let caller = env.pid();
    if let Some(runtime) = runtime::get() {
        runtime.spawn(async move {
            let _ = tokio::time::timeout(CLOSE_DRAIN, endpoint.wait_idle()).await;
            endpoint.release_port().await;
            send(&caller, |env| atoms::macula_endpoint_closed().encode(env));
        });
    }
    atoms::ok()
}

/// Moves the endpoint to a new local UDP address (connection migration). The socket is
/// bound on a runtime thread, not the caller's scheduler; the caller gets
/// `{macula_rebind, ok | {error, {bind, {Ip, Port}, Posix}}}`; `{error, not_listening}`
/// at once when no endpoint was ever opened.
#[rustler::nif]
fn start_rebind<'a>(
    env: Env<'a>,
    endpoint: ResourceArc<EndpointResource>,
    ip: Term<'a>,
    port: u16,
) -> NifResult<Term<'a>> {
    let addr = SocketAddr::new(terms::decode_ip(ip)?, port);
    let Some(runtime) = runtime::get() else { return Ok(not_listening(env)) };
    let caller = env.pid();
    let endpoint = endpoint.endpoint.clone();
    runtime.spawn(async move {
        let result = endpoint.rebind(addr);
        send(&caller, |env| {
            let reply = match &result {
                Ok(()) => atoms::ok().encode(env),
                Err(e) => errors::error(env, errors::socket(env, e)),
            };
            (atoms::macula_rebind(), reply).encode(env)
        });
    });
    Ok(atoms::ok().encode(env))
}

/// Whether the certificate the peer of `conn` presented in the TLS handshake covers
/// `host` (an IP SAN for an IP literal, a DNS SAN for a host name): `true | false |
/// {error, no_peer_certificate | {bad_peer_certificate, Why}}`. In PKI mode that certificate
/// has been verified against the CA already; this binds it to the peer's node name
/// (the `verify_name` option, checked by `macula_dist_auth`).
#[rustler::nif]
fn peer_cert_covers<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>, host: String) -> Term<'a> {
    match tls::peer_covers_host(conn.conn.quic(), &host) {
        Ok(covered) => covered.encode(env),
        Err(e) => errors::error(env, errors::peer_name(env, &e)),
    }
}
