//! Clusters of real `eventbroker serve` processes sharing one backend, for end-to-end tests of
//! work sharing and crash recovery.
//!
//! Every host runs the misbehaving fixture as handler `counter` on `cluster.>`; an event's
//! stored outcome for `counter` says how often it ran (`attempts`), which is how the tests see
//! "handled exactly once" across hosts.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::PATIENCE;

/// One `serve` process of a cluster.
pub struct Host {
    child: Child,
    /// Base URL of its HTTP API.
    pub url: String,
    logs: Option<JoinHandle<Vec<String>>>,
}

impl Host {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hosts started from one config, sharing the backend the config names.
pub struct Cluster {
    /// The hosts; a killed host's slot is `None`.
    pub hosts: Vec<Option<Host>>,
    dir: tempfile::TempDir,
    config: Value,
    /// Merged over each host's `handlers` section.
    handlers: Value,
}

/// A blocking HTTP client with generous timeouts.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("http client")
}

impl Cluster {
    /// Starts `count` hosts whose `event_broker` section is `broker` merged over test defaults
    /// (async mode, four workers, a two-second lease so that a dead host's work is taken over
    /// quickly, a distinct `instance_id` per host).
    pub fn start(broker: Value, count: usize) -> Cluster {
        Cluster::start_with(broker, json!({}), count)
    }

    /// [`Cluster::start`] with `handlers` merged over each host's `handlers` section.
    pub fn start_with(broker: Value, handlers: Value, count: usize) -> Cluster {
        let built = super::guests::build();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut defaults = json!({
            "mode": "async",
            "worker_count": 4,
            "lease": "2s",
            "retry_policy": {"initial_delay": "50ms", "max_delay": "200ms"},
        });
        merge(&mut defaults, broker);
        let mut cluster = Cluster {
            hosts: Vec::new(),
            dir,
            config: defaults,
            handlers,
        };
        for n in 0..count {
            let handlers = cluster.dir.path().join(format!("handlers-{n}"));
            std::fs::create_dir_all(&handlers).expect("handlers dir");
            std::fs::copy(built.misbehave(), handlers.join("counter.wasm")).expect("copy");
            std::fs::write(
                handlers.join("counter.toml"),
                "patterns = [\"cluster.>\"]\nfuel = 100_000_000_000\ntimeout = \"60s\"\nconcurrency = 16\n",
            )
            .expect("manifest");
            let host = cluster.spawn(n);
            cluster.hosts.push(Some(host));
        }
        cluster
    }

