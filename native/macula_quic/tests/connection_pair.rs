#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers outside #[test] functions.

//! Two endpoints on loopback, driven the way the NIF drives them, with events collected
//! on channels instead of Erlang mailboxes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use macula_quic::auth::Role;
use macula_quic::frame::OutgoingPacket;
use macula_quic::{CloseReason, Connection, Credit, Endpoint, Events, Settings};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug)]
enum Event {
    Handshake(Vec<u8>),
    Data(Vec<Vec<u8>>, Credit),
    Writable,
    Closed(CloseReason),
}

struct ChannelEvents(UnboundedSender<Event>);

impl Events for ChannelEvents {
    type Packet = Vec<u8>;
    fn handshake_frame(&self, frame: Vec<u8>) {
        let _ = self.0.send(Event::Handshake(frame));
    }
    fn data(&self, packets: Vec<Vec<u8>>, credit: Credit) {
        let _ = self.0.send(Event::Data(packets, credit));
    }
    fn writable(&self) {
        let _ = self.0.send(Event::Writable);
    }
    fn closed(&self, reason: &CloseReason) {
        let _ = self.0.send(Event::Closed(reason.clone()));
    }
}

type Side = (Arc<Connection<ChannelEvents>>, UnboundedReceiver<Event>);

fn test_settings() -> Settings {
    Settings { tick_time: Duration::from_secs(4), ..Settings::default() }
}

fn bind(settings: Settings) -> Endpoint {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), settings).unwrap()
}

/// A connected pair: (initiator, acceptor).
async fn pair() -> (Side, Side, Arc<Endpoint>, Arc<Endpoint>) {
    pair_with(test_settings(), test_settings()).await
}

