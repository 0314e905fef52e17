//! What the node serves: an immutable snapshot of deployed functions and
//! their routes, swapped atomically on every change so the request path
//! reads it without a lock.

use std::collections::HashMap;
use std::sync::Arc;

use mayfly_runtime::InvocationLimits;
use mayfly_store::{Digest, FunctionScaling};

use crate::metering::FunctionMeter;
use crate::routes::{Route, RouteTable};
use crate::tiers::{Activity, Tier};

/// One function's serving version.
pub struct Deployed {
    /// Function name.
    pub name: String,
    /// The name as the admission controller's key.
    pub key: Arc<str>,
    /// The version that serves requests.
    pub version: u64,
    /// Cache key of the compiled artifact.
    pub artifact: Digest,
    /// Routes to this function.
    pub routes: Vec<Route>,
    /// Limits of each invocation.
    pub limits: InvocationLimits,
    /// Concurrency, queueing and reuse settings.
    pub scaling: FunctionScaling,
    /// Turns the function's invocations into usage records and metrics.
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

/// Every deployed function, by name and by route.
#[derive(Default)]
pub struct Catalog {
    /// Functions by name.
    pub by_name: HashMap<String, Arc<Deployed>>,
    /// Functions by route.
    pub routes: RouteTable<Arc<Deployed>>,
}

impl Catalog {
    /// Builds a catalog from a set of functions.
    pub fn new(functions: impl IntoIterator<Item = Arc<Deployed>>) -> Self {
        let mut catalog = Self::default();
        for function in functions {
            for route in &function.routes {
                catalog.routes.insert(route, function.clone());
            }
            catalog.by_name.insert(function.name.clone(), function);
        }
        catalog
    }

    /// A new catalog with `function` added or replacing the one of that name.
    pub fn with(&self, function: Arc<Deployed>) -> Self {
        let name = function.name.clone();
        let others = self.by_name.values().filter(|f| f.name != name).cloned();
        Self::new(others.chain([function]))
    }

    /// A new catalog without the function `name`.
    pub fn without(&self, name: &str) -> Self {
        Self::new(self.by_name.values().filter(|f| f.name != name).cloned())
    }
}
