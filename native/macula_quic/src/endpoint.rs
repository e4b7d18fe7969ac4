//! A node's QUIC endpoint: one UDP socket that both accepts and initiates connections,
//! so the port in the node name is also the source port of its outgoing connections.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use quinn::{ClientConfig, EndpointConfig, ServerConfig, TokioRuntime, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use thiserror::Error;
use tokio::sync::broadcast;

use crate::icmp_socket::{self, Port, Unreachable};

use crate::admission::{Established, Gate, Probation};
use crate::settings::Settings;
use crate::tls::{self, TlsError};
use crate::wire::{close_code, SERVER_NAME};

/// Why a UDP socket could not be bound to `addr` (opening or rebinding an endpoint).
#[derive(Debug, Error)]
#[error("cannot bind udp {addr}: {source}")]
pub struct SocketError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Why an endpoint could not be opened.
#[derive(Debug, Error)]
pub enum BindError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why an outgoing connection failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot start connection: {0}")]
    Start(#[from] quinn::ConnectError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    TimedOut,
    /// An ICMP error came back before any answer: nobody listens there (`connection
    /// refused` in TCP terms).
    #[error("{0}")]
    Unreachable(Unreachable),
}

impl ConnectError {
    /// The TLS alert when the TLS handshake failed: this side did not trust the peer's
    /// certificate, or the peer did not trust ours (TLS alerts travel as QUIC
    /// CRYPTO_ERROR codes 0x100-0x1ff, the alert being the low byte).
    pub fn tls_alert(&self) -> Option<u8> {
        let code = match self {
            ConnectError::Connection(quinn::ConnectionError::TransportError(e)) => u64::from(e.code),
            ConnectError::Connection(quinn::ConnectionError::ConnectionClosed(close)) => u64::from(close.error_code),
            _ => return None,
        };
        code.checked_sub(0x100).and_then(|alert| u8::try_from(alert).ok())
    }
}

/// Why an incoming connection was not accepted.
#[derive(Debug, Error)]
pub enum AcceptError {
    #[error("dropped: too many unauthenticated connections")]
    Overloaded,
    #[error("handshake failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("did not authenticate within net_setuptime")]
    TimedOut,
}

/// A bound QUIC endpoint.
pub struct Endpoint {
    quic: quinn::Endpoint,
    settings: Arc<Settings>,
    probation: Arc<Probation>,
    /// ICMP reports of the socket (see [`icmp_socket`]).
    reports: broadcast::Sender<Unreachable>,
    closed: AtomicBool,
    /// The socket (and, after a rebind, the ones before it that quinn may still read),
    /// to give the port back when the endpoint is closed (see [`Endpoint::release_port`]).
    ports: Mutex<Vec<Port>>,
}

