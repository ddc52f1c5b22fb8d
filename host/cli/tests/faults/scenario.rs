//! One provider's run: start its hosts, publish the load while the fault script does its
//! worst, wait for every event to settle, stop the hosts, and judge.
//!
//! Topologies:
//! - **single** (memory, SQLite: one host per store): host `a0` in group `a` runs `alpha`
//!   (traps on every third event), `beta` and `gamma` (warm `reuse` instances) on a small
//!   instance pool.
//! - **shared** (PostgreSQL, Redis, NATS): hosts `a0` and `a1` share group `a` and run
//!   `alpha`; host `b0` alone is group `b` and runs `beta` and `gamma` on a small instance
//!   pool. Every host reaches the backend through a proxy the script can cut.
//!
//! Every handler is the counting guest (`tests/fixtures/counter`); `transient` (the same
//! component) is deployed to `a0` and removed again under load.
//!
//! The fault script, keyed to the load's progress (not to time): deploy `transient` (10 %),
//! clients hanging up on sync and async publishes (20 %), `kill -9` and restart of a host
//! (30 %), a backend cut of [`CUT_FOR`] (50 %), removal of `transient` (70 %). Stalled SSE and
//! WebSocket clients follow every event on `a0` from the start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::clients::{self, Answer, Attempt, Kind, Shape, Stalled, Stored};
use crate::serve::Serve;
use crate::verdict::{self, Evidence, Expectations, Verdict};
use eventbroker_testkit::PATIENCE;
use eventbroker_testkit::proxy::Proxy;

/// Events of the main load, per provider.
pub const LOAD: u64 = 2000;
/// Publishes in flight at once, per provider.
const CONCURRENCY: usize = 8;
/// Every `SYNC_EVERY`th event is published with `?mode=sync`.
const SYNC_EVERY: u64 = 20;
/// Every `SLOW_EVERY`th event makes every handler wait [`SLOW_MS`].
const SLOW_EVERY: u64 = 25;
const SLOW_MS: u64 = 150;
/// Every `BIG_EVERY`th event carries [`BIG_BYTES`] of padding (what a stalled client's
/// buffers would pile up).
const BIG_EVERY: u64 = 4;
/// See [`BIG_EVERY`].
pub const BIG_BYTES: usize = 256 * 1024;
/// Sync publishes whose client hangs up while the handlers run (they wait
/// [`HANG_UP_SLEEP_MS`]; the client leaves after [`HANG_UP_AFTER`]).
const SYNC_HANG_UPS: u64 = 8;
const HANG_UP_SLEEP_MS: u64 = 1500;
const HANG_UP_AFTER: Duration = Duration::from_millis(300);
/// Async publishes whose client hangs up (half of them halfway through the body).
const ASYNC_HANG_UPS: u64 = 24;
/// How long the backend stays cut.
const CUT_FOR: Duration = Duration::from_secs(2);
/// The hosts' `event_broker.lease`.
const LEASE: Duration = Duration::from_secs(5);
/// How long after the load every event must be final.
pub const SETTLE: Duration = Duration::from_secs(120);
/// How long a host may take to exit after SIGTERM.
const STOP_PATIENCE: Duration = Duration::from_secs(60);
/// The instance pool of the host that runs `beta` and `gamma`.
const SMALL_POOL: u32 = 4;
/// Largest resident set of a host, beyond what its provider keeps by design.
pub const RSS_BOUND_MIB: u64 = 192;

/// KiB of padding the load carries in all.
pub fn big_payload_kib() -> u64 {
    LOAD.div_ceil(BIG_EVERY) * BIG_BYTES as u64 / 1024
}

/// The handler that traps on every third event.
pub const TRAPPING: &str = "alpha";
/// The handler deployed and removed under load.
pub const TRANSIENT: &str = "transient";

/// How the provider's hosts are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One host: the store is not shared between processes.
    Single,
    /// Several hosts in two consumer groups, sharing the backend through a proxy.
    Shared,
}

