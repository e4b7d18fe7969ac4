//! `half-open`: many QUIC connections that complete TLS and never authenticate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::mpsc;

use crate::{net, wire, Res};

/// What each connection does once TLS is up.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Opens the control stream and never writes to it: the node never even learns of it.
    Silent,
    /// Writes the first byte of a frame header, never the rest.
    Partial,
    /// Writes a frame header announcing 100 bytes, then only 10 of them.
    Frame,
    /// The three above in turn.
    Mixed,
}

impl Mode {
    pub fn parse(text: &str) -> Res<Mode> {
        match text {
            "silent" => Ok(Mode::Silent),
            "partial" => Ok(Mode::Partial),
            "frame" => Ok(Mode::Frame),
            "mixed" => Ok(Mode::Mixed),
            _ => Err(format!("unknown half-open mode {text}").into()),
        }
    }

    /// The behaviour of connection number `index`.
    fn of(self, index: usize) -> Mode {
        match self {
            Mode::Mixed => [Mode::Silent, Mode::Partial, Mode::Frame][index % 3],
            one => one,
        }
    }

    fn bytes(self) -> Vec<u8> {
        match self {
            Mode::Partial => vec![0],
            Mode::Frame => [&[0, 100][..], &[b'A'; 10]].concat(),
            _ => Vec::new(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Silent => "silent",
            Mode::Partial => "partial",
            Mode::Frame => "frame",
            Mode::Mixed => "mixed",
        }
    }
}

enum Event {
    Established,
    Failed { index: usize, ms: u128, why: String },
    Closed { index: usize, after_ms: u128, why: String },
}

/// The tallies printed by `ready` and `done`.
#[derive(Default)]
struct Tally {
    established: usize,
    failed: usize,
    closed: usize,
    fail_reasons: BTreeMap<String, usize>,
    close_reasons: BTreeMap<String, usize>,
    close_times: Vec<u128>,
}

impl Tally {
    fn add(&mut self, event: Event) {
        match event {
            Event::Established => self.established += 1,
            Event::Failed { index, ms, why } => {
                self.failed += 1;
                println!("HALFOPEN failed i={index} at_ms={ms} reason={why}");
                *self.fail_reasons.entry(why).or_default() += 1;
            }
            Event::Closed { index, after_ms, why } => {
                self.closed += 1;
                println!("HALFOPEN closed i={index} after_ms={after_ms} reason={why}");
                *self.close_reasons.entry(why).or_default() += 1;
                self.close_times.push(after_ms);
            }
        }
    }

    fn counts(&self, count: usize) -> String {
        format!(
            "attempted={count} established={} failed={} closed_by_server={}",
            self.established, self.failed, self.closed
        )
    }

    /// The `p`-th percentile of the close times (0 when none closed).
    fn close_percentile(&self, p: usize) -> u128 {
        let mut times = self.close_times.clone();
        times.sort_unstable();
        times.get(times.len().saturating_sub(1) * p / 100).copied().unwrap_or(0)
    }
}

pub async fn run(target: SocketAddr, count: usize, hold: f64, mode: Mode, rate: f64) -> Res<i32> {
    let endpoint = net::client_endpoint(target)?;
    let (events, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    println!("HALFOPEN started target={target} count={count} hold={hold} mode={} rate={rate}", mode.name());
    for index in 0..count {
        let at = if rate > 0.0 { Duration::from_secs_f64(index as f64 / rate) } else { Duration::ZERO };
        let (endpoint, events) = (endpoint.clone(), events.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until((start + at).into()).await;
            match connect(&endpoint, target).await {
                Ok(conn) => {
                    let _ = events.send(Event::Established);
                    let established = Instant::now();
                    let why = stay_unauthenticated(conn, mode.of(index)).await;
                    let _ = events.send(Event::Closed { index, after_ms: established.elapsed().as_millis(), why });
                }
                Err(why) => {
                    let _ = events.send(Event::Failed { index, ms: start.elapsed().as_millis(), why });
                }
            }
        });
    }
    drop(events);

    let mut tally = Tally::default();
    while tally.established + tally.failed < count {
        match rx.recv().await {
            Some(event) => tally.add(event),
            None => break,
        }
    }
    let open = tally.established - tally.closed;
    println!("HALFOPEN ready elapsed_ms={} {} open={open}", start.elapsed().as_millis(), tally.counts(count));
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(hold);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => tally.add(event),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
        if tally.closed == tally.established && tally.established + tally.failed == count {
            break;
        }
    }
    println!(
        "HALFOPEN done elapsed_ms={} {} still_open={} close_after_ms(min,median,max)=({},{},{})",
        start.elapsed().as_millis(),
        tally.counts(count),
        tally.established - tally.closed,
        tally.close_percentile(0),
        tally.close_percentile(50),
        tally.close_percentile(100)
    );
    for (why, n) in &tally.close_reasons {
        println!("HALFOPEN close_reason count={n} reason={why}");
    }
    for (why, n) in &tally.fail_reasons {
        println!("HALFOPEN fail_reason count={n} reason={why}");
    }
    endpoint.close(VarInt::from_u32(0), b"done");
    Ok(0)
}

/// Completes the QUIC/TLS handshake (20 s at most), or says why not.
async fn connect(endpoint: &Endpoint, target: SocketAddr) -> Result<Connection, String> {
    let connecting = endpoint.connect(target, wire::SERVER_NAME).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(20), connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(net::describe_close(&e)),
        Err(_) => Err("handshake timeout (20 s)".into()),
    }
}

/// Opens the control stream, writes what `mode` says, and waits until the node closes
/// the connection: returns how it did.
async fn stay_unauthenticated(conn: Connection, mode: Mode) -> String {
    let mut streams = None;
    if let Ok((mut send, recv)) = conn.open_bi().await {
        let bytes = mode.bytes();
        if !bytes.is_empty() {
            let _ = send.write_all(&bytes).await;
        }
        streams = Some((send, recv));
    }
    let error = conn.closed().await;
    drop(streams);
    net::describe_close(&error)
}
