//! The host types behind the guest's wasi:keyvalue handles and errors, at
//! every interface version: the generated bindings name them, and the
//! versions' host functions fill them.

use wasmtime::component::ResourceTableError;

/// An open bucket: its name, checked against the grants on every call.
/// (`pub` only because the generated bindings re-export it.)
pub struct Bucket {
    pub(super) name: String,
}

/// A failed key-value call, whatever the interface version: an error for the
/// guest (each version turns it into its own `error`), or a trap when the
/// guest passed a handle that is not its own.
pub enum KvError {
    /// The bucket is not granted: `access-denied`.
    AccessDenied,
    /// Any other failure: `other(message)`.
    Other(String),
    /// Ends the guest with this trap.
    Trap(wasmtime::Error),
}

impl From<ResourceTableError> for KvError {
    fn from(error: ResourceTableError) -> Self {
        KvError::Trap(wasmtime::Error::new(error))
    }
}

impl KvError {
    /// A failure of the backend, passed on to the guest.
    pub(super) fn backend(bucket: &str, error: anyhow::Error) -> Self {
        tracing::warn!(bucket, "wasi:keyvalue backend error: {error:#}");
        KvError::Other(format!("{error:#}"))
    }

    /// This error as one version's `error` type, built with `denied` or
    /// `other`; a trap stays a trap.
    pub(super) fn into_guest<E>(
        self,
        denied: E,
        other: impl FnOnce(String) -> E,
    ) -> wasmtime::Result<E> {
        match self {
            KvError::AccessDenied => Ok(denied),
            KvError::Other(message) => Ok(other(message)),
            KvError::Trap(trap) => Err(trap),
        }
    }
}

/// A compare-and-swap in progress: the key and the value it read.
/// (`pub` only because the generated bindings re-export it.)
pub struct Cas {
    pub(super) bucket: String,
    pub(super) key: String,
    pub(super) current: Option<Vec<u8>>,
}
