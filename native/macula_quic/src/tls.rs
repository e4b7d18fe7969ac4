//! TLS 1.3 configuration for both ends of a connection.
//!
//! Two modes:
//!
//! * **Zero-configuration** (the default): every node makes an ephemeral key and
//!   self-signed certificate at start. Certificates are then not verified against any
//!   authority (there is none); the TLS handshake still proves possession of the
//!   presented key, and the channel is bound to the Erlang cookie above TLS (see `auth`).
//! * **PKI mode** (mutual TLS), when [`PkiFiles`] are given: each node presents its
//!   certificate chain from `certfile`, and both sides verify the peer's chain and
//!   validity period against the CA bundle in `cacertfile` (the server requires a client
//!   certificate). Every client sends the fixed SNI [`SERVER_NAME`], so the TLS layer
//!   does not check which host a certificate names; binding the certificate to the
//!   peer's node name is done above TLS with [`peer_covers_host`] (the `verify_name`
//!   option). The cookie proof of `auth` is made in this mode too.
//!
//! Only TLS 1.3 and one cipher suite are offered, so what `info` reports is what was
//! negotiated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, InconsistentKeys, RootCertStore, SignatureScheme};
use thiserror::Error;

use crate::wire::{ALPN, SERVER_NAME};

/// The only TLS version used.
pub const TLS_VERSION: &str = "TLSv1.3";

/// The only cipher suite offered (QUIC's Initial packets use AES-128-GCM as well).
pub const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// Why a TLS configuration could not be built. The messages name the option and the
/// file at fault: they are shown to whoever configured the node.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("tls configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable QUIC cipher suite: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A PKI file could not be read or holds nothing usable.
    #[error("{option} {path}: {reason}")]
    File { option: &'static str, path: String, reason: String },
    /// The private key is not the one the certificate was issued for.
    #[error("keyfile {keyfile} does not match the certificate in certfile {certfile}")]
    KeyMismatch { certfile: String, keyfile: String },
    #[error("cacertfile {path}: {reason}")]
    Verifier { path: String, reason: String },
}

/// The files of PKI mode, as given by the `certfile`, `keyfile` and `cacertfile` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiFiles {
    /// PEM certificate chain, this node's certificate first.
    pub certfile: PathBuf,
    /// PEM private key of that certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub keyfile: PathBuf,
    /// PEM bundle of the CA certificates peers' chains must lead to.
    pub cacertfile: PathBuf,
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

    /// The chain in `certfile` and the key in `keyfile`, checked to belong together.
    pub fn from_pem_files(certfile: &Path, keyfile: &Path) -> Result<Identity, TlsError> {
        let chain = read_certificates("certfile", certfile)?;
        ParsedCertificate::try_from(&chain[0])
            .map_err(|e| file_error("certfile", certfile, format!("first certificate is not usable: {e}")))?;
        let key = read_private_key(keyfile)?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| file_error("keyfile", keyfile, format!("unsupported private key: {e}")))?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch { certfile: display(certfile), keyfile: display(keyfile) })
            }
            // The provider cannot tell the key's public half: rustls checks it no further either.
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(file_error("certfile", certfile, format!("first certificate is not usable: {e}"))),
        }
        Ok(Identity { chain, key })
    }

    fn clone_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The TLS configurations of an endpoint: zero-configuration mode without `pki`,
/// PKI mode with it. Files are read here, once, when the endpoint is opened.
pub fn configure(
    pki: Option<&PkiFiles>,
) -> Result<(quinn::crypto::rustls::QuicServerConfig, quinn::crypto::rustls::QuicClientConfig), TlsError> {
    match pki {
        None => {
            let identity = Identity::ephemeral()?;
            Ok((server_crypto(&identity)?, client_crypto()?))
        }
        Some(files) => {
            let identity = Identity::from_pem_files(&files.certfile, &files.keyfile)?;
            let roots = Arc::new(load_roots(&files.cacertfile)?);
            Ok((pki_server_crypto(&identity, roots.clone(), &files.cacertfile)?, pki_client_crypto(&identity, roots)?))
        }
    }
}

/// Every certificate in a PEM file, in file order; at least one.
pub fn read_certificates(option: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(option, path, pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(option, path, pem_reason(&e)))?;
    if certificates.is_empty() {
        return Err(file_error(option, path, "no certificate in file (expected a PEM block BEGIN CERTIFICATE)".into()));
    }
    Ok(certificates)
}

