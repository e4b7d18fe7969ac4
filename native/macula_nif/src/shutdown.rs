//! What happens when the VM exits (`erlang:halt/0,1`, or the end of `init:stop/0`).
//!
//! The BEAM runs no Erlang code on halt, but it does run C `atexit` handlers. Ours
//! closes every endpoint, which sends CONNECTION_CLOSE on every connection so peers see
//! `connection_closed` at once instead of waiting for a tick timeout, gives the frames a
//! moment to leave, then stops the tokio threads: left running, they would call into a
//! process that is being torn down (seen as crashes at exit).
//!
//! The same list tells `start_listen` which endpoints an earlier incarnation closed:
//! `init:restart/0` keeps the library, and their ports must be free for the new one.

// Unsafe code: the call to libc's atexit below.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use macula_quic::Endpoint;

use crate::runtime;

static ENDPOINTS: Mutex<Vec<Weak<Endpoint>>> = Mutex::new(Vec::new());
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How long the exiting VM waits for close frames to be sent.
const FLUSH_TIME: Duration = Duration::from_millis(200);

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
}

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the exit handler, once per OS process: the load callback runs again after
/// `init:restart/0` (the library, its statics and its runtime stay).
pub fn install() -> bool {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return true;
    }
    // SAFETY: `at_exit` is a plain `extern "C" fn()` with no captured state.
    unsafe { atexit(at_exit) == 0 }
}

/// Remembers an endpoint so it is closed when the VM exits.
pub fn register(endpoint: &Arc<Endpoint>) {
    let mut endpoints = ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner());
    endpoints.retain(|e| e.strong_count() > 0);
    endpoints.push(Arc::downgrade(endpoint));
}

/// Endpoints closed but not yet freed (their terms not yet collected) that may still
/// hold their port.
pub fn closed_endpoints() -> Vec<Arc<Endpoint>> {
    let endpoints = ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner());
    endpoints.iter().filter_map(Weak::upgrade).filter(|e| e.is_closed() && e.holds_port()).collect()
}

/// True once the VM is exiting: no more messages may be sent.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

extern "C" fn at_exit() {
    STOPPING.store(true, Ordering::Release);
    let endpoints: Vec<Arc<Endpoint>> =
        ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
    let Some(runtime) = runtime::get() else { return };
    let (done, flushed) = std::sync::mpsc::channel();
    // Endpoints closed already (net_kernel's close on init:stop) have had their drain.
    let endpoints: Vec<Arc<Endpoint>> = endpoints.into_iter().filter(|e| !e.is_closed()).collect();
    runtime.spawn(async move {
        for endpoint in &endpoints {
            endpoint.close();
        }
        for endpoint in &endpoints {
            endpoint.wait_idle().await;
        }
        let _ = done.send(());
    });
    let _ = flushed.recv_timeout(FLUSH_TIME);
    runtime::stop(FLUSH_TIME);
}
