//! The one tokio runtime of the library, shared by every endpoint.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The runtime, started on first use with `workers` threads (later values are ignored:
/// a node has one runtime for its lifetime).
pub fn get_or_start(workers: usize) -> std::io::Result<&'static Runtime> {
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("macula-quic")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// The runtime, if `listen` (or `client_endpoint`) started it.
pub fn get() -> Option<&'static Runtime> {
    RUNTIME.get()
}