/// Builds the `event_broker` section of a host in consumer group `group` (second argument),
/// reaching the backend through the proxy on the given port.
pub type BrokerSection = Box<dyn Fn(Option<u16>, &str) -> Value + Send + Sync>;

/// What a provider's run needs to know about it.
pub struct Setup {
    /// Provider name for the table.
    pub name: &'static str,
    /// Host layout.
    pub topology: Topology,
    /// The backend's `host:port`, proxied so that it can be cut (`None`: nothing to cut).
    pub backend: Option<String>,
    /// The `event_broker` section of each host.
    pub broker: BrokerSection,
    /// Whether the script kills a host with SIGKILL (and restarts it).
    pub kill: bool,
    /// Faults that do not apply, with the reason.
    pub not_applicable: Vec<(&'static str, &'static str)>,
    /// Resident memory the provider keeps by design on top of [`RSS_BOUND_MIB`], in KiB.
    pub rss_allowance_kib: u64,
    /// Runs (on a blocking thread) when the run is over: deletes the backend namespace.
    pub cleanup: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// What the run shared by every provider provides.
pub struct Shared {
    /// The counting guest.
    pub component: PathBuf,
    /// The compiled-component cache every host uses.
    pub cache_dir: PathBuf,
}

/// One provider's result.
pub struct Outcome {
    /// Provider name.
    pub name: &'static str,
    /// Faults injected, as short labels.
    pub injected: Vec<String>,
    /// Faults not applicable, with the reason.
    pub not_applicable: Vec<(&'static str, &'static str)>,
    /// The judged run.
    pub verdict: Verdict,
    /// The memory bound applied, in MiB.
    pub rss_bound_mib: u64,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

struct HostPlan {
    label: &'static str,
    group: &'static str,
    handlers: &'static [&'static str],
    pool: Option<u32>,
}

fn plans(topology: Topology) -> Vec<HostPlan> {
    match topology {
        Topology::Single => vec![HostPlan {
            label: "a0",
            group: "a",
            handlers: &["alpha", "beta", "gamma"],
            pool: Some(SMALL_POOL),
        }],
        Topology::Shared => vec![
            HostPlan {
                label: "a0",
                group: "a",
                handlers: &["alpha"],
                pool: None,
            },
            HostPlan {
                label: "a1",
                group: "a",
                handlers: &["alpha"],
                pool: None,
            },
            HostPlan {
                label: "b0",
                group: "b",
                handlers: &["beta", "gamma"],
                pool: Some(SMALL_POOL),
            },
        ],
    }
}

/// The manifest of a counting handler in `group`.
fn manifest(handler: &str, group: &str) -> String {
    let mut text = String::from("patterns = [\"faults.>\"]\ntimeout = \"30s\"\n");
    if handler == "gamma" {
        text.push_str("instances = \"reuse\"\nconcurrency = 2\n");
    }
    text.push_str(&format!("\n[config]\ngroup = \"{group}\"\n"));
    if handler == TRAPPING {
        text.push_str("trap_every = \"3\"\n");
    }
    text
}

/// The consumer group name of group label `group`.
fn group_name(group: &str) -> String {
    format!("faults-{group}")
}

struct Ctx {
    name: &'static str,
    prefix: String,
    client: reqwest::Client,
    serves: Vec<Arc<Mutex<Serve>>>,
    /// Per serve: `(host, url)` while it runs.
    targets: RwLock<Vec<Option<(String, String)>>>,
    attempts: Mutex<Vec<Attempt>>,
    progress: AtomicU64,
    proxy: Option<Proxy>,
    stalled: Mutex<Option<Stalled>>,
    component: Vec<u8>,
}

#[derive(Default)]
struct Timeline {
    injected: Vec<String>,
    cut_windows: Vec<(Instant, Instant)>,
    removed_at: Option<Instant>,
    problems: Vec<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the serve on a blocking thread (its operations wait on processes).
async fn with_serve<T: Send + 'static>(
    serve: &Arc<Mutex<Serve>>,
    f: impl FnOnce(&mut Serve) -> T + Send + 'static,
) -> T {
    let serve = serve.clone();
    match tokio::task::spawn_blocking(move || f(&mut lock(&serve))).await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

impl Ctx {
    fn record(&self, attempt: Attempt) {
        lock(&self.attempts).push(attempt);
    }

    /// Re-reads where serve `index` runs.
    async fn refresh(&self, index: usize) {
        let target = with_serve(&self.serves[index], |s| s.host().zip(s.url())).await;
        self.targets.write().unwrap_or_else(|p| p.into_inner())[index] = target;
    }

    fn take_target(&self, index: usize) {
        self.targets.write().unwrap_or_else(|p| p.into_inner())[index] = None;
    }

    fn live(&self) -> Vec<(String, String)> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// A running host, round-robin by `n`; waits while none runs.
    async fn pick(&self, n: u64) -> (String, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let live = self.live();
            if !live.is_empty() {
                return live[(n as usize) % live.len()].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no host running for {PATIENCE:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_progress(&self, at_least: u64) {
        while self.progress.load(Ordering::Acquire) < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn id(&self, what: &str, n: u64) -> String {
        format!("{}-{what}-{n}", self.prefix)
    }
}

/// Runs the whole scenario for one provider.
pub async fn run(mut setup: Setup, shared: Arc<Shared>) -> Outcome {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = match &setup.backend {
        Some(addr) => Some(Proxy::start(addr).await),
        None => None,
    };
    let port = proxy.as_ref().map(|p| p.port);
    let plans = plans(setup.topology);
    let mut serves = Vec::new();
    for plan in &plans {
        let config = write_host(dir.path(), &setup, plan, port, &shared);
        let (label, root) = (plan.label, dir.path().to_owned());
        let serve = tokio::task::spawn_blocking(move || Serve::start(label, &config, &root))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        serves.push(Arc::new(Mutex::new(serve)));
    }
    let ctx = Arc::new(Ctx {
        name: setup.name,
        prefix: format!(
            "faults-{}-{}",
            setup.name,
            eventbroker_testkit::unique_suffix()
        ),
        client: clients::http(),
        targets: RwLock::new(vec![None; serves.len()]),
        serves,
        attempts: Mutex::default(),
        progress: AtomicU64::new(0),
        proxy,
        stalled: Mutex::default(),
        component: std::fs::read(&shared.component).expect("read the counting guest"),
    });
    for index in 0..ctx.serves.len() {
        ctx.refresh(index).await;
    }
    stall(&ctx).await;

    let mut timeline = Timeline::default();
    timeline.injected.push("stalled SSE+WS on a0".into());
    let pool_host = plans
        .iter()
        .find(|p| p.pool.is_some())
        .map_or("-", |p| p.label);
    timeline
        .injected
        .push(format!("pool of {SMALL_POOL} on {pool_host}"));
    timeline.injected.push("trap on every 3rd event".into());
    if setup.topology == Topology::Shared {
        timeline.injected.push("2 groups".into());
    }
    let (_, timeline) = tokio::join!(load(&ctx), script(&ctx, &setup, timeline));
    let load_done = Instant::now();
    eprintln!(
        "{}: load and faults done after {:?}; settling",
        setup.name,
        started.elapsed()
    );

    let stored = settle(&ctx, load_done + SETTLE).await;
    *lock(&ctx.stalled) = None;
    let stops: Vec<_> = ctx
        .serves
        .iter()
        .map(|serve| with_serve(serve, |s| s.stop(STOP_PATIENCE)))
        .collect();
    futures::future::join_all(stops).await;

    let mut invocations = Vec::new();
    let mut killed = HashSet::new();
    let mut hosts = Vec::new();
    for serve in &ctx.serves {
        let serve = lock(serve);
        invocations.extend(serve.invocations());
        killed.extend(
            serve
                .killed
                .iter()
                .map(|generation| format!("{}#{generation}", serve.label)),
        );
        hosts.push((serve.label.clone(), serve.health(), serve.ended.clone()));
    }
    let required = plans
        .iter()
        .flat_map(|plan| {
            plan.handlers
                .iter()
                .map(|handler| (handler.to_string(), plan.group.to_owned()))
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let rss_bound_kib = RSS_BOUND_MIB * 1024 + setup.rss_allowance_kib;
    let expect = Expectations {
        required,
        trapping: TRAPPING.into(),
        trap_every: 3,
        transient: TRANSIENT.into(),
        rss_bound_kib,
    };
    let evidence = Evidence {
        attempts: lock(&ctx.attempts).clone(),
        stored,
        invocations,
        killed,
        cut_windows: timeline.cut_windows.clone(),
        removed_at: timeline.removed_at,
        hosts,
        script: timeline.problems.clone(),
    };
    let verdict = verdict::judge(&expect, &evidence);
    if let Some(cleanup) = setup.cleanup.take() {
        let _ = tokio::task::spawn_blocking(cleanup).await;
    }
    Outcome {
        name: setup.name,
        injected: timeline.injected,
        not_applicable: std::mem::take(&mut setup.not_applicable),
        verdict,
        rss_bound_mib: rss_bound_kib / 1024,
        elapsed: started.elapsed(),
    }
}

/// Writes host `plan`'s handlers directory and config; returns the config's path.
fn write_host(
    root: &Path,
    setup: &Setup,
    plan: &HostPlan,
    port: Option<u16>,
    shared: &Shared,
) -> PathBuf {
    let handlers = root.join(format!("handlers-{}", plan.label));
    std::fs::create_dir_all(&handlers).expect("handlers dir");
    for handler in plan.handlers {
        std::fs::copy(&shared.component, handlers.join(format!("{handler}.wasm")))
            .expect("copy the counting guest");
        std::fs::write(
            handlers.join(format!("{handler}.toml")),
            manifest(handler, plan.group),
        )
        .expect("write a manifest");
    }
    let mut broker = (setup.broker)(port, &group_name(plan.group));
    let defaults = json!({
        "mode": "async",
        "worker_count": 4,
        "lease": format!("{}s", LEASE.as_secs()),
        "shutdown_timeout": "10s",
        "retry_policy": {"initial_delay": "50ms", "max_delay": "200ms"},
        "instance_id": format!("faults-{}-{}", setup.name, plan.label),
        "consumer_group": group_name(plan.group),
    });
    merge(&mut broker, defaults);
    let mut handlers_section = json!({
        "dir": handlers,
        "cache_dir": shared.cache_dir,
    });
    if let Some(instances) = plan.pool {
        handlers_section["pool"] = json!({ "instances": instances });
    }
    let config = json!({
        "event_broker": broker,
        "server": {"websocket": {"outbound_buffer": 64}},
        "handlers": handlers_section,
    });
    let path = root.join(format!("{}.yaml", plan.label));
    // JSON is YAML: the config loader reads it by the .yaml extension.
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("config");
    path
}

/// Adds the keys of `overlay` that `base` does not set.
fn merge(base: &mut Value, overlay: Value) {
    if let (Value::Object(base), Value::Object(overlay)) = (base, overlay) {
        for (key, value) in overlay {
            base.entry(key).or_insert(value);
        }
    }
}

/// Connects the stalled clients to `a0`.
async fn stall(ctx: &Arc<Ctx>) {
    let a0 = ctx.targets.read().unwrap_or_else(|p| p.into_inner())[0].clone();
    let Some((_, url)) = a0 else {
        return;
    };
    let stalled = tokio::task::spawn_blocking(move || Stalled::connect(&url))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    *lock(&ctx.stalled) = Some(stalled);
}

/// The main load: [`LOAD`] events, round-robin over the running hosts.
async fn load(ctx: &Arc<Ctx>) {
    futures::stream::iter(0..LOAD)
        .for_each_concurrent(CONCURRENCY, |n| async move {
            let (host, url) = ctx.pick(n).await;
            let kind = if n % SYNC_EVERY == SYNC_EVERY / 2 {
                Kind::Sync
            } else {
                Kind::Async
            };
            let shape = Shape {
                sleep_ms: (n % SLOW_EVERY == 7).then_some(SLOW_MS),
                pad: if n % BIG_EVERY == 3 { BIG_BYTES } else { 0 },
            };
            let id = ctx.id("load", n);
            let started = Instant::now();
            let body = clients::body(&id, "faults.load", n, shape);
            let answer = clients::publish(&ctx.client, &url, &body, kind == Kind::Sync).await;
            ctx.record(Attempt {
                id,
                n,
                kind,
                host,
                answer,
                started,
            });
            ctx.progress.fetch_add(1, Ordering::AcqRel);
        })
        .await;
}

/// The faults, in order, each when the load has made enough progress.
async fn script(ctx: &Arc<Ctx>, setup: &Setup, mut timeline: Timeline) -> Timeline {
    ctx.wait_progress(LOAD / 10).await;
    let a0 = ctx.targets.read().unwrap_or_else(|p| p.into_inner())[0].clone();
    match a0 {
        Some((_, url)) => {
            let manifest = manifest(TRANSIENT, "a");
            match clients::deploy(
                &ctx.client,
                &url,
                TRANSIENT,
                ctx.component.clone(),
                &manifest,
            )
            .await
            {
                Ok(()) => timeline.injected.push("deploy+remove on a0".into()),
                Err(error) => timeline.problems.push(error),
            }
        }
        None => timeline
            .problems
            .push("a0 was not running at deploy time".into()),
    }

    ctx.wait_progress(LOAD / 5).await;
    hang_ups(ctx).await;
    timeline
        .injected
        .push(format!("sync hang-up ×{SYNC_HANG_UPS}"));
    timeline
        .injected
        .push(format!("async hang-up ×{ASYNC_HANG_UPS}"));

    if setup.kill {
        ctx.wait_progress(3 * LOAD / 10).await;
        let victim = if setup.topology == Topology::Single {
            0
        } else {
            1
        };
        ctx.take_target(victim);
        let label = with_serve(&ctx.serves[victim], |s| {
            s.kill();
            s.restart();
            s.label.clone()
        })
        .await;
        ctx.refresh(victim).await;
        if victim == 0 {
            stall(ctx).await;
        }
        timeline.injected.push(format!("kill -9 {label}"));
    }

    if let Some(proxy) = &ctx.proxy {
        ctx.wait_progress(LOAD / 2).await;
        let cut_at = Instant::now();
        proxy.cut().await;
        tokio::time::sleep(CUT_FOR).await;
        proxy.restore().await;
        let recovered = markers(ctx).await;
        let recovered_at = match recovered {
            Ok(()) => Instant::now(),
            Err(problem) => {
                timeline.problems.push(problem);
                Instant::now() + SETTLE
            }
        };
        timeline
            .cut_windows
            .push((cut_at - 2 * LEASE, recovered_at + 2 * LEASE));
        timeline
            .injected
            .push(format!("backend cut {}s", CUT_FOR.as_secs()));
    }

    ctx.wait_progress(7 * LOAD / 10).await;
    let a0 = ctx.targets.read().unwrap_or_else(|p| p.into_inner())[0].clone();
    if let Some((_, url)) = a0 {
        match clients::remove(&ctx.client, &url, TRANSIENT).await {
            Ok(()) => timeline.removed_at = Some(Instant::now()),
            Err(error) => timeline.problems.push(error),
        }
    }
    timeline
}

/// Clients that hang up: sync publishes while their handlers run, async publishes right
/// after the request (half of them halfway through the body).
async fn hang_ups(ctx: &Arc<Ctx>) {
    let mut calls = Vec::new();
    for k in 0..SYNC_HANG_UPS + ASYNC_HANG_UPS {
        let ctx = ctx.clone();
        calls.push(async move {
            let sync = k < SYNC_HANG_UPS;
            let n = 1_000_000 + k;
            let (host, url) = ctx.pick(k).await;
            let id = ctx.id("hang-up", n);
            let shape = Shape {
                sleep_ms: sync.then_some(HANG_UP_SLEEP_MS),
                pad: 0,
            };
            let body = clients::body(&id, "faults.load", n, shape);
            let started = Instant::now();
            let (kind, answer) = if sync {
                let answer =
                    clients::publish_and_hang_up(&url, &body, true, false, HANG_UP_AFTER).await;
                (Kind::SyncHangUp, answer)
            } else {
                let truncate = k % 2 == 0;
                let answer =
                    clients::publish_and_hang_up(&url, &body, false, truncate, Duration::ZERO)
                        .await;
                (Kind::AsyncHangUp, answer)
            };
            ctx.record(Attempt {
                id,
                n,
                kind,
                host,
                answer,
                started,
            });
        });
    }
    futures::future::join_all(calls).await;
}

/// After a cut: one marker event through each running host, each published (again, under a
/// new id, while refused) until accepted, then awaited until final. `Err` says what did not
/// recover within the patience.
async fn markers(ctx: &Arc<Ctx>) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    let mut accepted = Vec::new();
    let mut k = 0;
    for (host, url) in ctx.live() {
        loop {
            // n ≡ 1 (mod 3): no handler traps on a marker.
            let n = 2_000_000 + 3 * k + 1;
            k += 1;
            let id = ctx.id("marker", n);
            let body = clients::body(&id, "faults.marker", n, Shape::default());
            let started = Instant::now();
            let answer = clients::publish(&ctx.client, &url, &body, false).await;
            let ok = answer == Answer::Accepted;
            ctx.record(Attempt {
                id: id.clone(),
                n,
                kind: Kind::Marker,
                host: host.clone(),
                answer,
                started,
            });
            if ok {
                accepted.push((id, url.clone()));
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: {host} accepted no event within {PATIENCE:?} after the cut",
                    ctx.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (id, url) in accepted {
        loop {
            let stored = clients::fetch(&ctx.client, &url, &id).await;
            if stored.is_final() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: marker {id} was not final within {PATIENCE:?} after the cut: {stored:?}",
                    ctx.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Reads every attempted event until it is final (or, if it was never accepted, absent), up
/// to `deadline`; returns the last state read of each.
async fn settle(ctx: &Arc<Ctx>, deadline: Instant) -> HashMap<String, Stored> {
    let attempts = lock(&ctx.attempts).clone();
    let mut pending: Vec<Attempt> = attempts;
    let mut done = HashMap::new();
    loop {
        let live = ctx.live();
        assert!(!live.is_empty(), "{}: no host runs to settle", ctx.name);
        let results: Vec<(Attempt, Stored)> = futures::stream::iter(pending)
            .enumerate()
            .map(|(i, attempt)| {
                let url = live[i % live.len()].1.clone();
                let client = ctx.client.clone();
                async move {
                    let stored = clients::fetch(&client, &url, &attempt.id).await;
                    (attempt, stored)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let out_of_time = Instant::now() >= deadline;
        pending = Vec::new();
        for (attempt, stored) in results {
            let absent_as_expected = matches!(stored, Stored::NotFound) && !attempt.accepted();
            if stored.is_final() || absent_as_expected || out_of_time {
                done.insert(attempt.id.clone(), stored);
            } else {
                pending.push(attempt);
            }
        }
        if pending.is_empty() {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts and stops one memory host running the counting guest, so that the component is
/// compiled into the shared cache once instead of by every host at once.
pub fn warm(shared: &Shared) {
    let dir = tempfile::tempdir().expect("temp dir");
    let setup = crate::providers::memory();
    let plan = HostPlan {
        label: "warm",
        group: "a",
        handlers: &["alpha"],
        pool: None,
    };
    let config = write_host(dir.path(), &setup, &plan, None, shared);
    let mut serve = Serve::start("warm", &config, dir.path());
    serve.stop(STOP_PATIENCE);
}
