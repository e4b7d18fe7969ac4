//! Hostile peers and relays for testing `macula_dist` against real nodes
//! (test/macula_security_SUITE.erl drives it).
//!
//! ```text
//! macula_hostile garbage-flood <ip:port> <seconds> <rate_pps>
//! macula_hostile half-open     <ip:port> <count> <hold_seconds> [silent|partial|frame|mixed] [rate_per_s]
//! macula_hostile malformed     <ip:port> <cookie> <own_node_name> <mode>
//!     modes: bad-proof auth-fin oversized-handshake bad-dist junk-data junk-packet
//!            late-control pipelined-control control-fin
//! macula_hostile mitm          <listen ip:port> <target ip:port>
//! macula_hostile udp-relay     <listen ip:port> <target ip:port>
//! macula_hostile md5           <text>     (self-check of the built-in MD5)
//! ```
//!
//! Every line printed starts with a word naming the subcommand (`FLOOD`, `HALFOPEN`,
//! `MALFORMED`, `MITM`, `RELAY`) so a test can wait for a line by prefix. Exit status:
//! 0 the run went as intended, 1 bad arguments or setup failure, 2 the peer did not do
//! what the run was waiting for (e.g. it never closed a misbehaving connection).
//!
//! Only loopback addresses are accepted unless `MACULA_HOSTILE_ALLOW_NON_LOOPBACK=1`.
//! With `MACULA_HOSTILE_EXIT_ON_EOF=1` the tool exits when its stdin closes, so a test
//! harness that dies cannot leave it running.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use macula_quic::auth::{self, Role, PROOF_LEN};
use macula_quic::frame::{self, Frame, FrameDecoder, HeaderWidth};
use macula_quic::tls::{self, Identity};
use quinn::{ClientConfig, ConnectionError, Endpoint, RecvStream, SendStream, ServerConfig, TransportConfig, VarInt};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const USAGE: &str = "usage:
  macula_hostile garbage-flood <ip:port> <seconds> <rate_pps>
  macula_hostile half-open <ip:port> <count> <hold_seconds> [silent|partial|frame|mixed] [rate_per_s]
  macula_hostile malformed <ip:port> <cookie> <own_node_name> <mode>
      modes: bad-proof auth-fin oversized-handshake bad-dist junk-data junk-packet
             late-control pipelined-control control-fin
  macula_hostile mitm <listen ip:port> <target ip:port>
  macula_hostile udp-relay <listen ip:port> <target ip:port>
  macula_hostile md5 <text>";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var("MACULA_HOSTILE_EXIT_ON_EOF").as_deref() == Ok("1") {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(3);
        });
    }
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            println!("ERROR {e}");
            eprintln!("{USAGE}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &[String]) -> Res<i32> {
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or_else(|| format!("missing argument {i}"));
    match args.first().map(String::as_str) {
        Some("garbage-flood") => garbage_flood(addr(arg(1)?)?, arg(2)?.parse()?, arg(3)?.parse()?),
        Some("half-open") => {
            let mode = args.get(4).map(String::as_str).unwrap_or("mixed").to_string();
            let rate: f64 = args.get(5).map(|r| r.parse()).transpose()?.unwrap_or(0.0);
            runtime()?.block_on(half_open(addr(arg(1)?)?, arg(2)?.parse()?, arg(3)?.parse()?, mode, rate))
        }
        Some("malformed") => {
            let (target, cookie, name, mode) =
                (addr(arg(1)?)?, arg(2)?.to_string(), arg(3)?.to_string(), arg(4)?.to_string());
            runtime()?.block_on(malformed(target, cookie, name, mode))
        }
        Some("mitm") => runtime()?.block_on(mitm(addr(arg(1)?)?, addr(arg(2)?)?)),
        Some("udp-relay") => runtime()?.block_on(udp_relay(addr(arg(1)?)?, addr(arg(2)?)?)),
        Some("md5") => {
            println!("{}", hex(&md5(arg(1)?.as_bytes())));
            Ok(0)
        }
        _ => Err("unknown subcommand".into()),
    }
}

fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Parses `ip:port` and refuses anything but loopback (unless explicitly allowed).
fn addr(text: &str) -> Res<SocketAddr> {
    let addr: SocketAddr = text.parse().map_err(|e| format!("bad address {text:?}: {e}"))?;
    let allowed = std::env::var("MACULA_HOSTILE_ALLOW_NON_LOOPBACK").as_deref() == Ok("1");
    if !addr.ip().is_loopback() && !allowed {
        return Err(format!("{addr} is not a loopback address (set MACULA_HOSTILE_ALLOW_NON_LOOPBACK=1)").into());
    }
    Ok(addr)
}

fn any_addr(like: SocketAddr) -> SocketAddr {
    if like.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    }
}

/// A fast non-cryptographic generator (xorshift64*), seeded from the OS.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let mut seed = [0u8; 8];
        let _ = SystemRandom::new().fill(&mut seed);
        Rng(u64::from_le_bytes(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(VarInt::from_u32(60_000).into())).keep_alive_interval(Some(Duration::from_secs(1)));
    Arc::new(t)
}

/// A client endpoint that accepts any server certificate (zero-configuration mode) and
/// speaks ALPN macula-dist/1.
fn client_endpoint(like: SocketAddr) -> Res<Endpoint> {
    let mut endpoint = Endpoint::client(any_addr(like))?;
    let mut config = ClientConfig::new(Arc::new(tls::client_crypto()?));
    config.transport_config(transport());
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn describe_close(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            format!("application_close code={} reason={:?}", close.error_code, String::from_utf8_lossy(&close.reason))
        }
        ConnectionError::ConnectionClosed(close) => format!("transport_close {close}"),
        ConnectionError::TimedOut => "idle_timeout".into(),
        ConnectionError::Reset => "stateless_reset".into(),
        ConnectionError::LocallyClosed => "locally_closed".into(),
        other => format!("other {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// garbage-flood
// ---------------------------------------------------------------------------------------

/// One random datagram: plain noise, or noise dressed as a QUIC packet (v1 Initial,
/// other v1 long headers, an unknown version, a short header).
fn garbage_datagram(rng: &mut Rng, kinds: &mut [u64; 5]) -> Vec<u8> {
    let kind = rng.range(0, 4);
    kinds[kind] += 1;
    match kind {
        0 => {
            let len = rng.range(1, 1500);
            rng.bytes(len)
        }
        1..=3 => {
            let len = if kind == 2 { rng.range(48, 1500) } else { rng.range(1200, 1500) };
            let mut p = rng.bytes(len);
            let packet_type = if kind == 1 { 0 } else { rng.range(1, 3) as u8 };
            p[0] = 0xC0 | (packet_type << 4) | (p[0] & 0x0F);
            let version: u32 = if kind == 3 { 0x0a0a_0a0a | (rng.next() as u32 & 0xf0f0_f0f0) } else { 1 };
            p[1..5].copy_from_slice(&version.to_be_bytes());
            let dcid_len = rng.range(8, 20);
            p[5] = dcid_len as u8;
            let at = 6 + dcid_len;
            let scid_len = rng.range(0, 20);
            p[at] = scid_len as u8;
            let at = at + 1 + scid_len;
            if kind == 1 {
                p[at] = 0; // token length
                let rest = (len - at - 3) as u16 & 0x3FFF;
                p[at + 1] = 0x40 | (rest >> 8) as u8;
                p[at + 2] = rest as u8;
            }
            p
        }
        _ => {
            let len = rng.range(21, 1500);
            let mut p = rng.bytes(len);
            p[0] = 0x40 | (p[0] & 0x3F);
            p
        }
    }
}

fn garbage_flood(target: SocketAddr, seconds: f64, rate: u64) -> Res<i32> {
    let socket = StdUdpSocket::bind(any_addr(target))?;
    // What the target sends back (version negotiation, stateless resets): counted to
    // show the garbage was processed, and to compare reply bytes with flood bytes.
    let replies = Arc::new(AtomicU64::new(0));
    let reply_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (socket, replies, reply_bytes, stop) =
            (socket.try_clone()?, replies.clone(), reply_bytes.clone(), stop.clone());
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    replies.fetch_add(1, Ordering::Relaxed);
                    reply_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    }
    let mut rng = Rng::seeded();
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
            println!(
                "FLOOD progress t={:.1} sent={sent} bytes={bytes} send_errors={errors} replies={} reply_bytes={}",
                elapsed.as_secs_f64(),
                replies.load(Ordering::Relaxed),
                reply_bytes.load(Ordering::Relaxed)
            );
            next_report += Duration::from_secs(1);
        }
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..(due - sent).min(1000) {
            let packet = garbage_datagram(&mut rng, &mut kinds);
            match socket.send_to(&packet, target) {
                Ok(n) => bytes += n as u64,
                Err(_) => errors += 1,
            }
            sent += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    println!(
        "FLOOD done seconds={:.1} sent={sent} bytes={bytes} send_errors={errors} replies={} reply_bytes={} \
         kinds(noise,v1_initial,v1_other_long,unknown_version,short)={:?}",
        start.elapsed().as_secs_f64(),
        replies.load(Ordering::Relaxed),
        reply_bytes.load(Ordering::Relaxed),
        kinds
    );
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// half-open
// ---------------------------------------------------------------------------------------

enum HalfOpenEvent {
    Established,
    Failed { index: usize, ms: u128, why: String },
    Closed { index: usize, after_ms: u128, why: String },
}

async fn half_open(target: SocketAddr, count: usize, hold: f64, mode: String, rate: f64) -> Res<i32> {
    if !["silent", "partial", "frame", "mixed"].contains(&mode.as_str()) {
        return Err(format!("unknown half-open mode {mode}").into());
    }
    let endpoint = client_endpoint(target)?;
    let (events, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    println!("HALFOPEN started target={target} count={count} hold={hold} mode={mode} rate={rate}");
    for index in 0..count {
        let at = if rate > 0.0 { Duration::from_secs_f64(index as f64 / rate) } else { Duration::ZERO };
        let (endpoint, events) = (endpoint.clone(), events.clone());
        let what = match mode.as_str() {
            "mixed" => ["silent", "partial", "frame"][index % 3],
            m => {
                if m == "silent" {
                    "silent"
                } else if m == "partial" {
                    "partial"
                } else {
                    "frame"
                }
            }
        };
        tokio::spawn(async move {
            tokio::time::sleep_until((start + at).into()).await;
            let connecting = match endpoint.connect(target, macula_quic::wire::SERVER_NAME) {
                Ok(c) => c,
                Err(e) => {
                    let _ = events.send(HalfOpenEvent::Failed {
                        index,
                        ms: start.elapsed().as_millis(),
                        why: e.to_string(),
                    });
                    return;
                }
            };
            let conn = match tokio::time::timeout(Duration::from_secs(20), connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    let why = describe_close(&e);
                    let _ = events.send(HalfOpenEvent::Failed { index, ms: start.elapsed().as_millis(), why });
                    return;
                }
                Err(_) => {
                    let why = "handshake timeout (20 s)".into();
                    let _ = events.send(HalfOpenEvent::Failed { index, ms: start.elapsed().as_millis(), why });
                    return;
                }
            };
            let established = Instant::now();
            let _ = events.send(HalfOpenEvent::Established);
            // The control stream; "silent" opens it but never writes, so the server never
            // even learns of it.
            let mut streams = None;
            if let Ok((mut send, recv)) = conn.open_bi().await {
                let _ = match what {
                    "partial" => send.write_all(&[0]).await.map_err(|_| ()),
                    "frame" => {
                        let mut f = vec![0, 100];
                        f.extend_from_slice(&[b'A'; 10]);
                        send.write_all(&f).await.map_err(|_| ())
                    }
                    _ => Ok(()),
                };
                streams = Some((send, recv));
            }
            let error = conn.closed().await;
            drop(streams);
            let _ = events.send(HalfOpenEvent::Closed {
                index,
                after_ms: established.elapsed().as_millis(),
                why: describe_close(&error),
            });
        });
    }
    drop(events);

    let (mut established, mut failed, mut closed) = (0usize, 0usize, 0usize);
    let mut fail_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut close_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut close_times: Vec<u128> = Vec::new();
    let mut handle = |event: HalfOpenEvent, established: &mut usize, failed: &mut usize, closed: &mut usize| match event
    {
        HalfOpenEvent::Established => *established += 1,
        HalfOpenEvent::Failed { index, ms, why } => {
            *failed += 1;
            println!("HALFOPEN failed i={index} at_ms={ms} reason={why}");
            *fail_reasons.entry(why).or_default() += 1;
        }
        HalfOpenEvent::Closed { index, after_ms, why } => {
            *closed += 1;
            println!("HALFOPEN closed i={index} after_ms={after_ms} reason={why}");
            *close_reasons.entry(why).or_default() += 1;
            close_times.push(after_ms);
        }
    };
    while established + failed < count {
        match rx.recv().await {
            Some(event) => handle(event, &mut established, &mut failed, &mut closed),
            None => break,
        }
    }
    println!(
        "HALFOPEN ready elapsed_ms={} attempted={count} established={established} failed={failed} closed_by_server={closed} open={}",
        start.elapsed().as_millis(),
        established - closed
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(hold);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => handle(event, &mut established, &mut failed, &mut closed),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
        if closed == established && established + failed == count {
            break;
        }
    }
    close_times.sort_unstable();
    let pct = |p: usize| close_times.get((close_times.len().saturating_sub(1)) * p / 100).copied().unwrap_or(0);
    println!(
        "HALFOPEN done elapsed_ms={} attempted={count} established={established} failed={failed} closed_by_server={closed} \
         still_open={} close_after_ms(min,median,max)=({},{},{})",
        start.elapsed().as_millis(),
        established - closed,
        pct(0),
        pct(50),
        pct(100)
    );
    for (why, n) in &close_reasons {
        println!("HALFOPEN close_reason count={n} reason={why}");
    }
    for (why, n) in &fail_reasons {
        println!("HALFOPEN fail_reason count={n} reason={why}");
    }
    endpoint.close(VarInt::from_u32(0), b"done");
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// malformed: an authenticated raw client that then misbehaves
// ---------------------------------------------------------------------------------------

/// Reads whole control frames (2-byte length prefix), skipping ticks.
struct ControlReader {
    recv: RecvStream,
    decoder: FrameDecoder<Vec<u8>>,
    ready: std::collections::VecDeque<Vec<u8>>,
}

impl ControlReader {
    fn new(recv: RecvStream) -> Self {
        ControlReader {
            recv,
            decoder: FrameDecoder::new(HeaderWidth::Two, HeaderWidth::Two.max_payload()),
            ready: Default::default(),
        }
    }

    async fn next(&mut self) -> Res<Vec<u8>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(frame);
            }
            let chunk = match self.recv.read_chunk(usize::MAX, true).await? {
                Some(chunk) => chunk.bytes,
                None => return Err("control stream finished by the server".into()),
            };
            let ready = &mut self.ready;
            self.decoder.feed(&chunk, |f| {
                if let Frame::Packet(p) = f {
                    ready.push_back(p);
                }
            })?;
        }
    }
}

