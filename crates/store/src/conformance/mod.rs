//! The back-end conformance suite: every contract's behaviour as generic
//! cases that any back-end must pass.
//!
//! A back-end implements [`Backend`] (make an empty place for its state,
//! open [`Stores`] over it) and runs every case with
//! [`conformance_suite!`](crate::conformance_suite). Cases are async, like
//! the contracts: the macro runs each one to completion on a tokio runtime
//! of its own ([`block_on`]).
//!
//! ```ignore
//! mayfly_store::conformance_suite!(nats, NatsBackend::default());
//! ```
//!
//! The SQLite back-end runs it in this crate's tests (`sqlite_backend`
//! below). What only one back-end has (migrations, file layout, WAL) is
//! tested next to that back-end, not here. Enable the `conformance`
//! feature to use the suite from another crate.

// Test code: a failed step is a failed case.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod auth;
pub mod changes;
pub mod events;
pub mod logs;
pub mod registry;
pub mod secrets;
pub mod usage;

use std::future::Future;

use crate::Stores;

#[allow(unused_imports)] // Each case module uses a different part of it.
pub(crate) use crate::*;

/// A back-end under test.
pub trait Backend {
    /// Where one instance's state lives (a temporary directory, a server
    /// prefix); dropping it may discard the state.
    type Place;

    /// A new, empty place.
    fn place(&self) -> Self::Place;

    /// The stores over `place`. Opened again after the previous stores
    /// were dropped, they must hold everything the previous ones
    /// acknowledged. Async, so a network back-end can connect here.
    fn open(&self, place: &Self::Place) -> impl Future<Output = Stores> + Send;
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Empty stores in a new place.
pub async fn fresh<B: Backend>(backend: &B) -> (B::Place, Stores) {
    let place = backend.place();
    let stores = backend.open(&place).await;
    (place, stores)
}

/// The embedded back-end: [`Stores::sqlite`] in a temporary directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteBackend;

impl Backend for SqliteBackend {
    type Place = tempfile::TempDir;

    fn place(&self) -> Self::Place {
        tempfile::tempdir().expect("cannot create a temporary directory")
    }

