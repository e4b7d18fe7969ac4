//! Length-prefixed framing for the two kinds of QUIC stream a connection uses.
//!
//! * The control stream carries the `dist_util` handshake and, afterwards, ticks:
//!   `Len:16/big, Payload`. An empty frame is a tick.
//! * A data stream carries distribution packets: `Len:32/big, Packet`. A zero length
//!   introduces a marker of the stream order instead (see [`crate::fence`]):
//!   `0:32, 1, Stream:8, Seq:64/big` is fence `Seq` on the sender's stream `Stream`,
//!   `0:32, 2, Seq:64/big, Streams:64/big` is a wait for fence `Seq` of the streams
//!   whose bits are set in `Streams` (bit `i`: stream `i`).
//!
//! [`DataEncoder`] frames outgoing packets and reads each one's sender for routing;
//! [`FrameDecoder`] takes incoming bytes apart.
//!
//! The decoder is incremental (bytes arrive in arbitrary chunks) and never trusts a
//! length: it refuses frames above a configured maximum and grows its buffer only as
//! bytes really arrive, so a peer that announces 4 GiB and sends nothing costs nothing.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::routing::{self, Class, SenderKey};

/// Width of the big-endian length prefix in front of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderWidth {
    /// Two bytes: the control stream.
    Two = 2,
    /// Four bytes: data streams.
    Four = 4,
}

impl HeaderWidth {
    /// The largest payload this header can describe.
    pub fn max_payload(self) -> usize {
        match self {
            HeaderWidth::Two => u16::MAX as usize,
            HeaderWidth::Four => u32::MAX as usize,
        }
    }
}

/// Why a byte stream could not be framed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The peer announced a frame larger than this side accepts.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// A packet was announced with one length and given another (a bug of the caller).
    #[error("packet announced as {announced} bytes but {written} were given")]
    LengthMismatch { announced: usize, written: usize },
    /// A data stream carried a marker of a type this side does not know.
    #[error("unknown marker type {0}")]
    UnknownMarker(u8),
}

/// A buffer a decoded packet is assembled in.
///
/// The NIF implements this for Erlang binaries so that each received byte is copied
/// exactly once, from QUIC's buffer into the binary handed to `dist_ctrl_put_data/2`.
pub trait PacketBuf: Sized {
    /// A buffer of exactly `len` bytes (contents unspecified).
    fn alloc(len: usize) -> Self;
    /// Grows the buffer to `len` bytes, keeping the current contents.
    fn grow(&mut self, len: usize);
    /// The whole buffer.
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// The buffer's length.
    fn len(&self) -> usize;
    /// True for an empty buffer (a decoded packet never is).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PacketBuf for Vec<u8> {
    fn alloc(len: usize) -> Self {
        vec![0; len]
    }
    fn grow(&mut self, len: usize) {
        self.resize(len, 0);
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<B> {
    /// An empty frame of the control stream: a tick.
    Tick,
    /// A non-empty payload.
    Packet(B),
    /// Data streams: everything before this point of the sender's stream `stream` was
    /// sent before fence `seq`.
    Fence { stream: u8, seq: u64 },
    /// Data streams: deliver what follows only once every stream in `streams` (bit `i`:
    /// stream `i`) has delivered everything before its fence `seq`.
    Wait { seq: u64, streams: u64 },
}

/// Marker types, the byte after a zero length on a data stream.
const FENCE: u8 = 1;
const WAIT: u8 = 2;

/// Wire size of a fence marker: `0:32, 1, Stream:8, Seq:64`.
pub const FENCE_LEN: usize = 14;
/// Wire size of a wait marker: `0:32, 2, Seq:64, Streams:64`.
pub const WAIT_LEN: usize = 21;

/// Longest marker body (after its type byte).
const MARKER_BODY_MAX: usize = 16;

/// The fence marker for stream `stream`, number `seq`.
pub fn fence_marker(stream: u8, seq: u64) -> [u8; FENCE_LEN] {
    let mut m = [0; FENCE_LEN];
    m[4] = FENCE;
    m[5] = stream;
    m[6..].copy_from_slice(&seq.to_be_bytes());
    m
}

/// The marker that waits for fence `seq` of the streams in `streams`.
pub fn wait_marker(seq: u64, streams: u64) -> [u8; WAIT_LEN] {
    let mut m = [0; WAIT_LEN];
    m[4] = WAIT;
    m[5..13].copy_from_slice(&seq.to_be_bytes());
    m[13..].copy_from_slice(&streams.to_be_bytes());
    m
}

/// The body length of a marker of type `kind`.
fn marker_body_len(kind: u8) -> Result<usize, FrameError> {
    match kind {
        FENCE => Ok(FENCE_LEN - 5),
        WAIT => Ok(WAIT_LEN - 5),
        other => Err(FrameError::UnknownMarker(other)),
    }
}

/// A marker of type `kind` from its whole body.
fn marker<B>(kind: u8, body: &[u8; MARKER_BODY_MAX]) -> Frame<B> {
    let be64 = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&body[at..at + 8]);
        u64::from_be_bytes(word)
    };
    match kind {
        FENCE => Frame::Fence { stream: body[0], seq: be64(1) },
        // `marker_body_len` let only the two known types through.
        _ => Frame::Wait { seq: be64(0), streams: be64(8) },
    }
}

