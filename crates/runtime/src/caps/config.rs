//! wasi:config over a [`ConfigSource`], which decides what the function may
//! read. Every version Mayfly serves (0.2.0-draft, 0.2.0-rc.1 and
//! 0.2.0-draft-2024-09-27) has the same `store` interface, so each is the
//! same thin adapter over [`CapsView::config_get`] and
//! [`CapsView::config_get_all`].
//!
//! [`ConfigSource`]: super::ConfigSource

use super::CapsView;
use super::bindings::wasi::config::store as draft;
use super::compat::wasi::config0_2_0_draft_2024_09_27::store as draft_2024_09_27;
use super::compat::wasi::config0_2_0_rc_1::store as rc_1;

impl CapsView<'_> {
    /// The value of `key`; a refusal is explained in the log and returned as
    /// its message.
    async fn config_get(&mut self, key: &str) -> Result<Option<String>, String> {
        self.caps.config.get(key).await.map_err(|message| {
            self.deny(&format!("wasi:config get({key:?}) denied: {message}"));
            message
        })
    }

    /// Every value the function may read; a failure is explained in the log.
    async fn config_get_all(&mut self) -> Result<Vec<(String, String)>, String> {
        self.caps.config.get_all().await.map_err(|message| {
            self.deny(&format!("wasi:config get-all failed: {message}"));
            message
        })
    }
}

/// Implements one version's `store` over the shared calls; refusals are
/// that version's `upstream` error.
macro_rules! config_store {
    ($store:ident) => {
        impl $store::Host for CapsView<'_> {
            async fn get(&mut self, key: String) -> Result<Option<String>, $store::Error> {
                self.config_get(&key).await.map_err($store::Error::Upstream)
            }

            async fn get_all(&mut self) -> Result<Vec<(String, String)>, $store::Error> {
                self.config_get_all().await.map_err($store::Error::Upstream)
            }
        }
    };
}

config_store!(draft);
config_store!(rc_1);
config_store!(draft_2024_09_27);

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wasmtime::component::ResourceTable;

    use super::*;
    use crate::caps::tests::{Lines, stderr};
    use crate::caps::{Capabilities, ConfigSource};

    /// `greeting` is set, `db-password` is a secret not granted.
    struct Source;

    #[async_trait::async_trait]
    impl ConfigSource for Source {
        async fn get(&self, key: &str) -> Result<Option<String>, String> {
            match key {
                "greeting" => Ok(Some("hello".into())),
                "db-password" => Err("secret db-password is not granted to this function \
                                      (deploy with --secret db-password)"
                    .into()),
                _ => Ok(None),
            }
        }
        async fn get_all(&self) -> Result<Vec<(String, String)>, String> {
            Ok(vec![("greeting".into(), "hello".into())])
        }
    }

    /// One test per version: each reads values and explains refusals alike.
    macro_rules! reads_values_and_explains_refusals {
        ($name:ident, $store:ident) => {
            #[tokio::test]
            async fn $name() {
                use $store::{Error, Host};
                let lines = Arc::new(Lines::default());
                let stderr = stderr(&lines);
                let mut caps = Capabilities::none();
                Arc::get_mut(&mut caps).expect("not shared").config = Arc::new(Source);
                let mut table = ResourceTable::new();
                let mut memory = crate::meter::MemoryMeter::new(1 << 20);
                let (mut extra_cpu, mut awaited_inference) = Default::default();
                let mut view = CapsView {
                    caps: &caps,
                    table: &mut table,
                    stderr: &stderr,
                    memory: &mut memory,
                    extra_cpu: &mut extra_cpu,
                    awaited_inference: &mut awaited_inference,
                };

                let greeting = Host::get(&mut view, "greeting".into()).await;
                assert!(matches!(greeting, Ok(Some(value)) if value == "hello"));
                let unset = Host::get(&mut view, "unset".into()).await;
                assert!(matches!(unset, Ok(None)));
                let all = Host::get_all(&mut view).await;
                assert!(
                    matches!(all, Ok(pairs) if pairs == [("greeting".into(), "hello".into())])
                );
                assert!(lines.take().is_empty());

                let refused = Host::get(&mut view, "db-password".into()).await;
                assert!(
                    matches!(refused, Err(Error::Upstream(message)) if message.contains("--secret"))
                );
                assert_eq!(
                    lines.take(),
                    [
                        "mayfly: wasi:config get(\"db-password\") denied: secret db-password is \
                         not granted to this function (deploy with --secret db-password)"
                    ]
                );
            }
        };
    }

    reads_values_and_explains_refusals!(draft_reads_values_and_explains_refusals, draft);
    reads_values_and_explains_refusals!(rc_1_reads_values_and_explains_refusals, rc_1);
    reads_values_and_explains_refusals!(
        draft_2024_09_27_reads_values_and_explains_refusals,
        draft_2024_09_27
    );
}
