//! Mayfly's fleet back-end: many nodes as one platform, on NATS JetStream.
//!
//! `mayfly serve --nats URL` connects through [`Fleet::connect`] (the
//! server list, credentials, a version check with a clear error). The
//! store contracts of `mayfly-store` are implemented here on JetStream
//! (KV buckets, the object store, streams), so every node reads and
//! writes one shared state and learns of other nodes' changes through the
//! same change feeds the embedded back-end emits. The design, and the
//! facts about nats-server 2.15 and async-nats 0.51 it rests on, are in
//! `docs/fleet-design.md`.
//!
//! Nothing cluster-wide is home-made: replication, ordering, delivery and
//! expiry are JetStream's.

mod auth;
mod batch;
mod blobs;
mod connect;
mod events;
mod forward;
mod link;
mod logs;
mod members;
mod registry;
mod secrets;
mod sites;
#[cfg(any(test, feature = "test-server"))]
pub mod testing;
mod usage;
mod watch;

pub use auth::NatsAuth;
pub use blobs::NatsBlobs;
pub use connect::{
    ConnectError, Credentials, DEFAULT_HUB_DOMAIN, Fleet, MIN_SERVER_VERSION, NatsOptions, redact,
};
pub use events::NatsEvents;
pub use link::NatsLink;
pub use logs::NatsLogFeed;
pub use members::NatsMembership;
pub use registry::NatsRegistry;
pub use secrets::NatsSecrets;
pub use usage::NatsUsage;

use std::path::Path;
use std::sync::Arc;

use mayfly_store::{BlobDir, EventHandles, Stores};

use crate::sites::{HubMonitor, Sites};

