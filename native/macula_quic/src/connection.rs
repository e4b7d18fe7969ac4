//! One distribution connection over one QUIC connection.
//!
//! Streams:
//! * a bidirectional **control stream**, opened by the connecting side, that carries the
//!   cookie proofs and the `dist_util` handshake (2-byte frames) and then ticks (empty
//!   frames) at a higher send priority than data, so liveness never waits behind bulk
//!   traffic;
//! * unidirectional **data streams** carrying distribution packets (4-byte frames): one,
//!   in order (single-stream mode, `data_streams` 1), or a pool where each sending
//!   process keeps to one stream, plus one stream of higher urgency for prioritised
//!   processes (see [`crate::routing`]).
//!
//! Flow of bytes, outwards: `send_data` (NIF, never blocks) → per-stream queues
//! ([`crate::data_out`]) → one writer task per stream → QUIC. Inwards: QUIC → one reader
//! task per stream → [`Events::data`], which is only called while the Erlang input
//! handler holds delivery credit (shared fairly by the readers); without credit a reader
//! stops reading and QUIC flow control pushes back on that stream's sender.
//!
//! Nothing here trusts the peer: every malformed frame closes this connection only.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use thiserror::Error;
use tokio::sync::Notify;

use crate::admission::{Established, Gate};
use crate::auth::{self, Role, PROOF_LEN};
use crate::data_in::{Credit, Delivery, Inbound};
use crate::data_out::DataOut;
pub use crate::data_out::SendStatus;
use crate::fence::FenceBoard;
use crate::frame::{self, Frame, FrameDecoder, HeaderWidth, OutgoingPacket, PacketBuf};
use crate::graceful_close::{self, PeerEnded};
use crate::liveness;
use crate::routing::Class;
use crate::settings::Settings;
use crate::wire::{close_code, stream_kind, urgency};

/// Why a connection is refused before its peer authenticated. Each has its own close
/// code, so the refused peer can tell a wrong cookie from a rejected name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotAuthenticated,
    BadNodeName,
}

/// A refusal's reason phrase is cut to this many bytes: it must fit in one packet.
const MAX_REFUSAL_PHRASE: usize = 200;

/// Where a connection's events go. Implemented by the NIF (Erlang messages) and by tests.
pub trait Events: Send + Sync + 'static {
    /// Buffer type decoded data packets are assembled in.
    type Packet: PacketBuf + Send + 'static;
    /// A handshake message for a reader that found none waiting in
    /// [`Connection::take_handshake_frame`].
    fn handshake_frame(&self, frame: Vec<u8>);
    /// Complete distribution packets of one stream, in arrival order, holding `credit`
    /// until it comes back through [`Connection::ack_data`].
    fn data(&self, packets: Vec<Self::Packet>, credit: Credit);
    /// The send queues drained after [`Connection::send_data`] answered [`SendStatus::Busy`].
    fn writable(&self);
    /// The connection is gone; called once.
    fn closed(&self, reason: &CloseReason);
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed it normally, or restarted (stateless reset).
    PeerClosed,
    /// The peer closed it with an error code.
    PeerError { code: u64, reason: String },
    /// Nothing was heard from the peer for the idle timeout (`net_ticktime`).
    TimedOut,
    /// This side closed it normally.
    Local,
    /// This side closed it because the peer broke the protocol.
    ProtocolViolation(String),
    /// The peer failed authentication.
    NotAuthenticated(String),
    /// QUIC itself failed.
    Transport(String),
    /// An ICMP error said the peer is gone and a probe went unanswered (`crate::liveness`).
    Unreachable(String),
}

