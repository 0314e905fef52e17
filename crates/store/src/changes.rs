//! Change feeds: what a node must learn about changes made elsewhere.
//!
//! A node keeps in memory what requests need (the catalog of functions and
//! their aliases, the trigger cache, live tokens, secrets) and refreshes it
//! after its own changes. In a fleet, other nodes change the same state:
//! each store whose state is cached says so on a feed, and a node that
//! subscribed at start-up re-reads what a change names (the function, the
//! trigger, the token, the secret).
//!
//! Feeds are designed to match a NATS KV watcher (a key, and whether it was
//! put or deleted): a change names its key, never carries the state, so a
//! subscriber always re-reads the store. The embedded back-end emits in
//! process, after the change committed. A subscriber that falls behind gets
//! [`tokio::sync::broadcast::error::RecvError::Lagged`] and must re-read
//! everything, as after a NATS reconnect.

use tokio::sync::broadcast;

/// A subscription to one store's changes.
pub type ChangeFeed<T> = broadcast::Receiver<T>;

/// A change to a function in the [`crate::Registry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryChange {
    /// A deploy, an alias move, or a version deleted or pruned: re-read the
    /// function's aliases and versions.
    Changed {
        /// The function.
        function: String,
    },
    /// The function was deleted with everything it had.
    Deleted {
        /// The function.
        function: String,
    },
}

/// A change to the triggers of the [`crate::TriggerStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerChange {
    /// A trigger was attached.
    Added {
        /// Its id.
        id: i64,
        /// The function it delivers to.
        function: String,
    },
    /// A trigger was detached.
    Removed {
        /// Its id.
        id: i64,
    },
    /// A function's triggers, inbox and dead letters were removed.
    FunctionRemoved {
        /// The function.
        function: String,
    },
    /// A schedule fired: its "last fired" time changed.
    Fired {
        /// The trigger.
        id: i64,
        /// When it fired (ms since the Unix epoch).
        fired_ms: i64,
    },
}

/// A change to the tokens of the [`crate::AuthStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenChange {
    /// A token was created.
    Created {
        /// Its public id.
        id: String,
    },
    /// A token was revoked.
    Revoked {
        /// Its public id.
        id: String,
    },
}

/// A change to the [`crate::SecretStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretChange {
    /// A new version of a secret was stored.
    Put {
        /// The secret.
        name: String,
        /// Its new version.
        version: u64,
    },
    /// A secret was deleted.
    Deleted {
        /// The secret.
        name: String,
    },
    /// Every secret was resealed under another master key (values
    /// unchanged): re-read any sealed copies.
    Resealed,
}

/// Changes a subscriber has not read yet before it lags.
const FEED_CAPACITY: usize = 1024;

/// The sending side of an in-process feed.
pub(crate) struct Feed<T>(broadcast::Sender<T>);

impl<T: Clone> Feed<T> {
    pub(crate) fn new() -> Self {
        Self(broadcast::channel(FEED_CAPACITY).0)
    }

    /// A new subscription: the changes from now on.
    pub(crate) fn subscribe(&self) -> ChangeFeed<T> {
        self.0.subscribe()
    }

    /// Tells every subscriber; call only after the change committed.
    pub(crate) fn emit(&self, change: T) {
        // No subscriber is not an error: nobody caches this state.
        let _ = self.0.send(change);
    }
}

impl<T: Clone> Default for Feed<T> {
    fn default() -> Self {
        Self::new()
    }
}
