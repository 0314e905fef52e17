//! wasi:keyvalue 0.2.0-draft2 (store, atomics, batch), as Spin 3 guests
//! import it: the shared calls of `keyvalue.rs` behind this version's types.
//! It differs from 0.2.0-draft in its list cursor (a string: the decimal
//! count of keys already returned), its signed `increment`, its `get-many`
//! shape and its compare-and-swap handles. `increment` and `swap` are built on
//! [`KeyValueBackend::compare_and_swap`]; counters are decimal text, as with
//! 0.2.0-draft, so both versions count the same keys.
//!
//! [`KeyValueBackend::compare_and_swap`]: super::KeyValueBackend::compare_and_swap

use wasmtime::component::Resource;

use super::CapsView;
use super::compat::wasi::keyvalue::atomics::{self, CasError};
use super::compat::wasi::keyvalue::batch;
use super::compat::wasi::keyvalue::store::{self, KeyResponse};
use super::resources::{Bucket, Cas, KvError};

/// Tries of a signed `increment` that keeps losing its compare-and-swap to
/// other writers.
const INCREMENT_ATTEMPTS: usize = 64;

impl CapsView<'_> {
    /// Adds a signed `delta` to the decimal number at `key` (absent = 0) with
    /// compare-and-swap, retrying while other writers get there first.
    async fn kv_increment_signed(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
        delta: i64,
    ) -> Result<i64, KvError> {
        let name = self.granted(bucket)?;
        let backend = &self.caps.keyvalue;
        let increment = async {
            for _ in 0..INCREMENT_ATTEMPTS {
                let value = backend.get(name, key).await?;
                let current = match &value {
                    Some(bytes) => std::str::from_utf8(bytes)
                        .ok()
                        .and_then(|text| text.trim().parse::<i64>().ok())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "key `{key}` holds a value that is not a decimal number, so \
                                 it cannot be incremented"
                            )
                        })?,
                    None => 0,
                };
                let next = current
                    .checked_add(delta)
                    .ok_or_else(|| anyhow::anyhow!("incrementing `{key}` would overflow an s64"))?;
                let new = next.to_string().into_bytes();
                if backend
                    .compare_and_swap(name, key, value.as_deref(), new)
                    .await?
                {
                    return Ok(next);
                }
            }
            anyhow::bail!("`{key}` changed too often to increment; try again")
        };
        increment.await.map_err(|e| KvError::backend(name, e))
    }

    /// Reads `key` and opens a compare-and-swap against that value.
    async fn cas_open(&mut self, bucket: String, key: String) -> Result<Resource<Cas>, KvError> {
        let current = self
            .caps
            .keyvalue
            .get(&bucket, &key)
            .await
            .map_err(|e| KvError::backend(&bucket, e))?;
        Ok(self.table.push(Cas {
            bucket,
            key,
            current,
        })?)
    }

    /// Sets the key to `value` if it still holds what `cas` read: `None`
    /// when it did, else a fresh handle holding the value now.
    async fn cas_swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> Result<Option<Resource<Cas>>, KvError> {
        let Cas {
            bucket,
            key,
            current,
        } = self.table.delete(cas)?;
        self.check_grant(&bucket)?;
        let swapped = self
            .caps
            .keyvalue
            .compare_and_swap(&bucket, &key, current.as_deref(), value)
            .await
            .map_err(|e| KvError::backend(&bucket, e))?;
        if swapped {
            Ok(None)
        } else {
            self.cas_open(bucket, key).await.map(Some)
        }
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
        cursor: Option<String>,
    ) -> Result<KeyResponse, KvError> {
        // The cursor is the decimal count of keys already returned, as the
        // backend pages; anything else did not come from us.
        let start = match cursor.as_deref() {
            None => 0,
            Some(text) => text.parse::<u64>().map_err(|_| {
                KvError::Other(format!(
                    "list-keys cursor {text:?} was not returned by this host"
                ))
            })?,
        };
        let (keys, next) = self.kv_list_keys(&bucket, start).await?;
        Ok(KeyResponse {
            keys,
            cursor: next.map(|n| n.to_string()),
        })
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
        delta: i64,
    ) -> Result<i64, KvError> {
        self.kv_increment_signed(&bucket, &key, delta).await
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), CasError>> {
        Ok(match self.cas_swap(cas, value).await {
            Ok(None) => Ok(()),
            Ok(Some(fresh)) => Err(CasError::CasFailed(fresh)),
            Err(error) => Err(CasError::StoreError(store::Host::convert_error(
                self, error,
            )?)),
        })
    }
}

