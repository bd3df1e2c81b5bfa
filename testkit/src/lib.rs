//! Test support for edge-tunnel: certificates, a fake kubelet, and an in-process cluster
//! (server plus agents on loopback, ports from :0). Used by the end-to-end tests and the
//! quickstart example.
#![forbid(unsafe_code)]
#![allow(clippy::missing_panics_doc)]

pub mod client;
pub mod cluster;
pub mod configmap;
pub mod fake_kube;
pub mod kubelet;
pub mod logs;
pub mod netns;
pub mod pki;
pub mod target;
pub mod tools;

pub use cluster::{AgentHandle, TestCluster};
pub use configmap::ConfigMapDir;
pub use kubelet::{FakeKubelet, LogFeed};
pub use pki::TestPki;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide metrics recorder for tests, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other recorder in a test process")
        })
        .clone()
}

/// Serialises the tests of one process that start servers or agents. Metrics are
/// process-wide, so two clusters in one process would count into the same series; under
/// `cargo nextest` (a process per test) the lock is never contended.
pub async fn exclusive() -> tokio::sync::OwnedMutexGuard<()> {
    static LOCK: OnceLock<std::sync::Arc<tokio::sync::Mutex<()>>> = OnceLock::new();
    LOCK.get_or_init(Default::default)
        .clone()
        .lock_owned()
        .await
}

/// A TCP port free on every address of `ips` at the time of asking (the https-proxy listener
/// and the node's service share a number; replicas on two addresses share front ports).
pub fn free_port_on(ips: &[&str]) -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((ips[0], 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// The value of a counter or gauge in Prometheus text, summed over series whose labels contain
/// every `label="value"` pair given.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The transport a fixed choice (`quic` or `grpc`) lands on.
pub fn kind_of(choice: tunnel_core::TransportChoice) -> tunnel_core::TransportKind {
    use tunnel_core::TransportChoice;
    match choice {
        TransportChoice::Quic => tunnel_core::TransportKind::Quic,
        TransportChoice::Grpc => tunnel_core::TransportKind::Grpc,
        TransportChoice::Auto => panic!("auto lands on either transport"),
    }
}

/// Runs each named `async fn(TransportChoice)` once per transport, as tests in modules `quic`
/// and `grpc`: the conformance suite, so that both transports keep the same behaviour. Tests run
/// on a two-thread runtime; `conformance!(current_thread: ...)` puts every task on the test's
/// thread (for a thread-local log capture).
#[macro_export]
macro_rules! conformance {
    (@with $attr:meta; $($name:ident),*) => {
        mod quic {
            $(
                #[$attr]
                async fn $name() {
                    super::$name(tunnel_core::TransportChoice::Quic).await;
                }
            )*
        }
        mod grpc {
            $(
                #[$attr]
                async fn $name() {
                    super::$name(tunnel_core::TransportChoice::Grpc).await;
                }
            )*
        }
    };
    (current_thread: $($name:ident),* $(,)?) => {
        $crate::conformance!(@with tokio::test; $($name),*);
    };
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@with tokio::test(flavor = "multi_thread", worker_threads = 2); $($name),*);
    };
}

/// Installs a compact tracing subscriber once (RUST_LOG controls it; default warnings only).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}
