//! macula_dist's wire protocol as a peer sees it, written down here on purpose rather
//! than imported from the core: the tool checks the nodes against the protocol, not
//! against the core's own idea of it.
//!
//! * One bidirectional control stream, opened by the initiator: frames
//!   `Len:16/big, Payload`; an empty frame is a tick.
//! * Before any `dist_util` message the initiator sends `'A', NameLen:16, Name, Proof`
//!   and the acceptor answers `'a', Proof`, where
//!   `Proof = HMAC-SHA256(Cookie, Exporter || RoleLabel || 0 || InitiatorName)` and
//!   `Exporter` is 32 bytes of the TLS exporter [`EXPORTER_LABEL`] of this session.
//! * Data streams (unidirectional): frames `Len:32/big, Packet`.

use std::collections::VecDeque;

use quinn::{RecvStream, SendStream};
use ring::hmac;

use crate::Res;

/// The SNI every client sends.
pub const SERVER_NAME: &str = "macula";

/// Label of the TLS exporter the cookie proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-macula-dist-cookie-proof";

/// Length of the exporter value and of a proof.
pub const PROOF_LEN: usize = 32;

/// The first byte of a data stream: an ordinary (not the priority) stream.
pub const NORMAL_DATA_STREAM: u8 = 0;

/// The side a proof is made for.
#[derive(Clone, Copy)]
pub enum Role {
    Initiator,
    Acceptor,
}

fn proof_key_and_message(exporter: &[u8; PROOF_LEN], cookie: &str, role: Role, name: &str) -> (hmac::Key, Vec<u8>) {
    let label: &[u8] = match role {
        Role::Initiator => b"initiator",
        Role::Acceptor => b"acceptor",
    };
    let message = [exporter.as_slice(), label, &[0], name.as_bytes()].concat();
    (hmac::Key::new(hmac::HMAC_SHA256, cookie.as_bytes()), message)
}

/// The proof `role` makes in a session with `exporter`, for initiator `name`.
pub fn proof(exporter: &[u8; PROOF_LEN], cookie: &str, role: Role, name: &str) -> Vec<u8> {
    let (key, message) = proof_key_and_message(exporter, cookie, role, name);
    hmac::sign(&key, &message).as_ref().to_vec()
}

pub fn proof_is_valid(exporter: &[u8; PROOF_LEN], cookie: &str, role: Role, name: &str, received: &[u8]) -> bool {
    let (key, message) = proof_key_and_message(exporter, cookie, role, name);
    hmac::verify(&key, &message, received).is_ok()
}

/// The initiator's first message: `'A', NameLen:16, Name, Proof`.
pub fn hello(name: &str, proof: &[u8]) -> Res<Vec<u8>> {
    let name_len = u16::try_from(name.len()).map_err(|_| "node name longer than 65535 bytes")?;
    Ok([&[b'A'][..], &name_len.to_be_bytes(), name.as_bytes(), proof].concat())
}

/// One control frame.
pub fn control_frame(payload: &[u8]) -> Res<Vec<u8>> {
    let len = u16::try_from(payload.len()).map_err(|_| "control frame payload above 65535 bytes")?;
    Ok([&len.to_be_bytes(), payload].concat())
}

/// One data frame.
pub fn data_frame(packet: &[u8]) -> Res<Vec<u8>> {
    let len = u32::try_from(packet.len()).map_err(|_| "data frame payload above 4 GiB")?;
    Ok([&len.to_be_bytes(), packet].concat())
}

pub async fn send_control(send: &mut SendStream, payload: &[u8]) -> Res<()> {
    send.write_all(&control_frame(payload)?).await?;
    Ok(())
}

/// Reads whole control frames from the node, skipping ticks.
pub struct ControlReader {
    recv: RecvStream,
    buffered: Vec<u8>,
    ready: VecDeque<Vec<u8>>,
}

impl ControlReader {
    pub fn new(recv: RecvStream) -> Self {
        ControlReader { recv, buffered: Vec::new(), ready: VecDeque::new() }
    }

    /// The next non-empty frame; an error once the node finishes or resets the stream.
    pub async fn next(&mut self) -> Res<Vec<u8>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(frame);
            }
            match self.recv.read_chunk(usize::MAX, true).await? {
                Some(chunk) => self.buffered.extend_from_slice(&chunk.bytes),
                None => return Err("control stream finished by the server".into()),
            }
            self.split_frames();
        }
    }

    fn split_frames(&mut self) {
        while let [hi, lo, rest @ ..] = self.buffered.as_slice() {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            let Some(payload) = rest.get(..len) else { return };
            if len > 0 {
                self.ready.push_back(payload.to_vec());
            }
            self.buffered.drain(..2 + len);
        }
    }
}
