//! The embedded back-end: SQLite databases and blob files in one data
//! directory, locked by one node at a time.
//!
//! `mayfly.db` holds the registry and the logs ([`EmbeddedStore`]),
//! `ledger.db` the usage ledger ([`EmbeddedLedger`]), `events.db` the event
//! stores ([`EmbeddedEvents`]), `auth.db` tokens and the audit log
//! ([`EmbeddedAuth`]), `secrets.db` sealed secrets ([`EmbeddedSecrets`]);
//! `blobs/` the content-addressed files ([`BlobDir`]). Every database is in
//! WAL mode and migrated by `PRAGMA user_version`.
//!
//! SQLite and file calls block, so each store keeps its synchronous code
//! (an inner `…Db` type, or `BlobDir`'s `*_blocking` methods) and its
//! async trait methods hand it to tokio's blocking pool through
//! `offload`: the caller's async worker never waits on a disk.

mod auth;
mod blob_dir;
mod data_dir;
mod embedded;
mod embedded_events;
mod jobs;
mod ledger;
mod models;
mod pipelines;
mod secrets;

use std::path::Path;
use std::sync::Arc;

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::stores::{EventHandles, LocalDir};
use crate::{AuthStore, Result, SecretStore, StoreError, Stores};

pub use auth::EmbeddedAuth;
pub use blob_dir::{BlobDir, BlobWriter, StagedBlob};
pub use data_dir::{DataDir, is_disk_full};
pub use embedded::EmbeddedStore;
pub use embedded_events::EmbeddedEvents;
pub use jobs::{EmbeddedJobs, open_jobs};
pub use ledger::EmbeddedLedger;
pub use models::{EmbeddedModels, ModelRecord};
pub use secrets::EmbeddedSecrets;

/// Runs `call` with (a clone of) `state` on tokio's blocking pool and
/// returns its result: how every async method of this back-end runs its
/// synchronous SQLite and file code. `state` is what the call works on
/// (an `Arc` of a store's connections, a `BlobDir`); arguments it borrows
/// are cloned into the closure by the caller. A call that panicked, or
/// that the runtime dropped while shutting down, fails with
/// [`StoreError::Backend`]. Must be awaited inside a tokio runtime.
pub(crate) async fn offload<S, T>(
    state: &S,
    call: impl FnOnce(&S) -> Result<T> + Send + 'static,
) -> Result<T>
where
    S: Clone + Send + 'static,
    T: Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || call(&state))
        .await
        .map_err(|error| StoreError::Backend(Box::new(error)))?
}

/// Opens a connection with the settings every Mayfly database uses.
pub(crate) fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer. synchronous=FULL: a deploy that
    // returned is on disk even after a power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// A stored integer from a `u64` (SQLite integers are signed; saturates).
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `u64` from a stored integer (a negative one, never written, reads 0).
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A write transaction that takes the lock up front: a deferred one could
/// fail with SQLITE_BUSY when upgrading, which the busy timeout cannot
/// retry.
pub(crate) fn write_tx(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>> {
    Ok(conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
}

/// One SQLite connection behind a mutex: the small stores (tokens and
/// audit, secrets) that see few writes and need no second connection.
pub(crate) struct LockedDb(std::sync::Mutex<Connection>);

impl LockedDb {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub(crate) fn open(path: &Path, migrations: &[&str]) -> Result<Self> {
        let conn = open_connection(path)?;
        migrate(&conn, migrations)?;
        Ok(Self(std::sync::Mutex::new(conn)))
    }

    /// The connection. Every change is one transaction that rolls back on
    /// drop, so a lock poisoned by a panic still guards a consistent file.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Applies the `migrations` this database has not run yet, each in its own
/// transaction; `PRAGMA user_version` counts those applied.
pub(crate) fn migrate(conn: &Connection, migrations: &[&str]) -> Result<()> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > migrations.len() {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {applied}, newer than this binary knows \
             ({}): use a newer mayfly",
            migrations.len()
        )));
    }
    for (index, migration) in migrations.iter().enumerate().skip(applied) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the store's clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens `<data_dir>/auth.db`: tokens and the audit log.
