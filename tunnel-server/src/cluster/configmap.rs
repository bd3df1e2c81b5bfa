//! The records sink of a cluster: the ConfigMap CoreDNS's hosts plugin reads.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use crate::config::ObjectName;
use crate::dns::{self, Pacing, RecordsRx, Sink};

/// The ConfigMap key CoreDNS's hosts plugin reads (mounted as `/etc/edge/tunnel-nodes`).
pub const RECORDS_KEY: &str = "tunnel-nodes";

/// Fewest seconds between two ConfigMap writes: changes within it go out as one write.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a change waits for the rest of its batch (a Node list, a burst of watch events)
/// before it is written, so that a batch becomes one write.
const SETTLE: Duration = Duration::from_millis(200);
/// How often the ConfigMap is read again while the records do not change.
const RESYNC: Duration = Duration::from_secs(60);

/// Writes the records to the ConfigMap's [`RECORDS_KEY`] each time they change, [`SETTLE`]
/// after the change and at most once per [`WRITE_INTERVAL`], until `stop`. It reads the
/// ConfigMap first and writes only when the key differs (another replica may have written the
/// same bytes); it creates the ConfigMap when there is none; it reads it again every
/// [`RESYNC`] and puts the records back if someone changed them.
pub(crate) async fn write_configmap(
    client: Client,
    configmap: ObjectName,
    records: RecordsRx,
    stop: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &configmap.namespace);
    let pacing = Pacing {
        settle: SETTLE,
        interval: WRITE_INTERVAL,
        resync: Some(RESYNC),
    };
    let target = configmap.to_string();
    dns::drive_sink(Sink::ConfigMap, &target, pacing, records, stop, |content| {
        let (api, name) = (&api, configmap.name.as_str());
        async move { put_records(api, name, &content).await }
    })
    .await;
}

/// Puts `content` under [`RECORDS_KEY`]; whether it wrote (false: it was there already).
async fn put_records(api: &Api<ConfigMap>, name: &str, content: &str) -> kube::Result<bool> {
    let patch = json!({ "data": { RECORDS_KEY: content } });
    match api.get_opt(name).await? {
        Some(existing) => {
            let current = existing.data.as_ref().and_then(|d| d.get(RECORDS_KEY));
            if current.map(String::as_str) == Some(content) {
                return Ok(false);
            }
        }
        None => {
            let configmap = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    RECORDS_KEY.to_owned(),
                    content.to_owned(),
                )])),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &configmap).await {
                Ok(_) => return Ok(true),
                // Another replica created it first: patch it like an existing one.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}
