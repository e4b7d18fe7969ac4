//! Hostile peers and relays for testing `macula_dist` against real nodes
//! (test/macula_security_SUITE.erl drives it through test/macula_hostile.erl).
//!
//! A test tool, not part of the product: it is its own crate so that nothing of it is
//! built into the NIF, and so that the core exports only what the product needs. It
//! speaks the wire protocol from its own description of it (`wire`, `dist`), and takes
//! from the core only the zero-configuration TLS setup a real node uses.
//!
//! ```text
//! macula_hostile garbage-flood <ip:port> <seconds> <rate_pps>
//! macula_hostile half-open     <ip:port> <count> <hold_seconds> [silent|partial|frame|mixed] [rate_per_s]
//! macula_hostile malformed     <ip:port> <cookie> <own_node_name> <mode>
//!     modes: bad-proof auth-fin oversized-handshake bad-dist junk-data junk-packet
//!            late-control pipelined-control control-fin
//! macula_hostile mitm          <listen ip:port> <target ip:port>
//! macula_hostile udp-relay     <listen ip:port> <target ip:port>
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

#![forbid(unsafe_code)]

mod dist;
mod garbage_flood;
mod half_open;
mod malformed;
mod mitm;
mod net;
mod udp_relay;
mod wire;

use std::error::Error;

/// Every failure of a run ends it with a message; none is recovered from.
pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const USAGE: &str = "usage:
  macula_hostile garbage-flood <ip:port> <seconds> <rate_pps>
  macula_hostile half-open <ip:port> <count> <hold_seconds> [silent|partial|frame|mixed] [rate_per_s]
  macula_hostile malformed <ip:port> <cookie> <own_node_name> <mode>
      modes: bad-proof auth-fin oversized-handshake bad-dist junk-data junk-packet
             late-control pipelined-control control-fin
  macula_hostile mitm <listen ip:port> <target ip:port>
  macula_hostile udp-relay <listen ip:port> <target ip:port>";

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
        Some("garbage-flood") => garbage_flood::run(net::addr(arg(1)?)?, arg(2)?.parse()?, arg(3)?.parse()?),
        Some("half-open") => {
            let mode = half_open::Mode::parse(args.get(4).map(String::as_str).unwrap_or("mixed"))?;
            let rate: f64 = args.get(5).map(|r| r.parse()).transpose()?.unwrap_or(0.0);
            let (target, count, hold) = (net::addr(arg(1)?)?, arg(2)?.parse()?, arg(3)?.parse()?);
            net::runtime()?.block_on(half_open::run(target, count, hold, mode, rate))
        }
        Some("malformed") => {
            let mode = malformed::Mode::parse(arg(4)?)?;
            let (target, cookie, name) = (net::addr(arg(1)?)?, arg(2)?.to_string(), arg(3)?.to_string());
            net::runtime()?.block_on(malformed::run(target, cookie, name, mode))
        }
        Some("mitm") => net::runtime()?.block_on(mitm::run(net::addr(arg(1)?)?, net::addr(arg(2)?)?)),
        Some("udp-relay") => net::runtime()?.block_on(udp_relay::run(net::addr(arg(1)?)?, net::addr(arg(2)?)?)),
        _ => Err("unknown subcommand".into()),
    }
}