impl CloseReason {
    fn from_quic(error: &ConnectionError) -> CloseReason {
        match error {
            ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(close_code::SHUTDOWN) => {
                CloseReason::PeerClosed
            }
            ConnectionError::ApplicationClosed(close) => CloseReason::PeerError {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            ConnectionError::Reset => CloseReason::PeerClosed,
            ConnectionError::TimedOut => CloseReason::TimedOut,
            ConnectionError::LocallyClosed => CloseReason::Local,
            other => CloseReason::Transport(other.to_string()),
        }
    }
}

/// The connection is closed (or closing): the one way most operations fail.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
#[error("connection closed")]
pub struct Closed;

/// Why [`Connection::send_handshake`] failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeSendError {
    #[error(transparent)]
    Closed(#[from] Closed),
    #[error("handshake is over")]
    HandshakeOver,
    #[error(transparent)]
    TooLarge(#[from] frame::FrameError),
}

/// Counters for `dist_util`'s tick supervision (`mf_getstat`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames received from the peer (distribution packets, handshake messages and
    /// ticks): moves while the peer is alive.
    pub received: u64,
    /// Data packets queued plus ticks written.
    pub sent: u64,
    /// Bytes queued and not yet handed to QUIC.
    pub pending: u64,
}

/// Control-stream output: handshake frames, then ticks; finally, on a graceful close,
/// the end of the stream.
#[derive(Default)]
struct ControlOut {
    frames: Mutex<VecDeque<Vec<u8>>>,
    tick: AtomicBool,
    closing: AtomicBool,
    wake: Notify,
    /// Every data writer has ended its stream (graceful close).
    data_ended: Notify,
}

/// How long either side of a graceful close waits for the other's next step.
pub(crate) const GRACEFUL_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// A distribution connection; shared by the NIF resource and the driver tasks.
pub struct Connection<E: Events> {
    quic: quinn::Connection,
    gate: Arc<Gate>,
    events: E,
    settings: Arc<Settings>,
    initiator: bool,
    control_out: ControlOut,
    peer_ended: PeerEnded,
    data_out: DataOut,
    /// Data streams this side has opened.
    streams_out: AtomicUsize,
    /// Data writers that have not ended their stream yet (graceful close).
    writers_left: AtomicUsize,
    /// Data streams the peer has opened towards us.
    streams_in: AtomicUsize,
    handshake_in: Mutex<HandshakeInbox>,
    handshake_space: Notify,
    delivery: Delivery,
    /// How far each of the peer's data streams has delivered (`crate::fence`).
    fences: FenceBoard,
    activated: AtomicBool,
    activate: Notify,
    received: AtomicU64,
    sent: AtomicU64,
    probes: AtomicU64,
    close_reason: OnceLock<CloseReason>,
}

impl<E: Events> Connection<E> {
    /// Starts the driver tasks of an established QUIC connection whose control stream is
    /// open. Must run inside the tokio runtime.
    pub fn start(established: Established, initiator: bool, events: E, settings: Arc<Settings>) -> Arc<Self> {
        let Established { quic, control, gate, unreachable } = established;
        let data_out = DataOut::new(settings.data_streams, settings.send_queue_limit);
        let delivery = Delivery::new(settings.delivery_window);
        let writers = data_out.stream_count();
        let conn = Arc::new(Connection {
            quic,
            gate,
            events,
            settings,
            initiator,
            control_out: ControlOut::default(),
            peer_ended: PeerEnded::default(),
            data_out,
            streams_out: AtomicUsize::new(0),
            writers_left: AtomicUsize::new(writers),
            streams_in: AtomicUsize::new(0),
            handshake_in: Mutex::new(HandshakeInbox::default()),
            handshake_space: Notify::new(),
            delivery,
            fences: FenceBoard::default(),
            activated: AtomicBool::new(false),
            activate: Notify::new(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            close_reason: OnceLock::new(),
        });
        let (control_send, control_recv) = control;
        tokio::spawn(conn.clone().watch_close());
        tokio::spawn(conn.clone().write_control(control_send));
        tokio::spawn(conn.clone().read_control(control_recv));
        for index in 0..conn.data_out.stream_count() {
            tokio::spawn(conn.clone().write_data(index));
        }
        tokio::spawn(conn.clone().accept_data_streams());
        tokio::spawn(liveness::watch(conn.clone(), unreachable));
        conn
    }

    /// The event sink.
    pub fn events(&self) -> &E {
        &self.events
    }

    /// Queues one handshake message; it is framed and sent on the control stream.
    pub fn send_handshake(&self, message: &[u8]) -> Result<(), HandshakeSendError> {
        self.check_open()?;
        if self.activated.load(Ordering::Acquire) {
            return Err(HandshakeSendError::HandshakeOver);
        }
        let frame = frame::control_frame(message)?;
        lock(&self.control_out.frames).push_back(frame);
        self.control_out.wake.notify_one();
        Ok(())
    }

    /// The next handshake message, if one has arrived; otherwise the next one to arrive
    /// is delivered through [`Events::handshake_frame`]. Taking a waiting message here,
    /// in the caller's thread, saves a message hop per handshake step.
    pub fn take_handshake_frame(&self) -> Result<Option<Vec<u8>>, Closed> {
        let mut inbox = lock(&self.handshake_in);
        if let Some(frame) = inbox.frames.pop_front() {
            // Even after the connection closed: a peer's last words (a `nok` status
            // before it hangs up) must still be read.
            drop(inbox);
            self.handshake_space.notify_one();
            return Ok(Some(frame));
        }
        self.check_open()?;
        inbox.waiting = true;
        Ok(None)
    }

    /// Ends the handshake phase: data stream reading starts (with `delivery_window`
    /// bytes of delivery credit), and non-empty control frames become protocol
    /// violations.
    pub fn activate(&self) -> Result<(), Closed> {
        self.check_open()?;
        if !lock(&self.handshake_in).frames.is_empty() {
            self.violation("handshake message after the handshake".into());
            return Err(Closed);
        }
        if !self.activated.swap(true, Ordering::AcqRel) {
            self.delivery.open();
            // Every data stream's reader waits for this, not just one.
            self.activate.notify_waiters();
            // Wakes a control reader waiting for inbox room: its message is a violation now.
            self.handshake_space.notify_one();
        }
        Ok(())
    }

    /// Returns the credit of a delivered batch (the input handler put it into the VM).
    pub fn ack_data(&self, credit: Credit) {
        self.delivery.release(credit);
    }

    /// An encoder for this connection's outgoing packets (it reads senders only when
    /// the connection routes by sender).
    pub fn encoder(&self) -> frame::DataEncoder {
        frame::DataEncoder::new(self.data_out.by_sender())
    }

    /// Queues framed packets on their data streams. Never blocks.
    pub fn send_data(&self, packets: Vec<OutgoingPacket>) -> Result<SendStatus, Closed> {
        self.check_open()?;
        self.sent.fetch_add(packets.len() as u64, Ordering::Relaxed);
        Ok(self.data_out.push(packets))
    }

    /// Data streams: `(opened by this side, opened by the peer, pool size)`.
    pub fn data_streams(&self) -> (usize, usize, usize) {
        (
            self.streams_out.load(Ordering::Relaxed),
            self.streams_in.load(Ordering::Relaxed),
            self.data_out.stream_count(),
        )
    }

    /// This side's cookie proof for this TLS session (see [`crate::auth`]).
    pub fn prove(&self, cookie: &[u8], role: Role, node_name: &[u8]) -> Result<[u8; PROOF_LEN], Closed> {
        Ok(auth::proof(&self.exporter()?, cookie, role, node_name))
    }

    /// Checks the peer's cookie proof; when it holds, the peer is authenticated and its
    /// connection leaves probation.
    pub fn verify_peer(&self, cookie: &[u8], role: Role, node_name: &[u8], proof: &[u8]) -> Result<bool, Closed> {
        let valid = auth::verify(&self.exporter()?, cookie, role, node_name, proof);
        if valid {
            self.gate.open();
        }
        Ok(valid)
    }

    /// Closes the connection because the peer did not authenticate; `why` is the
    /// reason phrase the peer sees (cut to [`MAX_REFUSAL_PHRASE`] bytes).
    pub fn refuse(&self, refusal: Refusal, why: &str) {
        let code = match refusal {
            Refusal::NotAuthenticated => close_code::NOT_AUTHENTICATED,
            Refusal::BadNodeName => close_code::BAD_NODE_NAME,
        };
        let mut end = why.len().min(MAX_REFUSAL_PHRASE);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        self.close_with(CloseReason::NotAuthenticated(why.into()), code, &why.as_bytes()[..end]);
    }

    fn exporter(&self) -> Result<[u8; PROOF_LEN], Closed> {
        let mut exporter = [0; PROOF_LEN];
        self.quic.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"").map_err(|_| Closed)?;
        Ok(exporter)
    }

