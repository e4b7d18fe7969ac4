//! The processes marked with `macula_dist:prioritize/2`, for every connection of the node.
//!
//! A mark is looked up for every packet the controller hands over (`send_data`); a
//! sender whose mark changed moves to a stream of its new class behind a fence (see
//! `macula_quic::routing`). Each mark monitors its process and goes away when the
//! process exits, so the table holds live processes only (and the last packets of a
//! process that has exited by the time they are handed over go out unmarked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use macula_quic::frame::OutgoingPacket;
use macula_quic::routing::{self, SenderKey};
use rustler::{Binary, Env, LocalPid, Monitor, NifResult, Resource, ResourceArc};

use crate::atoms;

/// One marked process; its monitor removes the mark when the process exits.
pub struct Mark {
    key: SenderKey,
}

#[rustler::resource_impl]
impl Resource for Mark {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        unmark(self.key);
    }
}

static MARKS: Mutex<Option<HashMap<SenderKey, ResourceArc<Mark>>>> = Mutex::new(None);
/// Marks in the table: lets `apply` skip the lock when nobody asked for priority.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn marks() -> std::sync::MutexGuard<'static, Option<HashMap<SenderKey, ResourceArc<Mark>>>> {
    MARKS.lock().unwrap_or_else(|p| p.into_inner())
}

fn unmark(key: SenderKey) {
    let mut marks = marks();
    if let Some(table) = marks.as_mut() {
        if table.remove(&key).is_some() {
            COUNT.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Marks (`on` true) or unmarks `pid`, whose `term_to_binary/1` is `external`.
#[rustler::nif]
fn set_priority(env: Env, pid: LocalPid, external: Binary, on: bool) -> NifResult<rustler::Atom> {
    let key = routing::pid_key(&external).ok_or(rustler::Error::BadArg)?;
    if !on {
        unmark(key);
        return Ok(atoms::ok());
    }
    let mark = ResourceArc::new(Mark { key });
    if env.monitor(&mark, &pid).is_none() {
        // The process is already gone.
        return Ok(atoms::ok());
    }
    let mut marks = marks();
    if marks.get_or_insert_with(HashMap::new).insert(key, mark).is_none() {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
    Ok(atoms::ok())
}

/// Prioritises the packets whose sender is marked.
pub fn apply(packets: &mut [OutgoingPacket]) {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let marks = marks();
    let Some(table) = marks.as_ref() else { return };
    for packet in packets {
        if packet.sender().is_some_and(|key| table.contains_key(&key)) {
            packet.prioritise();
        }
    }
}
