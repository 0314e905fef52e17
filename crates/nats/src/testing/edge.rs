//! A hub and leaf sites (docs/edge-design.md §1.1, §8 step 1): the hub runs
//! JetStream domain `hub`; each site is a server of its own, with its own
//! domain, joined to the hub by a leaf connection that goes through a
//! [`LinkProxy`], so a test can cut, blackhole, delay and heal one site's
//! link.
//!
//! Leafnode options have no command-line flags, so each server gets a
//! generated config file. Readiness is polled: `/healthz` on every server,
//! then each site's leaf connection on both sides' `/leafz`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

use super::{Member, NatsServers, READY_TIMEOUT, free_port, options};
use crate::NatsOptions;

/// The hub's JetStream domain in these tests (and `--nats-hub-domain`'s
/// default).
pub const HUB_DOMAIN: &str = "hub";

/// Server settings every member shares: pings every second, three missed
/// pongs drop a connection, so a dead (blackholed) leaf link is noticed in
/// about 3 s rather than the default 4 minutes (docs/edge-design.md §1.4).
const PINGS: &str = "ping_interval: \"1s\"\nping_max: 3\n";

/// A hub and its leaf sites, each site's link through its own proxy;
/// every server stopped on drop.
pub struct EdgeServers {
    hub: Member,
    sites: Vec<Site>,
    _dir: tempfile::TempDir,
}

/// One leaf site: its server and the proxy its leaf link goes through.
struct Site {
    member: Member,
    proxy: LinkProxy,
}

