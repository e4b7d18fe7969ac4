//! Which data stream a distribution packet travels on.
//!
//! Distributed Erlang promises order only between a pair of processes: whatever one
//! process sends to another (messages, links, monitors, exits, spawn requests, alias
//! sends) arrives in the order it was sent. So every packet of one sending process
//! takes the same QUIC stream, and packets of different senders may take different
//! streams, which is what lets one process's small messages pass another's bulk
//! transfer. The sender is read from the control message at the head of the packet.
//! That works because a connection with several data streams has rejected the atom
//! cache and fragmentation, so every packet is self-contained:
//! `112, 131, Control [, 131, Message]` (or `131, 68, 0, Control ...` from a peer that
//! rejected only the atom cache).
//!
//! A packet whose control message does not parse, or names no sending process, takes
//! the fixed stream 0, behind a fence that keeps it after everything sent before it
//! ([`crate::fence`]). Routes are sticky ([`Routes`]): a sender is placed on the least
//! loaded stream of its class and stays there until its class changes (it is marked or
//! unmarked for priority); a move goes behind a fence, so its order cannot break.

use std::collections::HashMap;
use std::num::NonZeroU8;

/// Identifies a sending process: a hash of its pid (node name, number, serial, creation).
pub type SenderKey = u64;

/// The stream for packets without a known sender.
pub const FIXED_STREAM: usize = 0;

/// Senders remembered per connection. Beyond this, new senders are spread by hash
/// (still sticky: a hash never changes) and the priority class is not honoured for them.
const ROUTE_TABLE_LIMIT: usize = 4096;

/// How many bytes of a packet's head [`sender_of`] needs at most: the dist header, the
/// control tuple's head, a reference and a pid with a 255-character UTF-8 node name.
pub const HEAD_LEN: usize = 1280;

// External term format tags (erl_ext_dist).
const VERSION: u8 = 131;
const PASS_THROUGH: u8 = 112;
const DIST_HEADER: u8 = 68;
const SMALL_INTEGER: u8 = 97;
const INTEGER: u8 = 98;
const SMALL_BIG: u8 = 110;
const LARGE_BIG: u8 = 111;
const ATOM: u8 = 100;
const SMALL_ATOM: u8 = 115;
const ATOM_UTF8: u8 = 118;
const SMALL_ATOM_UTF8: u8 = 119;
const ATOM_CACHE_REF: u8 = 82;
const PID: u8 = 103;
const NEW_PID: u8 = 88;
const REFERENCE: u8 = 101;
const NEW_REFERENCE: u8 = 114;
const NEWER_REFERENCE: u8 = 90;
const SMALL_TUPLE: u8 = 104;
const LARGE_TUPLE: u8 = 105;

/// Where the sending process sits in a control message of operation `op` (1-based
/// tuple position), per the distribution protocol's control messages.
fn sender_position(op: u32) -> Option<usize> {
    match op {
        // LINK, EXIT, UNLINK, REG_SEND, GROUP_LEADER, EXIT2, EXIT_TT, REG_SEND_TT,
        // EXIT2_TT, MONITOR_P, DEMONITOR_P, MONITOR_P_EXIT, SEND_SENDER, SEND_SENDER_TT,
        // PAYLOAD_EXIT(_TT), PAYLOAD_EXIT2(_TT), PAYLOAD_MONITOR_P_EXIT, ALIAS_SEND(_TT).
        1 | 3 | 4 | 6 | 7 | 8 | 13 | 16 | 18..=28 | 33 | 34 => Some(2),
        // SPAWN_REQUEST(_TT) {Op, ReqId, From, ...}, UNLINK_ID(_ACK) {Op, Id, From, To}.
        29 | 30 | 35 | 36 => Some(3),
        // SPAWN_REPLY(_TT) {Op, ReqId, To, Flags, Result}: the new process sends it before
        // anything else, so it travels with that process's traffic (Result is its pid).
        31 | 32 => Some(5),
        // SEND and SEND_TT carry no sender; anything else is unknown.
        _ => None,
    }
}

