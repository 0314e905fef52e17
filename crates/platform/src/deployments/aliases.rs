//! Aliases and their moves: set (with an optional canary), roll back,
//! delete, and apply automatic canaries' verdicts; each move stores its
//! cause and switches the catalog under the change lock.

use std::sync::Arc;
use std::time::Duration;

use mayfly_runtime::RequestLabels;
use mayfly_store::{
    AliasRecord, CanaryRecord, Expected, LIVE_ALIAS, MoveCause, StoreError, WEIGHT_SCALE_BP,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Deployments, slot_limits};
use crate::error::PlatformError;
use crate::rollout::{Progress, Verdict};
use crate::validate::{parse_routes, validate_alias};

impl Deployments {
    /// A function's aliases, `live` first.
    pub(crate) async fn aliases(&self, name: &str) -> Result<Vec<AliasRecord>, PlatformError> {
        let aliases = self.parts.registry.aliases(name).await?;
        if aliases.is_empty() {
            return Err(PlatformError::NotFound(name.to_string()));
        }
        Ok(aliases)
    }

    /// Points `alias` of `name` at `version`, with an optional canary taking
    /// `weight_bp` basis points of its traffic. Moving `live` makes the
    /// version's routes the function's (409 on a conflict, changing
    /// nothing) and records the version it left. The catalog is switched
    /// before this returns; nothing is recompiled unless the version's
    /// artifact is missing from disk.
    pub(crate) async fn set_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
    ) -> Result<AliasRecord, PlatformError> {
        validate_alias(alias)?;
        if let Some(canary) = canary {
            if canary.weight_bp == 0 || canary.weight_bp >= WEIGHT_SCALE_BP {
                return Err(PlatformError::BadRequest(format!(
                    "the canary weight is {}%: give more than 0% and less than 100%",
                    f64::from(canary.weight_bp) / 100.0
                )));
            }
            if canary.version == version {
                return Err(PlatformError::BadRequest(format!(
                    "the canary is version {version}, the alias's own version: give another one"
                )));
            }
        }
        let _change = self.changes.lock().await;
        // Where this node sees the alias: the store refuses the move if it
        // has moved since.
        let seen = self
            .parts
            .catalog
            .load()
            .by_name
            .get(name)
            .and_then(|served| served.alias(alias).map(|target| target.deployed.version));
        self.switch_alias(
            name,
            alias,
            version,
            canary,
            Expected::seen(seen),
            MoveCause::Set,
            "",
        )
        .await
    }

    /// Moves `live` of `name` back to its previous version (or, if it has
    /// none left, the newest one below it), clearing any canary. Returns
    /// the new `live` and the version it left.
    pub(crate) async fn rollback(&self, name: &str) -> Result<(AliasRecord, u64), PlatformError> {
        let _change = self.changes.lock().await;
        let aliases = self.parts.registry.aliases(name).await?;
        let versions = self.parts.registry.versions(name).await?;
        let live = aliases
            .into_iter()
            .find(|a| a.alias == LIVE_ALIAS)
            .ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        let Some(target) = rollback_target(&live, &numbers) else {
            return Err(PlatformError::Conflict(format!(
                "nothing to roll back to: `{name}` is live at version {} and has no earlier \
                 version (see `mayfly versions {name}`)",
                live.version
            )));
        };
        let record = self
            .switch_alias(
                name,
                LIVE_ALIAS,
                target,
                None,
                Expected::Version(live.version),
                MoveCause::Rollback,
                "",
            )
            .await?;
        tracing::info!(
            function = name,
            from = live.version,
            to = target,
            "rolled back"
        );
        Ok((record, live.version))
    }

    /// Moves an alias, under the change lock: checks the versions and
    /// their artifacts before anything is stored, then stores the move and
    /// swaps the catalog. `expected` is where the caller saw the alias;
    /// the store refuses the move if it has moved since.
    #[allow(clippy::too_many_arguments)]
    async fn switch_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        expected: Expected,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord, PlatformError> {
        let prior = self.served(name)?;
        let mut live_config = None;
        for wanted in std::iter::once(version).chain(canary.map(|c| c.version)) {
            let record = self
                .parts
                .registry
                .version(name, wanted)
                .await?
                .ok_or_else(|| StoreError::VersionNotFound {
                    function: name.to_string(),
                    version: wanted,
                })?;
            // A version already in service has its artifact loaded or on disk.
            if prior.version(wanted).is_none() {
                self.parts.artifacts.ensure(&record).await?;
            }
            if wanted == version && alias == LIVE_ALIAS {
                live_config = Some(record.config);
            }
        }
        if let Some(config) = &live_config {
            // The routes are checked (again) by the store, in its transaction.
            let routes = parse_routes(&config.routes).map_err(|e| {
                PlatformError::Internal(anyhow::anyhow!("stored routes of {name} are invalid: {e}"))
            })?;
            if let Some((route, owner)) = self.route_taken(name, &routes) {
                return Err(PlatformError::Conflict(format!(
                    "route `{route}` of version {version} is already served by function \
                     `{owner}`"
                )));
            }
            self.parts
                .admission
                .configure(name, slot_limits(config, &self.parts.config.scaling))
                .map_err(PlatformError::BadRequest)?;
        }
        let stored = self
            .parts
            .registry
            .set_alias(name, alias, version, canary, expected, cause, detail)
            .await;
        let record = match stored {
            Ok(record) => record,
            Err(error) => {
                if live_config.is_some() {
                    self.restore_admission(name, Some(&prior));
                }
                return Err(error.into());
            }
        };
        let served = self.build_served(name, Some(&prior)).await?;
        self.swap_in(served, Some(&prior));
        tracing::info!(
            function = name,
            alias,
            version,
            canary = ?canary,
            cause = cause.as_str(),
            "alias set"
        );
        Ok(record)
    }

    /// Applies an automatic canary's verdict, if the rollout that reached
    /// it still judges the alias (a user may have moved or re-set it
    /// meanwhile): promotion points the alias at the canary, rollback takes
    /// the canary out. The move is recorded with its figures and written to
    /// the function's log. Every catalog rebuild, under the change lock
    /// held here, keeps a rollout only while its alias has that canary and
    /// policy, so "current" needs no store read.
    async fn apply_verdict(self: &Arc<Self>, verdict: Verdict) {
        let Verdict {
            rollout_id,
            function: name,
            alias,
            stable_version,
            canary_version,
            promote,
            detail,
        } = verdict;
        let _change = self.changes.lock().await;
        if !self.parts.rollouts.is_current(&name, &alias, rollout_id) {
            return;
        }
        let (version, cause, verb) = if promote {
            (canary_version, MoveCause::AutoPromote, "promoted")
        } else {
            (stable_version, MoveCause::AutoRollback, "rolled back")
        };
        let line = match self
            .switch_alias(
                &name,
                &alias,
                version,
                None,
                // The version the judged alias pointed at.
                Expected::Version(stable_version),
                cause,
                &detail,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(function = %name, alias, canary_version, %detail, "canary {verb}");
                format!("mayfly: canary version {canary_version} on `{alias}` {verb}: {detail}")
            }
            Err(error) => {
                // A passing failure (a busy database) is judged again on the
                // next invocation, so it does not strand the canary; a
                // refusal (a route another function took) waits for the user.
                if matches!(error, PlatformError::Internal(_)) {
                    self.reopen_rollout_later(&name, &alias, rollout_id);
                }
                tracing::warn!(function = %name, alias, canary_version, "canary not {verb}: {error}");
                format!(
                    "mayfly: canary version {canary_version} on `{alias}` should be {verb} \
                     ({detail}) but the move failed: {error}"
                )
            }
        };
        let labels = RequestLabels {
            function: name,
            version: canary_version,
            request_id: "-".to_string(),
            trigger: "rollout",
            cold_start: false,
            load: std::time::Duration::ZERO,
        };
        mayfly_runtime::LogSink::line(
            self.parts.logs.as_ref(),
            &labels,
            mayfly_runtime::LogStream::Stderr,
            &line,
        );
    }

    /// Lets rollout `id` reach its verdict again after a second, so a
    /// failure that persists is retried once a second, not per request.
    fn reopen_rollout_later(self: &Arc<Self>, name: &str, alias: &str, id: u64) {
        let (deployments, name, alias) = (self.clone(), name.to_string(), alias.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            deployments.parts.rollouts.reopen(&name, &alias, id);
        });
    }

    /// Where the automatic canary on `alias` of `name` stands, if it has one.
    pub(crate) fn rollout_progress(&self, name: &str, alias: &str) -> Option<Progress> {
        self.parts.rollouts.progress(name, alias)
    }

    /// The last `limit` moves of `name`'s aliases, newest first.
    pub(crate) async fn alias_moves(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<mayfly_store::AliasMove>, PlatformError> {
        Ok(self.parts.registry.alias_moves(name, limit).await?)
    }

    /// Deletes a named alias of `name` (`live` cannot be deleted).
    pub(crate) async fn delete_alias(&self, name: &str, alias: &str) -> Result<(), PlatformError> {
        validate_alias(alias)?;
        if alias == LIVE_ALIAS {
            return Err(PlatformError::BadRequest(format!(
                "the `{LIVE_ALIAS}` alias cannot be deleted: it is what `{name}`'s routes serve; \
                 move it with `mayfly alias set` or delete the function"
            )));
        }
        let _change = self.changes.lock().await;
        let prior = self.served(name)?;
        let aimed: Vec<String> = self
            .parts
            .events
            .triggers(Some(name))
            .iter()
            .filter(|t| t.spec.alias.as_deref() == Some(alias))
            .map(|t| t.id.to_string())
            .collect();
        if !aimed.is_empty() {
            return Err(PlatformError::Conflict(format!(
                "alias `{alias}` of `{name}` receives the events of trigger(s) {}: remove them \
                 first (`mayfly trigger remove <id>`)",
                aimed.join(", ")
            )));
        }
        let existed = self.parts.registry.delete_alias(name, alias).await?;
        if !existed {
            return Err(PlatformError::Missing(format!(
                "function `{name}` has no alias `{alias}`: see `mayfly alias list {name}`"
            )));
        }
        let served = self.build_served(name, Some(&prior)).await?;
        self.swap_in(served, Some(&prior));
        tracing::info!(function = name, alias, "alias deleted");
        Ok(())
    }

    /// Deletes one version of `name`; refused (409, naming them) while an
    /// alias or canary points at it.
    pub(crate) async fn delete_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        self.parts.registry.delete_version(name, version).await?;
        tracing::info!(function = name, version, "version deleted");
        Ok(())
    }

    /// Applies automatic canaries' verdicts, one at a time, until `stop`
    /// is cancelled.
    pub(crate) fn judge(
        self: Arc<Self>,
        mut verdicts: mpsc::UnboundedReceiver<Verdict>,
        stop: CancellationToken,
    ) {
        tokio::spawn(async move {
            loop {
                let verdict = tokio::select! {
                    verdict = verdicts.recv() => verdict,
                    () = stop.cancelled() => None,
                };
                let Some(verdict) = verdict else {
                    return;
                };
                self.apply_verdict(verdict).await;
            }
        });
    }
}