    /// The config file of host `n` (written when it was started).
    pub fn config_file(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("host-{n}.yaml"))
    }

    fn config_path(&self, n: usize) -> PathBuf {
        let mut broker = self.config.clone();
        broker["instance_id"] = json!(format!("cluster-host-{n}"));
        // Each host compiles for itself, as hosts of a real cluster do.
        let mut handlers = json!({
            "dir": self.dir.path().join(format!("handlers-{n}")),
            "cache_dir": self.dir.path().join(format!("cache-{n}")),
            "watch": false,
        });
        merge(&mut handlers, self.handlers.clone());
        let config = json!({
            "event_broker": broker,
            "handlers": handlers,
        });
        let path = self.dir.path().join(format!("host-{n}.yaml"));
        // JSON is YAML: the config loader reads it by the .yaml extension.
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("config");
        path
    }

    fn spawn(&self, n: usize) -> Host {
        let config = self.config_path(n);
        start_serve(&config, self.dir.path())
    }

    /// Starts one more host, with an empty handlers directory: what it runs comes from the
    /// cluster handler store. Returns its index.
    pub fn add_host(&mut self) -> usize {
        let n = self.hosts.len();
        std::fs::create_dir_all(self.dir.path().join(format!("handlers-{n}")))
            .expect("handlers dir");
        let host = self.spawn(n);
        self.hosts.push(Some(host));
        n
    }

    /// The URL of a live host.
    pub fn url(&self, n: usize) -> &str {
        &self.hosts[n].as_ref().expect("host is alive").url
    }

    /// Kills host `n` with SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut host) = self.hosts[n].take() {
            host.child.kill().expect("kill -9");
            let _ = host.child.wait();
            if let Some(logs) = host.logs.take() {
                drop(logs);
            }
        }
    }

    /// Publishes `count` events of type `cluster.work`, round-robin over the live hosts; each
    /// handler invocation burns `iterations` loop iterations. Returns the event ids.
    pub fn publish(&self, count: usize, iterations: u64) -> Vec<String> {
        let live: Vec<&str> = self
            .hosts
            .iter()
            .flatten()
            .map(|h| h.url.as_str())
            .collect();
        let client = http();
        (0..count)
            .map(|n| {
                let url = live[n % live.len()];
                let response = client
                    .post(format!("{url}/v1/events"))
                    .json(&json!({
                        "type": "cluster.work",
                        "payload": {"action": "work", "iterations": iterations, "n": n},
                    }))
                    .send()
                    .expect("publish");
                assert_eq!(response.status(), 202, "publish accepted");
                let body: Value = response.json().expect("json");
                body["id"].as_str().expect("id").to_owned()
            })
            .collect()
    }

    /// Waits until every event is finished (as seen through live host `via`) and returns them.
    pub fn wait_all_finished(&self, via: usize, ids: &[String]) -> Vec<Value> {
        let client = http();
        let url = self.url(via);
        let deadline = Instant::now() + PATIENCE * 3;
        let mut done = Vec::with_capacity(ids.len());
        for id in ids {
            loop {
                let event: Value = client
                    .get(format!("{url}/v1/events/{id}"))
                    .send()
                    .and_then(|r| r.json())
                    .expect("get event");
                if matches!(event["status"].as_str(), Some("completed" | "failed")) {
                    done.push(event);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "event {id} did not finish: {event}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        done
    }

    /// Waits until host `n` reports at least `at_least` handler invocations.
    pub fn wait_invocations(&self, n: usize, at_least: u64) {
        let deadline = Instant::now() + PATIENCE;
        while invocations(self.url(n)) < at_least {
            assert!(
                Instant::now() < deadline,
                "host {n} did not start handling events"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Handler invocations host `n` reports in its metrics.
    pub fn invocations(&self, n: usize) -> u64 {
        invocations(self.url(n))
    }
}

/// How often the `counter` handler ran for this event (from its stored outcome).
pub fn attempts(event: &Value) -> u64 {
    event["handlers"]
        .as_array()
        .and_then(|outcomes| outcomes.iter().find(|o| o["handler"] == "counter"))
        .and_then(|outcome| outcome["attempts"].as_u64())
        .unwrap_or(0)
}

/// The sum of `eventbroker_handler_invocations_total` of the host at `url`.
pub fn invocations(url: &str) -> u64 {
    let text = http()
        .get(format!("{url}/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    text.lines()
        .filter(|line| line.starts_with("eventbroker_handler_invocations_total"))
        .filter_map(|line| line.rsplit(' ').next())
        .filter_map(|value| value.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Starts `eventbroker serve --config CONFIG` in `dir` and waits for its "listening" line.
pub fn start_serve(config: &Path, dir: &Path) -> Host {
    let config = config.to_str().expect("UTF-8 config path");
    let served = super::serve::serve_with(dir, &["--config", config], &[]);
    Host {
        child: served.child,
        url: served.url,
        logs: Some(served.logs),
    }
}

/// The two cluster scenarios every shared backend must pass, given its `event_broker`
/// section.
pub mod scenarios {
    use super::*;

    /// Two hosts, events published to either: all completed, each handled exactly once, and
    /// both hosts did some of the work.
    pub fn two_hosts_share_work_exactly_once(broker: Value) {
        let cluster = Cluster::start(broker, 2);
        let ids = cluster.publish(200, 200_000);
        let events = cluster.wait_all_finished(0, &ids);
        for event in &events {
            assert_eq!(event["status"], "completed", "{event}");
            assert_eq!(attempts(event), 1, "handled exactly once: {event}");
        }
        let (a, b) = (cluster.invocations(0), cluster.invocations(1));
        assert_eq!(a + b, ids.len() as u64, "invocations across hosts");
        assert!(a > 0 && b > 0, "both hosts shared the work: {a} + {b}");
    }

    /// Two hosts under load; one is killed with SIGKILL mid-load; the survivor completes every
    /// event, including those the dead host had claimed.
    pub fn killing_a_host_mid_load_loses_nothing(broker: Value) {
        let mut cluster = Cluster::start(broker, 2);
        let ids = cluster.publish(300, 3_000_000);
        // Host 0 is busy with its share when it dies.
        cluster.wait_invocations(0, 5);
        cluster.kill(0);
        let events = cluster.wait_all_finished(1, &ids);
        for event in &events {
            assert_eq!(event["status"], "completed", "{event}");
            assert!(attempts(event) >= 1, "{event}");
        }
        let survivor = cluster.invocations(1);
        assert!(survivor > 0, "the survivor did work");
    }
}

/// Deploying once for the whole cluster: the cluster handler store, canaries and rollback,
/// on a shared backend.
pub mod deploys {
    use super::*;
    use eventbroker_testkit::toolchains;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The manifest every `counter` release of these tests runs with (the cluster's patterns
    /// and generous limits), plus `extra`.
    fn counter_manifest(extra: &str) -> String {
        format!(
            "patterns = [\"cluster.>\"]\nfuel = 100_000_000_000\ntimeout = \"60s\"\nconcurrency = 16\n{extra}"
        )
    }

    /// Deploys over HTTP, as `eventbroker deploy` does; `canary` is the `?canary=` share.
    pub fn deploy(
        url: &str,
        name: &str,
        wasm: &Path,
        manifest: &str,
        canary: Option<&str>,
    ) -> Value {
        let bytes = std::fs::read(wasm).expect("component");
        let form = reqwest::blocking::multipart::Form::new()
            .part(
                "component",
                reqwest::blocking::multipart::Part::bytes(bytes).file_name(format!("{name}.wasm")),
            )
            .text("manifest", manifest.to_owned());
        let mut request = http()
            .put(format!("{url}/v1/handlers/{name}"))
            .multipart(form);
        if let Some(canary) = canary {
            request = request.query(&[("canary", canary)]);
        }
        let response = request.send().expect("deploy");
        let status = response.status();
        let body: Value = response.json().expect("json");
        assert!(
            status.is_success(),
            "deploy of {name} answered {status}: {body}"
        );
        body
    }

    /// Handler `name` as host `url` lists it (`null` when it has none).
    pub fn handler(url: &str, name: &str) -> Value {
        let response = http()
            .get(format!("{url}/v1/handlers/{name}"))
            .send()
            .expect("get handler");
        if response.status() == 404 {
            return Value::Null;
        }
        response.json().expect("json")
    }

    /// Whether host `url` runs release `release` of `name` (and canary `canary`), converged.
    fn runs(url: &str, name: &str, release: u64, canary: Option<u64>) -> bool {
        let info = handler(url, name);
        let cluster = &info["cluster"];
        cluster["state"] == "converged"
            && cluster["desired"]["number"] == release
            && info["current"]["version"] == cluster["desired"]["component"]
            && cluster["canary"]["release"].as_u64() == canary
    }

    /// Waits until every live host runs `release` of `name` (with `canary`); returns how long
    /// it took.
    pub fn wait_everywhere(
        cluster: &Cluster,
        name: &str,
        release: u64,
        canary: Option<u64>,
    ) -> Duration {
        let started = Instant::now();
        for host in cluster.hosts.iter().flatten() {
            while !runs(&host.url, name, release, canary) {
                assert!(
                    started.elapsed() < PATIENCE,
                    "{} does not run release #{release} of {name} (canary {canary:?}): {}",
                    host.url,
                    handler(&host.url, name)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        started.elapsed()
    }

    /// Deploys `wasm` as handler `name` on host 0 with the `eventbroker deploy` command and
    /// returns the time until host 1 runs it.
    fn deploy_with_cli_and_time(
        cluster: &Cluster,
        name: &str,
        wasm: &Path,
        patterns: &str,
    ) -> (Duration, Duration) {
        let manifest = cluster.dir.path().join(format!("{name}.toml"));
        std::fs::write(&manifest, format!("patterns = [\"{patterns}\"]\n")).expect("manifest");
        let started = Instant::now();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbroker"))
            .args([
                "deploy",
                "--server",
                cluster.url(0),
                "--name",
                name,
                "--manifest",
            ])
            .arg(&manifest)
            .arg(wasm)
            .output()
            .expect("eventbroker deploy");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("to the cluster"),
            "deploy failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let deployed = started.elapsed();
        while !runs(cluster.url(1), name, 1, None) {
            // A Python component compiles for tens of seconds on a loaded 2-core machine.
            assert!(
                started.elapsed() < PATIENCE * 5,
                "host 1 never ran {name}: {}",
                handler(cluster.url(1), name)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        (started.elapsed(), deployed)
    }

    /// The version that handled `event` for `counter`.
    fn version(event: &Value) -> &str {
        event["handlers"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["handler"] == "counter"))
            .and_then(|o| o["version"].as_str())
            .unwrap_or("")
    }

    /// Sum of a counter over the live hosts' metrics, for lines starting with `prefix`.
    fn metric_sum(cluster: &Cluster, prefix: &str) -> u64 {
        cluster
            .hosts
            .iter()
            .flatten()
            .map(|host| {
                let text = http()
                    .get(format!("{}/metrics", host.url))
                    .send()
                    .and_then(|r| r.text())
                    .expect("metrics");
                text.lines()
                    .filter(|line| line.starts_with(prefix))
                    .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .sum()
    }

    /// A thread publishing `cluster.work` events round-robin over `urls` until stopped.
    struct Publisher {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Vec<String>>,
    }

    impl Publisher {
        /// Stops publishing; the ids of every event published.
        fn stop(self) -> Vec<String> {
            self.stop.store(true, Ordering::Release);
            self.thread.join().expect("publisher thread")
        }
    }

    fn publish_until_stopped(urls: Vec<String>) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let client = http();
            let mut ids = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                let url = &urls[ids.len() % urls.len()];
                let response = client
                    .post(format!("{url}/v1/events"))
                    .json(&json!({
                        "type": "cluster.work",
                        "payload": {"action": "work", "iterations": 200_000, "n": ids.len()},
                    }))
                    .send()
                    .expect("publish");
                assert_eq!(response.status(), 202, "publish accepted");
                let body: Value = response.json().expect("json");
                ids.push(body["id"].as_str().expect("id").to_owned());
                std::thread::sleep(Duration::from_millis(2));
            }
            ids
        });
        Publisher { stop, thread }
    }

    /// The whole story on one backend (`backend` names it in the timing lines):
    /// 1. hosts started with the same file converge on one release in the store;
    /// 2. a Rust and a Python component deployed once on host 0 run on host 1 (timed);
    /// 3. a host started later loads the store's releases at start;
    /// 4. a deploy under load loses nothing and runs every event once, on one version or the
    ///    other, and the new one only once every host converged;
    /// 5. a canary that traps is rolled back by the hosts themselves, its events handled by
    ///    the stable release;
    /// 6. `eventbroker handlers rollback` returns every host to the previous release.
    pub fn deploy_once_canary_and_rollback(broker: Value, backend: &str) {
        let built = super::super::guests::build();
        let mut cluster = Cluster::start_with(
            broker,
            json!({
                "store": {"poll_interval": "2s", "report_interval": "250ms"},
                "canary": {"window": "1h", "min_sample": 20, "tolerance": 0.05},
            }),
            2,
        );
        // 1. Host 0 published its `counter` file; host 1 found the same release in the store.
        wait_everywhere(&cluster, "counter", 1, None);
        let first = handler(cluster.url(0), "counter")["cluster"]["desired"]["component"]
            .as_str()
            .expect("release #1")
            .to_owned();

        // 2. Deploy once: host 1 runs what was deployed on host 0.
        let rust = deploy_with_cli_and_time(
            &cluster,
            "audit",
            &built.guest("rust_audit_logger"),
            "audit.>",
        );
        eprintln!(
            "TIMING {backend}: deploy of a Rust component on host 0 -> host 1 runs it: {:?} (the deploy answered after {:?})",
            rust.0, rust.1
        );
        if let Some(python) = toolchains::build(toolchains::PAYLOAD_VALIDATORS[0]) {
            let size = std::fs::metadata(&python).map(|m| m.len()).unwrap_or(0);
            let took = deploy_with_cli_and_time(&cluster, "validator", &python, "validate.>");
            eprintln!(
                "TIMING {backend}: deploy of a Python component ({} MiB) on host 0 -> host 1 runs it: {:?} (the deploy answered after {:?})",
                size / (1 << 20),
                took.0,
                took.1
            );
        }

        // 3. A host started now runs the cluster's releases from its first event.
        let late = cluster.add_host();
        assert!(
            runs(cluster.url(late), "audit", 1, None),
            "{}",
            handler(cluster.url(late), "audit")
        );
        assert!(
            runs(cluster.url(late), "counter", 1, None),
            "{}",
            handler(cluster.url(late), "counter")
        );

        // 4. A new release of `counter` deployed (on host 1) while events flow.
        let invocations_before: u64 = (0..cluster.hosts.len())
            .map(|n| cluster.invocations(n))
            .sum();
        let before_0 = cluster.invocations(0);
        let publisher = publish_until_stopped(
            cluster
                .hosts
                .iter()
                .flatten()
                .map(|h| h.url.clone())
                .collect(),
        );
        cluster.wait_invocations(0, before_0 + 20);
        let second = deploy(
            cluster.url(1),
            "counter",
            &built.fixtures.join("counter.wasm"),
            &counter_manifest(""),
            None,
        );
        let second_version = second["cluster"]["desired"]["component"]
            .as_str()
            .expect("release #2")
            .to_owned();
        assert_ne!(second_version, first);
        wait_everywhere(&cluster, "counter", 2, None);
        // Events go on flowing a moment after every host converged.
        std::thread::sleep(Duration::from_millis(300));
        let during = publisher.stop();
        let after = cluster.publish(20, 1_000);
        let all: Vec<String> = during.iter().chain(&after).cloned().collect();
        let events = cluster.wait_all_finished(0, &all);
        for event in &events {
            assert_eq!(event["status"], "completed", "{event}");
            assert_eq!(attempts(event), 1, "handled once: {event}");
            assert!(
                [first.as_str(), second_version.as_str()].contains(&version(event)),
                "{event}"
            );
        }
        for event in &events[during.len()..] {
            assert_eq!(
                version(event),
                second_version,
                "published after every host converged: {event}"
            );
        }
        let invocations: u64 = (0..cluster.hosts.len())
            .map(|n| cluster.invocations(n))
            .sum();
        assert_eq!(
            invocations - invocations_before,
            all.len() as u64,
            "every event ran once, cluster-wide"
        );
        let on_new = events[..during.len()]
            .iter()
            .filter(|e| version(e) == second_version)
            .count();
        eprintln!(
            "deploy under load: of {} events published while it rolled out, {} ran on release #1 and {on_new} on release #2",
            during.len(),
            during.len() - on_new
        );
        assert!(
            on_new > 0 && on_new < during.len(),
            "the deploy happened while events flowed: {on_new} of {} on the new release",
            during.len()
        );

        // 5. A canary that traps on every event, on half of them.
        deploy(
            cluster.url(0),
            "counter",
            &built.fixtures.join("counter.wasm"),
            &counter_manifest("[config]\ntrap_every = \"1\"\n"),
            Some("50%"),
        );
        wait_everywhere(&cluster, "counter", 2, Some(3));
        let canary_events = cluster.publish(80, 1_000);
        let events = cluster.wait_all_finished(1, &canary_events);
        for event in &events {
            assert_eq!(
                event["status"], "completed",
                "nothing lost to the canary: {event}"
            );
            assert_eq!(
                version(event),
                second_version,
                "the stable release handled it: {event}"
            );
        }
        let started = Instant::now();
        let decision = loop {
            let info = handler(cluster.url(0), "counter");
            if let Some(decision) = info["cluster"]["decisions"]
                .as_array()
                .and_then(|d| d.last())
            {
                assert!(info["cluster"]["canary"].is_null(), "{info}");
                break decision.clone();
            }
            assert!(started.elapsed() < PATIENCE, "no canary decision: {info}");
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("canary decision: {decision}");
        assert_eq!(decision["outcome"], "rolled_back", "{decision}");
        assert_eq!(
            (decision["release"].as_u64(), decision["stable"].as_u64()),
            (Some(3), Some(2))
        );
        assert!(
            decision["canary"]["failures"]["trap"].as_u64().unwrap_or(0) >= 20,
            "{decision}"
        );
        wait_everywhere(&cluster, "counter", 2, None);
        assert_eq!(
            metric_sum(&cluster, "eventbroker_handler_canary_decisions_total"),
            1,
            "one host decided"
        );

        // 6. Roll back by hand to release #1, with the command.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbroker"))
            .args([
                "handlers",
                "rollback",
                "counter",
                "--server",
                cluster.url(late),
            ])
            .output()
            .expect("eventbroker handlers rollback");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("release #1"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        wait_everywhere(&cluster, "counter", 1, None);
        let ids = cluster.publish(10, 1_000);
        for event in cluster.wait_all_finished(1, &ids) {
            assert_eq!(version(&event), first, "after the rollback: {event}");
        }
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbroker"))
            .args(["handlers", "list", "--server", cluster.url(0)])
            .output()
            .expect("eventbroker handlers list");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("DESIRED") && stdout.contains("rolled_back"),
            "{stdout}"
        );
        eprintln!("{stdout}");
    }
}

/// Handlers' key-value state shared by the hosts of a cluster.
pub mod keyvalue {
    use super::*;
    use eventbroker::keyvalue::Namespace;

    const MANIFEST: &str = "patterns = [\"public.orders.>\"]\nconcurrency = 8\n[config]\ndedupe_key = \"order_id\"\n[keyvalue]\nbuckets = [\"dedupe\", \"counts\"]\n";
    const ORDERS: usize = 60;

    /// The dedupe counter (`guests/rust-dedupe-counter`), deployed once, runs on two hosts:
    /// every order is published twice, once through each host, from two threads at once, so
    /// both hosts increment the same keys concurrently. Each order is counted exactly once and
    /// marked seen exactly twice, read back from the backend itself.
    pub fn two_hosts_count_each_order_once(broker: Value) {
        let built = super::super::guests::build();
        let cluster = Cluster::start(broker, 2);
        let wasm = built.guest("rust_dedupe_counter");
        deploys::deploy(cluster.url(0), "dedupe-counter", &wasm, MANIFEST, None);
        deploys::wait_everywhere(&cluster, "dedupe-counter", 1, None);

        let urls = [cluster.url(0).to_owned(), cluster.url(1).to_owned()];
        let ids: Vec<String> = std::thread::scope(|scope| {
            let threads: Vec<_> = urls
                .iter()
                .map(|url| {
                    scope.spawn(move || {
                        let client = http();
                        (0..ORDERS)
                            .map(|n| {
                                let response = client
                                    .post(format!("{url}/v1/events"))
                                    .json(&json!({
                                        "type": "public.orders.create",
                                        "payload": {"order_id": format!("A-{n}")},
                                    }))
                                    .send()
                                    .expect("publish");
                                assert_eq!(response.status(), 202, "publish accepted");
                                let body: Value = response.json().expect("json");
                                body["id"].as_str().expect("id").to_owned()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("publisher"))
                .collect()
        });
        for event in cluster.wait_all_finished(0, &ids) {
            assert_eq!(event["status"], "completed", "{event}");
        }

        let config = eventbroker_server::Config::load(Some(&cluster.config_file(0)))
            .expect("host 0's config");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let provider = eventbroker_server::connect(&config.backend, &config.event_broker)
                .await
                .expect("connect to the backend");
            let store = provider.keyvalue().expect("the backend's key-value store");
            let group = &config.event_broker.consumer_group;
            let counts = Namespace::new(group, "dedupe-counter", "counts");
            assert_eq!(
                store
                    .get(&counts, "public.orders.create")
                    .await
                    .expect("read the count"),
                Some(ORDERS.to_string().into_bytes()),
                "each order counted once"
            );
            let seen = Namespace::new(group, "dedupe-counter", "dedupe");
            for n in 0..ORDERS {
                assert_eq!(
                    store
                        .get(&seen, &format!("public.orders.create:A-{n}"))
                        .await
                        .expect("read a mark"),
                    Some(b"2".to_vec()),
                    "order A-{n} delivered twice"
                );
            }
            provider.close().await;
        });
    }
}

/// The example guests that use grants, under `serve`: the webhook notifiers in Rust,
/// JavaScript (`fetch`) and Python post to a loopback server, and the dedupe counter keeps its
/// state in the backend's key-value store.
pub mod examples {
    use super::*;
    use eventbroker_testkit::toolchains::{self, Language};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    const ORDERS: usize = 5;
    /// Webhook notifiers among the examples.
    const WEBHOOKS: usize = 3;

    /// A loopback webhook receiver on a thread of its own: its port and the bodies posted to
    /// `/hooks/orders`.
    fn receiver() -> (u16, Arc<Mutex<Vec<Value>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let received = bodies.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/hooks/orders",
                    axum::routing::post(move |body: axum::body::Bytes| async move {
                        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        received.lock().expect("bodies").push(value);
                        "ok"
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        (port, bodies)
    }

    /// Waits until handler `name` has a loaded version on the host at `url`.
    fn wait_loaded(url: &str, name: &str) {
        let started = Instant::now();
        while deploys::handler(url, name)["current"]["version"].is_null() {
            assert!(
                started.elapsed() < PATIENCE * 5,
                "{name} never loaded: {}",
                deploys::handler(url, name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Each example by the name its manifest gives, with its folder in `guests/` and its
    /// component: Rust from the guests build, JavaScript and Python from their `build.sh`
    /// (`None` after a loud skip when a toolchain is missing).
    fn components() -> Option<BTreeMap<&'static str, (&'static str, PathBuf)>> {
        let built = super::super::guests::build();
        let javascript = toolchains::build(Language {
            name: "javascript",
            dir: "javascript-webhook-notifier",
        })?;
        let python = toolchains::build(Language {
            name: "python",
            dir: "python-webhook-notifier",
        })?;
        Some(BTreeMap::from([
            (
                "webhook-notifier",
                (
                    "rust-webhook-notifier",
                    built.guest("rust_webhook_notifier"),
                ),
            ),
            (
                "javascript-webhook-notifier",
                ("javascript-webhook-notifier", javascript),
            ),
            (
                "python-webhook-notifier",
                ("python-webhook-notifier", python),
            ),
            (
                "dedupe-counter",
                ("rust-dedupe-counter", built.guest("rust_dedupe_counter")),
            ),
        ]))
    }

    /// The manifest in the example's folder, with the receiver's port in its webhook URL and
    /// grant.
    fn manifest(dir: &str, port: u16) -> String {
        let path = super::super::guests::repo_root()
            .join("guests")
            .join(dir)
            .join("manifest.toml");
        std::fs::read_to_string(&path)
            .expect("the example's manifest")
            .replace("127.0.0.1:9000", &format!("127.0.0.1:{port}"))
    }

    /// Each webhook example run with `eventbroker run --deny-net`: the host refuses its request
    /// (after taking whatever body the guest writes after handing the request over, as `fetch`
    /// does), and the guest sees the refusal as an error and asks for a retry; no runtime
    /// aborts on a closed stream (a trap).
    pub fn webhook_examples_see_a_refused_request_as_an_error() {
        let Some(components) = components() else {
            return;
        };
        let cache = super::super::guests::repo_root().join("target/test-component-cache");
        for (name, (dir, wasm)) in components.iter().filter(|(n, _)| n.contains("webhook")) {
            let folder = super::super::guests::repo_root().join("guests").join(dir);
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbroker"))
                .arg("run")
                .arg(wasm)
                .arg("--manifest")
                .arg(folder.join("manifest.toml"))
                .arg("--event")
                .arg(folder.join("sample-event.json"))
                .arg("--cache-dir")
                .arg(&cache)
                .arg("--deny-net")
                .output()
                .expect("eventbroker run");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert_eq!(output.status.code(), Some(1), "{name}: {stdout}");
            assert!(
                stdout.contains("outcome   retry") && stdout.contains("webhook unreachable"),
                "{name} saw the refusal as an error: {stdout}"
            );
            assert!(
                stdout.contains("outbound HTTP refused") && !stdout.contains("trap"),
                "{name}: {stdout}"
            );
        }
    }

    /// One host on `broker` runs the four examples: every order reaches the receiver once
    /// through each webhook notifier, and the dedupe counter counts each order id once
    /// (its `stats.counted` events carry counts 1 to 5) although each is published twice.
    pub fn grant_examples_under_serve(broker: Value) {
        let Some(components) = components() else {
            return;
        };
        let (port, received) = receiver();
        // One compile cache for every backend's host: JavaScript and Python compile once.
        let cache = super::super::guests::repo_root().join("target/test-component-cache");
        let cluster = Cluster::start_with(broker, json!({"cache_dir": cache}), 1);
        for (name, (dir, wasm)) in &components {
            deploys::deploy(cluster.url(0), name, wasm, &manifest(dir, port), None);
        }
        for name in components.keys() {
            wait_loaded(cluster.url(0), name);
        }

        let client = http();
        let ids: Vec<String> = (0..2 * ORDERS)
            .map(|n| {
                let response = client
                    .post(format!("{}/v1/events", cluster.url(0)))
                    .json(&json!({
                        "type": "public.orders.create",
                        "payload": {"order_id": format!("A-{}", n % ORDERS), "n": n},
                    }))
                    .send()
                    .expect("publish");
                assert_eq!(response.status(), 202, "publish accepted");
                let body: Value = response.json().expect("json");
                body["id"].as_str().expect("id").to_owned()
            })
            .collect();
        for event in cluster.wait_all_finished(0, &ids) {
            assert_eq!(event["status"], "completed", "{event:#}");
        }

        let bodies = received.lock().expect("bodies").clone();
        for id in &ids {
            let posts = bodies.iter().filter(|b| b["id"] == id.as_str()).count();
            assert_eq!(
                posts, WEBHOOKS,
                "event {id} posted once by each webhook notifier: {bodies:#?}"
            );
        }
        let counted: Value = client
            .get(format!(
                "{}/v1/events?type=stats.counted&limit=100",
                cluster.url(0)
            ))
            .send()
            .and_then(|r| r.json())
            .expect("stats.counted events");
        let mut counts: Vec<u64> = counted["events"]
            .as_array()
            .or_else(|| counted.as_array())
            .expect("a list of events")
            .iter()
            .filter_map(|e| e["payload"]["count"].as_u64())
            .collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            (1..=ORDERS as u64).collect::<Vec<_>>(),
            "each order id counted once: {counted:#}"
        );
    }
}