/// The sender of a distribution packet, from the first bytes of the packet (at most
/// [`HEAD_LEN`] are looked at). `None` when the packet is not a self-contained packet,
/// its control message does not parse, or it names no sending process (for example a
/// `'DOWN'` of a monitor by registered name, which names the process by its name).
pub fn sender_of(head: &[u8]) -> Option<SenderKey> {
    let mut r = Reader::new(head);
    match r.u8()? {
        PASS_THROUGH => {
            if r.u8()? != VERSION {
                return None;
            }
        }
        VERSION => {
            // A dist header without atom cache references; its terms carry no version byte.
            if r.u8()? != DIST_HEADER || r.u8()? != 0 {
                return None;
            }
        }
        _ => return None,
    }
    let arity = match r.u8()? {
        SMALL_TUPLE => usize::from(r.u8()?),
        LARGE_TUPLE => usize::try_from(r.u32()?).ok()?,
        _ => return None,
    };
    let op = r.integer()?;
    let position = sender_position(op)?;
    if position > arity {
        return None;
    }
    for _ in 2..position {
        r.skip_term()?;
    }
    r.pid_key()
}

/// The key of a pid encoded alone by `term_to_binary/1` (`131, Pid`): how a process is
/// named when it asks for priority.
pub fn pid_key(external: &[u8]) -> Option<SenderKey> {
    let mut r = Reader::new(external);
    if r.u8()? != VERSION {
        return None;
    }
    r.pid_key()
}

/// A cursor over untrusted bytes: every read checks the length first.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        // `split_at` would panic past the end; `get` checks it.
        let taken = self.bytes.get(..n)?;
        self.bytes = &self.bytes[n..];
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A small non-negative integer (an operation code).
    fn integer(&mut self) -> Option<u32> {
        match self.u8()? {
            SMALL_INTEGER => self.u8().map(u32::from),
            INTEGER => u32::try_from(self.u32()? as i32).ok(),
            _ => None,
        }
    }

    /// The text of an atom (the cache index for a cached atom).
    fn atom(&mut self) -> Option<&'a [u8]> {
        let tag = self.u8()?;
        self.atom_body(tag)
    }

    fn atom_body(&mut self, tag: u8) -> Option<&'a [u8]> {
        match tag {
            ATOM | ATOM_UTF8 => {
                let len = self.u16()?;
                self.take(usize::from(len))
            }
            SMALL_ATOM | SMALL_ATOM_UTF8 => {
                let len = self.u8()?;
                self.take(usize::from(len))
            }
            ATOM_CACHE_REF => self.take(1),
            _ => None,
        }
    }

    /// Skips one term of the kinds that precede a sender in a control message:
    /// integers, atoms, pids and references.
    fn skip_term(&mut self) -> Option<()> {
        let tag = self.u8()?;
        match tag {
            ATOM | ATOM_UTF8 | SMALL_ATOM | SMALL_ATOM_UTF8 | ATOM_CACHE_REF => {
                self.atom_body(tag)?;
            }
            PID | NEW_PID => {
                self.pid_body(tag)?;
            }
            SMALL_INTEGER => {
                self.take(1)?;
            }
            INTEGER => {
                self.take(4)?;
            }
            SMALL_BIG => {
                let n = self.u8()?;
                self.take(1 + usize::from(n))?;
            }
            LARGE_BIG => {
                let n = usize::try_from(self.u32()?).ok()?;
                self.take(n.checked_add(1)?)?;
            }
            REFERENCE => {
                self.atom()?;
                self.take(5)?;
            }
            NEW_REFERENCE | NEWER_REFERENCE => {
                let words = usize::from(self.u16()?);
                self.atom()?;
                self.take(if tag == NEWER_REFERENCE { 4 } else { 1 })?;
                self.take(words.checked_mul(4)?)?;
            }
            _ => return None,
        }
        Some(())
    }

    /// A pid's key: a hash of its node name, number, serial and creation.
    fn pid_key(&mut self) -> Option<SenderKey> {
        let tag = self.u8()?;
        self.pid_body(tag)
    }

    fn pid_body(&mut self, tag: u8) -> Option<SenderKey> {
        let creation_len = match tag {
            NEW_PID => 4,
            PID => 1,
            _ => return None,
        };
        let node = self.atom()?;
        let fields = self.take(8 + creation_len)?;
        let mut hash = Fnv::default();
        hash.write(node);
        hash.write(&[0xff]);
        hash.write(fields);
        Some(hash.0)
    }
}