impl Endpoint {
    /// Binds `addr`: with the certificates of `settings.pki` (PKI mode), else with a fresh
    /// ephemeral identity (zero-configuration mode). The TLS configuration is built
    /// before the socket is bound, so a bad certificate file fails with
    /// [`BindError::Tls`]. Must run inside the tokio runtime.
    pub fn bind(addr: SocketAddr, settings: Settings) -> Result<Endpoint, BindError> {
        let (server_crypto, client_crypto) = tls::configure(settings.pki.as_ref())?;
        let socket = bind_socket(addr).map_err(|source| SocketError { addr, source })?;
        let transport = settings.transport();
        let mut server = ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let mut client = ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let mut config = match &settings.restart_identity {
            Some(identity) => {
                let mut config = EndpointConfig::new(Arc::new(identity.reset_key.clone()));
                let cid_key = identity.cid_key;
                // A restarted node must accept the old connection IDs as its own to
                // answer them with resets, so their check key survives the restart too.
                config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
                config
            }
            None => EndpointConfig::default(),
        };
        config.max_udp_payload_size(settings.max_udp_payload).ok();
        let (reports, _) = broadcast::channel(icmp_socket::REPORT_BACKLOG);
        let (socket, port) =
            icmp_socket::wrap(socket, reports.clone()).map_err(|source| SocketError { addr, source })?;
        let mut quic = quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, Arc::new(TokioRuntime))
            .map_err(|source| SocketError { addr, source })?;
        quic.set_default_client_config(client);
        Ok(Endpoint {
            probation: Arc::new(Probation::new(settings.max_pending_handshakes)),
            settings: Arc::new(settings),
            quic,
            reports,
            closed: AtomicBool::new(false),
            ports: Mutex::new(vec![port]),
        })
    }

    /// The settings every connection of this endpoint uses.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// Connects to `addr` and opens the control stream. Fails at once with
    /// [`ConnectError::Unreachable`] when an ICMP error about `addr` arrives first.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Established, ConnectError> {
        let mut unreachable = self.reports.subscribe();
        let connecting = self.quic.connect(addr, SERVER_NAME)?;
        let handshake = async {
            let quic = connecting.await?;
            let control = quic.open_bi().await?;
            Ok::<_, ConnectError>((quic, control))
        };
        let handshake = tokio::time::timeout(self.settings.handshake_timeout, handshake);
        let (quic, control) = tokio::select! {
            result = handshake => result.unwrap_or(Err(ConnectError::TimedOut))?,
            report = first_report_about(&mut unreachable, addr) => return Err(ConnectError::Unreachable(report)),
        };
        Ok(Established { quic, control, gate: Arc::new(Gate::default()), unreachable })
    }

    /// Accepts connections until the endpoint closes.
    ///
    /// `on_connection` gets each connection whose QUIC handshake completed and whose
    /// control stream opened; `on_refused` each one dropped before its peer proved the
    /// cookie (see [`Gate`]). A connection is *unauthenticated* from its first packet
    /// until it opens its gate; at most `max_pending_handshakes` may be, each for at most
    /// `handshake_timeout`. When the limit is reached the oldest is dropped, so a flood of
    /// connections that never authenticate cannot lock out a node that does.
    pub async fn accept_loop(
        &self,
        on_connection: impl Fn(Established) + Send + Sync + 'static,
        on_refused: impl Fn(SocketAddr, AcceptError) + Send + Sync + 'static,
    ) {
        let on_connection = Arc::new(on_connection);
        let on_refused = Arc::new(on_refused);
        while let Some(incoming) = self.quic.accept().await {
            let peer = incoming.remote_address();
            let (id, evicted) = self.probation.admit();
            let timeout = self.settings.handshake_timeout;
            let probation = self.probation.clone();
            let unreachable = self.reports.subscribe();
            let (on_connection, on_refused) = (on_connection.clone(), on_refused.clone());
            tokio::spawn(async move {
                let gate = Arc::new(Gate::default());
                let mut established: Option<quinn::Connection> = None;
                let admitted = async {
                    let quic = incoming.await?;
                    established = Some(quic.clone());
                    let control = quic.accept_bi().await?;
                    on_connection(Established { quic, control, gate: gate.clone(), unreachable });
                    gate.wait().await;
                    Ok::<_, AcceptError>(())
                };
                let outcome = tokio::select! {
                    result = tokio::time::timeout(timeout, admitted) => result.unwrap_or(Err(AcceptError::TimedOut)),
                    _ = evicted.notified() => Err(AcceptError::Overloaded),
                };
                probation.release(id);
                let Err(error) = outcome else { return };
                if let Some(quic) = established {
                    if quic.close_reason().is_some() {
                        return; // Already refused (and reported) by the Erlang side.
                    }
                    quic.close(VarInt::from_u32(close_code::NOT_AUTHENTICATED), b"not authenticated");
                }
                on_refused(peer, error);
            });
        }
    }

    /// Closes every connection (sending CONNECTION_CLOSE) and stops accepting.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.quic.close(VarInt::from_u32(close_code::SHUTDOWN), b"shutdown");
    }

    /// True once [`Endpoint::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves when every connection has finished closing.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await
    }

    /// Closes the UDP socket of a closed endpoint, so its port is free now rather than
    /// when the last handle to the endpoint and the last draining connection are gone
    /// (in the VM, whenever the garbage collector frees their terms): a node restarted
    /// in the same OS process (`init:restart/0`) binds the same port at once. Call it
    /// once the close frames are out; packets sent later are dropped.
    pub async fn release_port(&self) {
        debug_assert!(self.is_closed(), "release_port on an open endpoint");
        let ports: Vec<Port> = self.ports.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for port in &ports {
            port.release().await;
        }
    }

    /// True while the endpoint holds a UDP socket (until [`Endpoint::release_port`]).
    pub fn holds_port(&self) -> bool {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).iter().any(Port::is_bound)
    }

    /// Moves the endpoint to a new UDP socket (connection migration).
    pub fn rebind(&self, addr: SocketAddr) -> Result<(), SocketError> {
        let bind = || {
            let (socket, port) = icmp_socket::wrap(bind_socket(addr)?, self.reports.clone())?;
            self.quic.rebind_abstract(socket)?;
            Ok::<_, std::io::Error>(port)
        };
        let port = bind().map_err(|source| SocketError { addr, source })?;
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports.retain(Port::is_bound);
        ports.push(port);
        Ok(())
    }
}

