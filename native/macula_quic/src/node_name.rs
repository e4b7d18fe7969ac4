//! Node names of the form `Port@Host`: the UDP port is the name, so no EPMD is needed.
//!
//! `Host` is an IPv4 literal, an IPv6 literal (`4433@::1`, also `4433@[::1]`) or a DNS
//! host name. Resolution of host names is asynchronous (`tokio::net::lookup_host`), so it
//! never blocks a BEAM scheduler.

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

/// Where a node listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    pub port: u16,
    pub host: Host,
}

/// The host part of a node name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Why a node name is not a macula name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("node name has no '@'")]
    NoAt,
    #[error("'{0}' is not a UDP port number (1..65535)")]
    BadPort(String),
    #[error("'{0}' is neither an IP address nor a valid host name")]
    BadHost(String),
}

/// Why a node's address could not be resolved.
#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("host name lookup failed: {0}")]
    Lookup(#[from] std::io::Error),
    #[error("host name has no address")]
    NoAddress,
}

impl NodeAddress {
    /// Parses `Port@Host`.
    pub fn parse(node: &str) -> Result<NodeAddress, NameError> {
        let (port, host) = node.split_once('@').ok_or(NameError::NoAt)?;
        Ok(NodeAddress { port: parse_port(port)?, host: Host::parse(host)? })
    }

    /// The socket addresses of this node, IP literals first-hand, names through DNS.
    pub async fn resolve(&self) -> Result<SocketAddr, ResolveError> {
        match &self.host {
            Host::Ip(ip) => Ok(SocketAddr::new(*ip, self.port)),
            Host::Name(name) => {
                tokio::net::lookup_host((name.as_str(), self.port)).await?.next().ok_or(ResolveError::NoAddress)
            }
        }
    }
}

/// Parses the name part of a node name as a UDP port. Leading zeros are refused so that
/// one port has exactly one node name.
pub fn parse_port(text: &str) -> Result<u16, NameError> {
    let bad = || NameError::BadPort(text.to_string());
    if text.is_empty() || text.len() > 5 || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

impl Host {
    /// Parses an IP literal (IPv6 optionally in brackets) or a DNS host name.
    pub fn parse(text: &str) -> Result<Host, NameError> {
        let unbracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if is_host_name(text) {
            Ok(Host::Name(text.to_string()))
        } else {
            Err(NameError::BadHost(text.to_string()))
        }
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
fn is_host_name(text: &str) -> bool {
    let text = text.strip_suffix('.').unwrap_or(text);
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        // An all-numeric dotted name that is not an IP literal (e.g. "1.2.3") is a typo.
        && !text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_ipv6_and_host_names() {
        assert_eq!(
            NodeAddress::parse("4433@192.168.1.100").unwrap(),
            NodeAddress { port: 4433, host: Host::Ip(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 100))) }
        );
        assert_eq!(NodeAddress::parse("4437@::1").unwrap().host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(NodeAddress::parse("4437@[::1]").unwrap().host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(NodeAddress::parse("1@db-1.example.org").unwrap().host, Host::Name("db-1.example.org".into()));
    }

    #[test]
    fn malformed_names_say_what_is_wrong() {
        assert_eq!(NodeAddress::parse("foo"), Err(NameError::NoAt));
        assert_eq!(NodeAddress::parse("foo@127.0.0.1"), Err(NameError::BadPort("foo".into())));
        assert_eq!(NodeAddress::parse("0@127.0.0.1"), Err(NameError::BadPort("0".into())));
        assert_eq!(NodeAddress::parse("080@127.0.0.1"), Err(NameError::BadPort("080".into())));
        assert_eq!(NodeAddress::parse("65536@127.0.0.1"), Err(NameError::BadPort("65536".into())));
        assert_eq!(NodeAddress::parse("+80@127.0.0.1"), Err(NameError::BadPort("+80".into())));
        assert_eq!(NodeAddress::parse("80@"), Err(NameError::BadHost("".into())));
        assert_eq!(NodeAddress::parse("80@bad_host"), Err(NameError::BadHost("bad_host".into())));
        assert_eq!(NodeAddress::parse("80@1.2.3"), Err(NameError::BadHost("1.2.3".into())));
        assert_eq!(NodeAddress::parse("80@-a.b"), Err(NameError::BadHost("-a.b".into())));
    }

    #[tokio::test]
    async fn literals_resolve_without_dns() {
        let addr = NodeAddress::parse("4433@127.0.0.1").unwrap().resolve().await.unwrap();
        assert_eq!(addr, "127.0.0.1:4433".parse().unwrap());
    }
}
