//! wasi:config over a [`ConfigSource`], which decides what the function may
//! read.
//!
//! [`ConfigSource`]: super::ConfigSource

use super::CapsView;
use super::bindings::wasi::config::store::{self, Error};

impl store::Host for CapsView<'_> {
    async fn get(&mut self, key: String) -> Result<Option<String>, Error> {
        self.caps.config.get(&key).await.map_err(|message| {
            self.deny(&format!("wasi:config get({key:?}) denied: {message}"));
            Error::Upstream(message)
        })
    }

    async fn get_all(&mut self) -> Result<Vec<(String, String)>, Error> {
        self.caps.config.get_all().await.map_err(|message| {
            self.deny(&format!("wasi:config get-all failed: {message}"));
            Error::Upstream(message)
        })
    }
}

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

    #[tokio::test]
    async fn reads_values_and_explains_refusals() {
        let lines = Arc::new(Lines::default());
        let stderr = stderr(&lines);
        let mut caps = Capabilities::none();
        Arc::get_mut(&mut caps).expect("not shared").config = Arc::new(Source);
        let mut table = ResourceTable::new();
        let mut view = CapsView {
            caps: &caps,
            table: &mut table,
            stderr: &stderr,
        };

        let greeting = store::Host::get(&mut view, "greeting".into()).await;
        assert!(matches!(greeting, Ok(Some(value)) if value == "hello"));
        let unset = store::Host::get(&mut view, "unset".into()).await;
        assert!(matches!(unset, Ok(None)));
        let all = store::Host::get_all(&mut view).await;
        assert!(matches!(all, Ok(pairs) if pairs == [("greeting".into(), "hello".into())]));
        assert!(lines.take().is_empty());

        let refused = store::Host::get(&mut view, "db-password".into()).await;
        assert!(matches!(refused, Err(Error::Upstream(message)) if message.contains("--secret")));
        assert_eq!(
            lines.take(),
            [
                "mayfly: wasi:config get(\"db-password\") denied: secret db-password is not \
                 granted to this function (deploy with --secret db-password)"
            ]
        );
    }
}