const MANDATORY_DFLAGS_25: u64 =
    0x04 | 0x10 | 0x100 | 0x80 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x20000 | 0x40000 | 0x0100_0000;
/// What a hidden OTP 25 node announces (no DFLAG_PUBLISHED, no atom cache, no fragments).
const OUR_DFLAGS: u64 = MANDATORY_DFLAGS_25
    | 0x0400_0000 // MANDATORY_25_DIGEST
    | 0x08 | 0x20 // DIST_MONITOR, DIST_MONITOR_NAME
    | 0x1000 | 0x4000 // UNICODE_IO, SMALL_ATOM_TAGS
    | 0x8_0000 | 0x10_0000 | 0x40_0000 | 0x0200_0000 // SEND_SENDER, BIG_SEQTRACE_LABELS, EXIT_PAYLOAD, UNLINK_ID
    | (0x01 << 32) | (0x04 << 32) | (0x08 << 32); // SPAWN, V4_NC, ALIAS

/// `erlang:md5([Cookie | integer_to_list(Challenge)])`, dist_util's digest.
fn dist_digest(cookie: &str, challenge: u32) -> [u8; 16] {
    md5(format!("{cookie}{challenge}").as_bytes())
}

async fn send_control(send: &mut SendStream, payload: &[u8]) -> Res<()> {
    send.write_all(&frame::control_frame(payload)?).await?;
    Ok(())
}

