//! Joining the fleet's NATS servers: the URL list, credentials, the server
//! version check, and errors that say which server and what to do.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;

/// The oldest nats-server the fleet back-end works with: it commits
/// multi-key changes as atomic batches (2.12) and expires members with KV
/// limit markers (2.11).
pub const MIN_SERVER_VERSION: (i64, i64, i64) = (2, 12, 0);

/// How long one JetStream API call may take before it fails. Short, so a
/// write during a server failover fails over to a retry instead of
/// stalling for the client's default of 5 s (docs/fleet-design.md §0).
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The hub's JetStream domain unless `--nats-hub-domain` says otherwise
/// (docs/edge-design.md §7).
pub const DEFAULT_HUB_DOMAIN: &str = "hub";

/// How long the first connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach the fleet: `mayfly serve --nats URL[,URL…]` and its
/// credential flags.
#[derive(Clone)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`, `tls://host:port` or `host:port`),
    /// without credentials: [`NatsOptions::parse_urls`] moves those into
    /// [`NatsOptions::credentials`].
    pub urls: Vec<String>,
    /// How this node proves who it is.
    pub credentials: Credentials,
    /// Prefix of every bucket and stream name, so several fleets (or test
    /// cases) can share one NATS account. `mf` by default.
    pub namespace: String,
    /// This node's name in the fleet (the client connection's name too).
    pub node_name: String,
    /// Copies JetStream keeps of each bucket and stream; `None` picks 3
    /// when the server is part of a cluster, else 1.
    pub replicas: Option<usize>,
    /// The JetStream domain of the fleet's hub. A node whose server runs
    /// another domain is an edge node at a leaf site: it reaches the
    /// fleet's state through this domain ([`DEFAULT_HUB_DOMAIN`]).
    pub hub_domain: String,
}

/// NATS credentials. `Debug` never shows a secret.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No authentication.
    #[default]
    None,
    /// User name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A bearer token.
    Token(String),
    /// An NKey seed (`SU…`), read from a seed file.
    NKeySeed(String),
    /// A `.creds` file (JWT and NKey seed), as `nsc` writes it.
    CredsFile(PathBuf),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

impl Credentials {
    /// What kind of credentials these are, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::None => "no credentials",
            Credentials::UserPassword { .. } => "user and password",
            Credentials::Token(_) => "token",
            Credentials::NKeySeed(_) => "nkey",
            Credentials::CredsFile(_) => "credentials file",
        }
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("urls", &self.urls)
            .field("credentials", &self.credentials)
            .field("namespace", &self.namespace)
            .field("node_name", &self.node_name)
            .field("replicas", &self.replicas)
            .field("hub_domain", &self.hub_domain)
            .finish()
    }
}

/// Why the fleet could not be joined. Every message names the server list
/// (credentials removed) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A `--nats` value is not a server URL.
    #[error(
        "`{url}` is not a NATS server URL: {reason} (expected nats://HOST:PORT[,nats://HOST:PORT…])"
    )]
    BadUrl {
        /// The value, credentials removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Credentials were given twice or could not be read.
    #[error("{0}")]
    Credentials(String),
    /// No server answered.
    #[error(
        "NATS unreachable at {urls}: {reason} (is nats-server running there, with JetStream (-js) on?)"
    )]
    Unreachable {
        /// The servers tried.
        urls: String,
        /// The client's error (its text: it names no secret).
        reason: String,
    },
    /// A server answered but refused the credentials.
    #[error(
        "NATS at {urls} refused this node's {kind}: check the user, password, token or creds file"
    )]
    Refused {
        /// The servers tried.
        urls: String,
        /// Which kind of credentials were sent.
        kind: &'static str,
    },
    /// The server is older than [`MIN_SERVER_VERSION`].
    #[error(
        "NATS at {urls} runs nats-server {version}; Mayfly needs {}.{}.{} or newer (atomic batch publish): upgrade the server",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    TooOld {
        /// The servers tried.
        urls: String,
        /// The version the server reported.
        version: String,
    },
    /// The server runs without JetStream.
    #[error(
        "NATS at {urls} has JetStream turned off: start nats-server with -js (or `jetstream {{}}` in its config)"
    )]
    NoJetStream {
        /// The servers tried.
        urls: String,
    },
}

