//! The connecting side of OTP 25's `dist_util` handshake, as far as the attacks need it.

use md5::{Digest, Md5};
use quinn::SendStream;
use rand::rngs::StdRng;
use rand::RngExt;

use crate::wire::{self, ControlReader};
use crate::Res;

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
pub fn digest(cookie: &str, challenge: u32) -> [u8; 16] {
    Md5::digest(format!("{cookie}{challenge}")).into()
}

/// What the handshake's last step should carry.
pub enum Reply<'a> {
    /// The right digest.
    Honest,
    /// A digest of random bytes.
    WrongDigest,
    /// The right digest, and `extra` as a further control frame in the same write.
    Pipelined(&'a [u8]),
}

/// dist_util's handshake as the connecting side, up to and including the challenge
/// reply. Returns the challenge we sent, for checking the node's ack.
pub async fn until_reply(
    send: &mut SendStream,
    reader: &mut ControlReader,
    cookie: &str,
    name: &str,
    rng: &mut StdRng,
    reply: Reply<'_>,
) -> Res<u32> {
    let creation = rng.random::<u32>() | 1;
    let name_len = u16::try_from(name.len()).map_err(|_| "node name longer than 65535 bytes")?;
    let send_name =
        [&[b'N'][..], &OUR_DFLAGS.to_be_bytes(), &creation.to_be_bytes(), &name_len.to_be_bytes(), name.as_bytes()]
            .concat();
    wire::send_control(send, &send_name).await?;
    let status = reader.next().await?;
    println!("MALFORMED dist status {:?}", String::from_utf8_lossy(&status));
    if status != b"sok" {
        return Err(format!("unexpected status {:?}", String::from_utf8_lossy(&status)).into());
    }
    // 'N', Flags:64, Challenge:32, Creation:32, NameLen:16, Name
    let challenge = reader.next().await?;
    let (Some(b'N'), Some(word), Some(their_name)) = (challenge.first(), challenge.get(9..13), challenge.get(19..))
    else {
        return Err(format!("unexpected challenge message of {} bytes", challenge.len()).into());
    };
    let their_challenge = u32::from_be_bytes(word.try_into()?);
    let their_name = String::from_utf8_lossy(their_name);
    println!("MALFORMED dist challenge from {their_name}");
    let ours = rng.random::<u32>();
    let digest = match reply {
        Reply::WrongDigest => Md5::digest(rng.random::<[u8; 8]>()).into(),
        _ => digest(cookie, their_challenge),
    };
    let mut bytes = wire::control_frame(&[&[b'r'][..], &ours.to_be_bytes(), &digest].concat())?;
    if let Reply::Pipelined(extra) = reply {
        bytes.extend_from_slice(&wire::control_frame(extra)?);
    }
    send.write_all(&bytes).await?;
    Ok(ours)
}