/// Buffers above this size are grown as bytes arrive rather than allocated up front.
const EAGER_ALLOC_LIMIT: usize = 1 << 20;

enum State<B> {
    Header {
        bytes: [u8; 4],
        have: usize,
    },
    Body {
        buf: B,
        allocated: usize,
        len: usize,
        have: usize,
    },
    /// A data stream's zero length was read: the marker's type byte comes next.
    MarkerType,
    MarkerBody {
        kind: u8,
        body: [u8; MARKER_BODY_MAX],
        len: usize,
        have: usize,
    },
}

/// Incremental decoder of length-prefixed frames.
pub struct FrameDecoder<B> {
    width: HeaderWidth,
    max_len: usize,
    state: State<B>,
}

impl<B: PacketBuf> FrameDecoder<B> {
    /// A decoder for `width`-byte headers that rejects payloads above `max_len`.
    pub fn new(width: HeaderWidth, max_len: usize) -> Self {
        FrameDecoder {
            width,
            max_len: max_len.min(width.max_payload()),
            state: State::Header { bytes: [0; 4], have: 0 },
        }
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Consumes `input`, calling `emit` for every frame it completes.
    pub fn feed(&mut self, mut input: &[u8], mut emit: impl FnMut(Frame<B>)) -> Result<(), FrameError> {
        let width = self.width as usize;
        while !input.is_empty() {
            match &mut self.state {
                State::Header { bytes, have } => {
                    // In bounds: `*have < width <= 4 == bytes.len()` (a full header leaves
                    // this state at once), so `*have + take <= width`; `take <= input.len()`.
                    let take = (width - *have).min(input.len());
                    bytes[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    input = &input[take..];
                    if *have < width {
                        break;
                    }
                    // Constant indexes into the 4-byte array.
                    let len = match self.width {
                        HeaderWidth::Two => u16::from_be_bytes([bytes[0], bytes[1]]) as usize,
                        HeaderWidth::Four => u32::from_be_bytes(*bytes) as usize,
                    };
                    if len > self.max_len {
                        return Err(FrameError::TooLarge { len, max: self.max_len });
                    }
                    if len == 0 && self.width == HeaderWidth::Four {
                        self.state = State::MarkerType;
                        continue;
                    }
                    if len == 0 {
                        *have = 0;
                        emit(Frame::Tick);
                        continue;
                    }
                    let allocated = len.min(EAGER_ALLOC_LIMIT);
                    self.state = State::Body { buf: B::alloc(allocated), allocated, len, have: 0 };
                }
                State::Body { buf, allocated, len, have } => {
                    if *have == *allocated {
                        *allocated = (*allocated * 2).min(*len);
                        buf.grow(*allocated);
                    }
                    // In bounds: the buffer is `*allocated` bytes long (alloc and grow
                    // give exactly that), `*have < *allocated` here (a full buffer was just
                    // grown, and `*have < *len` while in this state), so
                    // `*have + take <= *allocated`; `take <= input.len()`.
                    let take = (*allocated - *have).min(input.len());
                    buf.as_mut_slice()[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    input = &input[take..];
                    if *have == *len {
                        let done = std::mem::replace(&mut self.state, State::Header { bytes: [0; 4], have: 0 });
                        if let State::Body { buf, .. } = done {
                            emit(Frame::Packet(buf));
                        }
                    }
                }
                State::MarkerType => {
                    let Some((&kind, rest)) = input.split_first() else { break };
                    input = rest;
                    let len = marker_body_len(kind)?;
                    self.state = State::MarkerBody { kind, body: [0; MARKER_BODY_MAX], len, have: 0 };
                }
                State::MarkerBody { kind, body, len, have } => {
                    // In bounds: `*have < *len <= MARKER_BODY_MAX`, `take <= input.len()`.
                    let take = (*len - *have).min(input.len());
                    body[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    input = &input[take..];
                    if *have == *len {
                        let frame = marker(*kind, body);
                        self.state = State::Header { bytes: [0; 4], have: 0 };
                        emit(frame);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The header of a data frame carrying `len` bytes.
pub fn data_frame_header(len: usize) -> Result<[u8; 4], FrameError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| FrameError::TooLarge { len, max: HeaderWidth::Four.max_payload() })
}

/// Frames outgoing distribution packets for the data streams without copying their
/// large pieces: small pieces are copied next to their frame header into one shared
/// buffer, large ones (`Bytes` that own or borrow the caller's memory) are queued as they
/// are, and QUIC copies each byte once, into the packet it encrypts.
pub struct DataEncoder {
    arena: BytesMut,
    by_sender: bool,
}

impl DataEncoder {
    /// An encoder; with `by_sender` each packet's sender is read for routing.
    pub fn new(by_sender: bool) -> Self {
        DataEncoder { arena: BytesMut::new(), by_sender }
    }

    /// Starts a packet of exactly `len` bytes.
    pub fn packet(&mut self, len: usize) -> Result<PacketBuilder<'_>, FrameError> {
        let header = data_frame_header(len)?;
        // Left over only if a previous builder was dropped unfinished.
        self.arena.clear();
        self.arena.extend_from_slice(&header);
        Ok(PacketBuilder { encoder: self, chunks: Vec::new(), len, written: 0 })
    }
}

/// One packet being framed; see [`DataEncoder::packet`].
pub struct PacketBuilder<'e> {
    encoder: &'e mut DataEncoder,
    chunks: Vec<Bytes>,
    len: usize,
    written: usize,
}

impl PacketBuilder<'_> {
    /// Appends bytes by copying them.
    pub fn copy(&mut self, bytes: &[u8]) {
        self.encoder.arena.extend_from_slice(bytes);
        self.written += bytes.len();
    }

    /// Appends bytes without copying them.
    pub fn borrow(&mut self, bytes: Bytes) {
        self.seal_copied();
        self.written += bytes.len();
        self.chunks.push(bytes);
    }

    fn seal_copied(&mut self) {
        if !self.encoder.arena.is_empty() {
            self.chunks.push(self.encoder.arena.split().freeze());
        }
    }

    /// The framed packet. Fails if the bytes appended differ from the announced length.
    pub fn finish(mut self) -> Result<OutgoingPacket, FrameError> {
        if self.written != self.len {
            return Err(FrameError::LengthMismatch { announced: self.len, written: self.written });
        }
        self.seal_copied();
        let sender = if self.encoder.by_sender { sender_of_chunks(&self.chunks) } else { None };
        Ok(OutgoingPacket { chunks: self.chunks, bytes: self.len + 4, sender, class: Class::Normal, fixed: false })
    }
}

/// The sender of a framed packet: parsed in place when the first chunk holds the whole
/// head, else from a copy of the head gathered across chunks.
fn sender_of_chunks(chunks: &[Bytes]) -> Option<SenderKey> {
    // The first chunk starts with the 4-byte frame header written by `packet`.
    let first = chunks.first()?.get(4..)?;
    let total: usize = chunks.iter().map(Bytes::len).sum::<usize>() - 4;
    if first.len() >= routing::HEAD_LEN || first.len() == total {
        return routing::sender_of(first);
    }
    let mut head = [0u8; routing::HEAD_LEN];
    let mut have = 0;
    let pieces = std::iter::once(first).chain(chunks[1..].iter().map(|c| &c[..]));
    for piece in pieces {
        let take = piece.len().min(head.len() - have);
        head[have..have + take].copy_from_slice(&piece[..take]);
        have += take;
        if have == head.len() {
            break;
        }
    }
    routing::sender_of(&head[..have])
}

/// A framed distribution packet on its way to a data stream.
#[derive(Debug)]
pub struct OutgoingPacket {
    pub(crate) chunks: Vec<Bytes>,
    /// Framed length: the packet plus its header.
    pub(crate) bytes: usize,
    sender: Option<SenderKey>,
    pub(crate) class: Class,
    pub(crate) fixed: bool,
}

impl OutgoingPacket {
    /// The sending process, when the encoder read it.
    pub fn sender(&self) -> Option<SenderKey> {
        self.sender
    }

    /// Sends the packet on a higher-urgency stream (if its sender is new to the connection).
    pub fn prioritise(&mut self) {
        self.class = Class::Priority;
    }

    /// Sends the packet on the fixed stream whatever its sender (raw packets injected
    /// through the controller's `{send, ...}` hook).
    pub fn pin_to_fixed_stream(&mut self) {
        self.fixed = true;
    }

    /// The framed bytes, in order (for tests and tools).
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }
}

/// One control frame (`Len:16, payload`).
pub fn control_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > HeaderWidth::Two.max_payload() {
        return Err(FrameError::TooLarge { len: payload.len(), max: HeaderWidth::Two.max_payload() });
    }
    let mut out = Vec::with_capacity(payload.len() + 2);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The control-stream tick: an empty frame.
pub const TICK_FRAME: [u8; 2] = [0, 0];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(width: HeaderWidth, max: usize, chunks: &[&[u8]]) -> Result<Vec<Frame<Vec<u8>>>, FrameError> {
        let mut decoder = FrameDecoder::new(width, max);
        let mut frames = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |f| frames.push(f))?;
        }
        Ok(frames)
    }

    #[test]
    fn control_frames_from_literal_bytes() {
        let frames = decode_all(HeaderWidth::Two, 1000, &[&[0, 3, b'a', b'b', b'c', 0, 0, 0, 1, b'z']]).unwrap();
        assert_eq!(frames, vec![Frame::Packet(b"abc".to_vec()), Frame::Tick, Frame::Packet(b"z".to_vec())]);
    }

    #[test]
    fn data_frames_and_markers_split_at_every_byte() {
        // A packet, fence 258 of stream 3, a wait for fence 5 of streams 1 and 3, a packet.
        let bytes = [
            0u8, 0, 0, 2, 7, 8, //
            0, 0, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 1, 2, //
            0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0b1010, //
            0, 0, 0, 1, 9,
        ];
        let expected = vec![
            Frame::Packet(vec![7, 8]),
            Frame::Fence { stream: 3, seq: 258 },
            Frame::Wait { seq: 5, streams: 0b1010 },
            Frame::Packet(vec![9]),
        ];
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(decode_all(HeaderWidth::Four, 100, &chunks).unwrap(), expected);
        assert_eq!(decode_all(HeaderWidth::Four, 100, &[&bytes]).unwrap(), expected);
    }

    #[test]
    fn markers_encode_to_literal_bytes() {
        assert_eq!(fence_marker(3, 258), [0, 0, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(wait_marker(5, 0b1010), [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0b1010]);
        let mut wire = fence_marker(32, u64::MAX).to_vec();
        wire.extend(wait_marker(u64::MAX, 1 << 32));
        assert_eq!(
            decode_all(HeaderWidth::Four, 100, &[&wire]).unwrap(),
            vec![Frame::Fence { stream: 32, seq: u64::MAX }, Frame::Wait { seq: u64::MAX, streams: 1 << 32 }]
        );
    }

    #[test]
    fn an_unknown_marker_is_refused_and_the_control_stream_has_ticks() {
        let err = decode_all(HeaderWidth::Four, 100, &[&[0, 0, 0, 0], &[9, 1, 2]]).unwrap_err();
        assert_eq!(err, FrameError::UnknownMarker(9));
        assert_eq!(err.to_string(), "unknown marker type 9");
        // A marker cut short is just not complete yet.
        let frames = decode_all(HeaderWidth::Four, 100, &[&fence_marker(1, 1)[..13]]).unwrap();
        assert!(frames.is_empty());
        let frames = decode_all(HeaderWidth::Two, 100, &[&[0, 0, 0, 1, 5]]).unwrap();
        assert_eq!(frames, vec![Frame::Tick, Frame::Packet(vec![5])]);
    }

    #[test]
    fn oversized_frame_is_refused_before_any_allocation() {
        let err = decode_all(HeaderWidth::Four, 1024, &[&[0xff, 0xff, 0xff, 0xff]]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: u32::MAX as usize, max: 1024 });
    }

    #[test]
    fn large_frame_grows_as_bytes_arrive() {
        let len = 3 * EAGER_ALLOC_LIMIT + 17;
        let mut input = (len as u32).to_be_bytes().to_vec();
        input.extend((0..len).map(|i| (i % 251) as u8));
        let chunks: Vec<&[u8]> = input.chunks(65_000).collect();
        let frames = decode_all(HeaderWidth::Four, usize::MAX, &chunks).unwrap();
        assert_eq!(frames.len(), 1);
        match &frames[0] {
            Frame::Packet(p) => assert_eq!(&p[..], &input[4..]),
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    #[test]
    fn partial_frame_is_reported_as_not_idle() {
        let mut decoder: FrameDecoder<Vec<u8>> = FrameDecoder::new(HeaderWidth::Four, 10);
        assert!(decoder.is_idle());
        decoder.feed(&[0, 0], |_| {}).unwrap();
        assert!(!decoder.is_idle());
    }

    fn flat(packet: &OutgoingPacket) -> Vec<u8> {
        packet.chunks().iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn encoded_packets_round_trip_through_the_decoder() {
        let big = Bytes::from(vec![7u8; 10_000]);
        let mut enc = DataEncoder::new(false);
        let mut p = enc.packet(3 + big.len() + 2).unwrap();
        p.copy(b"abc");
        p.borrow(big.clone());
        p.copy(b"yz");
        let first = p.finish().unwrap();
        let mut p = enc.packet(1).unwrap();
        p.copy(b"q");
        let second = p.finish().unwrap();
        // The large piece is shared, not copied.
        assert!(first.chunks().iter().any(|c| c.as_ptr() == big.as_ptr()));
        let mut wire = flat(&first);
        wire.extend(flat(&second));
        assert_eq!(&wire[..7], &[0, 0, 0x27, 0x15, b'a', b'b', b'c']);
        let frames = decode_all(HeaderWidth::Four, 1 << 20, &[&wire]).unwrap();
        let mut expected = b"abc".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"yz");
        assert_eq!(frames, vec![Frame::Packet(expected), Frame::Packet(b"q".to_vec())]);
        assert_eq!(first.bytes, 4 + 3 + 10_000 + 2);
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let mut enc = DataEncoder::new(false);
        let mut p = enc.packet(5).unwrap();
        p.copy(b"abc");
        assert_eq!(p.finish().unwrap_err(), FrameError::LengthMismatch { announced: 5, written: 3 });
    }

    #[test]
    fn the_sender_is_read_across_chunks() {
        // SEND_SENDER {22, From, To}, the head split over a copied and a borrowed piece.
        let mut control = vec![112, 131, 104, 3, 97, 22, 88, 119, 3, b'a', b'@', b'b'];
        control.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1]);
        let to = [88u8, 119, 3, b'c', b'@', b'd', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut payload = vec![131, 109, 0, 0, 0x10, 0];
        payload.extend(vec![0u8; 4096]);
        let mut whole = control.clone();
        whole.extend_from_slice(&to);
        whole.extend_from_slice(&payload);
        let expected = crate::routing::sender_of(&whole);
        assert!(expected.is_some());
        let mut enc = DataEncoder::new(true);
        let mut p = enc.packet(whole.len()).unwrap();
        p.copy(&control[..8]);
        p.borrow(Bytes::copy_from_slice(&control[8..]));
        p.copy(&to);
        p.borrow(Bytes::from(payload));
        assert_eq!(p.finish().unwrap().sender(), expected);
        // Without routing nothing is parsed.
        let mut plain = DataEncoder::new(false);
        let mut p = plain.packet(whole.len()).unwrap();
        p.copy(&whole);
        assert_eq!(p.finish().unwrap().sender(), None);
    }

    #[test]
    fn encoders_produce_literal_bytes() {
        assert_eq!(data_frame_header(3).unwrap(), [0, 0, 0, 3]);
        assert_eq!(data_frame_header(0x0102_0304).unwrap(), [1, 2, 3, 4]);
        assert!(data_frame_header(u32::MAX as usize + 1).is_err());
        assert_eq!(control_frame(b"sok").unwrap(), vec![0, 3, b's', b'o', b'k']);
        assert!(control_frame(&vec![0; 70_000]).is_err());
    }
}
