//! Connection events as Erlang messages. Every function here runs on a tokio thread
//! (never a scheduler thread), which is what `OwnedEnv::send_and_clear` requires.

use std::cell::RefCell;
use std::sync::Mutex;

use macula_quic::frame::PacketBuf;
use macula_quic::{CloseReason, Credit, Events};
use rustler::{Binary, Encoder, Env, LocalPid, OwnedBinary, OwnedEnv, Term};

use crate::{atoms, terms};

thread_local! {
    static MESSAGE_ENV: RefCell<OwnedEnv> = RefCell::new(OwnedEnv::new());
}

/// Sends the term `build` makes to `pid` (a dead pid is not an error: nobody is listening).
pub fn send<F>(pid: &LocalPid, build: F)
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    if crate::shutdown::stopping() {
        return;
    }
    MESSAGE_ENV.with(|env| {
        let _ = env.borrow_mut().send_and_clear(pid, build);
    });
}

/// An Erlang binary under construction; received packets are decoded straight into it.
pub struct ErlangBinary(OwnedBinary);

impl PacketBuf for ErlangBinary {
    fn alloc(len: usize) -> Self {
        ErlangBinary(OwnedBinary::new(len))
    }
    fn grow(&mut self, len: usize) {
        self.0.realloc_or_copy(len);
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
    fn len(&self) -> usize {
        self.0.as_slice().len()
    }
}

/// The processes a connection reports to.
#[derive(Default)]
pub struct ErlangEvents {
    /// The controller: gets `macula_writable` and `{macula_closed, Reason}`. On the
    /// connecting side this is the owner that called `connect` until `set_controller`
    /// names the controller.
    pub controller: Mutex<Option<LocalPid>>,
    /// The process waiting in `f_recv` for the next handshake message.
    pub handshake_reader: Mutex<Option<LocalPid>>,
    /// The input handler: gets `{macula_data, [Packet]}`.
    pub input: Mutex<Option<LocalPid>>,
}

impl ErlangEvents {
    /// Events that go to `pid` until `set_controller` names the controller.
    pub fn reporting_to(pid: LocalPid) -> Self {
        ErlangEvents { controller: Mutex::new(Some(pid)), ..Default::default() }
    }
}

/// Reads a pid slot, ignoring poisoning.
pub fn get(slot: &Mutex<Option<LocalPid>>) -> Option<LocalPid> {
    *slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes a pid slot, ignoring poisoning.
pub fn set(slot: &Mutex<Option<LocalPid>>, pid: LocalPid) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
}

impl Events for ErlangEvents {
    type Packet = ErlangBinary;

    fn handshake_frame(&self, frame: Vec<u8>) {
        if let Some(pid) = get(&self.handshake_reader) {
            send(&pid, |env| (atoms::macula_handshake(), terms::bytes(env, &frame)).encode(env));
        }
    }

    fn data(&self, packets: Vec<ErlangBinary>, credit: Credit) {
        if let Some(pid) = get(&self.input) {
            send(&pid, |env| {
                let list: Vec<Term> = packets.into_iter().map(|p| Binary::from_owned(p.0, env).encode(env)).collect();
                (atoms::macula_data(), terms::credit(env, credit), list).encode(env)
            });
        }
    }

    fn writable(&self) {
        if let Some(pid) = get(&self.controller) {
            send(&pid, |env| atoms::macula_writable().encode(env));
        }
    }

    fn closed(&self, reason: &CloseReason) {
        if let Some(pid) = get(&self.controller) {
            send(&pid, |env| (atoms::macula_closed(), terms::close_reason(env, reason)).encode(env));
        }
    }
}
