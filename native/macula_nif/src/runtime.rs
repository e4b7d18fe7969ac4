//! The one tokio runtime of the library, shared by every endpoint.

use std::num::NonZeroUsize;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

/// Owned here so the VM's exit can stop its threads (see `shutdown`).
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
static HANDLE: OnceLock<Handle> = OnceLock::new();

/// The runtime, started on first use with `workers` threads (later values are ignored:
/// a node has one runtime for its lifetime).
pub fn get_or_start(workers: NonZeroUsize) -> std::io::Result<&'static Handle> {
    let mut runtime = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let started = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.get())
        .thread_name("macula-quic")
        .enable_all()
        .build()?;
    let handle = HANDLE.get_or_init(|| started.handle().clone());
    *runtime = Some(started);
    Ok(handle)
}

/// The runtime, if `listen` started it.
pub fn get() -> Option<&'static Handle> {
    HANDLE.get()
}

/// Stops the runtime's threads, waiting at most `timeout` for them.
pub fn stop(timeout: Duration) {
    let runtime = RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(runtime) = runtime {
        runtime.shutdown_timeout(timeout);
    }
}
