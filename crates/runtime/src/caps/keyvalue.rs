//! wasi:keyvalue over a [`KeyValueBackend`], limited to the buckets granted
//! to the function: the grant checks and backend calls every version shares,
//! and the 0.2.0-draft interfaces (store, atomics, batch) over them. The
//! 0.2.0-draft2 interfaces are in `keyvalue_draft2.rs`.
//!
//! [`KeyValueBackend`]: super::KeyValueBackend

use wasmtime::component::Resource;

use super::CapsView;
use super::bindings::wasi::keyvalue::store::{self, KeyResponse};
use super::bindings::wasi::keyvalue::{atomics, batch};
use super::resources::{Bucket, KvError};

/// Keys one `get-many`, `set-many` or `delete-many` may name: each is a
/// backend call, and the guest can ask again for the next batch.
pub(crate) const MAX_BATCH_KEYS: usize = 1000;

/// The calls every version makes: grant checks, then the backend.
impl CapsView<'_> {
    /// Whether the function may use the bucket `name`; a refusal is logged.
    /// Grants are the current invocation's: a kept instance may hold a
    /// handle from an earlier one.
    pub(super) fn check_grant(&self, name: &str) -> Result<(), KvError> {
        self.check_grant_quietly(name)
            .inspect_err(|_| self.deny_bucket("use", name))
    }

    /// The name of an open bucket, if the function may still use it.
    pub(super) fn granted(&self, bucket: &Resource<Bucket>) -> Result<&str, KvError> {
        let name = self.table.get(bucket)?.name.as_str();
        self.check_grant(name)?;
        Ok(name)
    }

    fn deny_bucket(&self, action: &str, name: &str) {
        self.deny(&format!(
            "wasi:keyvalue {action}({name:?}) denied: bucket not granted to this function \
             (deploy with --kv {})",
            name.escape_debug()
        ));
    }

    /// Opens a granted bucket, or with `""` the function's default store
    /// (what wasmtime's in-memory keyvalue and Spin call the default).
    pub(super) fn open_bucket(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        let name = match (identifier.as_str(), &self.caps.default_kv_bucket) {
            ("", Some(default)) => default.clone(),
            _ => identifier,
        };
        self.check_grant_quietly(&name)
            .inspect_err(|_| self.deny_bucket("open", &name))?;
        Ok(self.table.push(Bucket { name })?)
    }

    fn check_grant_quietly(&self, name: &str) -> Result<(), KvError> {
        if self.caps.kv_buckets.contains(name)
            || self.caps.default_kv_bucket.as_deref() == Some(name)
        {
            Ok(())
        } else {
            Err(KvError::AccessDenied)
        }
    }

    pub(super) fn close_bucket(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }

    pub(super) async fn kv_get(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .get(name, key)
            .await
            .map_err(|e| KvError::backend(name, e))
    }

    pub(super) async fn kv_set(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .set(name, key, value)
            .await
            .map_err(|e| KvError::backend(name, e))
    }

    pub(super) async fn kv_delete(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
    ) -> Result<(), KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .delete(name, key)
            .await
            .map_err(|e| KvError::backend(name, e))
    }

    pub(super) async fn kv_exists(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
    ) -> Result<bool, KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .exists(name, key)
            .await
            .map_err(|e| KvError::backend(name, e))
    }

    /// A page of keys from `cursor` (keys already returned) and the cursor
    /// of the next page, `None` after the last.
    pub(super) async fn kv_list_keys(
        &mut self,
        bucket: &Resource<Bucket>,
        cursor: u64,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .list_keys(name, cursor)
            .await
            .map_err(|e| KvError::backend(name, e))
    }

    /// Batches are key-by-key calls on the backend: the interfaces promise no
    /// atomicity, and a local store gains nothing from a round trip saved.
    ///
    /// A batch names at most [`MAX_BATCH_KEYS`] keys, and its result is built
    /// on the host only as far as the function's memory limit leaves room
    /// for it: the same 1 MiB key asked for 1,500 times would otherwise make
    /// the node hold 1.5 GiB for a 16 MiB function.
    pub(super) async fn kv_get_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, KvError> {
        self.check_batch("get-many", keys.len())?;
        let name = self.granted(bucket)?.to_string();
        let backend = self.caps.keyvalue.clone();
        let mut pairs = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for key in keys {
            let value = backend
                .get(&name, &key)
                .await
                .map_err(|e| KvError::backend(&name, e))?;
            bytes = bytes
                .saturating_add(key.len())
                .saturating_add(value.as_ref().map_or(0, Vec::len));
            if !self.result_fits(bytes) {
                let limit = self.memory.limit() >> 20;
                return Err(self.refuse(format!(
                    "wasi:keyvalue get-many on bucket {name:?} refused: its result reached                      {bytes} bytes, more than this function's memory limit of {limit} MiB                      leaves room for; ask for fewer keys at a time"
                )));
            }
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    /// Refuses a batch of more than [`MAX_BATCH_KEYS`] keys.
    fn check_batch(&self, call: &str, keys: usize) -> Result<(), KvError> {
        if keys <= MAX_BATCH_KEYS {
            return Ok(());
        }
        Err(self.refuse(format!(
            "wasi:keyvalue {call} refused: it names {keys} keys, more than the limit of              {MAX_BATCH_KEYS} per call; split it into smaller batches"
        )))
    }

    /// Whether a result of `bytes` built on the host fits beside what the
    /// guest holds (counted toward its peak memory if it does).
    fn result_fits(&mut self, bytes: usize) -> bool {
        if self.memory.fits_transient(bytes) {
            return true;
        }
        // Charges for dropped wasi:http fields may be stale: recount once.
        crate::host_limits::recount(self.memory, self.table);
        self.memory.fits_transient(bytes)
    }

    /// Explains a refused call in the logs and returns it as the guest's
    /// error.
    fn refuse(&self, message: String) -> KvError {
        self.deny(&message);
        KvError::Other(message)
    }

    pub(super) async fn kv_set_many(
        &mut self,
        bucket: &Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        self.check_batch("set-many", key_values.len())?;
        // The batch was copied out of the guest's memory: it counts toward
        // the peak while the host holds it.
        let bytes = key_values
            .iter()
            .map(|(key, value)| key.len().saturating_add(value.len()))
            .fold(0, usize::saturating_add);
        self.result_fits(bytes);
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        for (key, value) in key_values {
            backend
                .set(name, &key, value)
                .await
                .map_err(|e| KvError::backend(name, e))?;
        }
        Ok(())
    }

    pub(super) async fn kv_delete_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        self.check_batch("delete-many", keys.len())?;
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        for key in keys {
            backend
                .delete(name, &key)
                .await
                .map_err(|e| KvError::backend(name, e))?;
        }
        Ok(())
    }
}