/// FNV-1a: deterministic, so a sender hashes alike in every connection and on both the
/// packet and the `prioritize` path.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The traffic class of a sender's packet (from its priority mark when it was sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Normal,
    /// Marked with `macula_dist:prioritize/1`: its stream has a higher QUIC urgency.
    Priority,
}

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub stream: usize,
    /// The sender's stream until now, when this packet moves it (its class changed):
    /// the packet must wait until that stream has delivered what the sender sent there.
    pub moved_from: Option<usize>,
}

/// The sticky sender-to-stream map of one connection.
///
/// Streams `0..normal` carry normal traffic (stream 0 also carries packets without a
/// sender); with more than one normal stream there is one more, `normal`, for
/// prioritised senders. A single normal stream means single-stream mode: everything,
/// in order, on stream 0.
pub struct Routes {
    normal: usize,
    table: HashMap<SenderKey, u8>,
    /// Senders placed on each stream, to break ties between equally loaded streams.
    placed: Vec<u32>,
}

impl Routes {
    /// Routes over `normal` normal streams.
    pub fn new(normal: NonZeroU8) -> Self {
        let normal = usize::from(normal.get());
        Routes { normal, table: HashMap::new(), placed: vec![0; normal + 1] }
    }

    /// How many streams the connection may use (normal ones plus the priority stream).
    pub fn streams(&self) -> usize {
        if self.normal == 1 {
            1
        } else {
            self.normal + 1
        }
    }

    /// True when packets are routed by sender (several streams).
    pub fn by_sender(&self) -> bool {
        self.normal > 1
    }

    /// The index of the priority stream, if there is one.
    pub fn priority_stream(&self) -> Option<usize> {
        self.by_sender().then_some(self.normal)
    }

    /// The stream for a packet from `sender`. A new sender of class `Normal` goes to the
    /// normal stream with the fewest queued bytes (`queued(i)`), then the fewest senders.
    /// A known sender whose class changed moves to a stream of its new class.
    pub fn stream_for(&mut self, sender: Option<SenderKey>, class: Class, queued: impl Fn(usize) -> usize) -> Route {
        let stay = |stream| Route { stream, moved_from: None };
        let Some(key) = sender.filter(|_| self.by_sender()) else { return stay(FIXED_STREAM) };
        let known = self.table.get(&key).map(|&stream| usize::from(stream));
        if let Some(stream) = known.filter(|&stream| self.class_of(stream) == class) {
            return stay(stream);
        }
        if known.is_none() && self.table.len() >= ROUTE_TABLE_LIMIT {
            return stay((key % self.normal as u64) as usize);
        }
        let stream = match class {
            Class::Priority => self.normal,
            Class::Normal => (0..self.normal).min_by_key(|&i| (queued(i), self.placed[i])).unwrap_or(FIXED_STREAM),
        };
        if let Some(was) = known {
            self.placed[was] = self.placed[was].saturating_sub(1);
        }
        self.placed[stream] += 1;
        // `stream` <= 255 by the clamp in `new`.
        self.table.insert(key, stream as u8);
        Route { stream, moved_from: known }
    }