/// The first private key in a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => file_error(
            "keyfile",
            path,
            "no private key in file (expected an unencrypted PEM block BEGIN PRIVATE KEY, \
             BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)"
                .into(),
        ),
        other => file_error("keyfile", path, pem_reason(&other)),
    })
}

/// The trust anchors in a PEM CA bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (n, certificate) in read_certificates("cacertfile", path)?.into_iter().enumerate() {
        roots.add(certificate).map_err(|e| {
            file_error("cacertfile", path, format!("certificate {} is not a usable CA certificate: {e}", n + 1))
        })?;
    }
    Ok(roots)
}

fn pem_reason(error: &pem::Error) -> String {
    match error {
        pem::Error::Io(e) => format!("cannot read file: {e}"),
        pem::Error::NoItemsFound => "nothing usable in file".into(),
        other => format!("not a valid PEM file: {other}"),
    }
}

fn file_error(option: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::File { option, path: display(path), reason }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The crypto provider: ring, restricted to [`CIPHER_SUITE`].
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = ring_provider::default_provider();
    provider.cipher_suites = vec![ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(provider)
}

fn finish_server(mut config: rustls::ServerConfig) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(quinn::crypto::rustls::QuicServerConfig::try_from(config)?)
}

fn finish_client(mut config: rustls::ClientConfig) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(quinn::crypto::rustls::QuicClientConfig::try_from(config)?)
}

/// Server side of the QUIC TLS configuration (zero-configuration mode).
pub fn server_crypto(identity: &Identity) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.clone_key())?;
    finish_server(config)
}

/// Client side of the QUIC TLS configuration (zero-configuration mode).
pub fn client_crypto() -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::self_signed()))
        .with_no_client_auth();
    finish_client(config)
}

/// Server side in PKI mode: a client certificate chaining to `roots` is required.
pub fn pki_server_crypto(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    cacertfile: &Path,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier { path: display(cacertfile), reason: format!("{e:?}") })?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.clone_key())?;
    finish_server(config)
}

/// Client side in PKI mode: presents `identity`, and accepts a server whose chain leads
/// to `roots` ([`ServerVerifier`]).
pub fn pki_client_crypto(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::chained_to(roots)))
        .with_client_auth_cert(identity.chain.clone(), identity.clone_key())?;
    finish_client(config)
}

/// Checks the server's certificate.
///
/// * PKI mode (`roots` set): the chain and validity period against the CA bundle, as
///   webpki does for any TLS server, but not the name in it: every client asks for the
///   fixed SNI [`SERVER_NAME`], and the certificate is bound to the node name above TLS
///   (`verify_name`).
/// * Zero-configuration mode: any well-formed certificate; the channel is bound to the
///   cookie above TLS (`auth`).
///
/// In both modes the handshake signature is checked, so the peer proves it holds the key
/// of the certificate it showed.
pub struct ServerVerifier {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerVerifier {
    /// PKI mode: chains must lead to `roots`.
    pub fn chained_to(roots: Arc<RootCertStore>) -> ServerVerifier {
        ServerVerifier { roots: Some(roots), provider: provider() }
    }

    /// Zero-configuration mode.
    pub fn self_signed() -> ServerVerifier {
        ServerVerifier { roots: None, provider: provider() }
    }
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier").field("roots", &self.roots.as_ref().map(|r| r.len())).finish()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
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

/// Why [`peer_covers_host`] could not answer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerNameError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate cannot be parsed: {0}")]
    BadCertificate(String),
}

/// Whether `certificate` is valid for `host`: an IP SAN equal to it for an IP literal
/// (IPv6 may be bracketed), a DNS SAN matching it (wildcards as in webpki) for a host
/// name. The subject's common name is never considered.
pub fn covers_host(certificate: &CertificateDer<'_>, host: &str) -> Result<bool, PeerNameError> {
    let parsed = ParsedCertificate::try_from(certificate).map_err(|e| PeerNameError::BadCertificate(e.to_string()))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    let Ok(name) = ServerName::try_from(host) else { return Ok(false) };
    match rustls::client::verify_server_name(&parsed, &name) {
        Ok(()) => Ok(true),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(false),
        Err(e) => Err(PeerNameError::BadCertificate(e.to_string())),
    }
}

/// The end-entity certificate the peer of `connection` presented, if any (a client in
/// zero-configuration mode presents none).
pub fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// Whether the certificate the peer of `connection` presented covers `host` (see
/// [`covers_host`]). In PKI mode that certificate has already been verified against the CA.
pub fn peer_covers_host(connection: &quinn::Connection, host: &str) -> Result<bool, PeerNameError> {
    let certificate = peer_certificate(connection).ok_or(PeerNameError::NoCertificate)?;
    covers_host(&certificate, host)
}

/// Certificates and files for tests: CAs, node certificates, expired ones.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::PkiFiles;