/// The stores of a node in the fleet: the contracts implemented on
/// JetStream are shared by every node; the rest are this node's own, in
/// `data_dir` (the embedded back-end).
///
/// Shared so far: functions, versions and aliases ([`NatsRegistry`]),
/// components ([`NatsBlobs`], cached in `data_dir/blobs`), tokens with the
/// audit log ([`NatsAuth`]), sealed secrets ([`NatsSecrets`]), the usage
/// ledger ([`NatsUsage`]: buffered in `data_dir`, read fleet-wide), the
/// event store ([`NatsEvents`]: buckets, queues, inboxes, triggers, dead
/// letters) and the membership list ([`NatsMembership`]). Guest logs are
/// stored per node; their new lines reach followers on every node through
/// [`NatsLogFeed`]. [`NatsLink`] reports the connection for the status.
pub async fn open_stores(fleet: &Fleet, data_dir: &Path) -> mayfly_store::Result<Stores> {
    // A cluster that is still forming (its servers do not all know each
    // other yet: "no suitable peers for placement", error 10005) or
    // electing a leader, or servers on a loaded machine, may refuse or time
    // out a call while the buckets are made: a reason to try again, not to
    // stop the node (every step opens or creates, so it can be repeated).
    // A bucket just made in a 3-server cluster answers reads with "no
    // responders" until its own stream has a leader (`bench/fleet.sh` lost
    // its first node to that once); JetStream being off altogether is
    // refused earlier, at connect. async-nats reports these only in its
    // messages.
    let deadline = std::time::Instant::now() + OPEN_PATIENCE;
    loop {
        match open_stores_once(fleet, data_dir).await {
            Err(error)
                if not_ready_yet(&error.to_string()) && std::time::Instant::now() < deadline =>
            {
                tracing::warn!(
                    "the fleet's JetStream did not answer in time ({error}); trying again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            opened => return opened,
        }
    }
}

/// Whether an error opening the stores says JetStream is not ready yet.
fn not_ready_yet(error: &str) -> bool {
    [
        "timed out",
        "no suitable peers",
        "temporarily unavailable",
        "no responders",
        HUB_UNREACHABLE,
    ]
    .iter()
    .any(|sign| error.contains(sign))
}

/// How long a node keeps trying to open the fleet's stores while JetStream
/// is not ready.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The start of the error an edge node gives while its hub is out of reach.
const HUB_UNREACHABLE: &str = "is unreachable from site";

async fn open_stores_once(fleet: &Fleet, data_dir: &Path) -> mayfly_store::Result<Stores> {
    // An edge node's state is at the hub: say so when it cannot be
    // reached, rather than let a bucket lookup's "does not exist" stand.
    if let Some(site) = fleet.site() {
        fleet
            .probe_hub(std::time::Duration::from_secs(2))
            .await
            .map_err(|reason| {
                mayfly_store::StoreError::Backend(
                    format!(
                        "the hub's JetStream (domain `{hub}`) {HUB_UNREACHABLE} `{site}` ({reason}): \
                         check the site server's leaf connection to the hub, and that \
                         --nats-hub-domain names the hub's JetStream domain",
                        hub = fleet.hub_domain()
                    )
                    .into(),
                )
            })?;
    }
    // The embedded stores first: they lock `data_dir` and sweep the blob
    // folder's unfinished writes before the cache below uses it.
    let mut stores = Stores::sqlite(data_dir)?;
    let cache = BlobDir::open(data_dir.join("blobs"))?;
    stores.blobs = Arc::new(
        NatsBlobs::open(fleet, cache, fleet.replicas())
            .await
            .map_err(|e| e.context("cannot open the fleet's component store"))?,
    );
    stores.auth = Arc::new(
        NatsAuth::open(fleet, fleet.replicas())
            .await
            .map_err(|e| e.context("cannot open the fleet's tokens and audit log"))?,
    );
    stores.registry = Arc::new(
        NatsRegistry::open(fleet, fleet.replicas())
            .await
            .map_err(|e| e.context("cannot open the fleet's function registry"))?,
    );
    stores.secrets = Arc::new(
        NatsSecrets::open(fleet, fleet.replicas())
            .await
            .map_err(|e| e.context("cannot open the fleet's secrets"))?,
    );
    // At an edge node: the probe of its link to the hub, and its records
    // in the fleet's sites (with each heartbeat).
    let sites = Arc::new(Sites::open(fleet, HubMonitor::start(fleet)).await?);
    stores.members = Arc::new(NatsMembership::open(fleet).await?.with_sites(sites.clone()));
    let usage = Arc::new(
        NatsUsage::open(fleet, data_dir, fleet.replicas())
            .await
            .map_err(|e| e.context("cannot open the fleet's usage ledger"))?,
    );
    stores.usage = usage.clone();
    let log_feed = Arc::new(NatsLogFeed::open(fleet, stores.logs.clone()));
    stores.log_feed = log_feed.clone();
    stores.forward = Arc::new(forward::NatsForwarder::new(fleet));
    sites.set_usage(usage.clone());
    stores.fleet = Some(Arc::new(NatsLink::new(
        fleet.clone(),
        usage,
        log_feed,
        sites,
    )));
    // KV and object buckets, queues, inboxes, triggers and dead letters:
    // one store; this node keeps only copies of object bytes locally.
    let events = NatsEvents::open(fleet, &data_dir.join("fleet").join("blobs"))
        .await
        .map_err(|e| e.context("cannot open the fleet's event store"))?;
    let events = EventHandles::of(Arc::new(events));
    stores.kv = events.kv;
    stores.objects = events.objects;
    stores.queues = events.queues;
    stores.triggers = events.triggers;
    Ok(stores)
}

/// A NATS client error as a store error (the source kept for logs).
pub(crate) fn backend<E>(error: E) -> mayfly_store::StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    mayfly_store::StoreError::Backend(Box::new(error))
}

/// The conformance suite against a real nats-server: one server for the
/// whole test binary, a namespace of its own per case.
#[cfg(test)]
mod conformance {
    use mayfly_store::conformance::Backend;

    use super::*;
    use crate::testing::NatsServers;

    /// The fleet back-end, each case on a nats-server of its own (a
    /// server shared through a static would outlive the test binary: no
    /// destructor runs on statics).
    pub struct NatsBackend;

    /// One case's state: its server and its node's own data directory.
    pub struct Place {
        server: NatsServers,
        dir: tempfile::TempDir,
    }

    impl Backend for NatsBackend {
        type Place = Place;

        fn place(&self) -> Place {
            Place {
                server: NatsServers::single(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        async fn open(&self, place: &Place) -> Stores {
            let fleet = Fleet::connect(&place.server.options("conformance", "mf"))
                .await
                .unwrap();
            open_stores(&fleet, place.dir.path()).await.unwrap()
        }
    }

    mayfly_store::conformance_suite!(nats, NatsBackend; registry, auth, secrets, usage, events);
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::NatsServers;

    #[test]
    fn a_forming_cluster_is_waited_for_and_a_refusal_is_not() {
        for waiting in [
            "failed getting entry: unable to get message: 503 no responders",
            "JetStream error: timed out",
            "insufficient resources: no suitable peers for placement",
        ] {
            assert!(not_ready_yet(waiting), "{waiting}");
        }
        assert!(!not_ready_yet("authorization violation"));
    }

    #[tokio::test]
    async fn a_node_connects_and_sees_the_server_version() {
        let servers = NatsServers::single();
        let fleet = Fleet::connect(&servers.options("node-a", "t"))
            .await
            .unwrap();
        assert!(fleet.is_connected());
        assert_eq!(fleet.name("registry"), "t_registry");
        assert!(
            fleet.server_version().starts_with("2."),
            "{}",
            fleet.server_version()
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_in_the_error() {
        let port = testing::free_port();
        let (urls, credentials) = NatsOptions::parse_urls(
            &format!("nats://me:hunter2@127.0.0.1:{port}"),
            Credentials::None,
        )
        .unwrap();
        let options = NatsOptions {
            urls,
            credentials,
            namespace: "mf".into(),
            node_name: "a".into(),
            replicas: None,
            hub_domain: DEFAULT_HUB_DOMAIN.into(),
        };
        let err = Fleet::connect(&options).await.unwrap_err().to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("unreachable"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
