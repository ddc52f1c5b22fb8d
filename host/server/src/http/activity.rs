//! `GET /v1/stats/history`: this host's counters sampled every few seconds over the last
//! minutes, for the console's chart of rates and queue depth.
//!
//! A task samples [`Broker::activity`] (in-process atomics, no provider round trip) every
//! [`SAMPLE_EVERY`] into a ring of [`KEEP`] samples; it ends when the router state is dropped.
//! The answer ends with a sample taken at request time, so even a host that just started has
//! a current point.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use eventbroker::broker::{Activity, Broker};
use serde::Serialize;

use super::{ApiError, AppState};

/// Time between samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes at [`SAMPLE_EVERY`].
pub const KEEP: usize = 120;

/// One sample: the time and this host's cumulative counters and gauges.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When it was taken.
    pub at: DateTime<Utc>,
    /// The counters (cumulative since start) and gauges at that time.
    #[serde(flatten)]
    pub activity: Activity,
}

/// The answer of `GET /v1/stats/history`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct History {
    /// Seconds between samples.
    pub interval_seconds: u64,
    /// Oldest first; the last one was taken for this request.
    pub samples: Vec<Sample>,
}

/// The sampled history, shared by the sampler task and the route.
#[derive(Debug, Default)]
pub struct ActivityLog {
    samples: Mutex<VecDeque<Sample>>,
}

impl ActivityLog {
    /// A log of `broker`'s activity, sampled by a task on the current tokio runtime (none
    /// outside one: the history then holds only the request-time sample).
    pub fn start(broker: &Broker) -> Arc<ActivityLog> {
        let log = Arc::new(ActivityLog::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sample(Arc::downgrade(&log), broker.clone()));
        }
        log
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    fn history(&self, now: Sample) -> History {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        History {
            interval_seconds: SAMPLE_EVERY.as_secs(),
            samples: samples.iter().copied().chain([now]).collect(),
        }
    }
}

async fn sample(log: Weak<ActivityLog>, broker: Broker) {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(log) = log.upgrade() else { return };
        log.push(Sample {
            at: Utc::now(),
            activity: broker.activity(),
        });
    }
}

/// `GET /v1/stats/history`.
#[utoipa::path(
    get,
    path = "/v1/stats/history",
    tag = "events",
    responses(
        (status = 200, description = "This host's counters sampled over the last ten minutes, oldest first", body = History),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn history(State(state): State<AppState>) -> Result<Json<History>, ApiError> {
    let now = Sample {
        at: Utc::now(),
        activity: state.broker().activity(),
    };
    Ok(Json(state.activity().history(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Sample {
        Sample {
            at: Utc::now(),
            activity: Activity {
                published: n,
                completed: 0,
                failed: 0,
                retried: 0,
                queue_depth: 0,
                active_workers: 0,
            },
        }
    }

    #[test]
    fn the_ring_keeps_the_latest_samples_and_ends_with_the_current_one() {
        let log = ActivityLog::default();
        for n in 0..(KEEP as u64 + 7) {
            log.push(at(n));
        }
        let history = log.history(at(1000));
        assert_eq!(history.samples.len(), KEEP + 1);
        assert_eq!(history.samples[0].activity.published, 7);
        assert_eq!(
            history.samples[KEEP - 1].activity.published,
            KEEP as u64 + 6
        );
        assert_eq!(history.samples[KEEP].activity.published, 1000);
    }
}