    /// Asks for a tick on the control stream. Ticks requested while one is queued merge.
    pub fn tick(&self) {
        self.control_out.tick.store(true, Ordering::Release);
        self.control_out.wake.notify_one();
    }

    /// Liveness probes made after ICMP reports about the peer (`crate::liveness`).
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    pub(crate) fn count_probe(&self) {
        self.probes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counters for tick supervision.
    pub fn stats(&self) -> Stats {
        Stats {
            received: self.received.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            pending: self.data_out.queued() as u64,
        }
    }

    /// Closes the connection once the peer has read everything queued (data, and the
    /// control frames: a last handshake status such as `nok` must not be lost), or after
    /// a short timeout; see `crate::graceful_close`. Used when the owning process ends.
    pub fn close_gracefully(&self) {
        self.control_out.closing.store(true, Ordering::Release);
        self.control_out.wake.notify_one();
        self.data_out.wake_all();
    }

    /// Closes the connection normally, at once (idempotent).
    pub fn close(&self) {
        self.close_with(CloseReason::Local, close_code::SHUTDOWN, b"shutdown");
    }

    /// Closes the connection, recording `reason` as what [`Events::closed`] reports.
    pub fn close_with(&self, reason: CloseReason, code: u32, wire_reason: &[u8]) {
        let _ = self.close_reason.set(reason);
        self.quic.close(VarInt::from_u32(code), wire_reason);
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.get()
    }

    /// The underlying QUIC connection (for addresses, RTT, statistics, key export).
    pub fn quic(&self) -> &quinn::Connection {
        &self.quic
    }

    /// True on the side that opened the connection.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// The peer's current UDP address (changes when it migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.quic.remote_address()
    }

