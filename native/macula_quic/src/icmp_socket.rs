//! The endpoint's UDP socket as quinn sees it, with ICMP errors turned into reports.
//!
//! A crashed node's host answers packets to its closed port with ICMP "port
//! unreachable". A plain unconnected UDP socket never hears of it. This wrapper sets
//! `IP_RECVERR` (and `IPV6_RECVERR`), reads the socket's error queue itself and
//! publishes an [`Unreachable`] report for each "destination unreachable" message; the
//! endpoint then probes the connections to that address (`crate::liveness`) and fails
//! pending connects to it at once.
//!
//! The errors are kept away from quinn: with `IP_RECVERR` the kernel also records the
//! error on the socket, so the next plain receive can fail with `ECONNREFUSED`, and
//! quinn's endpoint driver ends on any receive error other than `ConnectionReset`,
//! taking every connection of the node with it. Such errors are swallowed here (the
//! error queue has already told the story), so a forged ICMP message can at most cause
//! a probe, never cut a connection whose peer still answers.
//!
//! The wrapper can also give its port back while quinn still holds it ([`Port::release`]):
//! a closed endpoint keeps its socket until every handle to it and every draining
//! connection is gone, which in the VM waits for the garbage collector, while the next
//! incarnation of the node (`init:restart/0`, in the same OS process) binds the same
//! port at once.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::libc;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::{broadcast, Notify};

/// What an ICMP "destination unreachable" message said about a peer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnreachableKind {
    /// Nothing listens on the port (the node is not running): ICMP port unreachable.
    Port,
    /// The host cannot be reached.
    Host,
    /// The network cannot be reached.
    Network,
    /// A firewall refused the packet.
    Prohibited,
    /// Another kind of destination unreachable.
    Other,
}

impl fmt::Display for UnreachableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnreachableKind::Port => "port unreachable",
            UnreachableKind::Host => "host unreachable",
            UnreachableKind::Network => "network unreachable",
            UnreachableKind::Prohibited => "administratively prohibited",
            UnreachableKind::Other => "destination unreachable",
        })
    }
}

/// An ICMP report that a packet this socket sent to `peer` could not be delivered.
/// Anyone on the path can forge one: it is a hint to probe, not proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreachable {
    pub peer: SocketAddr,
    pub kind: UnreachableKind,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {}", self.kind, self.peer)
    }
}

impl Unreachable {
    /// True when this report is about `addr` (IPv4-mapped IPv6 and IPv4 compare equal).
    pub fn is_about(&self, addr: SocketAddr) -> bool {
        self.peer.port() == addr.port() && self.peer.ip().to_canonical() == addr.ip().to_canonical()
    }
}

/// Reports kept for a slow subscriber before it is told it lagged (and then probes).
pub const REPORT_BACKLOG: usize = 256;

/// Wraps `socket` for quinn; ICMP reports go to `reports`. Must run inside the tokio
/// runtime (a task reads the error queue until the socket is released). The [`Port`]
/// gives the port back on demand; dropping the wrapper gives it back too.
pub fn wrap(
    socket: std::net::UdpSocket,
    reports: broadcast::Sender<Unreachable>,
) -> io::Result<(Arc<dyn AsyncUdpSocket>, Port)> {
    enable_error_queue(&socket)?;
    let state = UdpSocketState::new((&socket).into())?;
    let io = tokio::net::UdpSocket::from_std(socket)?;
    let shared = Arc::new(Shared { io: RwLock::new(Some(Arc::new(io))), state, released: Notify::new() });
    tokio::spawn(read_error_queue(shared.clone(), reports));
    let port = Port(Arc::downgrade(&shared));
    Ok((Arc::new(IcmpSocket { shared }), port))
}

fn enable_error_queue(socket: &std::net::UdpSocket) -> io::Result<()> {
    if socket.local_addr()?.is_ipv6() {
        setsockopt(socket, sockopt::Ipv6RecvErr, &true)?;
        // A dual-stack socket gets ICMPv4 errors for its IPv4 peers only with this too.
        let _ = setsockopt(socket, sockopt::Ipv4RecvErr, &true);
    } else {
        setsockopt(socket, sockopt::Ipv4RecvErr, &true)?;
    }
    Ok(())
}

struct Shared {
    /// `None` once released: the file descriptor closes when the last clone of the
    /// `Arc` (held only for the duration of an await on readiness) goes.
    io: RwLock<Option<Arc<tokio::net::UdpSocket>>>,
    state: UdpSocketState,
    /// Wakes the futures that wait on the socket when it is released.
    released: Notify,
}