impl atomics::HostCas for CapsView<'_> {
    async fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Resource<Cas>, KvError> {
        let name = self.granted(&bucket)?.to_string();
        self.cas_open(name, key).await
    }

    async fn current(&mut self, cas: Resource<Cas>) -> Result<Option<Vec<u8>>, KvError> {
        let cas = self.table.get(&cas)?;
        self.check_grant(&cas.bucket)?;
        Ok(cas.current.clone())
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for CapsView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, KvError> {
        self.kv_get_many(&bucket, keys).await
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
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::caps::keyvalue::tests::{Fixture, handle, ok};

    /// The error a call returned to the guest, as draft2's `error`.
    fn guest_error<T: std::fmt::Debug>(result: Result<T, KvError>) -> store::Error {
        match result {
            Err(error) => error
                .into_guest(store::Error::AccessDenied, store::Error::Other)
                .unwrap_or_else(|trap| panic!("trapped: {trap:#}")),
            Ok(value) => panic!("succeeded: {value:?}"),
        }
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
    async fn a_granted_bucket_works() {
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

        let error = guest_error(B::set(&mut kv, handle(&bucket), String::new(), vec![]).await);
        assert!(matches!(error, store::Error::Other(message) if message == "empty key"));

        B::drop(&mut kv, bucket).await.expect("drops");
        assert!(kv.table.is_empty());
        assert!(fixture.lines.take().is_empty());
    }

    #[tokio::test]
    async fn list_keys_follows_the_string_cursor() {
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

        let error = guest_error(B::list_keys(&mut kv, handle(&bucket), Some("k:12".into())).await);
        assert!(matches!(error, store::Error::Other(message) if message.contains("k:12")));
    }

    #[tokio::test]
    async fn increment_is_signed_and_shares_counters_with_draft() {
        use crate::caps::bindings::wasi::keyvalue::{atomics as draft_atomics, store as draft};
        let mut fixture = Fixture::granting(&["counters"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "counters".into()).await);
        let hits = || "hits".to_string();
        assert_eq!(ok(by_key(&mut kv, &bucket, hits(), 5).await), 5);
        assert_eq!(ok(by_key(&mut kv, &bucket, hits(), -7).await), -2);
        let error = guest_error(by_key(&mut kv, &bucket, hits(), i64::MIN).await);
        assert!(matches!(error, store::Error::Other(message) if message.contains("overflow")));

        // A 0.2.0-draft guest counts the same decimal values.
        let old = ok(draft::Host::open(&mut kv, "counters".into()).await);
        let key = || "shared".to_string();
        assert_eq!(ok(by_key(&mut kv, &bucket, key(), 3).await), 3);
        let draft_total = draft_atomics::Host::increment(&mut kv, handle(&old), key(), 4).await;
        assert_eq!(ok(draft_total), 7);
        assert_eq!(ok(by_key(&mut kv, &bucket, key(), -1).await), 6);

        ok(store::HostBucket::set(&mut kv, handle(&bucket), "text".into(), b"x".to_vec()).await);
        let error = guest_error(by_key(&mut kv, &bucket, "text".into(), 1).await);
        assert!(matches!(error, store::Error::Other(message) if message.contains("decimal")));
    }

    async fn by_key(
        kv: &mut CapsView<'_>,
        bucket: &Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, KvError> {
        atomics::Host::increment(kv, handle(bucket), key, delta).await
    }

    #[tokio::test]
    async fn compare_and_swap_retries_with_a_fresh_handle() {
        use atomics::HostCas as C;
        use store::HostBucket as B;
        let mut fixture = Fixture::granting(&["orders"]);
        let mut kv = fixture.view();
        let bucket = ok(store::Host::open(&mut kv, "orders".into()).await);

        // An absent key swaps in.
        let cas = ok(C::new(&mut kv, handle(&bucket), "a".into()).await);
        assert_eq!(ok(C::current(&mut kv, handle(&cas)).await), None);
        let swapped = atomics::Host::swap(&mut kv, cas, b"1".to_vec()).await;
        assert!(matches!(swapped, Ok(Ok(()))));

        // Another write in between fails the swap and hands back the value now.
        let cas = ok(C::new(&mut kv, handle(&bucket), "a".into()).await);
        assert_eq!(
            ok(C::current(&mut kv, handle(&cas)).await),
            Some(b"1".to_vec())
        );
        ok(B::set(&mut kv, handle(&bucket), "a".into(), b"2".to_vec()).await);
        let fresh = match atomics::Host::swap(&mut kv, cas, b"3".to_vec()).await {
            Ok(Err(CasError::CasFailed(fresh))) => fresh,
            Ok(Err(CasError::StoreError(error))) => panic!("store error: {error:?}"),
            Ok(Ok(())) => panic!("swapped over a newer value"),
            Err(trap) => panic!("trapped: {trap:#}"),
        };
        assert_eq!(
            ok(C::current(&mut kv, handle(&fresh)).await),
            Some(b"2".to_vec())
        );
        let swapped = atomics::Host::swap(&mut kv, fresh, b"3".to_vec()).await;
        assert!(matches!(swapped, Ok(Ok(()))));
        assert_eq!(
            ok(B::get(&mut kv, handle(&bucket), "a".into()).await),
            Some(b"3".to_vec())
        );

        // A dropped handle is gone; using it again traps.
        let cas = ok(C::new(&mut kv, handle(&bucket), "a".into()).await);
        let stale = handle(&cas);
        C::drop(&mut kv, cas).await.expect("drops");
        assert!(matches!(
            C::current(&mut kv, stale).await,
            Err(KvError::Trap(_))
        ));
        B::drop(&mut kv, bucket).await.expect("drops");
        assert!(kv.table.is_empty());
    }

    #[tokio::test]
    async fn handles_whose_grant_is_gone_are_denied() {
        use atomics::HostCas as C;
        let mut fixture = Fixture::granting(&["orders"]);
        let bucket = ok(store::Host::open(&mut fixture.view(), "orders".into()).await);
        let cas = ok(C::new(&mut fixture.view(), handle(&bucket), "a".into()).await);
        // A kept instance's next request may carry different grants.
        fixture.caps.kv_buckets = BTreeSet::new();
        let mut kv = fixture.view();
        let error = guest_error(store::HostBucket::get(&mut kv, handle(&bucket), "a".into()).await);
        assert!(matches!(error, store::Error::AccessDenied));
        let error = guest_error(C::current(&mut kv, handle(&cas)).await);
        assert!(matches!(error, store::Error::AccessDenied));
        let swapped = atomics::Host::swap(&mut kv, cas, b"1".to_vec()).await;
        assert!(matches!(
            swapped,
            Ok(Err(CasError::StoreError(store::Error::AccessDenied)))
        ));
        let error = guest_error(by_key(&mut kv, &bucket, "n".into(), 1).await);
        assert!(matches!(error, store::Error::AccessDenied));
        assert_eq!(fixture.lines.take().len(), 4);
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
                ("a".to_string(), Some(b"1".to_vec())),
                ("missing".to_string(), None),
                ("b".to_string(), Some(b"2".to_vec()))
            ]
        );
        ok(batch::Host::delete_many(&mut kv, handle(&bucket), keys.clone()).await);
        let got = ok(batch::Host::get_many(&mut kv, handle(&bucket), keys).await);
        assert!(got.iter().all(|(_, value)| value.is_none()));
    }
}