    fn check_open(&self) -> Result<(), Closed> {
        match self.close_reason.get() {
            Some(_) => Err(Closed),
            None => Ok(()),
        }
    }

    fn violation(&self, what: String) {
        self.close_with(CloseReason::ProtocolViolation(what), close_code::PROTOCOL_VIOLATION, b"protocol violation");
    }

    async fn watch_close(self: Arc<Self>) {
        let error = self.quic.closed().await;
        let reason = self.close_reason.get_or_init(|| CloseReason::from_quic(&error)).clone();
        // Wake every task parked on a semaphore or notification so it can exit.
        self.handshake_space.notify_one();
        self.delivery.close();
        self.activate.notify_waiters();
        self.fences.wake_all();
        self.events.closed(&reason);
    }

    async fn write_control(self: Arc<Self>, mut stream: SendStream) {
        let _ = stream.set_priority(urgency::CONTROL);
        loop {
            tokio::select! {
                _ = self.control_out.wake.notified() => {}
                _ = self.quic.closed() => return,
            }
            loop {
                let Some(frame) = lock(&self.control_out.frames).pop_front() else { break };
                if stream.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if self.control_out.tick.swap(false, Ordering::AcqRel) {
                if stream.write_all(&frame::TICK_FRAME).await.is_err() {
                    return;
                }
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            if self.control_out.closing.load(Ordering::Acquire) {
                return self.finish_gracefully(stream).await;
            }
        }
    }

    /// This side's half of a graceful close (see `crate::graceful_close`): once every
    /// data writer has ended its stream, say how many there were, end the control stream
    /// and wait for the peer to close.
    async fn finish_gracefully(&self, mut control: SendStream) {
        let ended = async {
            self.control_out.data_ended.notified().await;
            if self.activated.load(Ordering::Acquire) {
                let opened = self.streams_out.load(Ordering::Acquire);
                if control.write_all(&graceful_close::end_of_data_frame(opened)).await.is_err() {
                    return;
                }
            }
            let _ = control.finish();
            self.quic.closed().await;
        };
        if tokio::time::timeout(GRACEFUL_CLOSE_TIMEOUT, ended).await.is_err() {
            self.close();
        }
    }

    async fn read_control(self: Arc<Self>, mut stream: RecvStream) {
        let mut decoder: FrameDecoder<Vec<u8>> = FrameDecoder::new(HeaderWidth::Two, HeaderWidth::Two.max_payload());
        let mut frames = Vec::new();
        loop {
            let chunk = match stream.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => chunk.bytes,
                // The peer is closing gracefully; its CONNECTION_CLOSE should follow.
                Ok(None) => return self.close_after_peer_finished().await,
                Err(_) => return,
            };
            if let Err(e) = decoder.feed(&chunk, |f| frames.push(f)) {
                return self.violation(format!("control stream: {e}"));
            }
            self.received.fetch_add(frames.len() as u64, Ordering::Relaxed);
            for frame in frames.drain(..) {
                let Frame::Packet(message) = frame else { continue };
                if let Some(streams) = self.end_of_data(&message) {
                    self.peer_ended.expect_data_streams(streams);
                    continue;
                }
                if !self.file_handshake_frame(message).await {
                    return;
                }
            }
        }
    }

    /// The number of data streams in the peer's end-of-data message, the last control
    /// frame of its graceful close; only after the handshake.
    fn end_of_data(&self, message: &[u8]) -> Option<usize> {
        if !self.activated.load(Ordering::Acquire) {
            return None;
        }
        graceful_close::parse_end_of_data(message)
    }

    /// Hands a handshake message to a waiting reader, or keeps it (at most
    /// [`HANDSHAKE_INBOX`] of them; then the stream is not read further until one is
    /// taken). False when the connection is over.
    async fn file_handshake_frame(&self, message: Vec<u8>) -> bool {
        loop {
            if self.activated.load(Ordering::Acquire) {
                self.violation("handshake message after the handshake".into());
                return false;
            }
            {
                let mut inbox = lock(&self.handshake_in);
                if inbox.waiting {
                    inbox.waiting = false;
                    drop(inbox);
                    self.events.handshake_frame(message);
                    return true;
                }
                if inbox.frames.len() < HANDSHAKE_INBOX {
                    inbox.frames.push_back(message);
                    return true;
                }
            }
            tokio::select! {
                _ = self.handshake_space.notified() => {}
                _ = self.quic.closed() => return false,
            }
        }
    }

    /// The peer ended its control stream: it is closing gracefully. Once every data
    /// stream it said it opened has been read to the end too (before the handshake is
    /// over there is none to wait for), close from this side at once; after a timeout,
    /// regardless.
    async fn close_after_peer_finished(&self) {
        self.peer_ended.mark_control();
        let activated = &self.activated;
        self.peer_ended.wait_until(|ended| !activated.load(Ordering::Acquire) || ended.all_data_ended()).await;
        self.close_with(CloseReason::PeerClosed, close_code::SHUTDOWN, b"closed");
    }

    /// The peer ended a data stream, which it may only do while closing gracefully
    /// (everything it carried is delivered): expects the control stream to end too.
    async fn data_stream_ended(&self) {
        self.peer_ended.mark_data_stream();
        if !self.peer_ended.wait_until(|ended| ended.control_ended()).await {
            self.violation("data stream finished by peer".into());
        }
    }

    /// End of one of this side's data streams in a graceful close (its queue is written
    /// out); the last writer to get here lets the control stream end.
    async fn end_data_stream(&self, stream: Option<SendStream>) {
        if let Some(mut stream) = stream {
            let _ = stream.finish();
        }
        if self.writers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.control_out.data_ended.notify_one();
        }
    }

