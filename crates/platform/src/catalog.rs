//! What the node serves: an immutable snapshot of deployed functions and
//! their routes, swapped atomically on every change so the request path
//! reads it without a lock.

use std::collections::HashMap;
use std::sync::Arc;

use mayfly_runtime::{Function, InvocationLimits};
use mayfly_store::Digest;
use tokio::sync::OnceCell;

use crate::metering::FunctionMeter;
use crate::routes::{Route, RouteTable};

/// One function's serving version.
pub struct Deployed {
    /// Function name.
    pub name: String,
    /// The version that serves requests.
    pub version: u64,
    /// Cache key of the compiled artifact.
    pub artifact: Digest,
    /// Routes to this function.
    pub routes: Vec<Route>,
    /// Limits of each invocation.
    pub limits: InvocationLimits,
    /// Turns the function's invocations into usage records and metrics.
    pub meter: Arc<FunctionMeter>,
    /// The loaded, pre-linked function: filled on deploy, or on the first
    /// request after a restart (the cold → warm step).
    pub loaded: OnceCell<Function>,
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
