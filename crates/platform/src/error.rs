//! The node's one domain error, [`PlatformError`]: what went wrong, told
//! apart as callers need it. How each kind is answered over HTTP is the
//! admin API's business (`admin/error.rs`); guests see their own mapping
//! (`capabilities.rs`).

use mayfly_runtime::DeployError;
use mayfly_store::StoreError;

/// Why an operation of the node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The component cannot be deployed.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// No such function.
    #[error("no function named `{0}`: see `mayfly list`")]
    NotFound(String),
    /// The change conflicts with what is deployed.
    #[error("{0}")]
    Conflict(String),
    /// Something other than a function was not found; the message names it.
    #[error("{0}")]
    Missing(String),
    /// A compare-and-swap condition did not hold.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A body over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// The node's disk is full: nothing can be stored until space is freed
    /// (507 Insufficient Storage). Ends by itself when there is room again.
    #[error("{0}")]
    InsufficientStorage(String),
    /// What the operation needs is out of reach for now (503): an edge
    /// node's hub or another site behind a link that is down; the message
    /// names it.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the node.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

/// The answer to a write refused because the disk is full.
fn disk_full(error: impl std::fmt::Display) -> PlatformError {
    PlatformError::InsufficientStorage(format!(
        "the node's disk is full, so it cannot store this ({error}): free space on the \
         filesystem of its data directory; writes resume by themselves once there is room"
    ))
}

impl From<StoreError> for PlatformError {
    fn from(error: StoreError) -> Self {
        match error {
            error if error.is_disk_full() => disk_full(error),
            StoreError::FunctionNotFound(name) => PlatformError::NotFound(name),
            StoreError::RouteTaken { .. } => PlatformError::Conflict(error.to_string()),
            StoreError::VersionNotFound { .. } => PlatformError::Missing(error.to_string()),
            StoreError::Conflict(message) | StoreError::Stale(message) => {
                PlatformError::Conflict(message)
            }
            StoreError::PreconditionFailed(message) => PlatformError::PreconditionFailed(message),
            StoreError::Unavailable(message) => PlatformError::Unavailable(message),
            other => PlatformError::Internal(other.into()),
        }
    }
}

impl From<anyhow::Error> for PlatformError {
    fn from(error: anyhow::Error) -> Self {
        if mayfly_store::is_disk_full(error.as_ref()) {
            return disk_full(format!("{error:#}"));
        }
        PlatformError::Internal(error)
    }
}

/// Runs the node's own blocking work (loading compiled code) off the async
/// workers, its error told apart like any other. Store calls need no such
/// wrapper: the stores are async, and a back-end whose I/O blocks (SQLite)
/// offloads it itself.
pub(crate) async fn blocking<T, E>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, PlatformError>
where
    T: Send + 'static,
    E: Into<PlatformError> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| PlatformError::Internal(e.into()))?
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_insufficient_storage_however_it_is_reported() {
        let io = StoreError::from(std::io::Error::from_raw_os_error(28));
        let wrapped = anyhow::Error::from(StoreError::from(std::io::Error::from_raw_os_error(28)))
            .context("cannot write the audit log");
        for error in [PlatformError::from(io), PlatformError::from(wrapped)] {
            assert!(
                matches!(&error, PlatformError::InsufficientStorage(m) if m.contains("disk is full")),
                "{error}"
            );
        }
        let other = PlatformError::from(StoreError::from(std::io::Error::from_raw_os_error(5)));
        assert!(matches!(other, PlatformError::Internal(_)));
    }
}
