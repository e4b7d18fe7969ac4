//! `mitm`: terminates QUIC/TLS towards both sides with its own certificate and relays
//! the stream bytes unchanged: what an active attacker in the path can do without the
//! cookie.

use std::net::SocketAddr;
use std::sync::Arc;

use macula_quic::tls;
use quinn::{ConnectionError, Endpoint, RecvStream, SendStream, ServerConfig, VarInt};

use crate::{net, wire, Res};

pub async fn run(listen: SocketAddr, target: SocketAddr) -> Res<i32> {
    let identity = tls::Identity::ephemeral()?;
    let mut server_config = ServerConfig::with_crypto(Arc::new(tls::server_crypto(&identity)?));
    server_config.transport_config(net::transport());
    let server = Endpoint::server(server_config, listen)?;
    let client = net::client_endpoint(target)?;
    println!("MITM listening on {listen} forwarding to {target} with its own certificate");
    let mut id = 0u64;
    while let Some(incoming) = server.accept().await {
        id += 1;
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = mitm_connection(id, incoming, client, target).await {
                println!("MITM {id} ended: {e}");
            }
        });
    }
    Ok(0)
}

async fn mitm_connection(id: u64, incoming: quinn::Incoming, client: Endpoint, target: SocketAddr) -> Res<()> {
    let down = incoming.await?;
    println!("MITM {id} accepted {} (TLS terminated here)", down.remote_address());
    let up = client.connect(target, wire::SERVER_NAME)?.await?;
    println!("MITM {id} connected upstream to {target} (second TLS session)");
    // Bidirectional streams are opened by the dialing side; unidirectional ones by both.
    tokio::spawn(relay_bidi(id, down.clone(), up.clone()));
    tokio::spawn(relay_uni(id, down.clone(), up.clone(), "dialer->target"));
    tokio::spawn(relay_uni(id, up.clone(), down.clone(), "target->dialer"));
    let (closed_side, error, other) = tokio::select! {
        e = down.closed() => ("dialer", e, up.clone()),
        e = up.closed() => ("target", e, down.clone()),
    };
    println!("MITM {id} {closed_side} side closed: {}", net::describe_close(&error));
    match &error {
        ConnectionError::ApplicationClosed(close) => {
            other.close(close.error_code, &close.reason);
            println!("MITM {id} mirrored the close (code {}) to the other side", close.error_code);
        }
        _ => other.close(VarInt::from_u32(0), b"relay closed"),
    }
    Ok(())
}

async fn relay_bidi(id: u64, down: quinn::Connection, up: quinn::Connection) {
    while let Ok((down_send, down_recv)) = down.accept_bi().await {
        let Ok((up_send, up_recv)) = up.open_bi().await else { return };
        tokio::spawn(pipe(id, "control dialer->target", down_recv, up_send));
        tokio::spawn(pipe(id, "control target->dialer", up_recv, down_send));
    }
}

async fn relay_uni(id: u64, from: quinn::Connection, to: quinn::Connection, label: &'static str) {
    while let Ok(recv) = from.accept_uni().await {
        let Ok(send) = to.open_uni().await else { return };
        tokio::spawn(pipe(id, label, recv, send));
    }
}

async fn pipe(id: u64, label: &'static str, mut recv: RecvStream, mut send: SendStream) {
    let mut total = 0usize;
    loop {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                if total == 0 {
                    let head = &chunk.bytes[..chunk.bytes.len().min(8)];
                    println!("MITM {id} {label} first bytes {} (relayed unchanged)", net::hex(head));
                }
                total += chunk.bytes.len();
                if send.write_all(&chunk.bytes).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = send.finish();
                break;
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(0));
                break;
            }
        }
    }
    println!("MITM {id} {label} relayed {total} bytes");
}
