//! Leaf sites in the fleet status (docs/edge-design.md §6, §8 steps 3 and
//! 10).
//!
//! An edge node probes the hub's JetStream every second ([`HubMonitor`]):
//! the leaf link is up or down, and since when. The server's own view
//! lags: over a dead (blackholed) link it keeps the connection for
//! several missed pings, and `/leafz` has no "since".
//!
//! With each membership heartbeat an edge node also puts a record into the
//! hub's `<ns>_sites` bucket under `<site>.<node>` ([`SiteNode`]: its
//! heartbeat, link and usage backlog). Unlike the membership list's, that
//! record does not expire: a site cut off from the hub stays listed, and
//! the age of its record says since when it is out of touch. Any node
//! reads the bucket for `mayfly status --fleet`.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt as _;
use mayfly_store::{HubLink, NodeInfo, Result, SiteNode, StoreError};
use tokio::task::JoinHandle;

use crate::{Fleet, NatsUsage, backend};

/// How often an edge node probes the hub.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a probe waits: a link that lets no answer through within it
/// is called down at once, not after the servers' ping checks give up on
/// it (seconds later).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A record older than this (three heartbeats) is stale: its node has not
/// reached the hub since.
const STALE_AFTER_MS: i64 = 3000;

/// An edge node's view of its link to the hub, kept by a probe task that
/// stops when the monitor is dropped.
pub(crate) struct HubMonitor {
    site: String,
    hub_domain: String,
    /// Up or down, and since when (ms since the Unix epoch).
    state: Mutex<(bool, i64)>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for HubMonitor {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl HubMonitor {
    /// Starts probing the hub from an edge node; `None` for a node
    /// connected to the hub itself. The link counts as up from now: the
    /// node opened its stores at the hub a moment ago.
    pub(crate) fn start(fleet: &Fleet) -> Option<Arc<Self>> {
        let site = fleet.site()?.to_string();
        let monitor = Arc::new(Self {
            site,
            hub_domain: fleet.hub_domain().to_string(),
            state: Mutex::new((true, now_ms())),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(probe(fleet.clone(), Arc::downgrade(&monitor)));
        *monitor.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Some(monitor)
    }

    /// The link now.
    pub(crate) fn link(&self) -> HubLink {
        let (up, since_ms) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        HubLink {
            site: self.site.clone(),
            hub_domain: self.hub_domain.clone(),
            up,
            since_ms,
        }
    }

    /// Records a probe's result; true when the hub just came back.
    fn record(&self, up: bool) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = state.0 != up;
        if changed {
            *state = (up, now_ms());
            if up {
                tracing::info!(site = self.site, "the hub is reachable again");
            } else {
                tracing::warn!(
                    site = self.site,
                    "the hub is unreachable: serving the versions this node has"
                );
            }
        }
        changed && up
    }
}

async fn probe(fleet: Fleet, monitor: Weak<HubMonitor>) {
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let up = fleet.probe_hub(PROBE_TIMEOUT).await.is_ok();
        let Some(monitor) = monitor.upgrade() else {
            return;
        };
        if monitor.record(up) {
            fleet.hub_returned();
        }
    }
}

/// The fleet's `<ns>_sites` bucket (at the hub), and at an edge node what
/// it writes there.
pub(crate) struct Sites {
    kv: kv::Store,
    edge: Option<Edge>,
}

/// What an edge node reports of itself.
struct Edge {
    monitor: Arc<HubMonitor>,
    /// Set once the usage ledger is open (after the membership list).
    usage: OnceLock<Arc<NatsUsage>>,
    /// Its last record, sent or not: its own row while the hub is out of
    /// reach.
    last: Mutex<Option<SiteNode>>,
}

impl Sites {
    /// Opens (or creates) the bucket; `monitor` is the edge node's probe,
    /// `None` on a hub node.
    pub(crate) async fn open(fleet: &Fleet, monitor: Option<Arc<HubMonitor>>) -> Result<Self> {
        let kv = fleet
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: fleet.name("sites"),
                description: "Mayfly leaf sites: each edge node's last heartbeat and link".into(),
                history: 1,
                num_replicas: fleet.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                StoreError::Backend(format!("cannot open the fleet's sites bucket: {e}").into())
            })?;
        Ok(Self {
            kv,
            edge: monitor.map(|monitor| Edge {
                monitor,
                usage: OnceLock::new(),
                last: Mutex::new(None),
            }),
        })
    }

