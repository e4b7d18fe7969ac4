//! A node's QUIC endpoint: one UDP socket that both accepts and initiates connections,
//! so the port in the node name is also the source port of its outgoing connections.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quinn::{ClientConfig, EndpointConfig, RecvStream, SendStream, ServerConfig, TokioRuntime, VarInt};
use thiserror::Error;
use tokio::sync::Notify;

use crate::connection::close_code;

use crate::settings::Settings;
use crate::tls::{self, Identity, TlsError};

/// Why an endpoint could not be opened.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("cannot bind udp {addr}: {source}")]
    Socket { addr: SocketAddr, source: std::io::Error },
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

/// An established connection with its control stream.
pub struct Established {
    pub quic: quinn::Connection,
    pub control: (SendStream, RecvStream),
    /// Opened once the peer has proved it knows the cookie.
    pub gate: Arc<Gate>,
}

/// Opened when a peer has authenticated; until then its connection is on probation.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicBool,
    opened: Notify,
}

impl Gate {
    /// Marks the peer as authenticated.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_one();
    }

    /// True once opened.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        while !self.is_open() {
            self.opened.notified().await;
        }
    }
}

/// The connections that have not authenticated yet, oldest first.
struct Unauthenticated {
    limit: usize,
    next_id: AtomicU64,
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

impl Unauthenticated {
    fn new(limit: usize) -> Self {
        Unauthenticated { limit: limit.max(1), next_id: AtomicU64::new(0), queue: Mutex::new(VecDeque::new()) }
    }

    /// Registers a new connection, evicting the oldest if the limit is reached.
    fn admit(&self) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.len() >= self.limit {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.notify_one();
            }
        }
        queue.push_back((id, evicted.clone()));
        (id, evicted)
    }

    fn remove(&self, id: u64) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != id);
    }
}

/// A bound QUIC endpoint.
pub struct Endpoint {
    quic: quinn::Endpoint,
    settings: Arc<Settings>,
    unauthenticated: Arc<Unauthenticated>,
}

impl Endpoint {
    /// Binds `addr` with a fresh ephemeral identity. Must run inside the tokio runtime.
    pub fn bind(addr: SocketAddr, settings: Settings) -> Result<Endpoint, BindError> {
        let identity = Identity::ephemeral()?;
        let socket = bind_socket(addr).map_err(|source| BindError::Socket { addr, source })?;
        let transport = settings.transport();
        let mut server = ServerConfig::with_crypto(Arc::new(tls::server_crypto(&identity)?));
        server.transport_config(transport.clone());
        let mut client = ClientConfig::new(Arc::new(tls::client_crypto()?));
        client.transport_config(transport);
        let mut config = EndpointConfig::default();
        config.max_udp_payload_size(settings.max_udp_payload.max(1200)).ok();
        let mut quic = quinn::Endpoint::new(config, Some(server), socket, Arc::new(TokioRuntime))
            .map_err(|source| BindError::Socket { addr, source })?;
        quic.set_default_client_config(client);
        Ok(Endpoint {
            unauthenticated: Arc::new(Unauthenticated::new(settings.max_pending_handshakes)),
            settings: Arc::new(settings),
            quic,
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

    /// Connects to `addr` and opens the control stream.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Established, ConnectError> {
        let connecting = self.quic.connect(addr, tls::SERVER_NAME)?;
        let handshake = async {
            let quic = connecting.await?;
            let control = quic.open_bi().await?;
            Ok::<_, ConnectError>(Established { quic, control, gate: Arc::new(Gate::default()) })
        };
        tokio::time::timeout(self.settings.handshake_timeout, handshake)
            .await
            .unwrap_or(Err(ConnectError::TimedOut))
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
            let (id, evicted) = self.unauthenticated.admit();
            let timeout = self.settings.handshake_timeout;
            let unauthenticated = self.unauthenticated.clone();
            let (on_connection, on_refused) = (on_connection.clone(), on_refused.clone());
            tokio::spawn(async move {
                let gate = Arc::new(Gate::default());
                let mut handed_over: Option<quinn::Connection> = None;
                let admitted = async {
                    let quic = incoming.await?;
                    let control = quic.accept_bi().await?;
                    handed_over = Some(quic.clone());
                    on_connection(Established { quic, control, gate: gate.clone() });
                    gate.wait().await;
                    Ok::<_, AcceptError>(())
                };
                let outcome = tokio::select! {
                    result = tokio::time::timeout(timeout, admitted) => result.unwrap_or(Err(AcceptError::TimedOut)),
                    _ = evicted.notified() => Err(AcceptError::Overloaded),
                };
                unauthenticated.remove(id);
                let Err(error) = outcome else { return };
                if let Some(quic) = handed_over {
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
        self.quic.close(VarInt::from_u32(close_code::SHUTDOWN), b"shutdown");
    }

    /// Resolves when every connection has finished closing.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await
    }

    /// Moves the endpoint to a new UDP socket (connection migration).
    pub fn rebind(&self, addr: SocketAddr) -> std::io::Result<()> {
        self.quic.rebind(bind_socket(addr)?)
    }
}

/// A UDP socket with large kernel buffers, so bursts are not dropped before QUIC sees them.
fn bind_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack on [::] so an IPv6 node also reaches IPv4 peers.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