    async fn open(&self, place: &Self::Place) -> Stores {
        Stores::sqlite(place.path()).expect("cannot open the SQLite stores")
    }
}

/// Runs one case to completion on a fresh tokio runtime (current-thread,
/// with timers): what each test [`conformance_suite!`](crate::conformance_suite)
/// generates calls, so the suite needs no test macro of its own. A case
/// that runs calls concurrently joins futures or spawns tasks on it, so
/// the calls are in flight at the same time.
pub fn block_on<F: Future>(case: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
        .block_on(case)
}

/// Defines a test module `$name` that runs every conformance case against
/// the back-end `$backend` (an expression of a type implementing
/// [`Backend`](crate::conformance::Backend)); after a `;`, only the cases
/// of the named contracts (`registry`, `logs`, `usage`, `events`, `auth`,
/// `secrets`), for a back-end that implements some of them.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $backend:expr) => {
        $crate::conformance_suite!($name, $backend; registry, logs, usage, events, auth, secrets);
    };
    ($name:ident, $backend:expr; $($contract:ident),+ $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $( $crate::conformance_suite!(@contract $contract, $backend); )+
        }
    };
    (@contract registry, $backend:expr) => {
        $crate::conformance_suite!(@cases registry, $backend;
            registry {
                versions_increase_and_the_newest_is_live,
                a_taken_route_changes_nothing,
                delete_removes_versions_and_routes,
                aliases_round_trip_and_record_the_previous_version,
                every_alias_move_is_kept_with_its_cause_and_policy,
                an_aliased_version_cannot_be_deleted,
                retention_keeps_the_newest_and_every_aliased_version,
                a_deploy_over_a_live_version_it_did_not_see_is_refused,
                an_alias_move_from_a_stale_read_is_refused_and_changes_nothing,
            }
            changes { registry_changes_name_the_function }
        );
    };
    (@contract logs, $backend:expr) => {
        $crate::conformance_suite!(@cases logs, $backend;
            logs {
                logs_tail_and_follow,
                function_logs_are_pruned_per_function_by_lines_and_bytes,
            }
        );
    };
    (@contract usage, $backend:expr) => {
        $crate::conformance_suite!(@cases usage, $backend;
            usage {
                appending_a_batch_twice_counts_it_once,
                the_same_request_id_on_two_functions_is_two_records,
                a_client_id_is_kept_and_never_deduplicates,
                summary_by_function,
                summary_by_version,
                summary_by_hour_and_day,
                summary_window_is_from_inclusive_to_exclusive,
                summary_for_one_function,
                periods_before_1970_round_down,
                records_page_by_seq_and_filter_by_function,
                huge_values_are_clamped_not_fatal,
            }
        );
    };
    (@contract events, $backend:expr) => {
        $crate::conformance_suite!(@cases events, $backend;
            events {
                kv_put_and_get_round_trip,
                kv_revisions_increase_across_keys_and_are_never_reused,
                kv_compare_and_swap_by_revision,
                kv_put_if_absent,
                kv_delete_with_conditions,
                kv_list_by_prefix_with_paging,
                kv_list_prefix_is_literal,
                kv_buckets_count_keys_and_bytes,
                kv_trigger_delivers_puts_and_deletes_under_its_prefix,
                kv_trigger_prefix_is_literal,
                kv_events_are_delivered_one_at_a_time_per_key,
                a_retried_kv_event_still_blocks_later_ones_of_its_key,
                next_visible_ignores_events_waiting_behind_their_key,
                every_watching_function_gets_its_own_copy,
                a_removed_kv_trigger_emits_nothing,
                object_list_by_prefix_with_paging,
                object_triggers_filter_by_prefix_suffix_and_change,
                queue_send_receive_ack,
                an_expired_visibility_redelivers_with_the_next_attempt,
                queue_stats_count_messages_and_in_flight_but_not_inboxes,
                receive_does_not_reach_inboxes,
                enqueued_events_keep_their_attributes,
                a_retry_hides_the_event_until_its_delay,
                a_postpone_does_not_count_the_attempt,
                dead_letters_can_be_read_redriven_and_purged,
                redrive_and_purge_all_and_paging,
                a_dead_named_queue_message_keeps_its_subject,
                a_dead_inbox_event_keeps_its_own_trigger,
                a_stale_settlement_does_nothing,
                release_leases_frees_the_dispatchers_claims_only,
                everything_survives_a_reopen,
                add_trigger_returns_an_identical_one,
                remove_function_removes_only_its_own_state,
                fire_schedule_stores_the_event_and_the_run,
                trigger_json_round_trips,
                concurrent_writes_and_claims_keep_per_key_order,
                concurrent_receivers_never_share_a_message,
            }
            changes { trigger_changes_name_the_trigger }
        );
    };
    (@contract auth, $backend:expr) => {
        $crate::conformance_suite!(@cases auth, $backend;
            auth { audit_is_pruned_by_age_and_by_count }
            changes { token_changes_name_the_token }
        );
    };
    (@contract secrets, $backend:expr) => {
        $crate::conformance_suite!(@cases secrets, $backend;
            secrets {
                secrets_versions_increase_and_survive_reopen,
                secrets_seal_sees_its_version_and_a_failed_seal_changes_nothing,
                secrets_delete_and_recreate_never_reuse_a_version,
                secrets_reseal_all_is_one_transaction,
            }
            changes { secret_changes_name_the_secret }
        );
    };
    (@cases $contract:ident, $backend:expr; $($module:ident { $($case:ident),* $(,)? })*) => {
        mod $contract {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(
                    #[test]
                    fn $case() {
                        $crate::conformance::block_on(async {
                            $crate::conformance::$module::$case(&$backend).await
                        });
                    }
                )*
            )*
        }
    };
}

#[cfg(test)]
crate::conformance_suite!(sqlite_backend, crate::conformance::SqliteBackend);