    async fn write_data(self: Arc<Self>, index: usize) {
        let urgency =
            if self.data_out.priority_stream() == Some(index) { urgency::PRIORITY_DATA } else { urgency::DATA };
        let mut stream: Option<SendStream> = None;
        loop {
            let mut batch = self.data_out.take(index);
            if batch.is_empty() {
                if self.control_out.closing.load(Ordering::Acquire) {
                    return self.end_data_stream(stream).await;
                }
                tokio::select! {
                    _ = self.data_out.queued_on(index) => continue,
                    _ = self.quic.closed() => return,
                }
            }
            let out = match stream.as_mut() {
                Some(out) => out,
                None => {
                    let Ok(mut opened) = self.quic.open_uni().await else { return };
                    let _ = opened.set_priority(urgency);
                    let kind = if urgency == urgency::DATA { stream_kind::NORMAL } else { stream_kind::PRIORITY };
                    if opened.write_all(&[kind]).await.is_err() {
                        return;
                    }
                    self.streams_out.fetch_add(1, Ordering::Relaxed);
                    stream.insert(opened)
                }
            };
            let len: usize = batch.iter().map(Bytes::len).sum();
            if out.write_all_chunks(&mut batch).await.is_err() {
                return;
            }
            if self.data_out.written(index, len) {
                self.events.writable();
            }
        }
    }