    /// Gives an edge node's records their usage backlog.
    pub(crate) fn set_usage(&self, usage: Arc<NatsUsage>) {
        if let Some(edge) = &self.edge {
            let _ = edge.usage.set(usage);
        }
    }

    /// The edge node's link to the hub now; `None` on a hub node.
    pub(crate) fn hub_link(&self) -> Option<HubLink> {
        self.edge.as_ref().map(|edge| edge.monitor.link())
    }

    /// The edge node's record for `node`'s heartbeat, live.
    async fn own(&self, edge: &Edge, node: &NodeInfo) -> SiteNode {
        let usage_backlog = match edge.usage.get() {
            Some(usage) => usage.backlog().await.unwrap_or(0),
            None => 0,
        };
        let link = edge.monitor.link();
        SiteNode {
            site: link.site.clone(),
            node: node.clone(),
            link,
            usage_backlog,
            stale: false,
        }
    }

    /// At an edge node: records `node`'s heartbeat as its site's, and
    /// sends it to the hub; nothing on a hub node.
    pub(crate) async fn beat(&self, node: &NodeInfo) -> Result<()> {
        let Some(edge) = &self.edge else {
            return Ok(());
        };
        let record = self.own(edge, node).await;
        let json = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = key(&record.site, &node.name);
        *edge.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
        self.kv.put(key, json.into()).await.map_err(backend)?;
        Ok(())
    }

    /// Removes the edge node's record (a clean shutdown: the site is not
    /// out of touch, the node is gone).
    pub(crate) async fn leave(&self, name: &str) -> Result<()> {
        let Some(edge) = &self.edge else {
            return Ok(());
        };
        let key = key(&edge.monitor.site, name);
        self.kv.delete(key).await.map_err(backend)?;
        Ok(())
    }

    /// Every edge node's record, sorted by site then node, each marked
    /// stale when older than three heartbeats. An edge node shows its own
    /// live record, and only that one while the hub is out of reach.
    pub(crate) async fn list(&self) -> Result<Vec<SiteNode>> {
        let own = match &self.edge {
            Some(edge) => {
                let last = edge.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match last {
                    Some(last) => Some(self.own(edge, &last.node).await),
                    None => None,
                }
            }
            None => None,
        };
        let mut records = match self.read().await {
            Ok(records) => records,
            Err(error) if own.is_some() => {
                tracing::debug!("cannot read the fleet's sites: {error}");
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        if let Some(own) = own {
            records.retain(|r| !(r.site == own.site && r.node.name == own.node.name));
            records.push(own);
        }
        records.sort_by(|a, b| (&a.site, &a.node.name).cmp(&(&b.site, &b.node.name)));
        Ok(records)
    }

    async fn read(&self) -> Result<Vec<SiteNode>> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)?;
        let now = now_ms();
        let mut records = Vec::with_capacity(keys.len());
        // Other keys hold locks (see usage.rs).
        for key in keys.into_iter().filter(|key| !key.starts_with("lock.")) {
            let Some(value) = self.kv.get(&key).await.map_err(backend)? else {
                continue;
            };
            match serde_json::from_slice::<SiteNode>(&value) {
                Ok(mut record) => {
                    record.stale = now - record.node.at_ms > STALE_AFTER_MS;
                    records.push(record);
                }
                Err(error) => tracing::warn!(key, "unreadable site record: {error}"),
            }
        }
        Ok(records)
    }
}

/// The key of `node`'s record at `site`.
fn key(site: &str, node: &str) -> String {
    format!("{site}.{node}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
