//! The subject of an X.509 certificate as text (`CN=node1,O=Example`), for
//! `macula_dist:info/1`. A small DER walk with every length checked: the certificate
//! comes from the peer, so a malformed one gives `None`, never a panic.

/// One DER element: its tag, its contents, and what follows it.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    rest: &'a [u8],
}

fn element(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    let (&first, after_len) = after_tag.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), after_len)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || after_len.len() < count {
            return None;
        }
        let len = after_len[..count].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &after_len[count..])
    };
    if body.len() < len {
        return None;
    }
    Some(Element { tag, contents: &body[..len], rest: &body[len..] })
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const EXPLICIT_VERSION: u8 = 0xa0;

/// `Name` of the certificate's subject: Certificate -> tbsCertificate -> the sixth
/// field (after version, serial, signature algorithm, issuer, validity).
fn subject_der(certificate: &[u8]) -> Option<&[u8]> {
    let cert = element(certificate).filter(|e| e.tag == SEQUENCE)?;
    let tbs = element(cert.contents).filter(|e| e.tag == SEQUENCE)?;
    let mut field = element(tbs.contents)?;
    if field.tag == EXPLICIT_VERSION {
        field = element(field.rest)?;
    }
    // serial -> signature algorithm -> issuer -> validity -> subject
    for _ in 0..4 {
        field = element(field.rest)?;
    }
    (field.tag == SEQUENCE).then_some(field.contents)
}

/// Short names of the attribute types certificates commonly carry (RFC 4514).
fn attribute_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        [0x55, 0x04, 0x05] => "serialNumber",
        _ => return None,
    })
}

/// Dotted form of an OID that has no short name.
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &byte in oid {
        value = (value << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// The subject of a DER certificate, as `Type=Value` pairs joined by commas in the
/// certificate's order; `None` if it cannot be read.
pub fn subject(certificate: &[u8]) -> Option<String> {
    let mut rdns = subject_der(certificate)?;
    let mut parts = Vec::new();
    while !rdns.is_empty() {
        let rdn = element(rdns).filter(|e| e.tag == SET)?;
        let mut attributes = rdn.contents;
        while !attributes.is_empty() {
            let attribute = element(attributes).filter(|e| e.tag == SEQUENCE)?;
            let oid = element(attribute.contents).filter(|e| e.tag == OID)?;
            let value = element(oid.rest)?;
            let name = attribute_name(oid.contents).map(str::to_owned).unwrap_or_else(|| dotted(oid.contents));
            parts.push(format!("{name}={}", String::from_utf8_lossy(value.contents)));
            attributes = attribute.rest;
        }
        rdns = rdn.rest;
    }
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_pki;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate").to_vec()
    }

    #[test]
    fn reads_the_subject_of_a_node_certificate() {
        let ca = test_pki::ca("test CA");
        let node = test_pki::node(&ca, &["127.0.0.1"], false);
        assert_eq!(subject(&der(&node.cert_pem)).as_deref(), Some("CN=macula node"));
        assert_eq!(subject(&der(&ca.pem)).as_deref(), Some("CN=test CA"));
    }

    #[test]
    fn truncated_or_garbage_input_gives_none() {
        let ca = test_pki::ca("test CA");
        let full = der(&ca.pem);
        for len in 0..full.len() {
            // Every prefix is malformed: the outer length no longer fits.
            assert_eq!(subject(&full[..len]), None, "prefix of {len} bytes");
        }
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject(b"not a certificate"), None);
    }

    #[test]
    fn unknown_attribute_types_are_dotted() {
        assert_eq!(dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]), "1.2.840.113549");
    }
}
