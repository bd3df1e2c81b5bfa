//! Process-wide telemetry, installed once by `main`: the tracing subscriber (what logs look
//! like) and the Prometheus recorder (what `/metrics` renders). Libraries never call these.

use std::io::IsTerminal;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; colour only when stdout is a terminal.
    #[default]
    Text,
    /// One JSON object per event, for log pipelines.
    Json,
}

/// The logging flags both binaries take.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format: text, or json for log pipelines. Levels come from RUST_LOG (default
    /// info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Why telemetry could not be installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// Another tracing subscriber is already installed.
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
    /// Another metrics recorder is already installed, or the recorder could not be built.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
}

/// The subscriber for `format` with `filter`, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(fmt.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(fmt.json().with_ansi(false).finish()),
    }
}

/// The levels without `RUST_LOG`: `info`, except hickory's DNS server and resolver, which
/// log a line per query at `info`: a client could fill the log.
pub const DEFAULT_LOG_FILTER: &str =
    "info,hickory_server=warn,hickory_proto=warn,hickory_resolver=warn,hickory_net=warn";

/// Installs the process's tracing subscriber: levels from `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]), lines in `format` on stdout, no colour codes unless stdout is a
/// terminal.
pub fn init_logging(format: LogFormat) -> Result<(), TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::stdout().is_terminal();
    let subscriber = subscriber(format, filter, ansi, std::io::stdout);
    tracing_subscriber::util::SubscriberInitExt::try_init(subscriber)
        .map_err(TelemetryError::Subscriber)
}

/// Installs the process-wide Prometheus recorder and returns the handle that renders it (for
/// the meta server's `/metrics`).
pub fn install_recorder() -> Result<PrometheusHandle, TelemetryError> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(TelemetryError::Recorder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn log_with(format: LogFormat, ansi: bool) -> String {
        let out = Buffer::default();
        let subscriber = subscriber(format, EnvFilter::new("info"), ansi, out.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(agent.id = "node-a", "connected");
            tracing::debug!("below the level");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_has_no_colour_codes_when_not_asked() {
        let text = log_with(LogFormat::Text, false);
        assert!(text.contains("connected"), "{text}");
        assert!(text.contains("agent.id=\"node-a\""), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(!text.contains("below the level"), "{text}");
    }

    #[test]
    fn json_is_one_object_per_event() {
        let json = log_with(LogFormat::Json, true);
        let lines: Vec<_> = json.lines().collect();
        assert_eq!(lines.len(), 1, "{json}");
        assert!(
            lines[0].starts_with('{') && lines[0].ends_with('}'),
            "{json}"
        );
        assert!(lines[0].contains("\"message\":\"connected\""), "{json}");
        assert!(lines[0].contains("\"agent.id\":\"node-a\""), "{json}");
        assert!(!json.contains('\u{1b}'), "{json}");
    }
}