impl NatsOptions {
    /// Splits a `--nats` value (`a,b,c`; async-nats does not split a
    /// comma-separated string itself) into URLs, and takes `user:password@`
    /// out of them: async-nats 0.51 ignores credentials in a URL, so they
    /// become [`Credentials::UserPassword`] (refused if other credentials
    /// were given too).
    pub fn parse_urls(
        list: &str,
        credentials: Credentials,
    ) -> Result<(Vec<String>, Credentials), ConnectError> {
        let mut urls = Vec::new();
        let mut credentials = credentials;
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (scheme, rest) = match raw.split_once("://") {
                Some((scheme, rest)) => (scheme, rest),
                None => ("nats", raw),
            };
            if !matches!(scheme, "nats" | "tls") {
                return Err(ConnectError::BadUrl {
                    url: redact(raw),
                    reason: format!("unknown scheme `{scheme}`"),
                });
            }
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((userinfo, host)) => (Some(userinfo), host),
                None => (None, rest),
            };
            let host = host.trim_end_matches('/');
            if host.is_empty() || host.contains('/') {
                return Err(ConnectError::BadUrl {
                    url: redact(raw),
                    reason: "expected HOST:PORT after the scheme".into(),
                });
            }
            if let Some(userinfo) = userinfo {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let from_url = if password.is_empty() {
                    Credentials::Token(user.to_string())
                } else {
                    Credentials::UserPassword {
                        user: user.to_string(),
                        password: password.to_string(),
                    }
                };
                match credentials {
                    Credentials::None => credentials = from_url,
                    ref other if other.kind() == from_url.kind() => {}
                    ref other => {
                        return Err(ConnectError::Credentials(format!(
                            "credentials given twice: in the URL `{}` and as a {}; give them once",
                            redact(raw),
                            other.kind()
                        )));
                    }
                }
            }
            urls.push(format!("{scheme}://{host}"));
        }
        if urls.is_empty() {
            return Err(ConnectError::BadUrl {
                url: list.to_string(),
                reason: "no server in the list".into(),
            });
        }
        Ok((urls, credentials))
    }

    /// The server list for messages: comma-separated, no credentials.
    pub fn display_urls(&self) -> String {
        self.urls
            .iter()
            .map(|u| redact(u))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `url` with any `user:password@` replaced, safe to log.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}***@{host}"),
        None => url.to_string(),
    }
}

