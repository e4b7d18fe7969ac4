#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers outside #[test] functions.

//! Two endpoints on loopback, driven the way the NIF drives them, with events collected
//! on channels instead of Erlang mailboxes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_quic::auth::Role;
use macula_quic::frame::data_frame_header;
use macula_quic::{CloseReason, Connection, Endpoint, Events, Settings};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug)]
enum Event {
    Handshake(Vec<u8>),
    Data(Vec<Vec<u8>>),
    Writable,
    Closed(CloseReason),
}

struct ChannelEvents(UnboundedSender<Event>);

impl Events for ChannelEvents {
    type Packet = Vec<u8>;
    fn handshake_frame(&self, frame: Vec<u8>) {
        let _ = self.0.send(Event::Handshake(frame));
    }
    fn data(&self, packets: Vec<Vec<u8>>) {
        let _ = self.0.send(Event::Data(packets));
    }
    fn writable(&self) {
        let _ = self.0.send(Event::Writable);
    }
    fn closed(&self, reason: &CloseReason) {
        let _ = self.0.send(Event::Closed(reason.clone()));
    }
}

type Side = (Arc<Connection<ChannelEvents>>, UnboundedReceiver<Event>);

fn bind() -> Endpoint {
    let settings = Settings { tick_time: Duration::from_secs(4), ..Settings::default() };
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), settings).unwrap()
}

/// A connected pair: (initiator, acceptor).
async fn pair() -> (Side, Side, Arc<Endpoint>, Arc<Endpoint>) {
    let server = Arc::new(bind());
    let client = Arc::new(bind());
    let addr: SocketAddr = server.local_addr().unwrap();
    let (accepted_tx, mut accepted_rx) = unbounded_channel();
    let acceptor = server.clone();
    tokio::spawn(async move {
        acceptor
            .accept_loop(
                move |established| {
                    let _ = accepted_tx.send(established);
                },
                |_, _| {},
            )
            .await;
    });
    let settings = client.settings().clone();
    let established = client.connect(addr).await.unwrap();
    let (tx, rx) = unbounded_channel();
    let initiator = Connection::start(established, true, ChannelEvents(tx), settings);
    // The acceptor sees the connection once the control stream carries a first frame.
    initiator.send_handshake(b"hello").unwrap();
    let established = accepted_rx.recv().await.unwrap();
    let (tx2, rx2) = unbounded_channel();
    let accepted = Connection::start(established, false, ChannelEvents(tx2), server.settings().clone());
    ((initiator, rx), (accepted, rx2), client, server)
}

async fn next(rx: &mut UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("event in time").expect("channel open")
}

/// The next handshake message: taken at once if it is there, else awaited as an event.
async fn take(conn: &Connection<ChannelEvents>, rx: &mut UnboundedReceiver<Event>) -> Vec<u8> {
    match conn.take_handshake_frame().unwrap() {
        Some(frame) => frame,
        None => match next(rx).await {
            Event::Handshake(frame) => frame,
            other => panic!("unexpected {other:?}"),
        },
    }
}

#[tokio::test]
async fn unconsumed_handshake_message_fails_activation() {
    let ((client, _crx), (server, mut server_rx), _c, _s) = pair().await;
    take(&server, &mut server_rx).await;
    client.send_handshake(b"extra").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.activate().is_err());
    assert!(matches!(next(&mut server_rx).await, Event::Closed(CloseReason::ProtocolViolation(_))));
}

fn framed(packets: &[&[u8]]) -> Vec<Bytes> {
    let mut out = Vec::new();
    for p in packets {
        out.extend_from_slice(&data_frame_header(p.len()).unwrap());
        out.extend_from_slice(p);
    }
    vec![Bytes::from(out)]
}