/// The first report about `addr`. A lagging subscriber cannot tell whether a dropped
/// report was about `addr`, so it waits for the next one (the handshake retransmits).
async fn first_report_about(reports: &mut broadcast::Receiver<Unreachable>, addr: SocketAddr) -> Unreachable {
    loop {
        match reports.recv().await {
            Ok(report) if report.is_about(addr) => return report,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// A UDP socket with kernel buffers sized for bursts (see the receive buffer below).
fn bind_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack on [::] so an IPv6 node also reaches IPv4 peers.
        let _ = socket.set_only_v6(false);
    }
    // Big enough for bursts, small enough that a receiver whose CPU cannot keep up
    // with a bulk sender drops (and loss-based congestion control backs off) before
    // its queue holds tens of milliseconds of datagrams that small messages wait behind.
    let _ = socket.set_recv_buffer_size(1 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::tls::test_pki::{ca, files, node};
    use crate::tls::PkiFiles;

    fn bind(pki: Option<PkiFiles>) -> Endpoint {
        let settings = Settings { pki, handshake_timeout: std::time::Duration::from_secs(5), ..Settings::default() };
        Endpoint::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), settings).unwrap()
    }

    /// Connects `client` to `server`: (the client's view, the server's view) of the handshake.
    async fn handshake(client: &Endpoint, server: &Endpoint) -> (Result<(), String>, Result<(), String>) {
        let addr = server.local_addr().unwrap();
        let server_side = async {
            let incoming = server.quic.accept().await.ok_or("endpoint closed")?;
            let conn = incoming.await.map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        let client_side = async {
            let conn =
                client.quic.connect(addr, SERVER_NAME).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        let (c, s) = tokio::join!(client_side, server_side);
        // A client whose own certificate is refused learns it only when the server
        // closes the connection right after the handshake.
        let c = match c {
            Ok(conn) => match tokio::time::timeout(std::time::Duration::from_millis(300), conn.closed()).await {
                Ok(reason) => Err(reason.to_string()),
                Err(_) => Ok(()),
            },
            Err(e) => Err(e),
        };
        (c, s.map(|_| ()))
    }

    #[tokio::test]
    async fn pki_endpoints_with_certificates_from_the_same_ca_connect() {
        let ca = ca("CA one");
        let a = bind(Some(files(&node(&ca, &["127.0.0.1"], false), &ca)));
        let b = bind(Some(files(&node(&ca, &["10.9.9.9"], false), &ca)));
        let (c, s) = handshake(&a, &b).await;
        assert_eq!((c, s), (Ok(()), Ok(())));
        // Each side sees the other's verified certificate.
        let addr = a.local_addr().unwrap();
        let (client, server) =
            tokio::join!(async { b.quic.connect(addr, SERVER_NAME).unwrap().await.unwrap() }, async {
                a.quic.accept().await.unwrap().await.unwrap()
            });
        assert_eq!(tls::peer_covers_host(&client, "127.0.0.1"), Ok(true));
        assert_eq!(tls::peer_covers_host(&server, "10.9.9.9"), Ok(true));
        assert_eq!(tls::peer_covers_host(&server, "127.0.0.1"), Ok(false));
    }

    #[tokio::test]
    async fn pki_server_refuses_client_from_another_ca() {
        let ours = ca("CA one");
        let theirs = ca("CA two");
        let server = bind(Some(files(&node(&ours, &["127.0.0.1"], false), &ours)));
        // The client trusts our CA but its own certificate comes from another one.
        let client = bind(Some(files(&node(&theirs, &["127.0.0.1"], false), &ours)));
        let (c, s) = handshake(&client, &server).await;
        assert!(s.as_ref().is_err_and(|e| e.contains("UnknownIssuer")), "{s:?}");
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn pki_client_refuses_server_from_another_ca_or_expired() {
        let ours = ca("CA one");
        let theirs = ca("CA two");
        let client = bind(Some(files(&node(&ours, &["127.0.0.1"], false), &ours)));
        let foreign = bind(Some(files(&node(&theirs, &["127.0.0.1"], false), &ours)));
        let (c, s) = handshake(&client, &foreign).await;
        assert!(c.as_ref().is_err_and(|e| e.contains("UnknownIssuer")), "{c:?}");
        assert!(s.is_err());
        let expired = bind(Some(files(&node(&ours, &["127.0.0.1"], true), &ours)));
        let (c, s) = handshake(&client, &expired).await;
        assert!(c.as_ref().is_err_and(|e| e.contains("expired")), "{c:?}");
        assert!(s.is_err());
        // And the expired node's certificate is refused as a client's too.
        let (c, s) = handshake(&expired, &client).await;
        assert!(s.as_ref().is_err_and(|e| e.contains("expired")), "{s:?}");
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn pki_and_zero_configuration_do_not_mix() {
        let ca = ca("CA one");
        let pki = bind(Some(files(&node(&ca, &["127.0.0.1"], false), &ca)));
        let zero = bind(None);
        let (c, s) = handshake(&zero, &pki).await;
        assert!(c.is_err() && s.is_err(), "{c:?} {s:?}");
        let (c, s) = handshake(&pki, &zero).await;
        assert!(c.is_err() && s.is_err(), "{c:?} {s:?}");
        // Zero-configuration endpoints still connect to each other.
        let other = bind(None);
        assert_eq!(handshake(&zero, &other).await, (Ok(()), Ok(())));
    }

    /// A closed endpoint that is still referenced (as the VM's terms keep it until the
    /// garbage collector frees them) with a connection still draining holds its port;
    /// once released the port can be bound again at once, and the peer was told.
    #[tokio::test]
    async fn a_released_endpoint_gives_its_port_back_while_still_held() {
        let server = bind(None);
        let client = bind(None);
        let addr = server.local_addr().unwrap();
        let (to_server, _from_client) =
            tokio::join!(async { client.quic.connect(addr, SERVER_NAME).unwrap().await.unwrap() }, async {
                server.quic.accept().await.unwrap().await.unwrap()
            });
        server.close();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let taken = std::net::UdpSocket::bind(addr).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(taken, Err(std::io::ErrorKind::AddrInUse), "closed, but held and draining");
        assert!(server.holds_port());
        server.release_port().await;
        assert!(!server.holds_port());
        std::net::UdpSocket::bind(addr).expect("the port is free once released");
        let closed = tokio::time::timeout(std::time::Duration::from_secs(2), to_server.closed()).await.unwrap();
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(close_code::SHUTDOWN)),
            "{closed:?}"
        );
    }

    /// Released after a rebind: neither the old port nor the new one stays bound.
    #[tokio::test]
    async fn release_after_a_rebind_frees_every_port() {
        let endpoint = bind(None);
        let first = endpoint.local_addr().unwrap();
        endpoint.rebind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let second = endpoint.local_addr().unwrap();
        assert_ne!(first.port(), second.port());
        endpoint.close();
        endpoint.release_port().await;
        std::net::UdpSocket::bind(first).expect("the first port is free");
        std::net::UdpSocket::bind(second).expect("the second port is free");
    }

    #[tokio::test]
    async fn bad_pki_files_fail_the_bind_with_a_tls_error() {
        let ca = ca("CA one");
        let mut files = files(&node(&ca, &["127.0.0.1"], false), &ca);
        files.keyfile = files.keyfile.with_file_name("missing.key");
        let settings = Settings { pki: Some(files), ..Settings::default() };
        let e = Endpoint::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), settings).err().unwrap();
        assert!(matches!(e, BindError::Tls(_)));
        assert!(e.to_string().starts_with("keyfile "), "{e}");
    }
}