impl Shared {
    fn io(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<tokio::net::UdpSocket>>> {
        self.io.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the socket away from every user; returns it for [`Port::release`] to
    /// close. Sleeping users are woken so they drop their clones.
    fn take(&self) -> Option<Arc<tokio::net::UdpSocket>> {
        let io = self.io.write().unwrap_or_else(|p| p.into_inner()).take();
        self.released.notify_waiters();
        io
    }

    /// Runs `wait` on the socket; `None` if the socket is or gets released first (the
    /// waiting future, and with it its clone of the socket, is then dropped).
    async fn until_released<T, F: Future<Output = T>>(
        &self,
        wait: impl FnOnce(Arc<tokio::net::UdpSocket>) -> F,
    ) -> Option<T> {
        let released = self.released.notified();
        tokio::pin!(released);
        // Registered before the socket is read, so a release from now on wakes it.
        released.as_mut().enable();
        let io = self.io().clone()?;
        tokio::select! {
            result = wait(io) => Some(result),
            _ = released => None,
        }
    }

    /// Waits until the socket is writable, or released (then sends are dropped).
    async fn writable(&self) -> io::Result<()> {
        self.until_released(|io| async move { io.writable().await }).await.unwrap_or(Ok(()))
    }
}

/// Gives a wrapped socket's port back: the socket closes, whoever still holds the
/// wrapper. Afterwards sends are dropped (as lost packets) and nothing is received.
#[derive(Clone, Debug)]
pub struct Port(Weak<Shared>);

/// How long [`Port::release`] waits for the users it woke to let go of the socket.
const RELEASE_WAIT: Duration = Duration::from_millis(500);

impl Port {
    /// Returns once the file descriptor is closed (the port free), or after
    /// [`RELEASE_WAIT`] if a user still holds it (then it closes when that one lets go).
    pub async fn release(&self) {
        let Some(mut io) = self.0.upgrade().and_then(|shared| shared.take()) else { return };
        // No new clones can appear (the slot is empty); the error queue reader and any
        // sender waiting for room drop theirs as soon as they run.
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            match Arc::try_unwrap(io) {
                Ok(last) => return drop(last),
                Err(shared) if tokio::time::Instant::now() < deadline => io = shared,
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// False once the socket is released or the wrapper dropped.
    pub fn is_bound(&self) -> bool {
        self.0.upgrade().is_some_and(|shared| shared.io().is_some())
    }
}

/// The socket quinn drives. Dropping it (endpoint gone or rebound) releases the socket
/// and so stops the error queue reader.
pub struct IcmpSocket {
    shared: Arc<Shared>,
}

impl fmt::Debug for IcmpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcmpSocket").field("local", &self.local_addr().ok()).finish()
    }
}

impl Drop for IcmpSocket {
    fn drop(&mut self) {
        drop(self.shared.take());
    }
}

fn released_error() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket released")
}

impl AsyncUdpSocket for IcmpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable { shared: self.shared.clone(), ready: None })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let s = &self.shared;
        // A released socket drops what quinn sends (a closed endpoint's late packets).
        let Some(io) = &*s.io() else { return Ok(()) };
        // quinn-udp returns only WouldBlock; other send errors are logged and dropped.
        io.try_io(Interest::WRITABLE, || s.state.send(io.into(), transmit))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let s = &self.shared;
        // A released socket receives nothing; quinn's driver stays up for its
        // connections' own events (an error would end it and strand their drain).
        let Some(io) = &*s.io() else { return Poll::Pending };
        loop {
            ready!(io.poll_recv_ready(cx))?;
            match io.try_io(Interest::READABLE, || s.state.recv(io.into(), bufs, meta)) {
                Ok(count) => return Poll::Ready(Ok(count)),
                // WouldBlock cleared the readiness: wait again. Any other error is one
                // the kernel recorded from an ICMP message; the error queue reports it,
                // and quinn's driver must never see it.
                Err(_) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.io().as_ref().ok_or_else(released_error)?.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.shared.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.shared.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.shared.state.gro_segments()
    }
}

type ReadyFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Wakes one sending task when the socket is writable again.
struct Writable {
    shared: Arc<Shared>,
    ready: Option<ReadyFuture>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let shared = this.shared.clone();
        let ready = this.ready.get_or_insert_with(|| Box::pin(async move { shared.writable().await }));
        let result = ready.as_mut().poll(cx);
        if result.is_ready() {
            this.ready = None;
        }
        result
    }
}

/// How long the reader pauses after an unexpected error-queue failure (never seen in
/// practice; keeps a persistent failure from spinning a runtime thread).
const QUEUE_FAILURE_PAUSE: Duration = Duration::from_millis(100);

