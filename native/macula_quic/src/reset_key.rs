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

/// Domain separation: these keys are used for nothing else.
const RESET_LABEL: &[u8] = b"macula-dist stateless reset key v1\0";
const CID_LABEL: &[u8] = b"macula-dist connection id key v1\0";

/// What a node keeps across restarts. quinn only answers packets whose connection ID
/// passes its generator's check with a reset, so the check key must survive too.
#[derive(Clone)]
pub struct RestartIdentity {
    /// Key of the stateless-reset tokens.
    pub reset_key: hmac::Key,
    /// Key of the connection-ID check (quinn's `HashedConnectionIdGenerator`).
    pub cid_key: u64,
}

impl std::fmt::Debug for RestartIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestartIdentity(..)")
    }
}

/// The identity of `node_name` with `cookie`: HMAC-SHA256 keyed with the cookie over
/// a label and the name, so neither key reveals anything about the cookie.
pub fn derive(node_name: &[u8], cookie: &[u8]) -> RestartIdentity {
    let cookie_key = hmac::Key::new(hmac::HMAC_SHA256, cookie);
    let sub_key = |label: &[u8]| {
        let mut context = hmac::Context::with_key(&cookie_key);
        context.update(label);
        context.update(node_name);
        context.sign()
    };
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&sub_key(CID_LABEL).as_ref()[..8]);
    RestartIdentity {
        reset_key: hmac::Key::new(hmac::HMAC_SHA256, sub_key(RESET_LABEL).as_ref()),
        cid_key: u64::from_be_bytes(cid_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(identity: &RestartIdentity) -> (Vec<u8>, u64) {
        (hmac::sign(&identity.reset_key, b"connection id").as_ref().to_vec(), identity.cid_key)
    }

    #[test]
    fn same_name_and_cookie_give_the_same_key() {
        assert_eq!(token(&derive(b"4433@10.0.0.5", b"secret")), token(&derive(b"4433@10.0.0.5", b"secret")));
    }

    #[test]
    fn another_name_or_cookie_gives_another_key() {
        let (reset, cid) = token(&derive(b"4433@10.0.0.5", b"secret"));
        for (other_reset, other_cid) in
            [token(&derive(b"4434@10.0.0.5", b"secret")), token(&derive(b"4433@10.0.0.5", b"secreT"))]
        {
            assert_ne!(reset, other_reset);
            assert_ne!(cid, other_cid);
        }
    }
}