#[tokio::test]
async fn handshake_frames_then_data_in_order() {
    let ((client, mut client_rx), (server, mut server_rx), _c, _s) = pair().await;
    assert_eq!(take(&server, &mut server_rx).await, b"hello");
    server.send_handshake(b"sok").unwrap();
    assert_eq!(take(&client, &mut client_rx).await, b"sok");

    // Data sent before the receiver is activated waits in QUIC's buffers.
    client.send_data(framed(&[b"one", b"two"]), 2).unwrap();
    client.activate().unwrap();
    server.activate().unwrap();
    let mut received = Vec::new();
    while received.len() < 3 {
        if received.len() == 2 {
            client.send_data(framed(&[b"three"]), 1).unwrap();
        }
        match next(&mut server_rx).await {
            Event::Data(packets) => {
                received.extend(packets);
                server.ack_data();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    assert_eq!(client.stats().sent, 3);
    assert!(server.stats().received > 0);
}

#[tokio::test]
async fn cookie_proofs_agree_only_on_the_same_session() {
    let ((client, _crx), (server, _srx), _c, _s) = pair().await;
    let proof = client.prove(b"cookie", Role::Initiator, b"1@127.0.0.1").unwrap();
    assert!(server.verify_peer(b"cookie", Role::Initiator, b"1@127.0.0.1", &proof).unwrap());
    assert!(!server.verify_peer(b"other", Role::Initiator, b"1@127.0.0.1", &proof).unwrap());

    // A second connection has another exporter: the proof does not transfer.
    let ((client2, _c2rx), (server2, _s2rx), _c2, _s2) = pair().await;
    assert!(!server2.verify_peer(b"cookie", Role::Initiator, b"1@127.0.0.1", &proof).unwrap());
    drop(client2);
}

#[tokio::test]
async fn oversized_data_frame_closes_only_that_connection() {
    let ((client, mut client_rx), (server, mut server_rx), _c, _s) = pair().await;
    take(&server, &mut server_rx).await;
    server.activate().unwrap();
    client.send_data(vec![Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])], 1).unwrap();
    // The default limit is 1 GiB: 4 GiB - 1 is refused as soon as the header arrives.
    match next(&mut server_rx).await {
        Event::Closed(CloseReason::ProtocolViolation(why)) => assert!(why.contains("exceeds"), "{why}"),
        other => panic!("unexpected {other:?}"),
    }
    match next(&mut client_rx).await {
        Event::Closed(CloseReason::PeerError { code, .. }) => assert_eq!(code, 1),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn last_handshake_frame_can_be_taken_after_the_close() {
    let ((client, mut client_rx), (server, _srx), _c, _s) = pair().await;
    server.send_handshake(b"snok").unwrap();
    server.close_gracefully();
    assert!(matches!(next(&mut client_rx).await, Event::Closed(CloseReason::PeerClosed)));
    assert_eq!(client.take_handshake_frame().unwrap(), Some(b"snok".to_vec()));
    assert!(client.take_handshake_frame().is_err());
}

#[tokio::test]
async fn graceful_close_delivers_the_last_handshake_frame() {
    let ((client, mut client_rx), (server, _srx), _c, _s) = pair().await;
    server.send_handshake(b"snok").unwrap();
    server.close_gracefully();
    assert_eq!(take(&client, &mut client_rx).await, b"snok");
    assert!(matches!(next(&mut client_rx).await, Event::Closed(CloseReason::PeerClosed)));
}

/// A graceful close after data: every packet queued before it is delivered, then the
/// peer reports the close, within a few milliseconds (it does not wait for ACKs).
#[tokio::test]
async fn graceful_close_after_data_delivers_it_all_then_closes_at_once() {
    let ((client, mut client_rx), (server, mut server_rx), _c, _s) = pair().await;
    take(&server, &mut server_rx).await;
    server.send_handshake(b"sok").unwrap();
    take(&client, &mut client_rx).await;
    client.activate().unwrap();
    server.activate().unwrap();
    let packets: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().repeat(16)).collect();
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    client.send_data(framed(&refs), 1000).unwrap();
    let closing = std::time::Instant::now();
    client.close_gracefully();
    let mut received = Vec::new();
    let reason = loop {
        match next(&mut server_rx).await {
            Event::Data(batch) => {
                received.extend(batch);
                server.ack_data();
            }
            Event::Closed(reason) => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reason, CloseReason::PeerClosed);
    assert_eq!(received, packets);
    assert!(closing.elapsed() < Duration::from_millis(200), "{:?}", closing.elapsed());
    assert!(matches!(next(&mut client_rx).await, Event::Closed(_)));
}
