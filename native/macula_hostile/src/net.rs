//! Addresses, the tokio runtime and the QUIC client every attack dials with.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use macula_quic::tls;
use quinn::{ClientConfig, ConnectionError, Endpoint, TransportConfig, VarInt};

use crate::Res;

pub fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Parses `ip:port` and refuses anything but loopback (unless explicitly allowed), so
/// a mistyped argument cannot aim an attack at another host.
pub fn addr(text: &str) -> Res<SocketAddr> {
    let addr: SocketAddr = text.parse().map_err(|e| format!("bad address {text:?}: {e}"))?;
    let allowed = std::env::var("MACULA_HOSTILE_ALLOW_NON_LOOPBACK").as_deref() == Ok("1");
    if !addr.ip().is_loopback() && !allowed {
        return Err(format!("{addr} is not a loopback address (set MACULA_HOSTILE_ALLOW_NON_LOOPBACK=1)").into());
    }
    Ok(addr)
}

/// A loopback address of the same family as `target`, any port: where to bind.
pub fn local_for(target: SocketAddr) -> SocketAddr {
    if target.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
    }
}

/// Long idle timeout and keep-alives: the tool's own connections stay up for as long
/// as the node under test keeps them, so what closes them is the node.
pub fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(VarInt::from_u32(60_000).into())).keep_alive_interval(Some(Duration::from_secs(1)));
    Arc::new(t)
}

/// A client endpoint with a real node's zero-configuration TLS (any server
/// certificate, ALPN macula-dist/3, from the core).
pub fn client_endpoint(target: SocketAddr) -> Res<Endpoint> {
    let mut endpoint = Endpoint::client(local_for(target))?;
    let mut config = ClientConfig::new(Arc::new(tls::client_crypto()?));
    config.transport_config(transport());
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// One word for how a connection ended, then its details.
pub fn describe_close(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            format!("application_close code={} reason={:?}", close.error_code, String::from_utf8_lossy(&close.reason))
        }
        ConnectionError::ConnectionClosed(close) => format!("transport_close {close}"),
        ConnectionError::TimedOut => "idle_timeout".into(),
        ConnectionError::Reset => "stateless_reset".into(),
        ConnectionError::LocallyClosed => "locally_closed".into(),
        other => format!("other {other}"),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
