//! The Kubernetes side, through kube-rs: Node and Service watchers that make the node records
//! (`nodes`), the ConfigMap CoreDNS reads them from (`configmap`), and the tunnel Service's
//! ports kept in step with the port configuration (`service`).
//!
//! Every replica computes the same records from the same Nodes, so they write the same bytes
//! and never fight over the ConfigMap. The watchers resume broken watches and back off while
//! the API server is away; the last records stay published (and served) meanwhile.

mod configmap;
mod nodes;
mod selector;
mod service;

use std::time::Duration;

use kube::Client;

pub use configmap::RECORDS_KEY;
pub(crate) use configmap::write_configmap;
pub(crate) use nodes::{NodeSource, SeenService};
pub use selector::parse_selector;
pub(crate) use service::{FrontPorts, keep_service_ports};

use crate::config::KubeSource;
use crate::dns::MAX_RETRY;

/// How long connecting to the API server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write of the API may take (watches are ended by the server sooner).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Not in a pod, or the pod's service account is not mounted.
    #[error(
        "in-cluster Kubernetes configuration (KUBERNETES_SERVICE_HOST is set; --kubernetes=off goes without): {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for `source`. Nothing is sent yet: an API server that is down shows in the
/// watchers' logs and metrics, not here.
pub async fn client(source: &KubeSource) -> Result<Client, ClusterError> {
    let mut config = match source {
        KubeSource::InCluster => kube::Config::incluster().map_err(ClusterError::InCluster)?,
        KubeSource::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config).map_err(ClusterError::Client)
}
