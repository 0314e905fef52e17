//! Fleet membership on a KV bucket (`<ns>_nodes`): each node puts its
//! heartbeat under its name every second, and the bucket's `max_age`
//! removes a node whose heartbeats stopped, so a dead node leaves the list
//! within three heartbeats without anyone deciding it is dead.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt as _;
use mayfly_store::{Membership, NodeInfo, Result, StoreError};

use crate::{Fleet, backend};

/// How often each node sends its heartbeat. KV expiry works in whole
/// seconds at best, so this cannot be shorter than 1 s.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a heartbeat stays listed: two and a half intervals, so one
/// late heartbeat does not drop a node and a dead one is gone within three.
const EXPIRY: Duration = Duration::from_millis(2500);

/// The membership list of a fleet.
pub struct NatsMembership {
    nodes: kv::Store,
}

impl NatsMembership {
    /// Opens (or creates) the fleet's membership bucket.
    pub async fn open(fleet: &Fleet) -> Result<Self> {
        let nodes = fleet
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: fleet.name("nodes"),
                description: "Mayfly fleet members: one heartbeat per node".into(),
                history: 1,
                max_age: EXPIRY,
                // Heartbeats are rewritten every second: losing them with
                // a server costs nothing, so keep them in memory.
                storage: async_nats::jetstream::stream::StorageType::Memory,
                num_replicas: fleet.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                StoreError::Backend(
                    format!("cannot open the fleet's membership bucket: {e}").into(),
                )
            })?;
        Ok(Self { nodes })
    }
}

#[async_trait::async_trait]
impl Membership for NatsMembership {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        let json = serde_json::to_vec(node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.nodes
            .put(&node.name, json.into())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<NodeInfo>> {
        let names: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)?;
        let mut members = Vec::with_capacity(names.len());
        for name in names {
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
        self.nodes.delete(name).await.map_err(backend)?;
        Ok(())
    }

    fn interval(&self) -> Duration {
        HEARTBEAT
    }
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
}
