//! The dispatch path of one event attempt, run by the worker pool for every event (sync
//! publishes included): run the matching handlers that still need to run, then decide — in
//! this one place — the event's next status and whether, and when, to retry.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use futures::future::join_all;

use super::WeakBroker;
use super::handler::HandlerContext;
use super::registry::Subscription;
use crate::event::{Event, EventStatus, Failure, FailureKind, HandlerOutcome, OutcomeState};
use crate::provider::StatusUpdate;

/// What happens to an event after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Every handler succeeded (or none matched).
    Complete,
    /// A handler failed for good; nothing is left to retry. The event is a dead letter.
    Fail {
        /// Summary of the permanent failures.
        error: String,
    },
    /// Some handlers failed transiently and have retries left.
    Retry {
        /// Summary of the failures being retried.
        error: String,
        /// Backoff before the next attempt.
        delay: Duration,
    },
}

/// Runs, concurrently, every subscription in `subscriptions` that has not already succeeded or
/// failed for good on `event`, and returns the merged outcomes of all handlers.
pub(crate) async fn run_handlers(
    event: &Event,
    subscriptions: &[Arc<Subscription>],
    broker: &WeakBroker,
) -> Vec<HandlerOutcome> {
    let previous: HashMap<&str, &HandlerOutcome> = event
        .handlers
        .iter()
        .map(|outcome| (outcome.handler.as_str(), outcome))
        .collect();
    let mut carried = Vec::new();
    let mut runs = Vec::new();
    for subscription in subscriptions {
        match previous.get(subscription.name.as_str()) {
            Some(done) if done.state != OutcomeState::Retrying => carried.push((*done).clone()),
            earlier => {
                let attempt = earlier.map_or(0, |o| o.attempts) + 1;
                runs.push(invoke(subscription.clone(), event, attempt, broker.clone()));
            }
        }
    }
    // Handlers that had a retry pending but are no longer subscribed cannot run again:
    // record that instead of forgetting them.
    for outcome in &event.handlers {
        let subscribed = subscriptions.iter().any(|s| s.name == outcome.handler);
        if !subscribed {
            let mut outcome = outcome.clone();
            if outcome.state == OutcomeState::Retrying {
                outcome.state = OutcomeState::Failed;
                outcome.last_error = Some(Failure::new(
                    FailureKind::Host,
                    "handler was unsubscribed before its retry could run",
                ));
                outcome.finished_at = Utc::now();
            }
            carried.push(outcome);
        }
    }
    let mut outcomes = carried;
    outcomes.extend(join_all(runs).await);
    outcomes.sort_by(|a, b| a.handler.cmp(&b.handler));
    outcomes
}

