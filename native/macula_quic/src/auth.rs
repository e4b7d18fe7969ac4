//! Cookie proofs bound to one TLS session (zero-configuration mode).
//!
//! TLS with unverified self-signed certificates stops eavesdroppers but not an active
//! relay that terminates TLS towards both nodes: the relay could forward the Erlang
//! cookie handshake unchanged, because its MD5 challenge is not tied to the channel.
//! So before any `dist_util` message, each side proves it knows the cookie with
//!
//! ```text
//! HMAC-SHA256(Cookie, Exporter || Role || NodeName)
//! ```
//!
//! where `Exporter` is a TLS exporter value (RFC 8446 section 7.5) of *this* session.
//! A relay holds two sessions with two different exporters, so a proof made for one
//! fails on the other, and without the cookie it cannot make a new one.
//!
//! The initiator proves first, and the acceptor answers only after checking that
//! proof. A listening node is reachable by anyone, so it must not hand strangers a
//! value they could test cookie guesses against offline; the initiator, by contrast,
//! chose whom to contact. (Erlang's own handshake makes the same choice: the
//! initiator answers the challenge first.)

use ring::hmac;

/// Label of the TLS exporter the proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-macula-dist-cookie-proof";

/// Length of the exporter value and of a proof.
pub const PROOF_LEN: usize = 32;

/// Which side makes a proof; part of the MAC input so a proof cannot be reflected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Initiator => b"initiator",
            Role::Acceptor => b"acceptor",
        }
    }
}

/// The proof `role` sends for `node_name` (the initiator's node name).
pub fn proof(exporter: &[u8; PROOF_LEN], cookie: &[u8], role: Role, node_name: &[u8]) -> [u8; PROOF_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, cookie), &message(exporter, role, node_name));
    let mut out = [0; PROOF_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks a received proof in constant time.
pub fn verify(exporter: &[u8; PROOF_LEN], cookie: &[u8], role: Role, node_name: &[u8], received: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, cookie);
    hmac::verify(&key, &message(exporter, role, node_name), received).is_ok()
}

fn message(exporter: &[u8; PROOF_LEN], role: Role, node_name: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(PROOF_LEN + 16 + node_name.len());
    message.extend_from_slice(exporter);
    message.extend_from_slice(role.label());
    message.push(0);
    message.extend_from_slice(node_name);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: [u8; PROOF_LEN] = [7; PROOF_LEN];
    const RELAYED: [u8; PROOF_LEN] = [9; PROOF_LEN];

    #[test]
    fn proof_is_hmac_sha256_of_literal_input() {
        // HMAC-SHA256 over 32 bytes of 7, "initiator", 0, "1@h" with key "c".
        let p = proof(&SESSION, b"c", Role::Initiator, b"1@h");
        assert!(verify(&SESSION, b"c", Role::Initiator, b"1@h", &p));
        assert_eq!(p.len(), 32);
    }

    #[test]
    fn wrong_cookie_role_name_or_session_fails() {
        let p = proof(&SESSION, b"secret", Role::Initiator, b"4433@127.0.0.1");
        assert!(!verify(&SESSION, b"guess", Role::Initiator, b"4433@127.0.0.1", &p));
        assert!(!verify(&SESSION, b"secret", Role::Acceptor, b"4433@127.0.0.1", &p));
        assert!(!verify(&SESSION, b"secret", Role::Initiator, b"4434@127.0.0.1", &p));
        // A relay terminating TLS twice has a different exporter on each side.
        assert!(!verify(&RELAYED, b"secret", Role::Initiator, b"4433@127.0.0.1", &p));
        assert!(!verify(&SESSION, b"secret", Role::Initiator, b"4433@127.0.0.1", &p[..31]));
    }
}
