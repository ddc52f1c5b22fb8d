//! What every path shares: the events, the trivial handler, the publishers, the wait for the
//! last final state, and the latency run at a fixed share of the measured peak.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbroker::{Broker, BrokerConfig, Event, EventSource, HandlerResult, handler_fn};

use crate::cpu::CpuMeter;

/// Publishing tasks, on the broker side and on the bare side.
pub const PUBLISHERS: u64 = 4;

/// The event every path publishes: a small JSON payload.
pub fn event(i: u64) -> Event {
    Event::new(EventSource::System, "bench.tick", "bench").with_payload(serde_json::json!({"n": i}))
}

/// Events per second.
pub fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// The broker settings of every broker-side run: a large local queue, and a memory provider
/// that keeps every event of the run.
pub fn broker_config() -> BrokerConfig {
    BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: 10_000,
        memory: eventbroker::MemoryConfig {
            max_events: 10_000_000,
            ..Default::default()
        },
        ..BrokerConfig::default()
    }
}

/// Subscribes the trivial native handler (it reads the payload and succeeds) to `bench.>`.
///
/// # Panics
/// If the subscription is refused (a bug of the benchmark).
pub fn subscribe_trivial(broker: &Broker, name: &str) {
    broker
        .subscribe_with(
            &["bench.>"],
            Arc::new(handler_fn(|_, event: Event| async move {
                std::hint::black_box(&event.payload);
                HandlerResult::Ok(())
            })),
            eventbroker::SubscribeOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            },
        )
        .expect("subscribe");
}

/// [`PUBLISHERS`] tasks sharing the events `0..events` between them (task `p` takes every
/// [`PUBLISHERS`]th from `p`), each awaiting `publish(i)` for its events in turn: the
/// publishing side of every path, broker and bare alike.
pub struct Publishers(Vec<tokio::task::JoinHandle<()>>);

impl Publishers {
    /// Starts the tasks.
    pub fn spawn<F, Fut>(events: u64, publish: F) -> Self
    where
        F: Fn(u64) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        Publishers(
            (0..PUBLISHERS)
                .map(|p| {
                    let publish = publish.clone();
                    tokio::spawn(async move {
                        for i in (p..events).step_by(PUBLISHERS as usize) {
                            publish(i).await;
                        }
                    })
                })
                .collect(),
        )
    }

    /// Waits until every task published all of its events.
    ///
    /// # Panics
    /// If a publish panicked.
    pub async fn join(self) {
        for publisher in self.0 {
            publisher.await.expect("publisher");
        }
    }
}

/// Publishes `events` events with `publish_async` from [`PUBLISHERS`] tasks and waits until
/// the broker recorded every one's final state. Returns the time from the first publish to
/// the last final state.
///
/// # Panics
/// If a publish fails or an event does not complete (the run would measure nothing).
pub async fn drive(broker: &Broker, events: u64) -> Duration {
    let completed_before = broker.stats().await.expect("stats").completed;
    let started = Instant::now();
    let publishing = broker.clone();
    Publishers::spawn(events, move |i| {
        let broker = publishing.clone();
        async move {
            broker.publish_async(event(i)).await.expect("publish");
        }
    })
    .join()
    .await;
    broker.wait_idle().await;
    let elapsed = started.elapsed();
    let completed = broker.stats().await.expect("stats").completed - completed_before;
    assert_eq!(completed, events, "every event completed once");
    elapsed
}

/// End-to-end latency percentiles (publish → final state recorded).
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Publishes `samples` events with `publish_sync`, started at a steady `per_second` (each on
/// its own task, so a slow one does not hold the next back), and returns the percentiles of
/// the time from the publish call to the final state.
///
/// # Panics
/// If a publish fails.
pub async fn latency(broker: &Broker, per_second: f64, samples: u64) -> Latency {
    let per_second = per_second.max(1.0);
    let times = Arc::new(Mutex::new(Vec::with_capacity(samples as usize)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let due = started + Duration::from_secs_f64(i as f64 / per_second);
        tokio::time::sleep_until(due.into()).await;
        let broker = broker.clone();
        let times = times.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let done = broker
                .publish_sync(event(1_000_000_000 + i))
                .await
                .expect("publish");
            assert!(done.status.is_finished());
            times.lock().expect("times").push(sent.elapsed());
        }));
    }
    for task in tasks {
        task.await.expect("latency task");
    }
    let mut times = std::mem::take(&mut *times.lock().expect("times"));
    times.sort();
    Latency {
        p50: percentile(&times, 0.50),
        p99: percentile(&times, 0.99),
    }
}

/// The `q` quantile of sorted `times` (zero when empty).
pub fn percentile(times: &[Duration], q: f64) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    let index = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
    times[index]
}

/// How many latency samples to take at `per_second`: about two seconds' worth, within bounds.
pub fn latency_samples(per_second: f64) -> u64 {
    ((per_second * 2.0) as u64).clamp(200, 20_000)
}

/// Counts what a bare loop handled and signals when the target is reached.
#[derive(Clone)]
pub struct Counter {
    seen: Arc<std::sync::atomic::AtomicU64>,
    target: u64,
    done: Arc<tokio::sync::Notify>,
}

impl Counter {
    /// A counter that signals after `target` events.
    pub fn new(target: u64) -> Self {
        Counter {
            seen: Arc::default(),
            target,
            done: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The trivial handler of the bare loops: read the payload, count it.
    pub fn handle<T: ?Sized>(&self, payload: &T) {
        std::hint::black_box(payload);
        let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        if seen == self.target {
            self.done.notify_one();
        }
    }

    /// Events handled so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the target is reached.
    pub fn finished(&self) -> bool {
        self.seen() >= self.target
    }

    /// Waits until the target is reached.
    pub async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.finished() {
                return;
            }
            notified.await;
        }
    }
}

/// Runs of each measurement; the median is reported (this machine is noisy).
pub const RUNS: usize = 3;

/// The median events/s of [`RUNS`] runs of `run`, each handling `events` events.
pub async fn median_rate<F, Fut>(events: u64, mut run: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut rates = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        rates.push(rate(events, run().await));
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// A rate with the CPU time each side spent per event while it was measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Events (or operations) per second: the median of [`RUNS`] runs.
    pub rate: f64,
    /// CPU microseconds per event over those runs: (this process, the backend server).
    pub cpu: (f64, f64),
}

/// [`median_rate`], also measuring the CPU time of this process and of the processes named
/// `server` (the backend's) over the runs.
pub async fn median_rate_cpu<F, Fut>(server: Option<&'static str>, events: u64, run: F) -> Measured
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let meter = CpuMeter::start(server);
    let rate = median_rate(events, run).await;
    let cpu = meter.stop().per_event(events * RUNS as u64);
    Measured { rate, cpu }
}

/// Measures a running broker: a warm-up run, the peak (median of [`RUNS`] runs of `events`
/// events, with the CPU time per event of this process and of the processes named `server`),
/// then the latency run at half the peak.
pub async fn broker_run(
    broker: &Broker,
    events: u64,
    server: Option<&'static str>,
) -> (Measured, Latency) {
    drive(broker, (events / 10).max(1)).await;
    let peak = median_rate_cpu(server, events, || drive(broker, events)).await;
    let load = peak.rate / 2.0;
    let latency = latency(broker, load, latency_samples(load)).await;
    (peak, latency)
}