/// dist_util's handshake as the connecting side, up to the challenge reply (with a wrong
/// digest if asked; followed in the same write by `extra` frame if given).
/// Returns the challenge we sent (for checking the ack).
async fn dist_handshake_until_reply(
    send: &mut SendStream,
    reader: &mut ControlReader,
    cookie: &str,
    name: &str,
    rng: &mut Rng,
    wrong_digest: bool,
    extra: Option<&[u8]>,
) -> Res<u32> {
    let creation = (rng.next() as u32) | 1;
    let mut send_name = vec![b'N'];
    send_name.extend_from_slice(&OUR_DFLAGS.to_be_bytes());
    send_name.extend_from_slice(&creation.to_be_bytes());
    send_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    send_name.extend_from_slice(name.as_bytes());
    send_control(send, &send_name).await?;
    let status = reader.next().await?;
    println!("MALFORMED dist status {:?}", String::from_utf8_lossy(&status));
    if status != b"sok" {
        return Err(format!("unexpected status {:?}", String::from_utf8_lossy(&status)).into());
    }
    let challenge = reader.next().await?;
    if challenge.len() < 19 || challenge[0] != b'N' {
        return Err(format!("unexpected challenge message of {} bytes", challenge.len()).into());
    }
    let their_challenge = u32::from_be_bytes([challenge[9], challenge[10], challenge[11], challenge[12]]);
    let their_name = String::from_utf8_lossy(&challenge[19..]).into_owned();
    println!("MALFORMED dist challenge from {their_name}");
    let ours = rng.next() as u32;
    let digest = if wrong_digest { md5(&rng.bytes(8)) } else { dist_digest(cookie, their_challenge) };
    let mut reply = vec![b'r'];
    reply.extend_from_slice(&ours.to_be_bytes());
    reply.extend_from_slice(&digest);
    let mut bytes = frame::control_frame(&reply)?;
    if let Some(extra) = extra {
        bytes.extend_from_slice(&frame::control_frame(extra)?);
    }
    send.write_all(&bytes).await?;
    Ok(ours)
}

