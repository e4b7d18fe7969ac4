//! `malformed`: a raw client that authenticates with the right cookie, then misbehaves
//! in one way, and reports whether and how the node closed the connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::{Connection, SendStream, VarInt};
use rand::rngs::StdRng;
use rand::{Rng, RngExt};

use crate::dist::{self, Reply};
use crate::wire::{self, ControlReader, Role, PROOF_LEN};
use crate::{net, Res};

/// The misbehaviours, one per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A wrong cookie proof.
    BadProof,
    /// The control stream finished right after authenticating.
    AuthFin,
    /// A 65535-byte garbage handshake frame.
    OversizedHandshake,
    /// A challenge reply with a wrong digest.
    BadDist,
    /// After the handshake: a data frame claiming 4 GiB.
    JunkData,
    /// After the handshake: well-formed data frames whose payloads are not packets.
    JunkPacket,
    /// A handshake message on the control stream well after the handshake.
    LateControl,
    /// A handshake message right behind the challenge reply.
    PipelinedControl,
    /// The control stream finished after the handshake.
    ControlFin,
}

const MODES: [(&str, Mode); 9] = [
    ("bad-proof", Mode::BadProof),
    ("auth-fin", Mode::AuthFin),
    ("oversized-handshake", Mode::OversizedHandshake),
    ("bad-dist", Mode::BadDist),
    ("junk-data", Mode::JunkData),
    ("junk-packet", Mode::JunkPacket),
    ("late-control", Mode::LateControl),
    ("pipelined-control", Mode::PipelinedControl),
    ("control-fin", Mode::ControlFin),
];

/// A handshake message where none may come.
const STRAY_HANDSHAKE: &[u8] = b"Nnot a handshake message";

impl Mode {
    pub fn parse(text: &str) -> Res<Mode> {
        match MODES.iter().find(|(name, _)| *name == text) {
            Some((_, mode)) => Ok(*mode),
            None => {
                let names: Vec<&str> = MODES.iter().map(|(name, _)| *name).collect();
                Err(format!("unknown malformed mode {text}; one of {names:?}").into())
            }
        }
    }

    fn name(self) -> &'static str {
        MODES.iter().find(|(_, mode)| *mode == self).map_or("?", |(name, _)| name)
    }
}

/// One connection of the run, with what it needs to prove and misbehave.
struct Client {
    conn: Connection,
    send: SendStream,
    reader: ControlReader,
    exporter: [u8; PROOF_LEN],
    cookie: String,
    name: String,
    rng: StdRng,
}

pub async fn run(target: SocketAddr, cookie: String, name: String, mode: Mode) -> Res<i32> {
    let endpoint = net::client_endpoint(target)?;
    let conn = endpoint.connect(target, wire::SERVER_NAME)?.await?;
    println!("MALFORMED connected target={target} local={} mode={}", endpoint.local_addr()?, mode.name());
    let (send, recv) = conn.open_bi().await?;
    let mut exporter = [0u8; PROOF_LEN];
    conn.export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"").map_err(|_| "TLS exporter unavailable")?;
    let mut client =
        Client { conn, send, reader: ControlReader::new(recv), exporter, cookie, name, rng: rand::make_rng() };
    let started = Instant::now();
    if let Err(e) = client.misbehave(mode).await {
        // The server may well have closed the connection already.
        println!("MALFORMED step failed: {e}");
    }
    let conn = client.conn;
    let code = match tokio::time::timeout(Duration::from_secs(20), conn.closed()).await {
        Ok(error) => {
            println!(
                "MALFORMED result mode={} outcome=closed_by_server after_ms={} {}",
                mode.name(),
                started.elapsed().as_millis(),
                net::describe_close(&error)
            );
            0
        }
        Err(_) => {
            println!(
                "MALFORMED result mode={} outcome=still_open after_ms={}",
                mode.name(),
                started.elapsed().as_millis()
            );
            2
        }
    };
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    Ok(code)
}

