//! What the node serves: an immutable snapshot of deployed functions, the
//! versions their aliases point at, and their routes, swapped atomically on
//! every change so the request path reads it without a lock.
//!
//! Each version in service (the `live` alias's, a canary's, a named
//! alias's) has one [`Deployed`] entry with its own tier, artifact and
//! capabilities; a function's aliases are [`Target`]s over them. A switch
//! (deploy, alias set, rollback) builds a new [`Served`] and swaps the
//! snapshot: requests already running hold an `Arc` of the version they
//! started on and finish there, new ones see the new version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mayfly_runtime::InvocationLimits;
use mayfly_store::{Digest, FunctionScaling, LIVE_ALIAS, WEIGHT_SCALE_BP};

use crate::metering::FunctionMeter;
use crate::rollout::{Observed, Rollout};
use crate::routes::{Route, RouteTable};
use crate::tiers::{Activity, Tier};

/// A compiled artifact and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Cache key of the artifact: the component digest and the engine
    /// fingerprint.
    pub key: Digest,
    /// Digest of the stored component it is compiled from, to compile it
    /// again when the artifact is damaged or lost.
    pub component: Digest,
}

/// One version of a function in service.
pub struct Deployed {
    /// Function name.
    pub name: String,
    /// The name as the admission controller's key.
    pub key: Arc<str>,
    /// The version this entry runs.
    pub version: u64,
    /// Which function of this name it belongs to: the function's creation
    /// time, which its credentials carry (a function deleted and deployed
    /// again is another one).
    pub generation: i64,
    /// `version` as the value of the `x-mayfly-version` response header,
    /// made once rather than per request.
    pub version_header: http::HeaderValue,
    /// Its compiled artifact, and the component to compile it again from.
    pub artifact: Artifact,
    /// Limits of each invocation.
    pub limits: InvocationLimits,
    /// Concurrency, queueing and reuse settings.
    pub scaling: FunctionScaling,
    /// Turns the version's invocations into usage records and metrics.
    pub meter: Arc<FunctionMeter>,
    /// The version's tier: its loaded, pre-linked function when warm or
    /// hot (filled on deploy or by the first request after it went cold).
    pub tier: Tier,
    /// Running invocations and keep-alive state, shared by all versions of
    /// the function.
    pub activity: Arc<Activity>,
    /// What its invocations may reach beyond the sandbox (its grants).
    pub caps: Arc<mayfly_runtime::Capabilities>,
    /// Its grants as deployed; a function credential is narrowed to them.
    pub grants: mayfly_store::Grants,
}

/// A canary on an alias: the version that gets a share of its traffic.
pub struct Canary {
    /// The canary version.
    pub deployed: Arc<Deployed>,
    /// Its share, in basis points (`1..10_000`).
    pub weight_bp: u32,
    /// For an automatic canary, the rollout judging it.
    pub rollout: Option<Arc<Rollout>>,
}

/// What an alias serves: a version, and maybe a canary taking a share.
pub struct Target {
    /// The alias's version.
    pub deployed: Arc<Deployed>,
    /// The canary, if the alias splits its traffic.
    pub canary: Option<Canary>,
}

impl Target {
    /// The version that serves the request `request_id`: the canary when
    /// the id's bucket falls below its weight, so the same id (a retry)
    /// always lands on the same version. Without a canary: one branch.
    /// With an automatic canary, also the rollout that records the result.
    #[inline]
    pub fn pick(&self, request_id: &str) -> (&Arc<Deployed>, Option<Observed>) {
        let Some(canary) = &self.canary else {
            return (&self.deployed, None);
        };
        let to_canary = split_bucket(request_id) < canary.weight_bp;
        let observed = canary.rollout.as_ref().map(|rollout| Observed {
            rollout: rollout.clone(),
            canary: to_canary,
        });
        if to_canary {
            (&canary.deployed, observed)
        } else {
            (&self.deployed, observed)
        }
    }

    /// The versions this target may run: its own, then its canary's.
    pub fn versions(&self) -> impl Iterator<Item = &Arc<Deployed>> {
        std::iter::once(&self.deployed).chain(self.canary.as_ref().map(|c| &c.deployed))
    }
}

/// A request id's place in `0..10_000`: a stable hash (FNV-1a, then a
/// 64-bit finaliser so every bit of the id moves the low bits), the same on
/// every node and every run.
pub fn split_bucket(request_id: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in request_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MurmurHash3's fmix64.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % u64::from(WEIGHT_SCALE_BP)) as u32
}

/// One function as the node serves it: its aliases and its routes.
pub struct Served {
    /// Function name.
    pub name: String,
    /// The function's routes: those of its `live` version.
    pub routes: Vec<Route>,
    /// Those of `routes` whose prefix the guest does not see.
    pub stripped: Vec<Route>,
    /// The `live` alias: what routes, triggers and the admin invoke reach.
    pub live: Target,
    /// The other aliases, by name.
    pub aliases: HashMap<String, Target>,
    /// The labels a fleet node needs to run it (its `live` version's
    /// placement; empty: every node).
    pub placement: BTreeMap<String, String>,
}

