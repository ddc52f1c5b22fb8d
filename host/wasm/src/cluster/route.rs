//! The subscription of a cluster-managed handler: which loaded version runs an event.
//!
//! A host subscribes one [`RoutedHandler`] per handler name. While it has not loaded what the
//! cluster's record says (or could not), the route is *converging*: every matching event is
//! deferred (retried later, by any host, without counting an attempt) instead of running on a
//! version the cluster no longer wants. Once loaded, the stable version runs every event,
//! except the canary's share (a stable hash of the event id). A canary invocation that fails
//! is deferred too, and its next run goes to the stable version: a bad canary costs no event.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::record::{JUDGED_KINDS, Tally, TrialFigures, routes_to_canary};
use crate::component::CompiledHandler;
use crate::handler::run_version;
use eventbroker::broker::{EventHandler, HandlerContext, HandlerResult};
use eventbroker::event::{Event, Failure, FailureKind};

/// The canary side of a route.
pub(crate) struct CanaryRoute {
    /// The canary version.
    pub(crate) version: Arc<CompiledHandler>,
    /// Its release number.
    pub(crate) release: u64,
    /// Share of events, percent.
    pub(crate) percent: u8,
    /// This host's tallies of the trial.
    pub(crate) trial: Arc<Trial>,
}

/// One host's invocations of both versions during a canary trial.
pub(crate) struct Trial {
    /// The canary release.
    pub(crate) release: u64,
    /// When the trial started.
    pub(crate) started_at: DateTime<Utc>,
    tallies: Mutex<(Tally, Tally)>,
}

impl Trial {
    /// A trial with nothing counted.
    pub(crate) fn new(release: u64, started_at: DateTime<Utc>) -> Self {
        Trial {
            release,
            started_at,
            tallies: Mutex::new((Tally::default(), Tally::default())),
        }
    }

    fn record(&self, canary: bool, result: &HandlerResult) {
        // A busy deferral did not run the version: it says nothing about it.
        if let Err(failure) = result
            && failure.kind == FailureKind::Busy
        {
            return;
        }
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let tally = if canary {
            &mut tallies.0
        } else {
            &mut tallies.1
        };
        tally.invocations += 1;
        if let Err(failure) = result {
            let kind = failure.kind.as_str();
            if JUDGED_KINDS.contains(&kind) {
                *tally.failures.entry(kind.to_owned()).or_default() += 1;
            }
        }
    }

    /// The figures counted so far.
    pub(crate) fn figures(&self) -> TrialFigures {
        let tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        TrialFigures {
            release: self.release,
            started_at: self.started_at,
            canary: tallies.0.clone(),
            stable: tallies.1.clone(),
        }
    }
}

/// What a route does with an event.
pub(crate) enum Route {
    /// Run the stable version, the canary's share on the canary.
    Ready {
        /// The stable version and its release number.
        stable: Arc<CompiledHandler>,
        /// The canary, while one runs.
        canary: Option<CanaryRoute>,
    },
    /// Defer every event: this host does not run what the cluster wants yet.
    Converging {
        /// Why, for the deferral's message.
        reason: String,
    },
}

/// The broker subscription of a cluster-managed handler.
pub(crate) struct RoutedHandler {
    name: String,
    route: Route,
}

impl RoutedHandler {
    /// A subscription for handler `name` that follows `route`.
    pub(crate) fn new(name: &str, route: Route) -> Self {
        RoutedHandler {
            name: name.to_owned(),
            route,
        }
    }

    /// Whether `event` last failed on a canary of this handler (its retry belongs to the
    /// stable version).
    fn failed_on_canary(&self, event: &Event) -> bool {
        event
            .handlers
            .iter()
            .find(|outcome| outcome.handler == self.name)
            .and_then(|outcome| outcome.last_error.as_ref())
            .is_some_and(|failure| failure.deferred && failure.kind != FailureKind::Busy)
    }
}

#[async_trait]
impl EventHandler for RoutedHandler {
    async fn handle(&self, ctx: &HandlerContext, event: &Event) -> HandlerResult {
        let (stable, canary) = match &self.route {
            Route::Converging { reason } => {
                return Err(Failure::new(FailureKind::Busy, reason.clone()));
            }
            Route::Ready { stable, canary } => (stable, canary.as_ref()),
        };
        let on_canary = canary.filter(|canary| {
            routes_to_canary(&event.id, canary.percent) && !self.failed_on_canary(event)
        });
        match on_canary {
            Some(canary) => {
                let result = run_version(&canary.version, ctx, event).await;
                canary.trial.record(true, &result);
                result.map_err(|mut failure| {
                    if !failure.is_deferral() {
                        failure.deferred = true;
                        failure.message = format!(
                            "canary release #{} failed; the event runs again on the stable release: {}",
                            canary.release, failure.message
                        );
                    }
                    failure
                })
            }
            None => {
                let result = run_version(stable, ctx, event).await;
                if let Some(canary) = canary {
                    canary.trial.record(false, &result);
                }
                result
            }
        }
    }
}
