//! # tunnel-process
//!
//! What a tunnel process needs around the library, shared by `tunnel-server` and
//! `tunnel-agent` (and by programs that embed either):
//!
//! * [`ConfigError`]: the one error for a configuration that cannot run.
//! * [`files`]: certificate, key and CA bundle, each read once without blocking the runtime.
//! * [`meta`]: the meta HTTP server (`/healthz`, `/livez`, `/readyz`, `/metrics`).
//! * [`signal`]: the future that resolves when the process is asked to stop.
//! * [`drain`]: the end of a run: let work finish within a deadline, then cut the rest.
//! * [`telemetry`]: the logging subscriber and the Prometheus recorder, for `main` only.
//! * [`throttle`]: a token bucket for the log lines a peer can cause (refused streams).
//!
//! Nothing here runs on import: only [`telemetry`] installs process-wide state, and only when
//! `main` calls it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod drain;
mod error;
pub mod files;
pub mod meta;
pub mod signal;
pub mod telemetry;
pub mod throttle;

pub use error::ConfigError;
