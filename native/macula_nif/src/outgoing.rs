//! Outgoing distribution packets from Erlang iodata, without copying their large binaries.
//!
//! `dist_ctrl_get_data/1` returns each packet as an iovec: a small header binary and,
//! for big messages, references into large refc binaries. The core's encoder frames
//! them (the wire format is `macula_quic`'s); this module only decides which pieces are
//! copied and which are borrowed: pieces of at least [`BORROW_THRESHOLD`] bytes are
//! handed to QUIC as they are, kept alive by a copy of the packet list in a
//! process-independent environment (copying a term shares its refc binaries instead of
//! copying their bytes). QUIC then copies each byte once, into the packet it encrypts.

// Unsafe code: the Send/Sync claims and the slice view of a pinned binary below.
#![allow(unsafe_code)]

use std::sync::Arc;

use bytes::Bytes;
use macula_quic::frame::{DataEncoder, FrameError, OutgoingPacket};
use rustler::{Binary, NifResult, OwnedEnv, Term};

/// Pieces at least this large are borrowed rather than copied.
const BORROW_THRESHOLD: usize = 4096;

/// Keeps the binaries of one `send_data` call alive while QUIC holds pieces of them.
struct Pinned {
    _env: OwnedEnv,
}

// SAFETY: the environment is only built once and then dropped; nothing reads or writes
// it concurrently. Dropping a process-independent environment is allowed on any thread.
unsafe impl Sync for Pinned {}

/// A piece of a pinned binary.
struct Borrowed {
    _pin: Arc<Pinned>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: `ptr..ptr+len` lies in a refc binary kept alive by `_pin`; binary contents
// are immutable once created.
unsafe impl Send for Borrowed {}
unsafe impl Sync for Borrowed {}

impl AsRef<[u8]> for Borrowed {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the `Send` impl above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A piece of a packet, and whether it may be borrowed (it belongs to the caller's term,
/// not to a temporary flattened binary).
struct Piece<'a> {
    bytes: &'a [u8],
    borrowable: bool,
}

/// Turns `list` (a list of iodata, one element per distribution packet) into packets
/// framed by the core's encoder; the inner error is a packet too large to frame.
pub fn packets(encoder: &mut DataEncoder, list: Term) -> NifResult<Result<Vec<OutgoingPacket>, FrameError>> {
    let mut pin: Option<Arc<Pinned>> = None;
    let mut out = Vec::new();
    for packet in list.decode::<rustler::ListIterator>()? {
        let pieces = pieces(packet)?;
        let len: usize = pieces.iter().map(|p| p.bytes.len()).sum();
        let mut framed = match encoder.packet(len) {
            Ok(framed) => framed,
            Err(e) => return Ok(Err(e)),
        };
        for piece in pieces {
            if piece.borrowable && piece.bytes.len() >= BORROW_THRESHOLD {
                let pin = pin.get_or_insert_with(|| pin_term(list)).clone();
                framed.borrow(Bytes::from_owner(Borrowed {
                    _pin: pin,
                    ptr: piece.bytes.as_ptr(),
                    len: piece.bytes.len(),
                }));
            } else {
                framed.copy(piece.bytes);
            }
        }
        // Only a length mismatch, which the sum above rules out.
        out.push(framed.finish().map_err(|_| rustler::Error::BadArg)?);
    }
    Ok(Ok(out))
}

fn pin_term(term: Term) -> Arc<Pinned> {
    let env = OwnedEnv::new();
    env.run(|owned| {
        term.in_env(owned);
    });
    Arc::new(Pinned { _env: env })
}

/// The binaries of an iovec (a binary or nested lists of binaries); anything else is
/// flattened into a temporary binary, which is then copied, never borrowed.
fn pieces(packet: Term) -> NifResult<Vec<Piece>> {
    let mut out = Vec::new();
    if collect(packet, &mut out).is_err() {
        out.clear();
        out.push(Piece { bytes: Binary::from_iolist(packet)?.as_slice(), borrowable: false });
    }
    Ok(out)
}

fn collect<'a>(term: Term<'a>, out: &mut Vec<Piece<'a>>) -> NifResult<()> {
    if let Ok(binary) = term.decode::<Binary<'a>>() {
        out.push(Piece { bytes: binary.as_slice(), borrowable: true });
        return Ok(());
    }
    for element in term.decode::<rustler::ListIterator<'a>>()? {
        collect(element, out)?;
    }
    Ok(())
}