impl Served {
    /// The alias `name` (`live` included).
    pub fn alias(&self, name: &str) -> Option<&Target> {
        if name == LIVE_ALIAS {
            Some(&self.live)
        } else {
            self.aliases.get(name)
        }
    }

    /// Every version in service, each once: live's first.
    pub fn versions(&self) -> Vec<&Arc<Deployed>> {
        let mut versions: Vec<&Arc<Deployed>> = Vec::new();
        for deployed in self
            .live
            .versions()
            .chain(self.aliases.values().flat_map(Target::versions))
        {
            if !versions.iter().any(|v| v.version == deployed.version) {
                versions.push(deployed);
            }
        }
        versions
    }

    /// The entry of `version`, if it is in service.
    pub fn version(&self, version: u64) -> Option<&Arc<Deployed>> {
        self.versions().into_iter().find(|v| v.version == version)
    }
}

/// What a request's route leads to: the function, and the route that
/// matched.
#[derive(Clone)]
pub struct RouteMatch {
    /// The function serving the route.
    pub function: Arc<Served>,
    /// The route, as the gateway tells the guest about it.
    pub route: Arc<MatchedRoute>,
}

/// One route of a function, prepared for the gateway's route headers.
#[derive(Debug)]
pub struct MatchedRoute {
    /// The route as users write it (`/api`, `example.com/api`): the value
    /// of `x-mayfly-route`.
    pub header: http::HeaderValue,
    /// The path prefix it serves (`/` or `/segment[/segment…]`).
    pub prefix: String,
    /// Whether the guest sees the path without `prefix`.
    pub strip: bool,
}

/// A function of the fleet this node does not run, because its placement
/// names labels the node lacks: what the node needs to forward its
/// requests to a node that runs it.
#[derive(Debug)]
pub struct RemoteFunction {
    /// Function name.
    pub name: String,
    /// Its `live` version.
    pub version: u64,
    /// The labels a node needs to run it.
    pub placement: BTreeMap<String, String>,
    /// The routes of its `live` version.
    pub routes: Vec<Route>,
    /// Those of `routes` whose prefix the guest does not see.
    pub stripped: Vec<Route>,
    /// How long a forward waits for the answer: the function's timeout
    /// plus a margin for the trip and a cold start.
    pub forward_timeout: Duration,
    /// The largest request body the function takes.
    pub max_request_bytes: u64,
}

/// The margin a forward waits beyond the function's own timeout.
pub const FORWARD_MARGIN: Duration = Duration::from_secs(5);

/// What a request's route leads to on this node when another node runs
/// the function.
#[derive(Clone)]
pub struct RemoteMatch {
    /// The function, run elsewhere.
    pub function: Arc<RemoteFunction>,
    /// The route, as the gateway tells the guest about it.
    pub route: Arc<MatchedRoute>,
}

/// Every deployed function, by name and by route: those this node runs,
/// and (apart, so the request path for the others checks nothing more)
/// those it forwards.
#[derive(Default)]
pub struct Catalog {
    /// Functions this node runs, by name.
    pub by_name: HashMap<String, Arc<Served>>,
    /// Functions this node runs, by route.
    pub routes: RouteTable<RouteMatch>,
    /// Functions other nodes run (their placement), by name.
    pub remote: HashMap<String, Arc<RemoteFunction>>,
    /// Functions other nodes run, by route: looked up only when `routes`
    /// has no match.
    pub remote_routes: RouteTable<RemoteMatch>,
}

/// A route of a function as the gateway reports it to the guest.
fn matched_route(route: &Route, stripped: &[Route]) -> Arc<MatchedRoute> {
    // A stored route is checked text (host name characters and a path
    // without controls), so it is a valid header value; one that were not
    // would simply go without the header.
    let header = http::HeaderValue::from_str(&route.to_string())
        .unwrap_or_else(|_| http::HeaderValue::from_static(""));
    Arc::new(MatchedRoute {
        header,
        prefix: route.prefix.clone(),
        strip: stripped.contains(route),
    })
}

impl Catalog {
    /// Builds a catalog from a set of functions this node runs.
    pub fn new(functions: impl IntoIterator<Item = Arc<Served>>) -> Self {
        Self::of(functions, [])
    }

