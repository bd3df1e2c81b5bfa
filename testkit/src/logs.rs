//! Log lines captured in a test: a subscriber writing plain text (no colour codes) into a
//! shared buffer, installed for the current thread. Run the test on a current-thread runtime
//! (`conformance!(current_thread: ...)`) so that every task of the server and the agent logs
//! through it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The lines written while a capture is installed.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture").finish_non_exhaustive()
    }
}

impl LogCapture {
    /// Captures events at `level` and above (an `EnvFilter` directive, e.g. `"warn"`) on this
    /// thread until the guard is dropped.
    pub fn install(&self, level: &str) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned()
    }

    /// The captured lines that contain every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (at most 10 s) until a captured line contains every one of `parts`; returns it.
    pub async fn line_with(&self, parts: &[&str]) -> String {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(line) = self.lines_with(parts).into_iter().next() {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {parts:?} in:\n{}", self.text()))
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}