async fn read_error_queue(shared: Arc<Shared>, reports: broadcast::Sender<Unreachable>) {
    loop {
        let ready = shared.until_released(|io| async move { (io.ready(Interest::ERROR).await, io) }).await;
        let Some((Ok(_), io)) = ready else { return };
        let failed = loop {
            match io.try_io(Interest::ERROR, || next_error(&io)) {
                Ok(Some(report)) => {
                    let _ = reports.send(report);
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        drop(io);
        if failed {
            tokio::time::sleep(QUEUE_FAILURE_PAUSE).await;
        }
    }
}

/// Takes one entry from the error queue: `Some` for a destination unreachable message
/// about a peer, `None` for anything else (a local MTU error, an ICMP "fragmentation
/// needed", which path MTU discovery handles on its own).
fn next_error(io: &tokio::net::UdpSocket) -> io::Result<Option<Unreachable>> {
    // The queued copy of our own packet; only its destination (the address) matters.
    let mut payload = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut payload)];
    // Room for the error and the other control messages quinn-udp turned on (packet
    // info, TOS), which the kernel attaches to queued errors too.
    let mut control = Vec::with_capacity(ERROR_CONTROL_SPACE);
    let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
    let message = recvmsg::<SockaddrStorage>(io.as_raw_fd(), &mut iov, Some(&mut control), flags)?;
    let Some(peer) = message.address.as_ref().and_then(socket_addr) else { return Ok(None) };
    for cmsg in message.cmsgs()? {
        let error = match cmsg {
            ControlMessageOwned::Ipv4RecvErr(error, _) | ControlMessageOwned::Ipv6RecvErr(error, _) => error,
            _ => continue,
        };
        return Ok(classify(error.ee_origin, error.ee_type, error.ee_code).map(|kind| Unreachable { peer, kind }));
    }
    Ok(None)
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

const ERROR_CONTROL_SPACE: usize = 512;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_DEST_UNREACH: u8 = 1;

/// The kind of a queued error, from its origin and ICMP type and code (RFC 792, 1122,
/// 1812 for ICMP; RFC 4443 for ICMPv6).
fn classify(origin: u8, icmp_type: u8, code: u8) -> Option<UnreachableKind> {
    use UnreachableKind::*;
    match (origin, icmp_type) {
        (libc::SO_EE_ORIGIN_ICMP, ICMP_DEST_UNREACH) => Some(match code {
            ICMP_FRAG_NEEDED => return None,
            3 => Port,
            0 | 6 => Network,
            1 | 7 => Host,
            9 | 10 | 13 => Prohibited,
            _ => Other,
        }),
        (libc::SO_EE_ORIGIN_ICMP6, ICMPV6_DEST_UNREACH) => Some(match code {
            4 => Port,
            0 => Network,
            3 => Host,
            1 | 5 | 6 => Prohibited,
            _ => Other,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};

    use super::*;

    #[test]
    fn icmp_types_are_classified() {
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP, 3, 3), Some(UnreachableKind::Port));
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP, 3, 1), Some(UnreachableKind::Host));
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP, 3, 13), Some(UnreachableKind::Prohibited));
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP, 3, ICMP_FRAG_NEEDED), None);
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP, 11, 0), None);
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP6, 1, 4), Some(UnreachableKind::Port));
        assert_eq!(classify(libc::SO_EE_ORIGIN_ICMP6, 2, 0), None);
        assert_eq!(classify(libc::SO_EE_ORIGIN_LOCAL, 0, 0), None);
    }

    #[test]
    fn mapped_and_plain_ipv4_addresses_compare_equal() {
        let report = Unreachable { peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 4433)), kind: UnreachableKind::Port };
        assert!(report.is_about(SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 4433))));
        assert!(!report.is_about(SocketAddr::from((Ipv4Addr::LOCALHOST, 4434))));
        assert!(!report.is_about(SocketAddr::from((Ipv6Addr::LOCALHOST, 4433))));
    }

    /// Sends as quinn does: wait for writability whenever the socket would block.
    async fn send(socket: &Arc<dyn AsyncUdpSocket>, transmit: &Transmit<'_>) {
        let mut poller = socket.clone().create_io_poller();
        loop {
            match socket.try_send(transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.unwrap()
                }
                result => return result.unwrap(),
            }
        }
    }

    /// A datagram to a closed loopback port comes back as a port unreachable report,
    /// and the socket keeps working for quinn afterwards.
    #[tokio::test]
    async fn a_closed_port_is_reported_and_the_socket_keeps_receiving() {
        let closed = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let (reports, mut received) = broadcast::channel(REPORT_BACKLOG);
        let (socket, _port) = wrap(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(), reports).unwrap();
        let local = socket.local_addr().unwrap();
        let transmit =
            Transmit { destination: closed_addr, ecn: None, contents: b"hello", segment_size: None, src_ip: None };
        send(&socket, &transmit).await;
        let report = tokio::time::timeout(Duration::from_secs(2), received.recv()).await.unwrap().unwrap();
        assert_eq!(report, Unreachable { peer: closed_addr, kind: UnreachableKind::Port });
        // A second error, then a real datagram: the receive path only sees the datagram.
        send(&socket, &transmit).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sender.send_to(b"still here", local).unwrap();
        let mut buf = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let count = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            socket.poll_recv(cx, &mut bufs, &mut meta)
        });
        let count = tokio::time::timeout(Duration::from_secs(2), count).await.unwrap().unwrap();
        assert_eq!(count, 1);
        assert_eq!(&buf[..meta[0].len], b"still here");
    }
}
