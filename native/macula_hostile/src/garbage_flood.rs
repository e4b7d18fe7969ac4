//! `garbage-flood`: random datagrams at a node's port, at a fixed rate.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngExt};

use crate::{net, Res};

/// The kinds of datagram sent, in the order of the counts printed at the end.
const KINDS: &str = "noise,v1_initial,v1_other_long,unknown_version,short";

/// One random datagram: plain noise, or noise dressed as a QUIC packet (v1 Initial,
/// other v1 long headers, an unknown version, a short header). Returns its kind too.
fn datagram(rng: &mut StdRng) -> (usize, Vec<u8>) {
    let kind = rng.random_range(0..=4);
    let len = match kind {
        0 => rng.random_range(1..=1500),
        2 => rng.random_range(48..=1500),
        1 | 3 => rng.random_range(1200..=1500),
        _ => rng.random_range(21..=1500),
    };
    let mut p = vec![0; len];
    rng.fill_bytes(&mut p);
    match kind {
        1..=3 => {
            // Long header: form and fixed bits, type, version, DCID and SCID with their
            // lengths (at most 1 + 4 + 1 + 20 + 1 + 20 = 47 bytes, under the 48 minimum).
            let packet_type = if kind == 1 { 0 } else { rng.random_range(1..=3u8) };
            p[0] = 0xC0 | (packet_type << 4) | (p[0] & 0x0F);
            let version: u32 = if kind == 3 { 0x0a0a_0a0a | (rng.random::<u32>() & 0xf0f0_f0f0) } else { 1 };
            p[1..5].copy_from_slice(&version.to_be_bytes());
            let dcid_len = rng.random_range(8..=20);
            p[5] = dcid_len as u8;
            let at = 6 + dcid_len;
            let scid_len = rng.random_range(0..=20);
            p[at] = scid_len as u8;
            let at = at + 1 + scid_len;
            if kind == 1 {
                // An Initial of at least 1200 bytes: an empty token, then the length of
                // the rest as a 2-byte varint.
                p[at] = 0;
                let rest = (len - at - 3) as u16 & 0x3FFF;
                p[at + 1] = 0x40 | (rest >> 8) as u8;
                p[at + 2] = rest as u8;
            }
        }
        4 => p[0] = 0x40 | (p[0] & 0x3F),
        _ => {}
    }
    (kind, p)
}

/// Counts what the node sends back (version negotiation, stateless resets), to show
/// the garbage was processed and to compare reply bytes with flood bytes.
#[derive(Default)]
struct Replies {
    datagrams: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
}

impl Replies {
    fn count_from(self: Arc<Self>, socket: UdpSocket) -> Res<()> {
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !self.stop.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    self.datagrams.fetch_add(1, Ordering::Relaxed);
                    self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        Ok(())
    }

    fn report(&self) -> String {
        format!("replies={} reply_bytes={}", self.datagrams.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

pub fn run(target: SocketAddr, seconds: f64, rate: u64) -> Res<i32> {
    let socket = UdpSocket::bind(net::local_for(target))?;
    let replies = Arc::new(Replies::default());
    replies.clone().count_from(socket.try_clone()?)?;
    let mut rng: StdRng = rand::make_rng();
    let mut kinds = [0u64; 5];
    let (mut sent, mut bytes, mut errors) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let mut next_report = Duration::from_secs(1);
    println!("FLOOD started target={target} from={} seconds={seconds} rate={rate}", socket.local_addr()?);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        if elapsed >= next_report {
            let t = elapsed.as_secs_f64();
            println!("FLOOD progress t={t:.1} sent={sent} bytes={bytes} send_errors={errors} {}", replies.report());
            next_report += Duration::from_secs(1);
        }
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..(due - sent).min(1000) {
            let (kind, packet) = datagram(&mut rng);
            kinds[kind] += 1;
            match socket.send_to(&packet, target) {
                Ok(n) => bytes += n as u64,
                Err(_) => errors += 1,
            }
            sent += 1;
        }
    }
    replies.stop.store(true, Ordering::Relaxed);
    println!(
        "FLOOD done seconds={:.1} sent={sent} bytes={bytes} send_errors={errors} {} kinds({KINDS})={kinds:?}",
        start.elapsed().as_secs_f64(),
        replies.report(),
    );
    Ok(0)
}