/// A live connection to the fleet's servers: the client, its JetStream
/// context, and the names this fleet's state lives under.
///
/// A node whose server runs a JetStream domain other than the hub's is an
/// edge node ([`Fleet::site`]): its server is a leaf site's, joined to the
/// hub by a leaf connection, and [`Fleet::jetstream`] reaches the hub's
/// JetStream through the hub's domain (`$JS.<hub>.API`), so the fleet's
/// buckets and streams are the same ones every hub node uses
/// (docs/edge-design.md §1.2).
#[derive(Clone, Debug)]
pub struct Fleet {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The JetStream of this node's own server (its site's at an edge).
    local: jetstream::Context,
    /// At an edge node: its site's JetStream domain.
    site: Option<String>,
    hub_domain: String,
    namespace: String,
    node_name: String,
    urls: String,
    replicas: usize,
    /// When the connection was last lost, in ms since the Unix epoch; 0
    /// while connected. Kept by the client's event callback.
    disconnected_since: Arc<AtomicI64>,
    /// How many times an edge node's hub came back after a loss (its
    /// leaf link healed): KV watches through the link start again.
    hub_returns: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Fleet {
    /// Connects, then checks that the server is new enough and has
    /// JetStream. Fails fast when no server answers: a node must not start
    /// believing it is in a fleet it cannot reach. Once connected, the
    /// client reconnects by itself for as long as the node runs.
    pub async fn connect(options: &NatsOptions) -> Result<Self, ConnectError> {
        let urls = options.display_urls();
        let disconnected_since = Arc::new(AtomicI64::new(0));
        let since = disconnected_since.clone();
        let mut connect = async_nats::ConnectOptions::new()
            .name(&options.node_name)
            .connection_timeout(CONNECT_TIMEOUT)
            .event_callback(move |event| {
                let since = since.clone();
                async move {
                    // Secrets never appear in these events; the server's
                    // address does, as the operator wants.
                    match event {
                        async_nats::Event::Connected => {
                            since.store(0, Ordering::Release);
                            tracing::info!("NATS connected")
                        }
                        async_nats::Event::Disconnected => {
                            // The first loss counts: failed reconnects
                            // report no new one, but keep the oldest.
                            let _ = since.compare_exchange(
                                0,
                                now_ms().max(1),
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                            tracing::warn!("NATS disconnected; reconnecting")
                        }
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            });
        connect = match &options.credentials {
            Credentials::None => connect,
            Credentials::UserPassword { user, password } => {
                connect.user_and_password(user.clone(), password.clone())
            }
            Credentials::Token(token) => connect.token(token.clone()),
            Credentials::NKeySeed(seed) => connect.nkey(seed.clone()),
            Credentials::CredsFile(path) => connect.credentials_file(path).await.map_err(|e| {
                ConnectError::Credentials(format!(
                    "cannot read the NATS credentials file {}: {e}",
                    path.display()
                ))
            })?,
        };
        let client =
            connect
                .connect(options.urls.as_slice())
                .await
                .map_err(|source| match source.kind() {
                    async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication => ConnectError::Refused {
                        urls: urls.clone(),
                        kind: options.credentials.kind(),
                    },
                    _ => ConnectError::Unreachable {
                        urls: urls.clone(),
                        reason: source.to_string(),
                    },
                })?;
        let info = client.server_info();
        let (major, minor, patch) = MIN_SERVER_VERSION;
        if !client.is_server_compatible(major, minor, patch) {
            return Err(ConnectError::TooOld {
                urls,
                version: info.version,
            });
        }
        if !info.jetstream {
            return Err(ConnectError::NoJetStream { urls });
        }
        // A cluster keeps three copies (survives one server lost); a
        // single server can only keep one. A leaf site's server reports a
        // cluster name of its own, which says nothing of the hub's: an
        // edge node makes one copy unless told otherwise, and the hub's
        // own nodes (which see the hub's cluster) should create the
        // fleet's buckets first.
        let at_site = info
            .domain
            .as_deref()
            .is_some_and(|domain| !domain.is_empty() && domain != options.hub_domain);
        let replicas = options
            .replicas
            .unwrap_or(if info.cluster.is_some() && !at_site {
                3
            } else {
                1
            });
        let local = jetstream::ContextBuilder::new()
            .timeout(JETSTREAM_TIMEOUT)
            .build(client.clone());
        // A server outside the hub's domain is a leaf site's: every
        // JetStream call of the fleet goes to the hub through its domain.
        let site = info.domain.filter(|_| at_site);
        let jetstream = match &site {
            Some(site) => {
                tracing::info!(
                    site,
                    hub = options.hub_domain,
                    "edge node: the fleet's state is in the hub's JetStream domain"
                );
                jetstream::ContextBuilder::new()
                    .timeout(JETSTREAM_TIMEOUT)
                    .domain(&options.hub_domain)
                    .build(client.clone())
            }
            None => local.clone(),
        };
        Ok(Self {
            client,
            jetstream,
            local,
            site,
            hub_domain: options.hub_domain.clone(),
            namespace: options.namespace.clone(),
            node_name: options.node_name.clone(),
            urls,
            replicas,
            disconnected_since,
            hub_returns: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// The core NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The fleet's JetStream context (API calls time out after 2 s): the
    /// hub's, through its domain, at an edge node.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The JetStream of this node's own server: its site's at an edge
    /// node, the same as [`Fleet::jetstream`] otherwise.
    pub fn local_jetstream(&self) -> &jetstream::Context {
        &self.local
    }

    /// At an edge node: the JetStream domain of its leaf site; `None` on
    /// a node connected to the hub itself.
    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }

    /// Whether the hub's JetStream answers this node now: a request to
    /// `$JS.<hub>.API.INFO` within `timeout`. The error says why not: "no
    /// responders" when the leaf link is down, a timeout when it is dead
    /// but not yet declared so (docs/edge-design.md §1.3, §1.4).
    pub async fn probe_hub(&self, timeout: Duration) -> Result<(), String> {
        self.probe_domain(&self.hub_domain, timeout).await
    }

    /// Whether JetStream domain `domain` (the hub's or a leaf site's)
    /// answers this node now, as [`Fleet::probe_hub`].
    pub async fn probe_domain(&self, domain: &str, timeout: Duration) -> Result<(), String> {
        let subject = format!("$JS.{domain}.API.INFO");
        let request = async_nats::Request::new().timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(_) => Ok(()),
            Err(error) => Err(match error.kind() {
                async_nats::RequestErrorKind::NoResponders => "no responders".to_string(),
                async_nats::RequestErrorKind::TimedOut => format!("no answer within {timeout:?}"),
                _ => error.to_string(),
            }),
        }
    }

    /// Tells of each time the hub comes back after a loss (see
    /// [`Fleet::hub_returned`]).
    pub(crate) fn hub_returns(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hub_returns.subscribe()
    }

    /// Records that an edge node's hub is reachable again after a loss.
    pub(crate) fn hub_returned(&self) {
        self.hub_returns.send_modify(|count| *count += 1);
    }

    /// The hub's JetStream domain (`--nats-hub-domain`).
    pub fn hub_domain(&self) -> &str {
        &self.hub_domain
    }

    /// The subject prefix a hand-written write to KV bucket `kv` (an
    /// atomic batch) publishes under: `$KV.<bucket>.` at the hub, and
    /// `$JS.<hub>.API.$KV.<bucket>.` at an edge, as `$KV.…` subjects do
    /// not cross a domain's leaf link (docs/edge-design.md §1.2).
    pub(crate) fn write_prefix(&self, kv: &async_nats::jetstream::kv::Store) -> String {
        match &self.site {
            Some(_) => format!("$JS.{}.API.{}", self.hub_domain, kv.prefix),
            None => kv.prefix.clone(),
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The servers, credentials removed, for messages.
    pub fn urls(&self) -> &str {
        &self.urls
    }

    /// The name of this fleet's bucket or stream `name` (`mf_registry`).
    pub fn name(&self, name: &str) -> String {
        format!("{}_{name}", self.namespace)
    }

    /// The subject `name` under this fleet's namespace (`mf.usage.f`), for
    /// streams that several fleets in one account must not share.
    pub fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.namespace)
    }

    /// Copies JetStream keeps of each of the fleet's buckets and streams.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// While the client is not connected: since when (ms since the Unix
    /// epoch), if it has been connected before; `None` while connected.
    pub fn disconnected_since_ms(&self) -> Option<i64> {
        if self.is_connected() {
            return None;
        }
        match self.disconnected_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(since),
        }
    }

    /// The version of the server this node is connected to.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }
}

/// Now, in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_is_split_and_credentials_leave_the_url() {
        let (urls, creds) =
            NatsOptions::parse_urls("nats://u:p@a:4222, b:4223,,tls://c:1", Credentials::None)
                .unwrap();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4223", "tls://c:1"]);
        assert!(
            matches!(creds, Credentials::UserPassword { ref user, ref password }
            if user == "u" && password == "p")
        );
        assert_eq!(format!("{creds:?}"), "user and password");
    }

    #[test]
    fn credentials_given_twice_are_refused_without_showing_them() {
        let err = NatsOptions::parse_urls("nats://u:secret@a:1", Credentials::Token("t".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("given twice"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (input, says) in [
            ("http://a:1", "unknown scheme"),
            ("nats://", "HOST:PORT"),
            (" , ", "no server"),
            ("nats://a:1/path", "HOST:PORT"),
        ] {
            let err = NatsOptions::parse_urls(input, Credentials::None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{input}: {err}");
        }
    }

    #[test]
    fn redaction_hides_user_info_only() {
        assert_eq!(redact("nats://u:p@h:1"), "nats://***@h:1");
        assert_eq!(redact("h:1"), "h:1");
    }
}