async fn malformed(target: SocketAddr, cookie: String, name: String, mode: String) -> Res<i32> {
    const MODES: [&str; 9] = [
        "pipelined-control",
        "auth-fin",
        "oversized-handshake",
        "junk-data",
        "junk-packet",
        "bad-dist",
        "late-control",
        "control-fin",
        "bad-proof",
    ];
    if !MODES.contains(&mode.as_str()) {
        return Err(format!("unknown malformed mode {mode}; one of {MODES:?}").into());
    }
    let mut rng = Rng::seeded();
    let endpoint = client_endpoint(target)?;
    let conn = endpoint.connect(target, macula_quic::wire::SERVER_NAME)?.await?;
    println!("MALFORMED connected target={target} local={} mode={mode}", endpoint.local_addr()?);
    let (mut send, recv) = conn.open_bi().await?;
    let mut reader = ControlReader::new(recv);
    let mut exporter = [0u8; PROOF_LEN];
    conn.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"").map_err(|_| "TLS exporter unavailable")?;
    let proof = if mode == "bad-proof" {
        let mut p = [0u8; PROOF_LEN];
        rng.fill(&mut p);
        p
    } else {
        auth::proof(&exporter, cookie.as_bytes(), Role::Initiator, name.as_bytes())
    };
    let mut hello = vec![b'A'];
    hello.extend_from_slice(&(name.len() as u16).to_be_bytes());
    hello.extend_from_slice(name.as_bytes());
    hello.extend_from_slice(&proof);
    send_control(&mut send, &hello).await?;
    let started = Instant::now();

    let misbehaved: Res<()> = async {
        if mode == "bad-proof" {
            println!("MALFORMED sent a wrong cookie proof");
            return Ok(());
        }
        let reply = reader.next().await?;
        let valid = reply.len() == 1 + PROOF_LEN
            && reply[0] == b'a'
            && auth::verify(&exporter, cookie.as_bytes(), Role::Acceptor, name.as_bytes(), &reply[1..]);
        if !valid {
            return Err(format!("bad auth reply ({} bytes)", reply.len()).into());
        }
        println!("MALFORMED authenticated (acceptor proof verified)");
        match mode.as_str() {
            "oversized-handshake" => {
                // A frame of the largest size the 2-byte header allows: a dist_util name
                // message ('N') followed by noise.
                let mut f = vec![0xff, 0xff, b'N'];
                f.extend_from_slice(&rng.bytes(65534));
                send.write_all(&f).await?;
                println!("MALFORMED sent a 65535-byte garbage handshake frame");
            }
            "auth-fin" => {
                send.finish()?;
                println!("MALFORMED finished the control stream right after authenticating");
            }
            "bad-dist" => {
                dist_handshake_until_reply(&mut send, &mut reader, &cookie, &name, &mut rng, true, None).await?;
                println!("MALFORMED sent a challenge reply with a wrong digest");
            }
            _ => {
                // pipelined-control: a handshake frame right behind the challenge reply,
                // so it arrives before the acceptor has finished its side of the handshake.
                let extra: Option<&[u8]> = (mode == "pipelined-control").then_some(b"Nnot a handshake message");
                let ours =
                    dist_handshake_until_reply(&mut send, &mut reader, &cookie, &name, &mut rng, false, extra).await?;
                let ack = reader.next().await?;
                if ack.len() != 17 || ack[0] != b'a' || ack[1..] != dist_digest(&cookie, ours) {
                    return Err("bad challenge ack".into());
                }
                println!("MALFORMED dist handshake complete (challenge ack verified): connected as {name}");
                match mode.as_str() {
                    "junk-data" => {
                        let mut uni = conn.open_uni().await?;
                        let mut junk = vec![0xff, 0xff, 0xff, 0xff];
                        junk.extend_from_slice(&rng.bytes(4096));
                        uni.write_all(&junk).await?;
                        println!("MALFORMED sent a data frame claiming 4294967295 bytes");
                    }
                    "junk-packet" => {
                        let mut uni = conn.open_uni().await?;
                        // Well-formed frames whose payloads are not distribution packets.
                        let mut junk = Vec::new();
                        for _ in 0..5 {
                            let len = rng.range(1, 1000);
                            junk.extend_from_slice(&frame::data_frame_header(len)?);
                            junk.extend_from_slice(&rng.bytes(len));
                        }
                        uni.write_all(&junk).await?;
                        println!("MALFORMED sent 5 well-formed data frames with random payloads");
                    }
                    "pipelined-control" => {
                        println!("MALFORMED sent a handshake frame pipelined behind the challenge reply");
                    }
                    "late-control" => {
                        // Well after the acceptor has completed the handshake.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        send_control(&mut send, b"Nnot a handshake message").await?;
                        println!("MALFORMED sent a handshake frame after the handshake");
                    }
                    _ => {
                        send.finish()?;
                        println!("MALFORMED finished the control stream");
                        match tokio::time::timeout(Duration::from_secs(3), send.stopped()).await {
                            Ok(r) => println!("MALFORMED control stream stopped(): {r:?}"),
                            Err(_) => println!("MALFORMED control stream FIN not acknowledged within 3 s"),
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = misbehaved {
        // The server may well have closed the connection already.
        println!("MALFORMED step failed: {e}");
    }
    let outcome = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
    let code = match outcome {
        Ok(error) => {
            println!(
                "MALFORMED result mode={mode} outcome=closed_by_server after_ms={} {}",
                started.elapsed().as_millis(),
                describe_close(&error)
            );
            0
        }
        Err(_) => {
            println!("MALFORMED result mode={mode} outcome=still_open after_ms={}", started.elapsed().as_millis());
            2
        }
    };
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    Ok(code)
}

// ---------------------------------------------------------------------------------------
// mitm: terminates QUIC/TLS on both sides with its own certificate, relays stream bytes
// ---------------------------------------------------------------------------------------

async fn mitm(listen: SocketAddr, target: SocketAddr) -> Res<i32> {
    let identity = Identity::ephemeral()?;
    let mut server_config = ServerConfig::with_crypto(Arc::new(tls::server_crypto(&identity)?));
    server_config.transport_config(transport());
    let server = Endpoint::server(server_config, listen)?;
    let client = client_endpoint(target)?;
    println!("MITM listening on {listen} forwarding to {target} with its own certificate");
    let mut id = 0u64;
    while let Some(incoming) = server.accept().await {
        id += 1;
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = mitm_connection(id, incoming, client, target).await {
                println!("MITM {id} ended: {e}");
            }
        });
    }
    Ok(0)
}

async fn mitm_connection(id: u64, incoming: quinn::Incoming, client: Endpoint, target: SocketAddr) -> Res<()> {
    let down = incoming.await?;
    println!("MITM {id} accepted {} (TLS terminated here)", down.remote_address());
    let up = client.connect(target, macula_quic::wire::SERVER_NAME)?.await?;
    println!("MITM {id} connected upstream to {target} (second TLS session)");
    // Bidirectional streams are opened by the dialing side; unidirectional ones by both.
    tokio::spawn(relay_bidi(id, down.clone(), up.clone()));
    tokio::spawn(relay_uni(id, down.clone(), up.clone(), "dialer->target"));
    tokio::spawn(relay_uni(id, up.clone(), down.clone(), "target->dialer"));
    let (closed_side, error, other) = tokio::select! {
        e = down.closed() => ("dialer", e, up.clone()),
        e = up.closed() => ("target", e, down.clone()),
    };
    println!("MITM {id} {closed_side} side closed: {}", describe_close(&error));
    match &error {
        ConnectionError::ApplicationClosed(close) => {
            other.close(close.error_code, &close.reason);
            println!("MITM {id} mirrored the close (code {}) to the other side", close.error_code);
        }
        _ => other.close(VarInt::from_u32(0), b"relay closed"),
    }
    Ok(())
}

async fn relay_bidi(id: u64, down: quinn::Connection, up: quinn::Connection) {
    while let Ok((down_send, down_recv)) = down.accept_bi().await {
        let Ok((up_send, up_recv)) = up.open_bi().await else { return };
        tokio::spawn(pipe(id, "control dialer->target", down_recv, up_send));
        tokio::spawn(pipe(id, "control target->dialer", up_recv, down_send));
    }
}

async fn relay_uni(id: u64, from: quinn::Connection, to: quinn::Connection, label: &'static str) {
    while let Ok(recv) = from.accept_uni().await {
        let Ok(send) = to.open_uni().await else { return };
        tokio::spawn(pipe(id, label, recv, send));
    }
}

async fn pipe(id: u64, label: &'static str, mut recv: RecvStream, mut send: SendStream) {
    let mut total = 0usize;
    loop {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                if total == 0 {
                    let head = &chunk.bytes[..chunk.bytes.len().min(8)];
                    println!("MITM {id} {label} first bytes {} (relayed unchanged)", hex(head));
                }
                total += chunk.bytes.len();
                if send.write_all(&chunk.bytes).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = send.finish();
                break;
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(0));
                break;
            }
        }
    }
    println!("MITM {id} {label} relayed {total} bytes");
}