/// One invocation under the subscription's timeout, with panics caught.
async fn invoke(
    subscription: Arc<Subscription>,
    event: &Event,
    attempt: u32,
    broker: WeakBroker,
) -> HandlerOutcome {
    let ctx = HandlerContext::new(
        &subscription.name,
        event,
        attempt,
        subscription.timeout,
        broker,
    );
    subscription
        .counters
        .invocations
        .fetch_add(1, Ordering::Relaxed);
    let span =
        tracing::info_span!("invoke", handler = %subscription.name, event_id = %event.id, attempt);
    let call = tracing::Instrument::instrument(
        AssertUnwindSafe(subscription.handler.handle(&ctx, event)).catch_unwind(),
        span,
    );
    let result = match tokio::time::timeout(subscription.timeout, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(Failure::new(FailureKind::Panic, panic_message(&*panic))),
        Err(_) => Err(Failure::new(
            FailureKind::Timeout,
            format!(
                "did not finish within {}",
                humantime::format_duration(subscription.timeout)
            ),
        )),
    };
    let (state, last_error) = match result {
        Ok(()) => {
            subscription
                .counters
                .succeeded
                .fetch_add(1, Ordering::Relaxed);
            (OutcomeState::Succeeded, None)
        }
        Err(failure) if failure.is_deferral() => {
            // Deferred, not attempted: retried later without spending the retry budget.
            tracing::debug!(handler = %subscription.name, event_id = %event.id, "handler busy; event deferred");
            return HandlerOutcome {
                handler: subscription.name.clone(),
                version: ctx.version(),
                state: OutcomeState::Retrying,
                attempts: attempt - 1,
                last_error: Some(failure),
                finished_at: Utc::now(),
            };
        }
        Err(failure) => {
            subscription.counters.failed.fetch_add(1, Ordering::Relaxed);
            let retries_left = attempt <= subscription.retry.max_retries;
            let state = if failure.retryable && retries_left {
                OutcomeState::Retrying
            } else {
                OutcomeState::Failed
            };
            tracing::warn!(
                handler = %subscription.name,
                event_id = %event.id,
                attempt,
                kind = %failure.kind,
                will_retry = state == OutcomeState::Retrying,
                "handler failed: {}",
                failure.message
            );
            (state, Some(failure))
        }
    };
    HandlerOutcome {
        handler: subscription.name.clone(),
        version: ctx.version(),
        state,
        attempts: attempt,
        last_error,
        finished_at: Utc::now(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    format!("handler panicked: {text}")
}

/// Decides what follows an attempt, from the merged outcomes.
pub(crate) fn decide(outcomes: &[HandlerOutcome], subscriptions: &[Arc<Subscription>]) -> Decision {
    let summary = |state: OutcomeState| {
        outcomes
            .iter()
            .filter(|o| o.state == state)
            .map(|o| match &o.last_error {
                Some(failure) => format!("{}: {failure}", o.handler),
                None => o.handler.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let retrying: Vec<&HandlerOutcome> = outcomes
        .iter()
        .filter(|o| o.state == OutcomeState::Retrying)
        .collect();
    if !retrying.is_empty() {
        let delay = retrying
            .iter()
            .filter_map(|o| {
                let subscription = subscriptions.iter().find(|s| s.name == o.handler)?;
                Some(subscription.retry.delay(o.attempts))
            })
            .max()
            .unwrap_or_default();
        return Decision::Retry {
            error: summary(OutcomeState::Retrying),
            delay,
        };
    }
    if outcomes.iter().any(|o| o.state == OutcomeState::Failed) {
        return Decision::Fail {
            error: summary(OutcomeState::Failed),
        };
    }
    Decision::Complete
}

/// The status update that records `decision` for `event`.
pub(crate) fn status_update(
    event: &Event,
    outcomes: Vec<HandlerOutcome>,
    decision: &Decision,
) -> StatusUpdate {
    let now = Utc::now();
    let (status, error, retry_count, completed_at) = match decision {
        Decision::Complete => (EventStatus::Completed, None, event.retry_count, Some(now)),
        Decision::Fail { error } => (
            EventStatus::Failed,
            Some(error.clone()),
            event.retry_count,
            Some(now),
        ),
        Decision::Retry { error, .. } => {
            // A deferral (every handler left to run found its instances busy) is the host's
            // capacity, not a retry: it does not count as one.
            let mut retrying = outcomes
                .iter()
                .filter(|o| o.state == OutcomeState::Retrying)
                .peekable();
            let deferred_only = retrying.peek().is_some()
                && retrying.all(|o| o.last_error.as_ref().is_some_and(Failure::is_deferral));
            let retry_count = event.retry_count + u32::from(!deferred_only);
            (EventStatus::Pending, Some(error.clone()), retry_count, None)
        }
    };
    StatusUpdate {
        status,
        error,
        retry_count,
        handlers: outcomes,
        processed_at: event.processed_at.or(Some(now)),
        completed_at,
    }
}

/// The update that prepares a finished event for a manual re-run: handlers that failed get a
/// fresh attempt budget, handlers that succeeded are kept (and so not re-run).
pub(crate) fn rerun_update(event: &Event) -> StatusUpdate {
    let handlers = event
        .handlers
        .iter()
        .cloned()
        .map(|mut outcome| {
            if outcome.state != OutcomeState::Succeeded {
                outcome.state = OutcomeState::Retrying;
                outcome.attempts = 0;
            }
            outcome
        })
        .collect();
    StatusUpdate {
        status: EventStatus::Pending,
        error: event.error.clone(),
        retry_count: event.retry_count,
        handlers,
        processed_at: event.processed_at,
        completed_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::handler::{EventHandler, HandlerResult};
    use crate::broker::registry::{SubscriptionCounters, SubscriptionId};
    use crate::config::RetryPolicy;
    use crate::event::EventSource;

    struct Nop;
    #[async_trait::async_trait]
    impl EventHandler for Nop {
        async fn handle(&self, _: &HandlerContext, _: &Event) -> HandlerResult {
            Ok(())
        }
    }

    fn subscription(name: &str, max_retries: u32) -> Arc<Subscription> {
        Arc::new(Subscription {
            id: SubscriptionId(1),
            name: name.into(),
            patterns: vec!["*".parse().unwrap()],
            handler: Arc::new(Nop),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy {
                max_retries,
                jitter: false,
                ..RetryPolicy::default()
            },
            counters: SubscriptionCounters::default(),
        })
    }

    fn outcome(handler: &str, state: OutcomeState, attempts: u32) -> HandlerOutcome {
        HandlerOutcome {
            handler: handler.into(),
            version: None,
            state,
            attempts,
            last_error: (state != OutcomeState::Succeeded)
                .then(|| Failure::retry(format!("{handler} broke"))),
            finished_at: Utc::now(),
        }
    }

    #[test]
    fn no_handlers_completes() {
        assert_eq!(decide(&[], &[]), Decision::Complete);
    }

    #[test]
    fn any_retrying_handler_retries_with_the_longest_backoff() {
        let subs = vec![subscription("a", 5), subscription("b", 5)];
        let outcomes = vec![
            outcome("a", OutcomeState::Retrying, 1),
            outcome("b", OutcomeState::Retrying, 3),
        ];
        match decide(&outcomes, &subs) {
            Decision::Retry { delay, error } => {
                assert_eq!(delay, Duration::from_secs(4));
                assert!(
                    error.contains("a broke") && error.contains("b broke"),
                    "{error}"
                );
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[test]
    fn permanent_failure_waits_for_retries_then_fails() {
        let subs = vec![subscription("a", 5), subscription("b", 5)];
        let mixed = vec![
            outcome("a", OutcomeState::Failed, 1),
            outcome("b", OutcomeState::Retrying, 1),
        ];
        assert!(matches!(decide(&mixed, &subs), Decision::Retry { .. }));
        let done = vec![
            outcome("a", OutcomeState::Failed, 1),
            outcome("b", OutcomeState::Succeeded, 2),
        ];
        match decide(&done, &subs) {
            Decision::Fail { error } => assert!(error.starts_with("a: retry: a broke"), "{error}"),
            other => panic!("expected fail, got {other:?}"),
        }
    }

    #[test]
    fn status_updates_follow_decisions() {
        let event = Event::new(EventSource::System, "a.b", "h");
        let retry = status_update(
            &event,
            vec![],
            &Decision::Retry {
                error: "x".into(),
                delay: Duration::ZERO,
            },
        );
        assert_eq!(retry.status, EventStatus::Pending);
        assert_eq!(retry.retry_count, 1);
        assert!(retry.completed_at.is_none() && retry.processed_at.is_some());
        let fail = status_update(&event, vec![], &Decision::Fail { error: "y".into() });
        assert_eq!(fail.status, EventStatus::Failed);
        assert_eq!(fail.error.as_deref(), Some("y"));
        assert!(fail.completed_at.is_some());
        let done = status_update(&event, vec![], &Decision::Complete);
        assert_eq!(done.status, EventStatus::Completed);
        assert!(done.error.is_none());
    }

    #[test]
    fn a_deferral_for_busy_instances_is_not_counted_as_a_retry() {
        let event = Event::new(EventSource::System, "a.b", "h");
        let outcome = |kind| HandlerOutcome {
            handler: "a".into(),
            version: None,
            state: OutcomeState::Retrying,
            attempts: 0,
            last_error: Some(Failure::new(kind, "x")),
            finished_at: Utc::now(),
        };
        let retry = Decision::Retry {
            error: "x".into(),
            delay: Duration::ZERO,
        };
        let deferred = status_update(&event, vec![outcome(FailureKind::Busy)], &retry);
        assert_eq!(
            (deferred.status, deferred.retry_count),
            (EventStatus::Pending, 0)
        );
        let mixed = vec![outcome(FailureKind::Busy), outcome(FailureKind::Timeout)];
        assert_eq!(status_update(&event, mixed, &retry).retry_count, 1);
        // A canary's trap handed to the stable version is a deferral too.
        let mut canary = outcome(FailureKind::Trap);
        if let Some(failure) = canary.last_error.as_mut() {
            failure.deferred = true;
        }
        assert_eq!(status_update(&event, vec![canary], &retry).retry_count, 0);
    }
}