    /// Builds a catalog from the functions this node runs and those it
    /// forwards.
    pub fn of(
        functions: impl IntoIterator<Item = Arc<Served>>,
        remote: impl IntoIterator<Item = Arc<RemoteFunction>>,
    ) -> Self {
        let mut catalog = Self::default();
        for function in functions {
            for route in &function.routes {
                let matched = RouteMatch {
                    function: function.clone(),
                    route: matched_route(route, &function.stripped),
                };
                catalog.routes.insert(route, matched);
            }
            catalog.by_name.insert(function.name.clone(), function);
        }
        for function in remote {
            for route in &function.routes {
                let matched = RemoteMatch {
                    function: function.clone(),
                    route: matched_route(route, &function.stripped),
                };
                catalog.remote_routes.insert(route, matched);
            }
            catalog.remote.insert(function.name.clone(), function);
        }
        catalog
    }

    /// The functions this node runs and those it forwards, but `name`.
    fn others(
        &self,
        name: &str,
    ) -> (
        impl Iterator<Item = Arc<Served>> + '_,
        impl Iterator<Item = Arc<RemoteFunction>> + '_,
    ) {
        let name = name.to_string();
        let remote_name = name.clone();
        (
            self.by_name
                .values()
                .filter(move |f| f.name != name)
                .cloned(),
            self.remote
                .values()
                .filter(move |f| f.name != remote_name)
                .cloned(),
        )
    }

    /// A new catalog with `function` run here, added or replacing the
    /// one of that name.
    pub fn with(&self, function: Arc<Served>) -> Self {
        let (served, remote) = self.others(&function.name);
        Self::of(served.chain([function]), remote)
    }

    /// A new catalog with `function` forwarded, added or replacing the one
    /// of that name.
    pub fn with_remote(&self, function: Arc<RemoteFunction>) -> Self {
        let (served, remote) = self.others(&function.name);
        Self::of(served, remote.chain([function]))
    }

    /// A new catalog without the function `name`.
    pub fn without(&self, name: &str) -> Self {
        let (served, remote) = self.others(name);
        Self::of(served, remote)
    }

    /// Whether the fleet has function `name`, run here or forwarded.
    pub fn knows(&self, name: &str) -> bool {
        self.by_name.contains_key(name) || self.remote.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: &str, version: u64, routes: &[&str]) -> Arc<RemoteFunction> {
        Arc::new(RemoteFunction {
            name: name.to_string(),
            version,
            placement: [("site".to_string(), "a".to_string())].into(),
            routes: routes.iter().map(|r| Route::parse(r).unwrap()).collect(),
            stripped: Vec::new(),
            forward_timeout: Duration::from_secs(35),
            max_request_bytes: 1 << 20,
        })
    }

    #[test]
    fn functions_run_elsewhere_are_found_by_route_apart_and_replaced_by_name() {
        let catalog = Catalog::of([], [remote("f", 1, &["/f"])]);
        assert!(catalog.routes.lookup(None, "/f/x").is_none());
        let found = catalog.remote_routes.lookup(None, "/f/x").unwrap();
        assert_eq!(
            (found.function.name.as_str(), found.route.prefix.as_str()),
            ("f", "/f")
        );
        assert!(catalog.knows("f") && !catalog.by_name.contains_key("f"));

        // A new version with other routes replaces the old entry whole.
        let catalog = catalog.with_remote(remote("f", 2, &["/g"]));
        assert!(catalog.remote_routes.lookup(None, "/f").is_none());
        assert_eq!(
            catalog
                .remote_routes
                .lookup(None, "/g")
                .unwrap()
                .function
                .version,
            2
        );
        assert_eq!(catalog.remote.len(), 1);
        let catalog = catalog.without("f");
        assert!(!catalog.knows("f"));
        assert!(catalog.remote_routes.lookup(None, "/g").is_none());
    }

    #[test]
    fn the_split_is_deterministic() {
        for id in ["a", "split-1", "0190b4c2a3f47c3e9d8e5b1f2a3c4d5e", ""] {
            assert_eq!(split_bucket(id), split_bucket(id));
            assert!(split_bucket(id) < WEIGHT_SCALE_BP);
        }
        // Pinned: the same id maps to the same bucket on every node and
        // release, so a retry keeps its version across a restart.
        assert_eq!(split_bucket("split-1"), 1416);
        assert_eq!(split_bucket("split-2"), 6975);
        assert_eq!(split_bucket(""), 4342);
    }

    #[test]
    fn ten_percent_of_ids_go_to_a_ten_percent_canary() {
        let count = |ids: &mut dyn Iterator<Item = String>| {
            ids.filter(|id| split_bucket(id) < 1000).count()
        };
        // Binomial(10 000, 0.1): sd 30; ±5 sd.
        let sequential = count(&mut (0..10_000).map(|i| format!("split-{i}")));
        assert!((850..=1150).contains(&sequential), "{sequential}");
        let generated = count(&mut (0..10_000).map(|_| uuid::Uuid::now_v7().simple().to_string()));
        assert!((850..=1150).contains(&generated), "{generated}");
        let numbers = count(&mut (0..10_000).map(|i| i.to_string()));
        assert!((850..=1150).contains(&numbers), "{numbers}");
    }
}