    fn class_of(&self, stream: usize) -> Class {
        if stream == self.normal {
            Class::Priority
        } else {
            Class::Normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `term_to_binary(Pid)` style bytes for pid <0.Id.Serial> of node `node`.
    fn pid(node: &str, id: u32, serial: u32, creation: u32) -> Vec<u8> {
        let mut b = vec![NEW_PID, SMALL_ATOM_UTF8, node.len() as u8];
        b.extend_from_slice(node.as_bytes());
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&serial.to_be_bytes());
        b.extend_from_slice(&creation.to_be_bytes());
        b
    }

    fn packet(op: u8, elements: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![PASS_THROUGH, VERSION, SMALL_TUPLE, 1 + elements.len() as u8, SMALL_INTEGER, op];
        for e in elements {
            b.extend_from_slice(e);
        }
        // A message payload follows the control message; it must not matter.
        b.extend_from_slice(&[VERSION, SMALL_INTEGER, 42]);
        b
    }

    fn atom(name: &str) -> Vec<u8> {
        let mut b = vec![SMALL_ATOM_UTF8, name.len() as u8];
        b.extend_from_slice(name.as_bytes());
        b
    }

    fn newer_ref(node: &str) -> Vec<u8> {
        let mut b = vec![NEWER_REFERENCE, 0, 3];
        b.extend(atom(node));
        b.extend_from_slice(&[0, 0, 0, 7]);
        b.extend_from_slice(&[0; 12]);
        b
    }

    fn key(node: &str, id: u32) -> SenderKey {
        let mut bin = vec![VERSION];
        bin.extend(pid(node, id, 0, 7));
        pid_key(&bin).unwrap()
    }

    const NODE: &str = "4433@127.0.0.1";

    #[test]
    fn sender_of_send_sender_link_and_exit() {
        let from = pid(NODE, 80, 0, 7);
        let to = pid("4434@127.0.0.1", 90, 0, 9);
        for op in [22, 1, 3, 8, 19, 20, 33] {
            let p = packet(op, &[from.clone(), to.clone()]);
            assert_eq!(sender_of(&p), Some(key(NODE, 80)), "op {op}");
        }
        // REG_SEND {6, From, Unused, ToName}.
        let p = packet(6, &[from.clone(), atom(""), atom("some_server")]);
        assert_eq!(sender_of(&p), Some(key(NODE, 80)));
    }

    #[test]
    fn sender_after_a_reference_or_an_integer() {
        let from = pid(NODE, 81, 0, 7);
        // SPAWN_REQUEST {29, ReqId, From, GroupLeader, MFA, Opts}.
        let p = packet(29, &[newer_ref(NODE), from.clone(), pid(NODE, 5, 0, 7)]);
        assert_eq!(sender_of(&p), Some(key(NODE, 81)));
        // UNLINK_ID {35, Id, From, To} with a small and a big Id.
        let p = packet(35, &[vec![SMALL_INTEGER, 3], from.clone(), pid("x@y", 1, 0, 1)]);
        assert_eq!(sender_of(&p), Some(key(NODE, 81)));
        let p = packet(36, &[vec![SMALL_BIG, 2, 0, 1, 1], from.clone(), pid("x@y", 1, 0, 1)]);
        assert_eq!(sender_of(&p), Some(key(NODE, 81)));
        // SPAWN_REPLY {31, ReqId, To, Flags, Result}: the new process.
        let p = packet(31, &[newer_ref(NODE), pid("x@y", 1, 0, 1), vec![SMALL_INTEGER, 0], from]);
        assert_eq!(sender_of(&p), Some(key(NODE, 81)));
    }

    #[test]
    fn no_sender_for_send_name_monitor_down_or_failed_spawn() {
        let to = pid("4434@127.0.0.1", 90, 0, 9);
        assert_eq!(sender_of(&packet(2, &[atom(""), to.clone()])), None);
        // MONITOR_P_EXIT {21, FromProc, To, Ref, Reason} of a monitor by name.
        assert_eq!(sender_of(&packet(21, &[atom("registered"), to.clone(), newer_ref(NODE)])), None);
        // SPAWN_REPLY with an error atom as Result.
        let p = packet(31, &[newer_ref(NODE), to, vec![SMALL_INTEGER, 0], atom("badopt")]);
        assert_eq!(sender_of(&p), None);
    }

    #[test]
    fn dist_header_without_cache_refs_is_understood() {
        let mut p = vec![VERSION, DIST_HEADER, 0, SMALL_TUPLE, 3, SMALL_INTEGER, 22];
        p.extend(pid(NODE, 82, 0, 7));
        p.extend(pid("b@c", 1, 0, 1));
        assert_eq!(sender_of(&p), Some(key(NODE, 82)));
        // With atom cache references the packet is not self-contained.
        let mut cached = p.clone();
        cached[2] = 1;
        assert_eq!(sender_of(&cached), None);
    }

    #[test]
    fn malformed_and_truncated_heads_give_no_sender() {
        let good = packet(22, &[pid(NODE, 83, 0, 7), pid("b@c", 1, 0, 1)]);
        for n in 0..good.len() - 3 {
            // Every prefix that cuts the sender short is refused, never a panic.
            let got = sender_of(&good[..n]);
            assert!(got.is_none() || n >= 6 + pid(NODE, 83, 0, 7).len(), "prefix {n}");
        }
        assert_eq!(sender_of(&[0xff; 40]), None);
        assert_eq!(sender_of(&[PASS_THROUGH, VERSION, SMALL_TUPLE, 1, SMALL_INTEGER, 22]), None);
        // An atom announcing more bytes than there are.
        assert_eq!(
            sender_of(&[PASS_THROUGH, VERSION, SMALL_TUPLE, 3, SMALL_INTEGER, 22, NEW_PID, ATOM, 0xff, 0xff]),
            None
        );
        // A large big integer length that would overflow.
        let p = [PASS_THROUGH, VERSION, SMALL_TUPLE, 4, SMALL_INTEGER, 35, LARGE_BIG, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(sender_of(&p), None);
    }

    #[test]
    fn pid_keys_differ_by_every_field_and_match_across_atom_encodings() {
        let k = key(NODE, 80);
        assert_ne!(k, key(NODE, 81));
        assert_ne!(k, key("4433@127.0.0.2", 80));
        let mut other_creation = vec![VERSION];
        other_creation.extend(pid(NODE, 80, 0, 8));
        assert_ne!(Some(k), pid_key(&other_creation));
        // term_to_binary in OTP 25 may write the node as ATOM_EXT; the key is the same.
        let mut latin1 = vec![VERSION, NEW_PID, ATOM, 0, NODE.len() as u8];
        latin1.extend_from_slice(NODE.as_bytes());
        latin1.extend_from_slice(&[0, 0, 0, 80, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(pid_key(&latin1), Some(k));
    }

    #[test]
    fn routes_are_sticky_and_spread_new_senders() {
        let mut routes = Routes::new(NonZeroU8::new(4).unwrap());
        assert_eq!(routes.streams(), 5);
        let idle = |_| 0;
        let a = routes.stream_for(Some(1), Class::Normal, idle).stream;
        let b = routes.stream_for(Some(2), Class::Normal, idle).stream;
        assert_ne!(a, b, "equally loaded streams take turns");
        // A new sender avoids the stream holding a bulk transfer.
        let loaded = |i| if i == a { 10 << 20 } else { 0 };
        let c = routes.stream_for(Some(3), Class::Normal, loaded).stream;
        assert_ne!(c, a);
        // Old senders keep their stream whatever the load.
        assert_eq!(routes.stream_for(Some(1), Class::Normal, |_| 0), Route { stream: a, moved_from: None });
        assert_eq!(routes.stream_for(Some(9), Class::Priority, idle).stream, 4);
        assert_eq!(routes.stream_for(None, Class::Normal, idle).stream, FIXED_STREAM);
        assert_eq!(routes.priority_stream(), Some(4));
    }

    #[test]
    fn a_sender_whose_class_changes_moves_and_says_from_where() {
        let mut routes = Routes::new(NonZeroU8::new(4).unwrap());
        let idle = |_| 0;
        let a = routes.stream_for(Some(1), Class::Normal, idle).stream;
        assert_eq!(routes.stream_for(Some(1), Class::Priority, idle), Route { stream: 4, moved_from: Some(a) });
        assert_eq!(routes.stream_for(Some(1), Class::Priority, idle), Route { stream: 4, moved_from: None });
        let back = routes.stream_for(Some(1), Class::Normal, idle);
        assert_eq!(back.moved_from, Some(4));
        assert!(back.stream < 4, "back on a normal stream");
        // Single-stream mode has no classes to move between.
        let mut one = Routes::new(NonZeroU8::new(1).unwrap());
        assert_eq!(one.stream_for(Some(1), Class::Normal, idle), Route { stream: 0, moved_from: None });
        assert_eq!(one.stream_for(Some(1), Class::Priority, idle), Route { stream: 0, moved_from: None });
    }

    #[test]
    fn single_stream_mode_routes_everything_to_stream_zero() {
        let mut routes = Routes::new(NonZeroU8::new(1).unwrap());
        assert_eq!(routes.streams(), 1);
        assert_eq!(routes.priority_stream(), None);
        assert_eq!(routes.stream_for(Some(5), Class::Priority, |_| 0).stream, 0);
    }

    #[test]
    fn a_full_table_falls_back_to_a_stable_hash() {
        let mut routes = Routes::new(NonZeroU8::new(3).unwrap());
        for k in 0..ROUTE_TABLE_LIMIT as u64 {
            routes.stream_for(Some(k), Class::Normal, |_| 0);
        }
        let late = u64::MAX - 1;
        let first = routes.stream_for(Some(late), Class::Normal, |_| 0);
        assert_eq!(first, Route { stream: (late % 3) as usize, moved_from: None });
        assert_eq!(routes.stream_for(Some(late), Class::Priority, |i| i), first);
    }
}
