//! A node's QUIC endpoint: one UDP socket that both accepts and initiates connections,
//! so the port in the node name is also the source port of its outgoing connections.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use quinn::{ClientConfig, EndpointConfig, RecvStream, SendStream, ServerConfig, TokioRuntime};
use thiserror::Error;
use tokio::sync::Semaphore;

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
    #[error("too many handshakes in progress")]
    Overloaded,
    #[error("handshake failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    TimedOut,
}

/// An established connection with its control stream.
pub struct Established {
    pub quic: quinn::Connection,
    pub control: (SendStream, RecvStream),
}

/// A bound QUIC endpoint.
pub struct Endpoint {
    quic: quinn::Endpoint,
    settings: Arc<Settings>,
    handshake_slots: Arc<Semaphore>,
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
            handshake_slots: Arc::new(Semaphore::new(settings.max_pending_handshakes)),
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
            Ok::<_, ConnectError>(Established { quic, control })
        };
        tokio::time::timeout(self.settings.handshake_timeout, handshake)
            .await
            .unwrap_or(Err(ConnectError::TimedOut))
    }

    /// Accepts connections until the endpoint closes, calling `on_connection` for each
    /// one whose handshake completed and whose control stream opened, and `on_refused`
    /// for each one that failed. At most `max_pending_handshakes` run at once; the rest
    /// are refused at once, before any cryptography is done for them.
    pub async fn accept_loop(
        &self,
        on_connection: impl Fn(Established) + Send + Sync + 'static,
        on_refused: impl Fn(SocketAddr, AcceptError) + Send + Sync + 'static,
    ) {
        let on_connection = Arc::new(on_connection);
        let on_refused = Arc::new(on_refused);
        while let Some(incoming) = self.quic.accept().await {
            let peer = incoming.remote_address();
            let Ok(slot) = self.handshake_slots.clone().try_acquire_owned() else {
                incoming.refuse();
                on_refused(peer, AcceptError::Overloaded);
                continue;
            };
            let timeout = self.settings.handshake_timeout;
            let (on_connection, on_refused) = (on_connection.clone(), on_refused.clone());
            tokio::spawn(async move {
                let handshake = async {
                    let quic = incoming.await?;
                    let control = quic.accept_bi().await?;
                    Ok::<_, AcceptError>(Established { quic, control })
                };
                let result = tokio::time::timeout(timeout, handshake).await.unwrap_or(Err(AcceptError::TimedOut));
                drop(slot);
                match result {
                    Ok(established) => on_connection(established),
                    Err(error) => on_refused(peer, error),
                }
            });
        }
    }

    /// Closes every connection (sending CONNECTION_CLOSE) and stops accepting.
    pub fn close(&self) {
        self.quic.close(quinn::VarInt::from_u32(crate::connection::close_code::SHUTDOWN), b"shutdown");
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
