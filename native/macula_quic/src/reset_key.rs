//! The QUIC stateless-reset key of a node, the same for every incarnation of it.
//!
//! A QUIC endpoint hands its peers, with each connection ID, a token derived from its
//! reset key. After a restart the node receives packets of connections it no longer
//! knows and answers each with a stateless reset carrying that token; the peer ends the
//! connection at once if the token matches. With a random key per start (quinn's
//! default) the new incarnation's tokens never match and the old connections linger
//! until ticks time out. So the key is derived from what survives a restart: the node
//! name and the node's own cookie. Only the node needs the key; a peer only compares
//! tokens, so forging a reset for this node's connections takes the cookie.

use ring::hmac;

/// Domain separation: this HMAC key is used for nothing else.
const LABEL: &[u8] = b"macula-dist stateless reset key v1\0";

/// The reset key of `node_name` with `cookie`: HMAC-SHA256 keyed with the cookie over
/// a label and the name, so the key reveals nothing about the cookie.
pub fn derive(node_name: &[u8], cookie: &[u8]) -> hmac::Key {
    let outer = hmac::Key::new(hmac::HMAC_SHA256, cookie);
    let mut context = hmac::Context::with_key(&outer);
    context.update(LABEL);
    context.update(node_name);
    hmac::Key::new(hmac::HMAC_SHA256, context.sign().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(key: &hmac::Key) -> Vec<u8> {
        hmac::sign(key, b"connection id").as_ref().to_vec()
    }

    #[test]
    fn same_name_and_cookie_give_the_same_key() {
        assert_eq!(token(&derive(b"4433@10.0.0.5", b"secret")), token(&derive(b"4433@10.0.0.5", b"secret")));
    }

    #[test]
    fn another_name_or_cookie_gives_another_key() {
        let base = token(&derive(b"4433@10.0.0.5", b"secret"));
        assert_ne!(base, token(&derive(b"4434@10.0.0.5", b"secret")));
        assert_ne!(base, token(&derive(b"4433@10.0.0.5", b"secreT")));
    }
}
