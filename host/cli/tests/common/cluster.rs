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

    fn config_path(&self, n: usize) -> PathBuf {
        let mut broker = self.config.clone();
        broker["instance_id"] = json!(format!("cluster-host-{n}"));
        let config = json!({
            "event_broker": broker,
            "handlers": {
                "dir": self.dir.path().join(format!("handlers-{n}")),
                "cache_dir": self.dir.path().join("cache"),
                "watch": false,
            },
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