impl NatsServers {
    /// A hub (JetStream domain `hub`) and one leaf site per name, each a
    /// server whose JetStream domain is that name (`site-a`), its leaf
    /// link through a [`LinkProxy`]. Returns once every server is healthy
    /// and every site is linked.
    pub fn hub_with_sites(sites: &[&str]) -> EdgeServers {
        let dir = tempfile::tempdir().expect("temporary directory");
        let leaf_port = free_port();
        let mut hub = configured(
            dir.path(),
            HUB_DOMAIN,
            &format!(
                // Without no_advertise the hub gossips its own leafnode
                // address, and a site reconnects there, around the proxy.
                "leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n  no_advertise: true\n}}\n"
            ),
        );
        hub.spawn();
        let hub_leaf: SocketAddr = ([127, 0, 0, 1], leaf_port).into();
        let mut sites = sites
            .iter()
            .map(|name| {
                let proxy = LinkProxy::start(hub_leaf);
                let member = configured(
                    dir.path(),
                    name,
                    &format!(
                        "leafnodes {{\n  reconnect: \"250ms\"\n  remotes: [ {{ url: \"nats-leaf://127.0.0.1:{}\" }} ]\n}}\n",
                        proxy.port()
                    ),
                );
                Site { member, proxy }
            })
            .collect::<Vec<_>>();
        for site in &mut sites {
            site.member.spawn();
        }
        let mut servers = EdgeServers {
            hub,
            sites,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        servers.hub.wait_healthy(deadline);
        for site in &mut servers.sites {
            site.member.wait_healthy(deadline);
        }
        for site in &servers.sites {
            servers.wait_linked(&site.member.name);
        }
        servers
    }
}

/// A member started from a generated config file: server `name` with
/// JetStream domain `name`, plus `extra` (its leafnodes block).
fn configured(dir: &Path, name: &str, extra: &str) -> Member {
    let client_port = free_port();
    let monitor_port = free_port();
    let store = dir.join(name);
    let config = format!(
        "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{monitor_port}\n{PINGS}\
         jetstream {{\n  store_dir: \"{}\"\n  domain: {name}\n}}\n{extra}",
        store.display()
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, config).expect("write a nats-server config");
    Member {
        log: dir.join(format!("{name}.log")),
        name: name.to_string(),
        client_port,
        monitor_port,
        args: vec!["-c".into(), path.display().to_string()],
        child: None,
    }
}

/// The leaf connections a server's `/leafz` lists, by remote server name;
/// `None` when the server does not answer.
fn leafs(member: &Member) -> Option<Vec<String>> {
    let body: serde_json::Value =
        ureq::get(format!("http://127.0.0.1:{}/leafz", member.monitor_port))
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()?;
    Some(
        body["leafs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|leaf| leaf["name"].as_str().map(str::to_string))
            .collect(),
    )
}

impl EdgeServers {
    fn site(&self, name: &str) -> &Site {
        self.sites
            .iter()
            .find(|site| site.member.name == name)
            .unwrap_or_else(|| panic!("no site `{name}` in this topology"))
    }

    /// The hub's client URL.
    pub fn hub_url(&self) -> String {
        self.hub.client_url()
    }

    /// Site `name`'s client URL.
    pub fn site_url(&self, name: &str) -> String {
        self.site(name).member.client_url()
    }

    /// The monitoring URL (`/healthz`, `/jsz`, `/leafz`) of the hub
    /// ([`HUB_DOMAIN`]) or of site `name`.
    pub fn monitor_url(&self, name: &str) -> String {
        let member = if name == HUB_DOMAIN {
            &self.hub
        } else {
            &self.site(name).member
        };
        format!("http://127.0.0.1:{}", member.monitor_port)
    }

    /// Options to connect to the hub as `node` under `namespace`.
    pub fn hub_options(&self, node: &str, namespace: &str) -> NatsOptions {
        options(vec![self.hub_url()], node, namespace)
    }

    /// Options to connect to site `site` as `node` under `namespace`.
    pub fn site_options(&self, site: &str, node: &str, namespace: &str) -> NatsOptions {
        options(vec![self.site_url(site)], node, namespace)
    }

    /// The proxy site `name`'s leaf link goes through.
    pub fn link(&self, name: &str) -> &LinkProxy {
        &self.site(name).proxy
    }

    /// Whether site `name`'s leaf link is up as both ends see it.
    pub fn linked(&self, name: &str) -> bool {
        let site = self.site(name);
        let at_site = leafs(&site.member).is_some_and(|l| l.iter().any(|n| n == HUB_DOMAIN));
        at_site && leafs(&self.hub).is_some_and(|l| l.iter().any(|n| n == name))
    }

    /// Waits until site `name`'s leaf link is up at both ends.
    pub fn wait_linked(&self, name: &str) {
        self.wait_link(name, true);
    }

    /// Waits until neither end lists site `name`'s leaf link.
    pub fn wait_unlinked(&self, name: &str) {
        self.wait_link(name, false);
    }

    fn wait_link(&self, name: &str, up: bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.linked(name) != up {
            assert!(
                Instant::now() < deadline,
                "site {name}'s leaf link is not {} after {READY_TIMEOUT:?}\n\
                 --- site {name}'s log:\n{}\n--- hub's log:\n{}",
                if up { "up" } else { "down" },
                self.site(name).member.log_tail(),
                self.hub.log_tail()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for EdgeServers {
    fn drop(&mut self) {
        for site in &mut self.sites {
            site.member.kill();
        }
        self.hub.kill();
    }
}

/// What the proxy does with a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bytes flow (after the configured delay).
    Open,
    /// Connections are closed and new ones closed as soon as accepted:
    /// a clean loss (router reboot, interface down).
    Cut,
    /// Connections stay open, every byte is dropped: a dead path with no
    /// FIN.
    Blackhole,
    /// The proxy is being dropped.
    Stopped,
}

/// The proxy's state: a mode and a generation; a connection ends when
/// the mode is `Cut` or `Stopped`, or the generation moved past the one
/// it was opened in (a heal after a blackhole: those streams lost bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    mode: Mode,
    generation: u64,
}

struct Control {
    state: watch::Sender<State>,
    /// One-way delay added to every chunk, in microseconds.
    delay_us: AtomicU64,
}

/// A user-space TCP proxy for one leaf link, on a thread (and tokio
/// runtime) of its own so it works under sync and async tests alike. It
/// can cut the link, blackhole it, delay it, and heal it.
pub struct LinkProxy {
    port: u16,
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LinkProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("proxy address").port();
        let control = Arc::new(Control {
            state: watch::channel(State {
                mode: Mode::Open,
                generation: 0,
            })
            .0,
            delay_us: AtomicU64::new(0),
        });
        let shared = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("link-proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the proxy");
                runtime.block_on(serve(listener, target, shared));
            })
            .expect("start the proxy thread");
        Self {
            port,
            control,
            thread: Some(thread),
        }
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection and closes new ones as soon as they come.
    pub fn cut(&self) {
        self.control.state.send_modify(|s| s.mode = Mode::Cut);
    }

    /// Keeps connections open but drops every byte, in both directions.
    pub fn blackhole(&self) {
        self.control.state.send_modify(|s| s.mode = Mode::Blackhole);
    }

    /// Lets bytes flow again; connections that were blackholed are closed
    /// (their streams lost bytes), so the site dials a fresh one.
    pub fn heal(&self) {
        self.control.state.send_modify(|s| {
            if s.mode == Mode::Blackhole {
                s.generation += 1;
            }
            s.mode = Mode::Open;
        });
    }

    /// Delays every byte by `one_way` in each direction (a WAN's latency;
    /// no bandwidth cap). Applies to bytes read from now on.
    pub fn delay(&self, one_way: Duration) {
        let micros = u64::try_from(one_way.as_micros()).unwrap_or(u64::MAX);
        self.control.delay_us.store(micros, Ordering::Relaxed);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.control.state.send_modify(|s| s.mode = Mode::Stopped);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `state` satisfies `done` (or its sender is gone).
async fn until(state: &mut watch::Receiver<State>, done: impl FnMut(&State) -> bool) {
    let _ = state.wait_for(done).await.is_ok();
}

async fn serve(listener: std::net::TcpListener, target: SocketAddr, control: Arc<Control>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let mut state = control.state.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = until(&mut state, |s| s.mode == Mode::Stopped) => return,
        };
        let Ok((inbound, _)) = accepted else {
            continue;
        };
        let now = *control.state.borrow();
        match now.mode {
            Mode::Stopped => return,
            // Refused: closed at once.
            Mode::Cut => drop(inbound),
            Mode::Open | Mode::Blackhole => {
                tokio::spawn(link(inbound, target, control.clone(), now.generation));
            }
        }
    }
}

/// Carries one connection until either side closes it or the proxy's
/// state ends it; both sockets are closed when it returns.
async fn link(inbound: TcpStream, target: SocketAddr, control: Arc<Control>, generation: u64) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let mut state = control.state.subscribe();
    tokio::select! {
        () = pump(in_read, out_write, control.clone()) => {}
        () = pump(out_read, in_write, control.clone()) => {}
        () = until(&mut state, |s| {
            matches!(s.mode, Mode::Cut | Mode::Stopped) || s.generation != generation
        }) => {}
    }
}

/// Copies one direction: reads as they come, writes each chunk once its
/// delay has passed (in order), drops them while blackholed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, control: Arc<Control>) {
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if control.state.borrow().mode == Mode::Blackhole {
                continue;
            }
            let delay = Duration::from_micros(control.delay_us.load(Ordering::Relaxed));
            let due = tokio::time::Instant::now() + delay;
            if due_tx.send((due, buffer[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let write = async {
        while let Some((due, bytes)) = due_rx.recv().await {
            // Not even a zero delay through the timer: it rounds a
            // deadline up to its next millisecond tick, which added about
            // 1 ms per chunk per hop to an undelayed link.
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = read => {}
        () = write => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JetStream API `INFO` request on `subject`: the domain that
    /// answered, or the request's error kind.
    async fn info(
        client: &async_nats::Client,
        subject: &str,
    ) -> Result<String, async_nats::RequestErrorKind> {
        let request = async_nats::Request::new().timeout(Some(Duration::from_millis(500)));
        let answer = client
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| e.kind())?;
        let body: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        Ok(body["domain"].as_str().unwrap_or_default().to_string())
    }

    /// Polls `check` every 20 ms until it holds; panics after 15 s.
    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check().await {
            assert!(Instant::now() < deadline, "{what}: not within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_site_reaches_the_hubs_jetstream_until_its_link_is_cut_and_again_once_healed() {
        let servers = NatsServers::hub_with_sites(&["site-a"]);
        let client = async_nats::connect(servers.site_url("site-a"))
            .await
            .unwrap();
        assert_eq!(client.server_info().domain.as_deref(), Some("site-a"));
        assert_eq!(info(&client, "$JS.API.INFO").await.unwrap(), "site-a");
        eventually("the hub's JetStream through the leaf link", async || {
            info(&client, "$JS.hub.API.INFO").await.as_deref() == Ok(HUB_DOMAIN)
        })
        .await;

        // A cut is a clean loss: the hub's API has no responders (fast,
        // not a timeout), the site's own domain keeps answering.
        servers.link("site-a").cut();
        eventually("no responders from the cut hub", async || {
            info(&client, "$JS.hub.API.INFO").await
                == Err(async_nats::RequestErrorKind::NoResponders)
        })
        .await;
        servers.wait_unlinked("site-a");
        assert_eq!(info(&client, "$JS.API.INFO").await.unwrap(), "site-a");

        servers.link("site-a").heal();
        eventually("the hub again after the heal", async || {
            info(&client, "$JS.hub.API.INFO").await.as_deref() == Ok(HUB_DOMAIN)
        })
        .await;
        servers.wait_linked("site-a");

        // A delay of 40 ms each way makes a round trip to the hub take at
        // least 80 ms (a lower bound: it cannot be met by a fast machine).
        servers.link("site-a").delay(Duration::from_millis(40));
        let started = Instant::now();
        let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
        client
            .send_request("$JS.hub.API.INFO", request)
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(80));
        servers.link("site-a").delay(Duration::ZERO);

        // A blackhole gives timeouts, not "no responders", until the
        // servers' pings give up on the link; a heal restores it.
        servers.link("site-a").blackhole();
        assert_eq!(
            info(&client, "$JS.hub.API.INFO").await,
            Err(async_nats::RequestErrorKind::TimedOut)
        );
        servers.link("site-a").heal();
        eventually("the hub again after the blackhole", async || {
            info(&client, "$JS.hub.API.INFO").await.as_deref() == Ok(HUB_DOMAIN)
        })
        .await;
    }
}