    pub struct Ca {
        pub issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    pub struct Node {
        pub cert_pem: String,
        pub key_pem: String,
    }

    pub fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A node certificate for `sans` (IP literals become IP SANs), valid now unless `expired`.
    pub fn node(ca: &Ca, sans: &[&str], expired: bool) -> Node {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "macula node");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        Node { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A fresh directory under the system temporary directory.
    pub fn dir() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "macula_quic_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn write(dir: &std::path::Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// The files of a node holding `node`'s certificate and key, trusting `trusted`.
    pub fn files(node: &Node, trusted: &Ca) -> PkiFiles {
        let dir = dir();
        PkiFiles {
            certfile: write(&dir, "cert.pem", &node.cert_pem),
            keyfile: write(&dir, "key.pem", &node.key_pem),
            cacertfile: write(&dir, "ca.pem", &trusted.pem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::{ca, dir, files, node, write};
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

    fn message(error: TlsError) -> String {
        error.to_string()
    }

    #[test]
    fn pki_files_load_and_configure() {
        let ca = ca("CA one");
        let files = files(&node(&ca, &["127.0.0.1"], false), &ca);
        let identity = Identity::from_pem_files(&files.certfile, &files.keyfile).unwrap();
        assert_eq!(identity.chain.len(), 1);
        assert_eq!(load_roots(&files.cacertfile).unwrap().len(), 1);
        configure(Some(&files)).unwrap();
        configure(None).unwrap();
    }

    #[test]
    fn missing_and_unreadable_files_name_option_and_path() {
        let dir = dir();
        let missing = dir.join("nope.pem");
        let e = message(Identity::from_pem_files(&missing, &missing).unwrap_err());
        assert!(e.starts_with(&format!("certfile {}: cannot read file", missing.display())), "{e}");
        let e = message(load_roots(&missing).unwrap_err());
        assert!(e.starts_with(&format!("cacertfile {}: cannot read file", missing.display())), "{e}");
        // A directory is not a readable file either.
        let e = message(load_roots(&dir).unwrap_err());
        assert!(e.starts_with("cacertfile "), "{e}");
    }

    #[test]
    fn files_without_the_expected_pem_blocks_are_refused() {
        let ca = ca("CA one");
        let n = node(&ca, &["127.0.0.1"], false);
        let dir = dir();
        let key_only = write(&dir, "key.pem", &n.key_pem);
        let cert_only = write(&dir, "cert.pem", &n.cert_pem);
        let empty = write(&dir, "empty.pem", "");
        let garbage =
            write(&dir, "garbage.pem", "-----BEGIN CERTIFICATE-----\n%%%not base64%%%\n-----END CERTIFICATE-----\n");
        let unterminated = write(&dir, "cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");

        let e = message(Identity::from_pem_files(&key_only, &key_only).unwrap_err());
        assert!(e.contains("certfile") && e.contains("no certificate in file"), "{e}");
        let e = message(Identity::from_pem_files(&cert_only, &cert_only).unwrap_err());
        assert!(e.starts_with(&format!("keyfile {}: no private key", cert_only.display())), "{e}");
        let e = message(load_roots(&empty).unwrap_err());
        assert!(e.contains("cacertfile") && e.contains("no certificate in file"), "{e}");
        let e = message(Identity::from_pem_files(&garbage, &key_only).unwrap_err());
        assert!(e.contains("certfile") && e.contains("not a valid PEM file"), "{e}");
        let e = message(load_roots(&unterminated).unwrap_err());
        assert!(e.contains("cacertfile") && e.contains("not a valid PEM file"), "{e}");
        // A certificate block that is not a certificate.
        let junk = write(&dir, "junk.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let e = message(Identity::from_pem_files(&junk, &key_only).unwrap_err());
        assert!(e.contains("certfile") && e.contains("not usable"), "{e}");
    }

    #[test]
    fn key_that_does_not_match_the_certificate_is_refused() {
        let ca = ca("CA one");
        let a = node(&ca, &["127.0.0.1"], false);
        let b = node(&ca, &["127.0.0.1"], false);
        let dir = dir();
        let cert = write(&dir, "a.pem", &a.cert_pem);
        let other_key = write(&dir, "b.key", &b.key_pem);
        let e = Identity::from_pem_files(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        let e = message(e);
        assert!(e.contains(&other_key.display().to_string()) && e.contains(&cert.display().to_string()), "{e}");
        // Both halves together are fine.
        let key = write(&dir, "a.key", &a.key_pem);
        Identity::from_pem_files(&cert, &key).unwrap();
    }

    fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
    }

    fn server_verdict(roots: &Arc<RootCertStore>, pem: &str) -> Result<(), rustls::Error> {
        let chain = chain(pem);
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        ServerVerifier::chained_to(roots.clone())
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn client_verdict(roots: &Arc<RootCertStore>, pem: &str) -> Result<(), rustls::Error> {
        let chain = chain(pem);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build().unwrap();
        assert!(verifier.client_auth_mandatory());
        verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map(|_| ())
    }

    fn roots(ca: &test_pki::Ca) -> Arc<RootCertStore> {
        let dir = dir();
        Arc::new(load_roots(&write(&dir, "ca.pem", &ca.pem)).unwrap())
    }

    #[test]
    fn chain_from_the_ca_passes_whatever_name_it_has() {
        let ca = ca("CA one");
        let roots = roots(&ca);
        for sans in [&["127.0.0.1"][..], &["node1.example.com"][..], &["10.1.2.3", "::1"][..]] {
            let n = node(&ca, sans, false);
            server_verdict(&roots, &n.cert_pem).unwrap();
            client_verdict(&roots, &n.cert_pem).unwrap();
        }
    }

    #[test]
    fn chain_from_another_ca_is_refused() {
        let ours = ca("CA one");
        let theirs = ca("CA two");
        let roots = roots(&ours);
        let n = node(&theirs, &["127.0.0.1"], false);
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(server_verdict(&roots, &n.cert_pem), Err(unknown.clone()));
        assert_eq!(client_verdict(&roots, &n.cert_pem), Err(unknown));
        // A self-signed certificate (zero-configuration peer) likewise.
        let zero = Identity::ephemeral().unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        assert!(ServerVerifier::chained_to(roots)
            .verify_server_cert(&zero.chain[0], &[], &name, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn expired_certificate_is_refused() {
        let ca = ca("CA one");
        let roots = roots(&ca);
        let n = node(&ca, &["127.0.0.1"], true);
        let expired = |r: Result<(), rustls::Error>| {
            matches!(
                r,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            )
        };
        assert!(expired(server_verdict(&roots, &n.cert_pem)));
        assert!(expired(client_verdict(&roots, &n.cert_pem)));
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        chain(pem).remove(0)
    }

    #[test]
    fn ip_sans_cover_ip_hosts_only() {
        let ca = ca("CA one");
        let cert = der(&node(&ca, &["127.0.0.1", "::1"], false).cert_pem);
        assert_eq!(covers_host(&cert, "127.0.0.1"), Ok(true));
        assert_eq!(covers_host(&cert, "::1"), Ok(true));
        assert_eq!(covers_host(&cert, "[::1]"), Ok(true));
        assert_eq!(covers_host(&cert, "0:0:0:0:0:0:0:1"), Ok(true));
        assert_eq!(covers_host(&cert, "127.0.0.2"), Ok(false));
        assert_eq!(covers_host(&cert, "10.0.0.1"), Ok(false));
        assert_eq!(covers_host(&cert, "localhost"), Ok(false));
    }

    #[test]
    fn dns_sans_cover_host_names_only() {
        let ca = ca("CA one");
        let cert = der(&node(&ca, &["node1.example.com", "*.cluster.example.com"], false).cert_pem);
        assert_eq!(covers_host(&cert, "node1.example.com"), Ok(true));
        assert_eq!(covers_host(&cert, "NODE1.Example.COM"), Ok(true));
        assert_eq!(covers_host(&cert, "node1.example.com."), Ok(true));
        assert_eq!(covers_host(&cert, "a.cluster.example.com"), Ok(true));
        assert_eq!(covers_host(&cert, "b.a.cluster.example.com"), Ok(false));
        assert_eq!(covers_host(&cert, "node2.example.com"), Ok(false));
        assert_eq!(covers_host(&cert, "example.com"), Ok(false));
        assert_eq!(covers_host(&cert, "127.0.0.1"), Ok(false));
        assert_eq!(covers_host(&cert, "not a host"), Ok(false));
        // The common name does not count.
        let cn_only = der(&node(&ca, &[], false).cert_pem);
        assert_eq!(covers_host(&cn_only, "macula node"), Ok(false));
        assert!(matches!(
            covers_host(&CertificateDer::from(vec![1, 2, 3]), "x"),
            Err(PeerNameError::BadCertificate(_))
        ));
    }
}
