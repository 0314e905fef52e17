//! Fleet membership on a KV bucket (`<ns>_nodes`): each node puts its
//! heartbeat under its name every second, and the bucket's `max_age`
//! removes a node whose heartbeats stopped, so a dead node leaves the list
//! within three heartbeats without anyone deciding it is dead.
//!
//! A node also holds its name: `claim/<name>` (no node name or host name
//! has a `/`), created at start and refreshed every second. Two
//! processes with one name would share the name's durable usage consumer
//! (each materialising half the fleet ledger) and release each other's
//! event leases, so the second is refused at start.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use futures::TryStreamExt as _;
use mayfly_store::{Membership, NodeInfo, Result, StoreError};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::sites::Sites;
use crate::{Fleet, backend};

/// How often each node sends its heartbeat. KV expiry works in whole
/// seconds at best, so this cannot be shorter than 1 s.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a heartbeat stays listed: two and a half intervals, so one
/// late heartbeat does not drop a node and a dead one is gone within three.
const EXPIRY: Duration = Duration::from_millis(2500);

/// Longest a start waits for a claim on its name to lapse: a node that was
/// killed a moment ago (and is being restarted) stops refreshing its claim,
/// which expires within [`EXPIRY`]; a claim refreshed past this is a live
/// node's.
const CLAIM_WAIT: Duration = Duration::from_millis(4500);

/// The membership list of a fleet, and this node's claim on its name.
pub struct NatsMembership {
    nodes: kv::Store,
    bucket: Arc<Bucket>,
    /// Refreshes `claim/<name>`; stopped on [`Membership::leave`] or drop.
    refresher: Mutex<Option<JoinHandle<()>>>,
    /// The fleet's sites, which an edge node's heartbeats also reach.
    sites: Option<Arc<Sites>>,
}

/// Who holds a node name: enough for the refused node's error to say
/// which process to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    /// Unique per process, so a store reopened in the same process (a
    /// restart in tests) takes its own claim over instead of waiting.
    instance: String,
    host: String,
    pid: u32,
    started_ms: i64,
}

