//! TLS 1.3 configuration for both ends of a connection.
//!
//! Zero-configuration mode: every node makes an ephemeral key and self-signed
//! certificate at start. Certificates are then not verified against any authority (there
//! is none); the TLS handshake still proves possession of the presented key, and the
//! channel is bound to the Erlang cookie above TLS (see `auth`). Only TLS 1.3 and one
//! cipher suite are offered, so what `info` reports is what was negotiated.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

/// ALPN protocol name; a peer that does not speak it is refused during the TLS handshake.
pub const ALPN: &[u8] = b"macula-dist/1";

/// The SNI every client sends in zero-configuration mode.
pub const SERVER_NAME: &str = "macula";

/// The only TLS version used.
pub const TLS_VERSION: &str = "TLSv1.3";

/// The only cipher suite offered (QUIC's Initial packets use AES-128-GCM as well).
pub const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("tls configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable QUIC cipher suite: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A fresh P-256 key with a self-signed certificate for [`SERVER_NAME`].
    pub fn ephemeral() -> Result<Identity, TlsError> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        Ok(Identity { chain: vec![certified.cert.der().clone()], key: PrivateKeyDer::Pkcs8(key) })
    }

    fn clone_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The crypto provider: ring, restricted to [`CIPHER_SUITE`].
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = ring_provider::default_provider();
    provider.cipher_suites = vec![ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(provider)
}

/// Server side of the QUIC TLS configuration.
pub fn server_crypto(identity: &Identity) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(quinn::crypto::rustls::QuicServerConfig::try_from(config)?)
}

/// Client side of the QUIC TLS configuration (zero-configuration mode).
pub fn client_crypto() -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SelfSignedPeer { provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(quinn::crypto::rustls::QuicClientConfig::try_from(config)?)
}

/// Accepts any well-formed server certificate but still checks the handshake signature,
/// so the peer proves it holds the key of the certificate it showed.
#[derive(Debug)]
struct SelfSignedPeer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SelfSignedPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_identities_are_fresh_and_usable() {
        let a = Identity::ephemeral().unwrap();
        let b = Identity::ephemeral().unwrap();
        assert_eq!(a.chain.len(), 1);
        assert_ne!(a.chain[0], b.chain[0]);
        server_crypto(&a).unwrap();
        client_crypto().unwrap();
    }
}