    /// Starts a reader for every data stream the peer opens (at most
    /// [`crate::wire::MAX_DATA_STREAMS`], by the transport parameters).
    async fn accept_data_streams(self: Arc<Self>) {
        loop {
            let stream = tokio::select! {
                accepted = self.quic.accept_uni() => match accepted {
                    Ok(stream) => stream,
                    Err(_) => return,
                },
                _ = self.quic.closed() => return,
            };
            self.streams_in.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(self.clone().read_data(stream));
        }
    }

    async fn read_data(self: Arc<Self>, mut stream: RecvStream) {
        // Data that arrives before the handshake completes stays in QUIC's buffers.
        loop {
            // Registered before the check, so a notify_waiters() in between is not lost.
            let activated = self.activate.notified();
            if self.close_reason.get().is_some() {
                return;
            }
            if self.activated.load(Ordering::Acquire) {
                break;
            }
            activated.await;
        }
        // The stream's first byte says what it carries.
        let mut kind = [0u8];
        let class = match stream.read_exact(&mut kind).await {
            Ok(()) if kind[0] == stream_kind::NORMAL => Class::Normal,
            Ok(()) if kind[0] == stream_kind::PRIORITY => Class::Priority,
            Ok(()) => return self.violation(format!("data stream of unknown kind {}", kind[0])),
            Err(_) => return,
        };
        let mut decoder: FrameDecoder<E::Packet> = FrameDecoder::new(HeaderWidth::Four, self.settings.max_packet);
        let mut chunks: Vec<Bytes> = vec![Bytes::new(); 64];
        let mut inbound = Inbound::new(&self.fences);
        let mut finished = false;
        loop {
            // Taken before the checks below, so a fence passed (or a close) meanwhile
            // wakes a reader held by a wait.
            let fence_passed = self.fences.changed();
            if self.close_reason.get().is_some() {
                return;
            }
            if let Err(e) = inbound.settle() {
                return self.violation(format!("data stream: {e}"));
            }
            if finished && inbound.is_empty() {
                // Marks the stream ended for the fences before waiting for the close.
                drop(inbound);
                return self.data_stream_ended().await;
            }
            // While there is no credit for the pending packets, keep reading (up to
            // MAX_BATCH): a slow consumer gets fewer, fuller messages, and beyond that
            // QUIC flow control holds this stream's sender back. Credit is a fair
            // semaphore, so the readers of several streams take turns. A reader held by
            // a fence wait asks for no credit until the wait is over.
            let read = tokio::select! {
                biased;
                credit = self.delivery.acquire(class, inbound.ready_bytes()), if inbound.has_ready() => match credit {
                    Ok(credit) => {
                        inbound.deliver(|packets| self.events.data(packets, credit));
                        continue;
                    }
                    Err(_) => return,
                },
                () = fence_passed, if inbound.waits() => continue,
                read = stream.read_chunks(&mut chunks), if !finished && inbound.has_room() => read,
                // Unreachable: after `settle`, something pending is ready or waits.
                else => return self.violation("data stream reader has nothing to wait for".into()),
            };
            let n = match read {
                Ok(Some(n)) => n,
                // The peer may end a data stream only while closing gracefully; what is
                // pending is delivered first.
                Ok(None) => {
                    finished = true;
                    continue;
                }
                Err(_) => return,
            };
            let mut packets = 0u64;
            let mut refused = None;
            for chunk in &chunks[..n] {
                inbound.read(chunk.len());
                let fed = decoder.feed(chunk, |f| {
                    packets += 1;
                    if refused.is_none() {
                        refused = inbound.push(f).err();
                    }
                });
                if let Err(e) = fed {
                    return self.violation(format!("data stream: {e}"));
                }
                if let Some(e) = refused {
                    return self.violation(format!("data stream: {e}"));
                }
            }
            self.received.fetch_add(packets, Ordering::Relaxed);
        }
    }
}

/// Handshake messages kept for the reader before the control stream is read no further.
const HANDSHAKE_INBOX: usize = 4;

/// Handshake messages that arrived before the reader asked for them.
#[derive(Default)]
struct HandshakeInbox {
    frames: VecDeque<Vec<u8>>,
    /// The reader asked and found nothing: the next message goes to it as an event.
    waiting: bool,
}

impl<E: Events> Drop for Connection<E> {
    fn drop(&mut self) {
        self.quic.close(VarInt::from_u32(close_code::SHUTDOWN), b"shutdown");
    }
}

/// Locks a mutex, ignoring poisoning: the protected queues stay consistent on panic.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