impl Claim {
    fn ours() -> Self {
        static INSTANCE: OnceLock<String> = OnceLock::new();
        Claim {
            instance: INSTANCE
                .get_or_init(|| uuid::Uuid::now_v7().simple().to_string())
                .clone(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .unwrap_or_default(),
            pid: std::process::id(),
            started_ms: now_ms(),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The prefix of claim keys in the membership bucket.
const CLAIM_PREFIX: &str = "claim/";

fn claim_key(name: &str) -> String {
    format!("{CLAIM_PREFIX}{name}")
}

impl Drop for NatsMembership {
    fn drop(&mut self) {
        if let Some(task) = self
            .refresher
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl NatsMembership {
    /// Opens (or creates) the fleet's membership bucket and claims this
    /// node's name ([`Fleet::node_name`]) for as long as it lives; a name a
    /// running node holds is refused with an error that says what to do.
    pub async fn open(fleet: &Fleet) -> Result<Self> {
        let bucket = Arc::new(Bucket {
            jetstream: fleet.jetstream().clone(),
            config: kv::Config {
                bucket: fleet.name("nodes"),
                description: "Mayfly fleet members: one heartbeat per node".into(),
                history: 1,
                max_age: EXPIRY,
                // Heartbeats are rewritten every second: losing them with
                // a server costs nothing, so keep them in memory (a lost
                // bucket is made again, see `Bucket::ensure`).
                storage: async_nats::jetstream::stream::StorageType::Memory,
                num_replicas: fleet.replicas(),
                ..Default::default()
            },
        });
        let nodes = bucket.ensure().await.map_err(|e| {
            StoreError::Backend(format!("cannot open the fleet's membership bucket: {e}").into())
        })?;
        let name = fleet.node_name().to_string();
        let (claim, revision) = claim(&nodes, &name, Claim::ours()).await?;
        let refresher = tokio::spawn(refresh(
            bucket.clone(),
            nodes.clone(),
            name,
            claim,
            revision,
        ));
        Ok(Self {
            nodes,
            bucket,
            refresher: Mutex::new(Some(refresher)),
            sites: None,
        })
    }

    /// Sends each heartbeat to the fleet's sites too (an edge node's).
    pub(crate) fn with_sites(mut self, sites: Arc<Sites>) -> Self {
        self.sites = Some(sites);
        self
    }
}

/// The membership bucket's definition, to make it again: a bucket in
/// memory is gone when a single server restarts (a cluster keeps it on the
/// other servers), and every heartbeat after that would fail.
struct Bucket {
    jetstream: async_nats::jetstream::Context,
    config: kv::Config,
}

impl Bucket {
    /// Creates the bucket if it is missing; the store handle works on the
    /// bucket by name, so handles taken before stay valid.
    async fn ensure(&self) -> std::result::Result<kv::Store, String> {
        self.jetstream
            .create_or_update_key_value(self.config.clone())
            .await
            .map_err(|e| e.to_string())
    }
}

/// Takes `claim/<name>`, waiting up to [`CLAIM_WAIT`] for a lapsed holder's
/// claim to expire.
async fn claim(nodes: &kv::Store, name: &str, ours: Claim) -> Result<(Claim, u64)> {
    let key = claim_key(name);
    let value: bytes::Bytes = serde_json::to_vec(&ours)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?
        .into();
    let deadline = Instant::now() + CLAIM_WAIT;
    loop {
        match nodes.create(&key, value.clone()).await {
            Ok(revision) => return Ok((ours, revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(backend(e)),
        }
        let Some(entry) = nodes.entry(&key).await.map_err(backend)? else {
            continue; // expired in between: try again at once
        };
        let holder = serde_json::from_slice::<Claim>(&entry.value).ok();
        if let Some(holder) = &holder
            && holder.instance == ours.instance
        {
            // This process's own earlier claim (a reopened store).
            match nodes.update(&key, value.clone(), entry.revision).await {
                Ok(revision) => return Ok((ours, revision)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(backend(e)),
            }
        }
        if Instant::now() >= deadline {
            let by = holder.map_or_else(String::new, |h| {
                format!(" (pid {} on host `{}`)", h.pid, h.host)
            });
            return Err(StoreError::Conflict(format!(
                "node name `{name}` is in use by a running node{by}: give this node a name of \
                 its own with --node-name (or MAYFLY_NODE_NAME), or stop the other node (a \
                 stopped node's name is free again within {} s)",
                CLAIM_WAIT.as_secs_f32().ceil()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why a refresh of the claim failed.
enum Refresh {
    /// Another process holds the name now.
    Taken(String),
    /// NATS did not answer, or the bucket is gone.
    Failed(String),
}

/// Keeps `claim/<name>` alive, every heartbeat interval, by compare-and-
/// swap: a claim another process took meanwhile (this node was cut off
/// past the expiry, and the other started with its name) is reported, not
/// overwritten.
async fn refresh(
    bucket: Arc<Bucket>,
    nodes: kv::Store,
    name: String,
    claim: Claim,
    mut revision: u64,
) {
    let key = claim_key(&name);
    let Ok(value) = serde_json::to_vec(&claim) else {
        return;
    };
    let value = bytes::Bytes::from(value);
    let mut ticker = tokio::time::interval(HEARTBEAT);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        ticker.tick().await;
        let refreshed = match nodes.update(&key, value.clone(), revision).await {
            Ok(next) => Ok(next),
            // Expired while NATS was out of reach: take it again if free.
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                match nodes.create(&key, value.clone()).await {
                    Ok(next) => Ok(next),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                        Err(Refresh::Taken(format!(
                            "another node now holds the name `{name}`: two nodes share one \
                             name, which splits the fleet's usage ledger between them; stop \
                             one and give it a name of its own"
                        )))
                    }
                    Err(e) => Err(Refresh::Failed(e.to_string())),
                }
            }
            Err(e) => Err(Refresh::Failed(e.to_string())),
        };
        match refreshed {
            Ok(next) => {
                revision = next;
                warned = false;
            }
            Err(Refresh::Taken(error)) if !warned => {
                tracing::error!(node = %name, "{error}");
                warned = true;
            }
            Err(Refresh::Taken(_)) => {}
            // NATS out of reach (the link status says so) or the bucket
            // lost with a restarted server: made again for the next tick.
            Err(Refresh::Failed(error)) => {
                tracing::debug!(node = %name, "cannot refresh the node's name: {error}");
                let _ = bucket.ensure().await;
            }
        }
    }
}

#[async_trait::async_trait]
impl Membership for NatsMembership {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        // First: an edge node's record of itself is kept even when the
        // hub is out of reach (its own status shows it).
        let site = match &self.sites {
            Some(sites) => sites.beat(node).await,
            None => Ok(()),
        };
        let json: bytes::Bytes = serde_json::to_vec(node)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .into();
        if self.nodes.put(&node.name, json.clone()).await.is_ok() {
            return site;
        }
        // Perhaps the bucket went with a restarted server: make it again.
        self.bucket.ensure().await.map_err(backend_text)?;
        self.nodes.put(&node.name, json).await.map_err(backend)?;
        site
    }

    async fn members(&self) -> Result<Vec<NodeInfo>> {
        // A cut-off edge node: say where the list is, not "resource does
        // not exist" (the hub's JetStream has no responders from here).
        if let Some(link) = self.sites.as_ref().and_then(|s| s.hub_link())
            && !link.up
        {
            return Err(backend_text(format!(
                "the fleet's membership list is at the hub (JetStream domain `{}`), which is \
                 unreachable from site `{}`: its leaf link is down; `mayfly status --fleet` \
                 shows this node's own site meanwhile",
                link.hub_domain, link.site
            )));
        }
        let names = match self.names().await {
            Ok(names) => names,
            Err(_) => {
                self.bucket.ensure().await.map_err(backend_text)?;
                self.names().await?
            }
        };
        let mut members = Vec::with_capacity(names.len());
        // Claims are not members: a node is listed by its heartbeat.
        for name in names
            .into_iter()
            .filter(|name| !name.starts_with(CLAIM_PREFIX))
        {
            // Gone between the listing and the read: expired, skip it.
            let Some(value) = self.nodes.get(&name).await.map_err(backend)? else {
                continue;
            };
            match serde_json::from_slice::<NodeInfo>(&value) {
                Ok(node) => members.push(node),
                // A newer node's heartbeat this one cannot read still
                // says the node is there.
                Err(error) => {
                    tracing::warn!(node = name, "unreadable heartbeat: {error}");
                    members.push(NodeInfo {
                        name,
                        ..Default::default()
                    });
                }
            }
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }

    async fn leave(&self, name: &str) -> Result<()> {
        let refresher = self
            .refresher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = refresher {
            task.abort();
        }
        self.nodes.delete(name).await.map_err(backend)?;
        // The name is free for a restart at once.
        self.nodes.delete(claim_key(name)).await.map_err(backend)?;
        if let Some(sites) = &self.sites {
            sites.leave(name).await?;
        }
        Ok(())
    }

    fn interval(&self) -> Duration {
        HEARTBEAT
    }
}

impl NatsMembership {
    /// Every key in the bucket.
    async fn names(&self) -> Result<Vec<String>> {
        self.nodes
            .keys()
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)
    }
}

fn backend_text(error: String) -> StoreError {
    StoreError::Backend(error.into())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::testing::NatsServers;

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            at_ms: 1,
            functions: [("hello".to_string(), 3)].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_node_that_stops_its_heartbeats_leaves_the_list() {
        let servers = NatsServers::single();
        let a = NatsMembership::open(&Fleet::connect(&servers.options("a", "m")).await.unwrap())
            .await
            .unwrap();
        let b = NatsMembership::open(&Fleet::connect(&servers.options("b", "m")).await.unwrap())
            .await
            .unwrap();
        a.heartbeat(&node("a")).await.unwrap();
        b.heartbeat(&node("b")).await.unwrap();
        let listed = b.members().await.unwrap();
        assert_eq!(listed, vec![node("a"), node("b")]);

        // `a` goes silent; `b` keeps beating. `a` is gone within three
        // intervals (polled, with slack for a slow machine).
        let silent = Instant::now();
        loop {
            b.heartbeat(&node("b")).await.unwrap();
            let names: Vec<String> = b
                .members()
                .await
                .unwrap()
                .into_iter()
                .map(|n| n.name)
                .collect();
            if names == ["b"] {
                break;
            }
            assert!(silent.elapsed() < Duration::from_secs(20), "{names:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A clean leave removes a node at once.
        b.leave("b").await.unwrap();
        assert!(a.members().await.unwrap().is_empty());
    }

    /// Another process's claim, for the tests: this process's own claims
    /// are taken over, not refused.
    fn elsewhere() -> Claim {
        Claim {
            instance: "another-process".into(),
            host: "elsewhere".into(),
            pid: 4242,
            started_ms: 1,
        }
    }

    #[tokio::test]
    async fn a_name_a_running_node_holds_is_refused_until_it_leaves() {
        let servers = NatsServers::single();
        let running =
            NatsMembership::open(&Fleet::connect(&servers.options("a", "m")).await.unwrap())
                .await
                .unwrap();
        // Held past the wait by the running node's refresher.
        let error = claim(&running.nodes, "a", elsewhere()).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, StoreError::Conflict(_)), "{text}");
        assert!(
            text.contains("node name `a` is in use") && text.contains("--node-name"),
            "{text}"
        );
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );

        // A clean stop frees the name at once.
        running.leave("a").await.unwrap();
        claim(&running.nodes, "a", elsewhere()).await.unwrap();
    }

    #[tokio::test]
    async fn a_lapsed_claim_expires_and_a_restarted_node_takes_its_name() {
        let servers = NatsServers::single();
        let fleet = Fleet::connect(&servers.options("b", "m")).await.unwrap();
        let first = NatsMembership::open(&fleet).await.unwrap();
        // A process that claimed `b` and was killed: nobody refreshes it.
        first.leave("b").await.unwrap();
        claim(&first.nodes, "b", elsewhere()).await.unwrap();
        // This node waits for that claim to expire, then holds the name.
        let restarted = NatsMembership::open(&fleet).await.unwrap();
        let holder = restarted
            .nodes
            .entry(claim_key("b"))
            .await
            .unwrap()
            .unwrap();
        let holder: Claim = serde_json::from_slice(&holder.value).unwrap();
        assert_eq!(holder.pid, std::process::id());
        // Claims are not listed as members.
        assert!(restarted.members().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn heartbeats_and_the_list_come_back_after_a_single_server_restart() {
        let mut servers = NatsServers::single();
        let a = NatsMembership::open(&Fleet::connect(&servers.options("a", "m")).await.unwrap())
            .await
            .unwrap();
        a.heartbeat(&node("a")).await.unwrap();
        // The bucket lives in memory: a restarted single server has lost it.
        servers.restart(0);
        servers.wait_ready();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let beat = a.heartbeat(&node("a")).await;
            let listed = a.members().await;
            if beat.is_ok() && listed.as_ref().is_ok_and(|list| *list == vec![node("a")]) {
                break;
            }
            assert!(Instant::now() < deadline, "{beat:?} {listed:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The name is held again too (made again by its refresher).
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.nodes.entry(claim_key("a")).await.ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "the claim was not made again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
