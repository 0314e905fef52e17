//! A node follows changes that another writer makes to its store, as
//! another node of a fleet sharing the store will: alias moves, triggers,
//! token revocations and deletes written past this node's admin API still
//! change what it serves and whom it lets in.

use std::process::Command;
use std::time::Duration;

use mayfly_platform::{NodeConfig, RunningNode, ServeConfig};
use mayfly_store::{Expected, MoveCause, RetryPolicy, Stores, TriggerSource, TriggerSpec};

use crate::common::{agent, eventually, guest};

#[test]
fn changes_another_writer_makes_to_the_registry_reach_what_the_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stores = Stores::sqlite(dir.path()).unwrap();
    let other_writer = stores.clone();
    let config = ServeConfig {
        node: NodeConfig::new(dir.path()),
        gateway_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        shutdown_grace: Duration::from_secs(5),
        admin_tls: None,
        connections: Default::default(),
        metrics_addr: None,
    };
    let node = runtime
        .block_on(RunningNode::start(config, async move { Ok(stores) }))
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let deploy = |guest_name: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["deploy", "f"])
            .arg(guest(guest_name))
            .args(["--route", "/f"])
            .env("MAYFLY_ADMIN_URL", format!("http://{}", node.admin_addr))
            .env("MAYFLY_TOKEN", token.trim())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    deploy("hello");
    deploy("echo");
    let url = format!("http://{}/f", node.gateway_addr);
    let served = || {
        let response = agent().get(&url).call().unwrap();
        let version = response
            .headers()
            .get("x-mayfly-version")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        (response.status().as_u16(), version)
    };
    assert_eq!(served(), (200, Some("2".to_string())));

    // Another writer rolls `live` back to version 1 in the store itself.
    runtime
        .block_on(other_writer.registry.set_alias(
            "f",
            "live",
            1,
            None,
            Expected::Version(2),
            MoveCause::Rollback,
            "moved by another writer",
        ))
        .unwrap();
    eventually(Duration::from_secs(10), "live to serve version 1", || {
        (served() == (200, Some("1".to_string()))).then_some(())
    });

    // Sends a message to a queue, then attaches a queue trigger: the
    // worker this node starts for the new trigger delivers the message,
    // which empties the queue. (In that order: a message another writer
    // sends wakes no worker here; an idle worker finds it only at its next
    // poll, up to a minute later. In a fleet, consumers wait on NATS.)
    runtime
        .block_on(
            other_writer
                .queues
                .send("jobs", &[(None, b"from elsewhere".to_vec())]),
        )
        .unwrap();
    let spec = TriggerSpec {
        source: TriggerSource::Queue {
            queue: "jobs".to_string(),
            batch_size: 1,
            max_concurrency: 1,
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    runtime
        .block_on(other_writer.triggers.add_trigger("f", &spec))
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the queued message to be delivered",
        || {
            let queues = runtime.block_on(other_writer.queues.queues()).unwrap();
            queues
                .iter()
                .all(|queue| queue.queue != "jobs" || queue.messages == 0)
                .then_some(())
        },
    );

    // Revokes the admin token: this node stops honouring it.
    let status = || {
        agent()
            .get(&format!("http://{}/v1/status", node.admin_addr))
            .header("authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(), 200);
    let tokens = runtime.block_on(other_writer.auth.tokens()).unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(
        runtime
            .block_on(other_writer.auth.revoke_token(&tokens[0].id))
            .unwrap()
    );
    eventually(
        Duration::from_secs(10),
        "the revoked token to be refused",
        || (status() == 401).then_some(()),
    );

    // And deletes the function.
    assert!(
        runtime
            .block_on(other_writer.registry.delete_function("f"))
            .unwrap()
    );
    eventually(
        Duration::from_secs(10),
        "the deleted function to be gone",
        || (served().0 == 404).then_some(()),
    );
    let status: serde_json::Value =
        runtime.block_on(async { serde_json::to_value(node.platform.status()).unwrap() });
    assert_eq!(status["functions"], 0, "{status}");
    runtime.block_on(node.shutdown());
}