impl store::Host for CapsView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        self.open_bucket(identifier)
    }

    fn convert_error(&mut self, error: KvError) -> wasmtime::Result<store::Error> {
        error.into_guest(store::Error::AccessDenied, store::Error::Other)
    }
}

impl store::HostBucket for CapsView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        self.kv_get(&bucket, &key).await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        self.kv_set(&bucket, &key, value).await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        self.kv_delete(&bucket, &key).await
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        self.kv_exists(&bucket, &key).await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<KeyResponse, KvError> {
        let (keys, cursor) = self.kv_list_keys(&bucket, cursor.unwrap_or(0)).await?;
        Ok(KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.close_bucket(bucket)
    }
}

impl atomics::Host for CapsView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        let name = self.granted(&bucket)?;
        let backend = &self.caps.keyvalue;
        backend
            .increment(name, &key, delta)
            .await
            .map_err(|e| KvError::backend(name, e))
    }
}

impl batch::Host for CapsView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let pairs = self.kv_get_many(&bucket, keys).await?;
        Ok(pairs
            .into_iter()
            .map(|(key, value)| value.map(|value| (key, value)))
            .collect())
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        self.kv_set_many(&bucket, key_values).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        self.kv_delete_many(&bucket, keys).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use wasmtime::component::ResourceTable;

    use super::*;
    use crate::caps::tests::{Lines, stderr};
    use crate::caps::{Capabilities, KeyValueBackend};
    use crate::outbound::OutboundPolicy;

    /// Buckets in memory; lists two keys per page so paging is exercised.
    #[derive(Default)]
    pub(crate) struct Memory(Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>);

    const PAGE: usize = 2;

    impl Memory {
        fn with<R>(&self, bucket: &str, f: impl FnOnce(&mut BTreeMap<String, Vec<u8>>) -> R) -> R {
            let mut buckets = self.0.lock().unwrap_or_else(|p| p.into_inner());
            f(buckets.entry(bucket.to_string()).or_default())
        }
    }

    #[async_trait::async_trait]
    impl KeyValueBackend for Memory {
        async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
            Ok(self.with(bucket, |b| b.get(key).cloned()))
        }
        async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
            if key.is_empty() {
                anyhow::bail!("empty key");
            }
            self.with(bucket, |b| b.insert(key.to_string(), value));
            Ok(())
        }
        async fn delete(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
            self.with(bucket, |b| b.remove(key));
            Ok(())
        }
        async fn exists(&self, bucket: &str, key: &str) -> anyhow::Result<bool> {
            Ok(self.with(bucket, |b| b.contains_key(key)))
        }
        async fn list_keys(
            &self,
            bucket: &str,
            cursor: u64,
        ) -> anyhow::Result<(Vec<String>, Option<u64>)> {
            let skip = usize::try_from(cursor)?;
            Ok(self.with(bucket, |b| {
                let keys: Vec<String> = b.keys().skip(skip).take(PAGE).cloned().collect();
                let next = skip + keys.len();
                let more = next < b.len();
                (keys, more.then_some(next as u64))
            }))
        }
        async fn increment(&self, bucket: &str, key: &str, delta: u64) -> anyhow::Result<u64> {
            self.with(bucket, |b| {
                let current = match b.get(key) {
                    Some(value) => std::str::from_utf8(value)?.parse::<u64>()?,
                    None => 0,
                };
                let new = current
                    .checked_add(delta)
                    .ok_or_else(|| anyhow::anyhow!("overflow"))?;
                b.insert(key.to_string(), new.to_string().into_bytes());
                Ok(new)
            })
        }
        async fn compare_and_swap(
            &self,
            bucket: &str,
            key: &str,
            current: Option<&[u8]>,
            new: Vec<u8>,
        ) -> anyhow::Result<bool> {
            Ok(self.with(bucket, |b| {
                let swap = b.get(key).map(Vec::as_slice) == current;
                if swap {
                    b.insert(key.to_string(), new);
                }
                swap
            }))
        }
    }

    /// A view over the in-memory backend granting some buckets, with its
    /// stderr lines.
    pub(crate) struct Fixture {
        pub(crate) caps: Capabilities,
        pub(crate) table: ResourceTable,
        pub(crate) lines: Arc<Lines>,
        stderr: crate::logs::GuestOutput,
        pub(crate) memory: crate::meter::MemoryMeter,
        extra_cpu: std::time::Duration,
        awaited_inference: std::time::Duration,
    }

    impl Fixture {
        pub(crate) fn granting(buckets: &[&str]) -> Self {
            let lines = Arc::new(Lines::default());
            Self {
                caps: Capabilities {
                    kv_buckets: buckets.iter().map(|b| b.to_string()).collect(),
                    default_kv_bucket: Some("fn.me".into()),
                    keyvalue: Arc::new(Memory::default()),
                    config: Capabilities::none().config.clone(),
                    outbound: Arc::new(OutboundPolicy::deny_all()),
                    env: Vec::new(),
                    env_secrets: Vec::new(),
                    models: Default::default(),
                    nn: None,
                },
                table: ResourceTable::new(),
                stderr: stderr(&lines),
                lines,
                memory: crate::meter::MemoryMeter::new(64 << 20),
                extra_cpu: std::time::Duration::ZERO,
                awaited_inference: std::time::Duration::ZERO,
            }
        }

        pub(crate) fn view(&mut self) -> CapsView<'_> {
            CapsView {
                caps: &self.caps,
                table: &mut self.table,
                stderr: &self.stderr,
                memory: &mut self.memory,
                extra_cpu: &mut self.extra_cpu,
                awaited_inference: &mut self.awaited_inference,
            }
        }
    }

    /// The error a call returned to the guest, as 0.2.0-draft's `error`.
    fn guest_error<T: std::fmt::Debug>(result: Result<T, KvError>) -> store::Error {
        match result {
            Err(error) => error
                .into_guest(store::Error::AccessDenied, store::Error::Other)
                .unwrap_or_else(|trap| panic!("trapped: {trap:#}")),
            Ok(value) => panic!("succeeded: {value:?}"),
        }
    }

    pub(crate) fn ok<T>(result: Result<T, KvError>) -> T {
        match result {
            Ok(value) => value,
            Err(KvError::AccessDenied) => panic!("failed: access denied"),
            Err(KvError::Other(message)) => panic!("failed: {message}"),
            Err(KvError::Trap(trap)) => panic!("trapped: {trap:#}"),
        }
    }

    /// A borrow of an owned handle, as the guest passes it.
    pub(crate) fn handle<T: 'static>(owned: &Resource<T>) -> Resource<T> {
        Resource::new_borrow(owned.rep())
    }

    #[tokio::test]
    async fn opening_an_ungranted_bucket_is_denied_and_logged() {
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let error = guest_error(store::Host::open(&mut kv, "payroll".into()).await);
        assert!(matches!(error, store::Error::AccessDenied));
        ok(store::Host::open(&mut kv, "orders".into()).await);
        assert_eq!(
            fixture.lines.take(),
            [
                "mayfly: wasi:keyvalue open(\"payroll\") denied: bucket not granted to this \
                 function (deploy with --kv payroll)"
            ]
        );
    }

    #[tokio::test]
    async fn the_empty_name_opens_the_functions_default_store() {
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&[]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, String::new()).await);
        ok(B::set(&mut kv, handle(&bucket), "a".into(), b"1".to_vec()).await);
        // It is the bucket `fn.me`, by either name.
        let named = ok(store::Host::open(&mut kv, "fn.me".into()).await);
        assert_eq!(
            ok(B::get(&mut kv, handle(&named), "a".into()).await),
            Some(b"1".to_vec())
        );
        assert!(fixture.lines.take().is_empty());

        // Without a default store (no function around it), `""` is denied.
        fixture.caps.default_kv_bucket = None;
        let mut kv = fixture.view();
        let error = guest_error(store::Host::open(&mut kv, String::new()).await);
        assert!(matches!(error, store::Error::AccessDenied));
    }

    #[tokio::test]
    async fn get_set_delete_exists() {
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);
        assert_eq!(ok(B::get(&mut kv, handle(&bucket), "a".into()).await), None);
        ok(B::set(&mut kv, handle(&bucket), "a".into(), b"1".to_vec()).await);
        assert_eq!(
            ok(B::get(&mut kv, handle(&bucket), "a".into()).await),
            Some(b"1".to_vec())
        );
        assert!(ok(B::exists(&mut kv, handle(&bucket), "a".into()).await));
        ok(B::delete(&mut kv, handle(&bucket), "a".into()).await);
        assert!(!ok(B::exists(&mut kv, handle(&bucket), "a".into()).await));

        // A backend failure reaches the guest as `other`, with its message.
        let error = guest_error(B::set(&mut kv, handle(&bucket), String::new(), vec![]).await);
        assert!(matches!(error, store::Error::Other(message) if message == "empty key"));

        B::drop(&mut kv, bucket).await.expect("drops");
        assert!(kv.table.is_empty());
    }

    #[tokio::test]
    async fn list_keys_follows_the_cursor() {
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);
        for key in ["e", "a", "d", "b", "c"] {
            ok(B::set(&mut kv, handle(&bucket), key.into(), vec![]).await);
        }
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let page = ok(B::list_keys(&mut kv, handle(&bucket), cursor).await);
            pages.push(page.keys);
            cursor = page.cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(pages, [vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
    }

    #[tokio::test]
    async fn increment_counts_from_zero() {
        let mut fixture = Fixture::granting(&["counters"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "counters".into()).await);
        let mut results = Vec::new();
        for by in [5, 2, u64::MAX] {
            results
                .push(atomics::Host::increment(&mut kv, handle(&bucket), "hits".into(), by).await);
        }
        let mut results = results.into_iter();
        assert_eq!(results.next().map(ok), Some(5));
        assert_eq!(results.next().map(ok), Some(7));
        let error = guest_error(results.next().expect("three results"));
        assert!(matches!(error, store::Error::Other(message) if message == "overflow"));
    }

    #[tokio::test]
    async fn batches() {
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);
        let pairs = vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".into(), b"2".to_vec()),
        ];
        ok(batch::Host::set_many(&mut kv, handle(&bucket), pairs).await);
        let keys = vec!["a".to_string(), "missing".into(), "b".into()];
        let got = ok(batch::Host::get_many(&mut kv, handle(&bucket), keys.clone()).await);
        assert_eq!(
            got,
            [
                Some(("a".to_string(), b"1".to_vec())),
                None,
                Some(("b".to_string(), b"2".to_vec()))
            ]
        );
        ok(batch::Host::delete_many(&mut kv, handle(&bucket), keys.clone()).await);
        let got = ok(batch::Host::get_many(&mut kv, handle(&bucket), keys).await);
        assert_eq!(got, [None, None, None]);
    }

    #[tokio::test]
    async fn batches_are_capped_and_their_results_fit_the_memory_limit() {
        let mut fixture = Fixture::granting(&["orders"]);
        fixture.memory = crate::meter::MemoryMeter::new(4 << 20);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);
        let big = vec![b'v'; 1 << 20];
        ok(store::HostBucket::set(&mut kv, handle(&bucket), "big".into(), big).await);

        let too_many = vec!["big".to_string(); MAX_BATCH_KEYS + 1];
        for result in [
            batch::Host::get_many(&mut kv, handle(&bucket), too_many.clone())
                .await
                .map(drop),
            batch::Host::delete_many(&mut kv, handle(&bucket), too_many.clone()).await,
        ] {
            let store::Error::Other(message) = guest_error(result) else {
                panic!("not `other`");
            };
            assert!(message.contains("1001 keys"), "{message}");
        }
        let pairs = too_many.into_iter().map(|key| (key, Vec::new())).collect();
        let refused = batch::Host::set_many(&mut kv, handle(&bucket), pairs).await;
        assert!(matches!(guest_error(refused), store::Error::Other(_)));

        // Three 1 MiB values fit a 4 MiB limit; five do not.
        let three = vec!["big".to_string(); 3];
        ok(batch::Host::get_many(&mut kv, handle(&bucket), three).await);
        let five = vec!["big".to_string(); 5];
        let refused = batch::Host::get_many(&mut kv, handle(&bucket), five).await;
        let store::Error::Other(message) = guest_error(refused) else {
            panic!("not `other`");
        };
        assert!(message.contains("memory limit of 4 MiB"), "{message}");
        assert!(fixture.lines.take().iter().any(|l| l.contains("get-many")));
        // The peak counts the largest result the host built.
        assert!(fixture.memory.peak() >= 3 << 20);
    }

    #[tokio::test]
    async fn a_bucket_whose_grant_is_gone_is_denied() {
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&["orders"]);
        let bucket = ok(store::Host::open(&mut fixture.view(), "orders".into()).await);
        // A kept instance's next request may carry different grants.
        fixture.caps.kv_buckets = BTreeSet::new();
        let error = guest_error(B::get(&mut fixture.view(), handle(&bucket), "a".into()).await);
        assert!(matches!(error, store::Error::AccessDenied));
        assert_eq!(fixture.lines.take().len(), 1);
    }

    #[tokio::test]
    async fn a_stale_handle_traps() {
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);
        let stale = handle(&bucket);
        B::drop(&mut kv, bucket).await.expect("drops");
        let result = B::get(&mut kv, stale, "a".into()).await;
        assert!(matches!(result, Err(KvError::Trap(_))));
    }
}