impl Client {
    async fn misbehave(&mut self, mode: Mode) -> Res<()> {
        let proof = if mode == Mode::BadProof {
            self.rng.random::<[u8; PROOF_LEN]>().to_vec()
        } else {
            wire::proof(&self.exporter, &self.cookie, Role::Initiator, &self.name)
        };
        wire::send_control(&mut self.send, &wire::hello(&self.name, &proof)?).await?;
        if mode == Mode::BadProof {
            println!("MALFORMED sent a wrong cookie proof");
            return Ok(());
        }
        self.check_acceptor_proof().await?;
        match mode {
            Mode::OversizedHandshake => {
                // A frame of the largest size the 2-byte header allows: a dist_util name
                // message ('N') followed by noise.
                let mut noise = vec![0; 65534];
                self.rng.fill_bytes(&mut noise);
                self.send.write_all(&[&[0xff, 0xff, b'N'][..], &noise].concat()).await?;
                println!("MALFORMED sent a 65535-byte garbage handshake frame");
            }
            Mode::AuthFin => {
                self.send.finish()?;
                println!("MALFORMED finished the control stream right after authenticating");
            }
            Mode::BadDist => {
                self.handshake(Reply::WrongDigest).await?;
                println!("MALFORMED sent a challenge reply with a wrong digest");
            }
            Mode::PipelinedControl => {
                // Right behind the challenge reply, so it arrives before the acceptor has
                // finished its side of the handshake.
                self.complete_handshake(Reply::Pipelined(STRAY_HANDSHAKE)).await?;
                println!("MALFORMED sent a handshake frame pipelined behind the challenge reply");
            }
            _ => {
                self.complete_handshake(Reply::Honest).await?;
                self.after_handshake(mode).await?;
            }
        }
        Ok(())
    }

    /// Reads the acceptor's `'a', Proof` and checks it.
    async fn check_acceptor_proof(&mut self) -> Res<()> {
        let reply = self.reader.next().await?;
        let valid = match reply.split_first() {
            Some((b'a', proof)) => {
                wire::proof_is_valid(&self.exporter, &self.cookie, Role::Acceptor, &self.name, proof)
            }
            _ => false,
        };
        if !valid {
            return Err(format!("bad auth reply ({} bytes)", reply.len()).into());
        }
        println!("MALFORMED authenticated (acceptor proof verified)");
        Ok(())
    }

    async fn handshake(&mut self, reply: Reply<'_>) -> Res<u32> {
        dist::until_reply(&mut self.send, &mut self.reader, &self.cookie, &self.name, &mut self.rng, reply).await
    }

    /// The whole dist_util handshake, checking the node's challenge ack.
    async fn complete_handshake(&mut self, reply: Reply<'_>) -> Res<()> {
        let ours = self.handshake(reply).await?;
        let ack = self.reader.next().await?;
        if ack.split_first() != Some((&b'a', dist::digest(&self.cookie, ours).as_slice())) {
            return Err("bad challenge ack".into());
        }
        println!("MALFORMED dist handshake complete (challenge ack verified): connected as {}", self.name);
        Ok(())
    }

    async fn after_handshake(&mut self, mode: Mode) -> Res<()> {
        match mode {
            Mode::JunkData => {
                let mut uni = self.conn.open_uni().await?;
                let mut junk = vec![0; 4096];
                self.rng.fill_bytes(&mut junk);
                uni.write_all(&[&[wire::NORMAL_DATA_STREAM, 0xff, 0xff, 0xff, 0xff][..], &junk].concat()).await?;
                println!("MALFORMED sent a data frame claiming 4294967295 bytes");
            }
            Mode::JunkPacket => {
                let mut uni = self.conn.open_uni().await?;
                let mut junk = vec![wire::NORMAL_DATA_STREAM];
                for _ in 0..5 {
                    let mut packet = vec![0; self.rng.random_range(1..=1000)];
                    self.rng.fill_bytes(&mut packet);
                    junk.extend_from_slice(&wire::data_frame(&packet)?);
                }
                uni.write_all(&junk).await?;
                println!("MALFORMED sent 5 well-formed data frames with random payloads");
            }
            Mode::LateControl => {
                // Well after the acceptor has completed the handshake.
                tokio::time::sleep(Duration::from_millis(500)).await;
                wire::send_control(&mut self.send, STRAY_HANDSHAKE).await?;
                println!("MALFORMED sent a handshake frame after the handshake");
            }
            _ => {
                self.send.finish()?;
                println!("MALFORMED finished the control stream");
                match tokio::time::timeout(Duration::from_secs(3), self.send.stopped()).await {
                    Ok(r) => println!("MALFORMED control stream stopped(): {r:?}"),
                    Err(_) => println!("MALFORMED control stream FIN not acknowledged within 3 s"),
                }
            }
        }
        Ok(())
    }
}