// ---------------------------------------------------------------------------------------
// udp-relay: a NAT that forwards datagrams untouched
// ---------------------------------------------------------------------------------------

async fn udp_relay(listen: SocketAddr, target: SocketAddr) -> Res<i32> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let forwarded = Arc::new(AtomicU64::new(0));
    let returned = Arc::new(AtomicU64::new(0));
    println!("RELAY listening on {listen} forwarding to {target}");
    {
        let (forwarded, returned) = (forwarded.clone(), returned.clone());
        tokio::spawn(async move {
            let mut last = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = (forwarded.load(Ordering::Relaxed), returned.load(Ordering::Relaxed));
                if now != last {
                    println!("RELAY datagrams to_target={} to_clients={}", now.0, now.1);
                    last = now;
                }
            }
        });
    }
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match front.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let upstream = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(UdpSocket::bind(any_addr(target)).await?);
                s.connect(target).await?;
                println!("RELAY new client {from} mapped to {}", s.local_addr()?);
                let (s2, front2, returned) = (s.clone(), front.clone(), returned.clone());
                tokio::spawn(async move {
                    let mut back = vec![0u8; 65536];
                    loop {
                        match s2.recv(&mut back).await {
                            Ok(n) => {
                                let _ = front2.send_to(&back[..n], from).await;
                                returned.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                });
                clients.insert(from, s.clone());
                s
            }
        };
        let _ = upstream.send(&buf[..n]).await;
        forwarded.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// MD5 (RFC 1321), for dist_util's challenge digests; ring has none.
// ---------------------------------------------------------------------------------------

fn md5(input: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14,
        20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6,
        10, 15, 21,
    ];
    let k: Vec<u32> = (0..64).map(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32).collect();
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut message = input.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((input.len() as u64).wrapping_mul(8)).to_le_bytes());
    for block in message.chunks(64) {
        let m: Vec<u32> = block.chunks(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a.wrapping_add(f).wrapping_add(k[i]).wrapping_add(m[g]).rotate_left(S[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(rotated);
        }
        state[0] = state[0].wrapping_add(a);
        state[1] = state[1].wrapping_add(b);
        state[2] = state[2].wrapping_add(c);
        state[3] = state[3].wrapping_add(d);
    }
    let mut out = [0u8; 16];
    for (i, word) in state.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}
