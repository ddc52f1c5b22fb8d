//! The provider conformance suite: the same cases run against every backend. A backend
//! declares what it guarantees ([`eventbroker::provider::ProviderFeatures`]) and a case skips
//! only what its backend does not claim. Backends needing a service skip loudly when it is
//! unreachable (a failure under `EVENTBROKER_REQUIRE_SERVICES=1`).
//!
//! A backend crate runs every case with one line in its tests:
//! `eventbroker_testkit::conformance!(name, backend_expression);`.

// Each case is named for the property it checks (`publish_then_consume_keeps_every_field`);
// helpers and cases with more to say carry doc comments.
#[allow(missing_docs)]
pub mod cases;
pub mod handler_store;
pub mod keyvalue;

/// Generates one `#[tokio::test]` per conformance case, in a module named `$backend`, each
/// running its case on the backend `$open` (an expression of type
/// `Option<eventbroker_testkit::backends::Backend>`, evaluated once per test; `None` skips the
/// test, after the loud message of [`crate::services::available`]).
///
/// ```ignore
/// eventbroker_testkit::conformance!(redis, common::backend());
/// ```
#[macro_export]
macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance::cases;

            $crate::conformance!(@cases $open;
                publish_then_consume_keeps_every_field,
                many_publishers_and_consumers_deliver_each_event_once,
                negative_acknowledgement_redelivers,
                retry_redelivers_after_its_delay_with_the_update,
                unacknowledged_delivery_is_redelivered_after_its_lease,
                keep_alive_holds_the_lease,
                closing_and_reopening_consumers_loses_nothing,
                every_consumer_group_receives_every_event,
                watchers_receive_only_matching_types,
                a_stalled_watcher_is_cut_and_holds_a_bounded_buffer,
                store_get_update_delete,
                list_filters_order_and_paginate,
                concurrent_publishers_while_consuming_skip_nothing,
                requeue_makes_a_finished_event_deliverable_again,
                close_is_idempotent_and_ends_streams_and_consumers,
                duplicate_ids_are_rejected,
                stats_count_events_by_status,
                a_new_provider_instance_sees_everything_of_a_closed_one,
                hosts_sharing_the_backend_share_work_and_watch_each_other,
                ping_answers_until_closed,
                a_group_created_later_receives_every_event_with_its_own_state,
                a_retry_or_failure_in_one_group_leaves_the_other_completed,
                requeue_accepts_an_event_whose_processing_was_abandoned,
                a_release_never_undoes_a_finished_state,
                a_claim_that_records_processing_shows_it,
            );
        }
    };
    (@cases $open:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                if let Some(backend) = $open.await {
                    cases::$case(&backend).await;
                }
            }
        )+
    };
}