pub fn open_auth(data_dir: &Path) -> Result<Arc<dyn AuthStore>> {
    let store = EmbeddedAuth::open(&data_dir.join("auth.db"))
        .map_err(|e| e.context("cannot open the token database"))?;
    Ok(Arc::new(store))
}

/// Opens `<data_dir>/secrets.db`: sealed secrets.
pub fn open_secrets(data_dir: &Path) -> Result<Arc<dyn SecretStore>> {
    let path = data_dir.join(SECRETS_DB);
    let store = EmbeddedSecrets::open(&path)
        .map_err(|e| e.context(format!("cannot open the secrets in {}", path.display())))?;
    Ok(Arc::new(store))
}

/// Name of the secrets database in the data directory.
pub const SECRETS_DB: &str = "secrets.db";

impl Stores {
    /// The embedded back-end in `data_dir`: locks the directory (another
    /// node holding it is [`StoreError::InUse`]), then opens `mayfly.db`,
    /// `blobs/` (removing writes a crash left unfinished), `ledger.db`,
    /// `events.db`, `secrets.db` and `auth.db`, creating what is missing,
    /// in the order a node has always opened them. Each failure says which
    /// store could not be opened.
    pub fn sqlite(data_dir: &Path) -> Result<Self> {
        open_stores(data_dir)
    }
}

fn open_stores(data_dir: &Path) -> Result<Stores> {
    // Locked before anything in it is opened or swept.
    let held = DataDir::open(data_dir).map_err(|error| match error {
        StoreError::InUse(message) => StoreError::InUse(message),
        other => other.context(format!("cannot open data directory {}", data_dir.display())),
    })?;
    let store = Arc::new(
        EmbeddedStore::open(&data_dir.join("mayfly.db")).map_err(|e| {
            e.context(format!(
                "cannot open the database in {}",
                data_dir.display()
            ))
        })?,
    );
    let blob_dir = BlobDir::open(data_dir.join("blobs"))?;
    // Writes this node never finished (a crash): nobody else can be
    // writing them, the directory is locked.
    let swept = blob_dir
        .sweep_temp_files()
        .map_err(|e| e.context("cannot remove unfinished blob writes"))?;
    if swept > 0 {
        tracing::info!(files = swept, "removed unfinished blob writes");
    }
    let usage = EmbeddedLedger::open(&data_dir.join("ledger.db")).map_err(|e| {
        e.context(format!(
            "cannot open the usage ledger in {}",
            data_dir.display()
        ))
    })?;
    let events = BlobDir::open(data_dir.join("blobs"))
        .and_then(|objects| EmbeddedEvents::open(&data_dir.join("events.db"), objects))
        .map_err(|e| {
            e.context(format!(
                "cannot open the event store in {}",
                data_dir.display()
            ))
        })?;
    let secrets = open_secrets(data_dir)?;
    let auth = open_auth(data_dir)?;
    // Jobs: its own file (see `jobs.rs`).
    let jobs = open_jobs(data_dir)?;
    let mut stores = Stores::from_parts(
        store.clone(),
        store,
        Arc::new(blob_dir),
        Arc::new(usage),
        EventHandles::of(Arc::new(events)),
        auth,
        secrets,
        Some(Arc::new(held)),
    );
    stores.pipelines = Some(Arc::new(jobs.clone()));
    stores.jobs = Some(Arc::new(jobs));
    Ok(stores)
}

impl LocalDir for DataDir {
    fn path(&self) -> &Path {
        DataDir::path(self)
    }

    fn restrict_permissions(&self) -> Result<()> {
        DataDir::restrict_permissions(self)
    }
}

/// SQLite failures become the contract's back-end error, with the SQLite
/// error kept as its source (disk-full detection reads it).
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Backend(Box::new(error))
    }
}