async fn pair_with(client: Settings, server: Settings) -> (Side, Side, Arc<Endpoint>, Arc<Endpoint>) {
    let server = Arc::new(bind(server));
    let client = Arc::new(bind(client));
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

/// Packets framed as the NIF frames them (copied pieces).
fn framed(conn: &Connection<ChannelEvents>, packets: &[&[u8]]) -> Vec<OutgoingPacket> {
    let mut encoder = conn.encoder();
    packets
        .iter()
        .map(|p| {
            let mut packet = encoder.packet(p.len()).unwrap();
            packet.copy(p);
            packet.finish().unwrap()
        })
        .collect()
}

/// A SEND_SENDER control message from pid number `id` of node a@b, then `payload`.
fn from_sender(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![112, 131, 104, 3, 97, 22, 88, 119, 3, b'a', b'@', b'b'];
    bytes.extend_from_slice(&[0, 0, 0, id, 0, 0, 0, 0, 0, 0, 0, 1]);
    bytes.extend_from_slice(&[88, 119, 3, b'c', b'@', b'd', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
    bytes.extend_from_slice(payload);
    bytes
}

/// Activates both sides of a fresh pair.
async fn activated(client: &Side, server: &mut Side) {
    take(&server.0, &mut server.1).await;
    client.0.activate().unwrap();
    server.0.activate().unwrap();
}

#[tokio::test]
async fn handshake_frames_then_data_in_order() {
    let ((client, mut client_rx), (server, mut server_rx), _c, _s) = pair().await;
    assert_eq!(take(&server, &mut server_rx).await, b"hello");
    server.send_handshake(b"sok").unwrap();
    assert_eq!(take(&client, &mut client_rx).await, b"sok");

    // Data sent before the receiver is activated waits in QUIC's buffers.
    client.send_data(framed(&client, &[b"one", b"two"])).unwrap();
    client.activate().unwrap();
    server.activate().unwrap();
    let mut received = Vec::new();
    while received.len() < 3 {
        if received.len() == 2 {
            client.send_data(framed(&client, &[b"three"])).unwrap();
        }
        match next(&mut server_rx).await {
            Event::Data(packets, credit) => {
                received.extend(packets);
                server.ack_data(credit);
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
    let server_settings = Settings { max_packet: 1024, ..test_settings() };
    let ((client, mut client_rx), (server, mut server_rx), _c, _s) = pair_with(test_settings(), server_settings).await;
    take(&server, &mut server_rx).await;
    server.activate().unwrap();
    client.send_data(framed(&client, &[&[7; 5000]])).unwrap();
    // The receiver accepts 1 KiB: the frame is refused as soon as its header arrives.
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

/// Receives data packets until `count` have arrived, acknowledging each delivery.
async fn receive(server: &mut Side, count: usize) -> Vec<Vec<u8>> {
    let (conn, rx) = server;
    let mut received = Vec::new();
    while received.len() < count {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap() {
            Event::Data(packets, credit) => {
                received.extend(packets);
                conn.ack_data(credit);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    received
}

#[tokio::test]
async fn a_small_sender_overtakes_another_senders_bulk_transfer() {
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    // Sender 1 queues 64 MiB; then sender 2 queues one small packet.
    let chunk = vec![1u8; 1 << 20];
    let bulk: Vec<Vec<u8>> = (0..64).map(|_| from_sender(1, &chunk)).collect();
    let refs: Vec<&[u8]> = bulk.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let small = from_sender(2, b"ping");
    client.0.send_data(framed(&client.0, &[&small])).unwrap();
    let received = receive(&mut server, 65).await;
    let at = received.iter().position(|p| p == &small).unwrap();
    assert!(at < 32, "the small packet arrived after {at} bulk packets");
    // Each sender's own packets keep their order (all bulk packets are alike, so count them).
    assert_eq!(received.iter().filter(|p| p.len() == bulk[0].len()).count(), 64);
    assert_eq!(client.0.data_streams().0, 2, "two senders, two streams opened");
}

#[tokio::test]
async fn single_stream_mode_keeps_one_total_order() {
    let one = Settings { data_streams: std::num::NonZeroU8::MIN, ..test_settings() };
    let (client, mut server, _ce, _se) = pair_with(one.clone(), one).await;
    activated(&client, &mut server).await;
    let packets: Vec<Vec<u8>> = (0..200u8).map(|i| from_sender(i, &vec![i; 20_000])).collect();
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let received = receive(&mut server, 200).await;
    assert_eq!(received, packets);
    assert_eq!(client.0.data_streams(), (1, 0, 1));
    assert_eq!(server.0.data_streams().1, 1);
}

#[tokio::test]
async fn per_sender_order_holds_across_interleaved_senders() {
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    // 20 senders, 50 packets each, sizes varying, all sent interleaved.
    let mut packets = Vec::new();
    for seq in 0..50u16 {
        for sender in 0..20u8 {
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(2 + (usize::from(sender) * 997 + usize::from(seq) * 31) % 70_000, 0);
            packets.push((sender, from_sender(sender, &payload)));
        }
    }
    let refs: Vec<&[u8]> = packets.iter().map(|(_, p)| p.as_slice()).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let received = receive(&mut server, packets.len()).await;
    let mut next_seq = [0u16; 20];
    for p in &received {
        // Byte 15 is the sender's pid number; the payload starts after the 42-byte head.
        let sender = usize::from(p[15]);
        let seq = u16::from_be_bytes([p[42], p[43]]);
        assert_eq!(seq, next_seq[sender], "sender {sender} out of order");
        next_seq[sender] += 1;
    }
    assert_eq!(next_seq, [50; 20]);
}

#[tokio::test]
async fn data_on_several_streams_before_activation_is_delivered_after_it() {
    let (client, mut server, _ce, _se) = pair().await;
    take(&server.0, &mut server.1).await;
    client.0.activate().unwrap();
    let packets: Vec<Vec<u8>> = (1..=5u8).map(|i| from_sender(i, b"early")).collect();
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    // Let every stream reach the receiver before it activates.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.0.data_streams().1, 5);
    server.0.activate().unwrap();
    let mut received = receive(&mut server, 5).await;
    received.sort();
    assert_eq!(received, packets);
}

#[tokio::test]
async fn packets_larger_than_half_the_stream_window_flow() {
    let small_window = Settings { stream_window: 2 << 20, ..test_settings() };
    let (client, mut server, _ce, _se) = pair_with(small_window.clone(), small_window).await;
    activated(&client, &mut server).await;
    let chunk = vec![3u8; 1 << 20];
    let bulk: Vec<Vec<u8>> = (0..20).map(|_| from_sender(1, &chunk)).collect();
    let refs: Vec<&[u8]> = bulk.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    assert_eq!(receive(&mut server, 20).await.len(), 20);
}

/// Bulk one way (16 packets of 1 MiB in flight, each acknowledged by a small packet
/// the other way) while another pair of senders ping-pongs: nothing may stall, and
/// neither may starve the other. Counted in progress, not time, so a loaded host
/// slows it down without failing it: 50 pings must complete before 1000 bulk
/// packets have.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn bulk_with_acks_and_ping_pong_never_stall() {
    const ENOUGH: u32 = 50;
    const STARVED: u32 = 1000;
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let (c, mut crx) = client;
    let (s, mut srx) = server;
    let chunk = vec![5u8; 1 << 20];
    let bulk = from_sender(1, &chunk);
    let ack = from_sender(7, b"ack");
    let ping = from_sender(2, b"ping");
    let pong = from_sender(8, b"pong");
    let send = |conn: &Connection<ChannelEvents>, p: &[u8]| {
        conn.send_data(framed(conn, &[p])).unwrap();
    };
    for _ in 0..16 {
        send(&c, &bulk);
    }
    send(&c, &ping);
    let (mut bulks, mut pings) = (0u32, 0u32);
    while bulks < ENOUGH || pings < ENOUGH {
        assert!(bulks < STARVED && pings < STARVED * 100, "one starved: bulk {bulks} pings {pings}");
        tokio::select! {
            event = srx.recv() => match event.unwrap() {
                Event::Data(packets, credit) => {
                    for p in packets {
                        if p == bulk { bulks += 1; send(&s, &ack); } else if p == ping { send(&s, &pong); }
                    }
                    s.ack_data(credit);
                }
                other => panic!("server: {other:?}"),
            },
            event = crx.recv() => match event.unwrap() {
                Event::Data(packets, credit) => {
                    for p in packets {
                        if p == ack { send(&c, &bulk); } else if p == pong { pings += 1; send(&c, &ping); }
                    }
                    c.ack_data(credit);
                }
                Event::Writable => {}
                other => panic!("client: {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                panic!("stalled after {bulks} bulk packets and {pings} pings");
            }
        }
    }
}

#[tokio::test]
async fn the_accepting_side_opens_every_stream_of_its_pool() {
    let (mut client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let packets: Vec<Vec<u8>> = (1..=20u8).map(|i| from_sender(i, b"from the acceptor")).collect();
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    server.0.send_data(framed(&server.0, &refs)).unwrap();
    let mut received = receive(&mut client, 20).await;
    received.sort();
    assert_eq!(received, packets);
    assert_eq!(server.0.data_streams().0, 8);
    assert_eq!(client.0.data_streams().1, 8);
}

/// A graceful close after data on several streams: every packet queued before it is
/// delivered, then the peer reports the close within a few milliseconds (it does not
/// wait for ACKs, and it waits for every data stream the closing side announced).
#[tokio::test]
async fn graceful_close_after_data_delivers_it_all_then_closes_at_once() {
    let (mut client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let packets: Vec<Vec<u8>> = (0..1000u32).map(|i| from_sender((i % 5) as u8, &i.to_be_bytes().repeat(16))).collect();
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let closing = std::time::Instant::now();
    client.0.close_gracefully();
    let mut received = Vec::new();
    let reason = loop {
        match next(&mut server.1).await {
            Event::Data(batch, credit) => {
                received.extend(batch);
                server.0.ack_data(credit);
            }
            Event::Closed(reason) => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reason, CloseReason::PeerClosed);
    let mut expected = packets.clone();
    expected.sort();
    received.sort();
    assert_eq!(received, expected);
    assert!(closing.elapsed() < Duration::from_millis(200), "{:?}", closing.elapsed());
    assert!(matches!(next(&mut client.1).await, Event::Closed(_)));
    assert!(client.0.data_streams().0 > 1, "the close covered several data streams");
}

/// A packet whose control message names no sender: the MONITOR_P_EXIT of a monitor by
/// registered name, `{21, 'registered', ToPid, ...}` (enough of it for the router).
fn without_sender(tag: u8) -> Vec<u8> {
    let mut bytes = vec![112, 131, 104, 5, 97, 21, 119, 10];
    bytes.extend_from_slice(b"registered");
    bytes.extend_from_slice(&[88, 119, 3, b'c', b'@', b'd', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, tag]);
    bytes
}

/// Senders 1 to 3 each queue 8 MiB on their own streams, then a packet without a sender
/// goes on the fixed stream: it must be delivered after all of it, though it is tiny and
/// the receiver reads every stream at once. What a sender sends after it is not held.
#[tokio::test]
async fn a_packet_without_a_sender_comes_after_what_was_sent_before_it() {
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    // Sender 9 takes the fixed stream, so the bulk senders get streams of their own.
    let first = from_sender(9, b"first");
    client.0.send_data(framed(&client.0, &[&first])).unwrap();
    let chunk = vec![4u8; 1 << 20];
    let mut bulk = Vec::new();
    for _ in 0..8 {
        for sender in 1..=3 {
            bulk.push(from_sender(sender, &chunk));
        }
    }
    let down = without_sender(1);
    let after = from_sender(9, b"after");
    let mut packets: Vec<&[u8]> = bulk.iter().map(Vec::as_slice).collect();
    packets.push(&down);
    packets.push(&after);
    client.0.send_data(framed(&client.0, &packets)).unwrap();
    let received = receive(&mut server, 2 + bulk.len() + 1).await;
    assert_eq!(received[0], first);
    let at = received.iter().position(|p| p == &down).unwrap();
    assert_eq!(at, 1 + bulk.len(), "the packet without a sender overtook bulk packets");
    assert_eq!(received.last(), Some(&after));
    assert!(client.0.data_streams().0 >= 4, "the bulk went on streams of their own");
}

/// Sender 1 queues 16 MiB on its normal stream, is then marked for priority (its next
/// packets are of the priority class) and sends small packets: they go on the priority
/// stream, which the receiver reads at once, yet arrive after all of its bulk.
#[tokio::test]
async fn a_sender_marked_mid_connection_moves_to_the_priority_stream_in_order() {
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let chunk = vec![6u8; 1 << 20];
    let bulk: Vec<Vec<u8>> = (0..16).map(|_| from_sender(1, &chunk)).collect();
    let refs: Vec<&[u8]> = bulk.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let small: Vec<Vec<u8>> = (0..3u8).map(|i| from_sender(1, &[b's', i])).collect();
    let refs: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
    let mut marked = framed(&client.0, &refs);
    marked.iter_mut().for_each(OutgoingPacket::prioritise);
    client.0.send_data(marked).unwrap();
    let received = receive(&mut server, bulk.len() + small.len()).await;
    assert_eq!(&received[..bulk.len()], &bulk[..], "the bulk first, in order");
    assert_eq!(&received[bulk.len()..], &small[..], "then the small packets, in order");
    let (out, _, _) = client.0.data_streams();
    assert!(out >= 2, "the small packets took a stream of their own ({out} opened)");
}

/// A raw data stream of `client`'s QUIC connection carrying `bytes` after the stream
/// kind; kept open (a dropped stream ends, which is a violation of its own).
async fn raw_stream(client: &Connection<ChannelEvents>, bytes: &[u8]) -> quinn::SendStream {
    let mut stream = client.quic().open_uni().await.unwrap();
    stream.write_all(&[&[0][..], bytes].concat()).await.unwrap();
    stream
}

fn data_frame(packet: &[u8]) -> Vec<u8> {
    [&(packet.len() as u32).to_be_bytes()[..], packet].concat()
}

/// Waits for the server to close the connection as a protocol violation; its reason.
async fn violation(server: &mut Side) -> String {
    loop {
        match next(&mut server.1).await {
            Event::Closed(CloseReason::ProtocolViolation(why)) => return why,
            Event::Data(_, credit) => server.0.ack_data(credit),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn hostile_markers_close_the_connection_naming_the_fault() {
    use macula_quic::frame::{fence_marker, wait_marker};
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![vec![0, 0, 0, 0, 7, 1, 2, 3]], "unknown marker type 7"),
        (vec![fence_marker(40, 1).to_vec()], "fence names stream 40"),
        (vec![[fence_marker(2, 5), fence_marker(2, 5)].concat()], "fence 5 after fence 5"),
        (vec![fence_marker(3, 1).to_vec(), fence_marker(3, 2).to_vec()], "two data streams name themselves stream 3"),
        (vec![wait_marker(1, 0).to_vec()], "wait 1 names no stream"),
        (vec![wait_marker(1, 1 << 40).to_vec()], "names no stream or one beyond"),
        (vec![[wait_marker(3, 2), wait_marker(1, 2)].concat()], "wait 1 after wait 3"),
    ];
    for (streams, expected) in cases {
        let (client, mut server, _ce, _se) = pair().await;
        activated(&client, &mut server).await;
        let mut open = Vec::new();
        for bytes in &streams {
            open.push(raw_stream(&client.0, bytes).await);
        }
        let why = violation(&mut server).await;
        assert!(why.contains(expected), "expected {expected:?}, got {why:?}");
    }
}

/// A wait for a fence that does not come holds only its own stream (bounded: the reader
/// stops reading) while the rest of the connection works; the fence releases it.
#[tokio::test]
async fn a_wait_for_a_missing_fence_holds_only_its_stream() {
    use macula_quic::frame::{fence_marker, wait_marker};
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let held = b"held".to_vec();
    let _waiting = raw_stream(&client.0, &[&wait_marker(1, 1 << 5)[..], &data_frame(&held)].concat()).await;
    let ordinary: Vec<Vec<u8>> = (1..=3u8).map(|i| from_sender(i, b"meanwhile")).collect();
    let refs: Vec<&[u8]> = ordinary.iter().map(Vec::as_slice).collect();
    client.0.send_data(framed(&client.0, &refs)).unwrap();
    let mut received = receive(&mut server, 3).await;
    received.sort();
    assert_eq!(received, ordinary);
    assert!(tokio::time::timeout(Duration::from_millis(300), server.1.recv()).await.is_err(), "held packet came");
    let _fencing = raw_stream(&client.0, &fence_marker(5, 1)).await;
    assert_eq!(receive(&mut server, 1).await, vec![held]);
}

/// A stream that ends before the fence a wait needs: the wait can never be met.
#[tokio::test]
async fn a_stream_ending_short_of_a_fence_is_a_violation() {
    use macula_quic::frame::{fence_marker, wait_marker};
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let _waiting = raw_stream(&client.0, &[&wait_marker(2, 1 << 6)[..], &data_frame(b"never")].concat()).await;
    let mut short = raw_stream(&client.0, &fence_marker(6, 1)).await;
    short.finish().unwrap();
    let why = violation(&mut server).await;
    assert!(why.contains("stream 6 ended before fence 2"), "{why}");
}

/// A reader held by a wait, with so much held that it reads no further, ends when the
/// connection does: nothing keeps the connection.
#[tokio::test]
async fn a_held_reader_ends_with_its_connection() {
    use macula_quic::frame::wait_marker;
    let (client, mut server, _ce, _se) = pair().await;
    activated(&client, &mut server).await;
    let mut held = wait_marker(1, 1 << 5).to_vec();
    for _ in 0..4 {
        held.extend(data_frame(&vec![1; 1 << 20]));
    }
    let _waiting = raw_stream(&client.0, &held).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.0.close();
    assert!(matches!(next(&mut server.1).await, Event::Closed(CloseReason::PeerClosed)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while Arc::strong_count(&server.0) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "{} holders left", Arc::strong_count(&server.0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