/// Where a rollback of `live` goes: its previous version if that still
/// exists, else the newest version below it.
fn rollback_target(live: &AliasRecord, versions: &[u64]) -> Option<u64> {
    live.previous_version
        .filter(|previous| *previous != live.version && versions.contains(previous))
        .or_else(|| versions.iter().copied().filter(|v| *v < live.version).max())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(version: u64, previous: Option<u64>) -> AliasRecord {
        AliasRecord {
            function: "f".into(),
            alias: LIVE_ALIAS.into(),
            version,
            canary: None,
            previous_version: previous,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_rollback_goes_to_the_previous_version_or_the_newest_below() {
        assert_eq!(rollback_target(&live(7, Some(6)), &[5, 6, 7]), Some(6));
        // After a rollback the previous one is the version left: back again.
        assert_eq!(rollback_target(&live(6, Some(7)), &[5, 6, 7]), Some(7));
        // The previous version is gone (retention, delete): the newest below.
        assert_eq!(rollback_target(&live(7, Some(3)), &[5, 6, 7]), Some(6));
        assert_eq!(rollback_target(&live(7, None), &[2, 7, 9]), Some(2));
        assert_eq!(rollback_target(&live(1, None), &[1, 2]), None);
        assert_eq!(rollback_target(&live(1, Some(1)), &[1]), None);
    }
}
