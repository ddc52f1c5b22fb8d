//! The `eventbroker serve` processes of the suite: started from a config file, killed with
//! SIGKILL, restarted, stopped with SIGTERM. While one runs, a reader thread collects every
//! invocation line of the counting guest from its stderr, and a monitor thread samples its
//! resident memory (`VmRSS` of `/proc/<pid>/status`) and the latency of `GET /healthz`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use eventbroker_testkit::PATIENCE;

/// What the counting guest logs first in every invocation (see `tests/fixtures/counter`).
const COUNT_MARK: &str = "faults-count ";

/// How often the monitor samples memory and `/healthz`.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A `/healthz` probe that takes longer than this counts as not answered.
pub const HEALTH_PATIENCE: Duration = Duration::from_secs(10);

/// Lines of a host's log kept for failure reports.
const TAIL_LINES: usize = 400;

/// One run of the counting guest, as the host logged it.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The event id.
    pub event: String,
    /// The handler name.
    pub handler: String,
    /// The consumer group (from the handler's manifest `[config] group`).
    pub group: String,
    /// The attempt number the host gave the guest.
    pub attempt: u32,
    /// Which process ran it: `<label>#<generation>`.
    pub host: String,
    /// When the test read the line (the guest logs it before doing anything else).
    pub at: Instant,
}

/// What the monitor saw of one process generation.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Largest resident set seen, in KiB.
    pub max_rss_kib: u64,
    /// Slowest `/healthz` answer.
    pub max_latency: Duration,
    /// Probes that failed or took longer than [`HEALTH_PATIENCE`], with the reason.
    pub failures: Vec<String>,
    /// Probes made.
    pub probes: u64,
}

impl Health {
    fn merge(&mut self, other: &Health) {
        self.max_rss_kib = self.max_rss_kib.max(other.max_rss_kib);
        self.max_latency = self.max_latency.max(other.max_latency);
        self.failures.extend(other.failures.iter().cloned());
        self.probes += other.probes;
    }
}

/// How one process generation ended.
#[derive(Debug, Clone)]
pub enum End {
    /// Killed with SIGKILL by the test.
    Killed,
    /// Stopped with SIGTERM; `clean` if it exited with success after draining all its work.
    Stopped { clean: bool, detail: String },
}

/// A finished process generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `<label>#<generation>`.
    pub host: String,
    /// How it ended.
    pub end: End,
    /// Memory and `/healthz`.
    pub health: Health,
    /// The last lines of its log.
    pub tail: Vec<String>,
    /// Its warnings, errors and lease rescues, by message (ids and numbers blanked), with
    /// how often each was logged.
    pub notable: Vec<(String, u64)>,
}

/// What the reader thread kept of a process's log.
#[derive(Default)]
struct Log {
    tail: VecDeque<String>,
    notable: BTreeMap<String, u64>,
}

struct Live {
    child: Child,
    url: String,
    generation: u32,
    reader: JoinHandle<Log>,
    monitor_stop: Arc<AtomicBool>,
    monitor: JoinHandle<Health>,
}

/// One host: a config file and the processes started from it over the test.
pub struct Serve {
    /// Short name, e.g. `a0`.
    pub label: String,
    config: PathBuf,
    dir: PathBuf,
    next_generation: u32,
    live: Option<Live>,
    /// Every invocation line of every generation, in the order read.
    pub invocations: Arc<Mutex<Vec<Invocation>>>,
    /// Generations that were killed with SIGKILL.
    pub killed: BTreeSet<u32>,
    /// Generations that ended.
    pub ended: Vec<Generation>,
}

impl Serve {
    /// Starts `eventbroker serve --config CONFIG` in `dir` and waits until `/readyz` answers 200.
    ///
    /// # Panics
    /// If the process does not start listening or become ready within the patience.
    pub fn start(label: &str, config: &Path, dir: &Path) -> Serve {
        let mut serve = Serve {
            label: label.to_owned(),
            config: config.to_owned(),
            dir: dir.to_owned(),
            next_generation: 0,
            live: None,
            invocations: Arc::default(),
            killed: BTreeSet::new(),
            ended: Vec::new(),
        };
        serve.spawn();
        serve
    }

    /// The base URL of the running process, if one runs.
    pub fn url(&self) -> Option<String> {
        self.live.as_ref().map(|live| live.url.clone())
    }

    /// `<label>#<generation>` of the running process.
    pub fn host(&self) -> Option<String> {
        self.live
            .as_ref()
            .map(|live| format!("{}#{}", self.label, live.generation))
    }

    fn spawn(&mut self) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let host = format!("{}#{generation}", self.label);
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventbroker"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&self.config)
            .current_dir(&self.dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start eventbroker serve");
        let stderr = child.stderr.take().expect("stderr");
        let (addr_tx, addr_rx) = mpsc::channel();
        let invocations = self.invocations.clone();
        let reader_host = host.clone();
        let reader = std::thread::spawn(move || {
            let mut log = Log::default();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find(COUNT_MARK) {
                    if let Some(invocation) =
                        parse_invocation(&line[at + COUNT_MARK.len()..], &reader_host)
                    {
                        invocations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(invocation);
                    }
                    continue;
                }
                if line.contains("eventbroker listening")
                    && let Some(addr) = line.split("addr=").nth(1)
                {
                    let _ = addr_tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
                if let Some(key) = notable(&line) {
                    *log.notable.entry(key).or_default() += 1;
                }
                if log.tail.len() == TAIL_LINES {
                    log.tail.pop_front();
                }
                log.tail.push_back(line);
            }
            log
        });
        let addr = match addr_rx.recv_timeout(PATIENCE) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = reader.join().unwrap_or_default();
                panic!(
                    "{host} did not start listening; its log:\n{}",
                    Vec::from(log.tail).join("\n")
                );
            }
        };
        let url = format!("http://{addr}");
        wait_ready(&url, &host);
        let monitor_stop = Arc::new(AtomicBool::new(false));
        let monitor = {
            let (stop, url, pid) = (monitor_stop.clone(), url.clone(), child.id());
            std::thread::spawn(move || monitor(pid, &url, &stop))
        };
        self.live = Some(Live {
            child,
            url,
            generation,
            reader,
            monitor_stop,
            monitor,
        });
    }

    /// Kills the running process with SIGKILL (no drain, no goodbye) and collects what it
    /// logged.
    pub fn kill(&mut self) {
        let Some(mut live) = self.live.take() else {
            return;
        };
        live.monitor_stop.store(true, Ordering::Release);
        let health = live.monitor.join().unwrap_or_default();
        let _ = live.child.kill();
        let _ = live.child.wait();
        let log = live.reader.join().unwrap_or_default();
        self.killed.insert(live.generation);
        self.ended.push(Generation {
            host: format!("{}#{}", self.label, live.generation),
            end: End::Killed,
            health,
            tail: log.tail.into(),
            notable: log.notable.into_iter().collect(),
        });
    }

    /// Starts a new process from the same config (after [`Serve::kill`]).
    pub fn restart(&mut self) {
        assert!(self.live.is_none(), "{} still runs", self.label);
        self.spawn();
    }

    /// Stops the running process with SIGTERM and waits for it to exit (killing it after
    /// `patience`); records whether it exited with success after draining all its work.
    pub fn stop(&mut self, patience: Duration) {
        let Some(mut live) = self.live.take() else {
            return;
        };
        live.monitor_stop.store(true, Ordering::Release);
        let health = live.monitor.join().unwrap_or_default();
        let signalled = Command::new("kill")
            .args(["-TERM", &live.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + patience;
        let status = loop {
            match live.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if signalled && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = live.child.kill();
                    let _ = live.child.wait();
                    break None;
                }
            }
        };
        let log = live.reader.join().unwrap_or_default();
        let tail: Vec<String> = log.tail.into();
        let drained = tail.iter().any(|line| line.contains("all work drained"));
        let (clean, detail) = match status {
            None => (
                false,
                format!("did not exit within {patience:?} of SIGTERM; killed"),
            ),
            Some(status) if !status.success() => (false, format!("exited with {status}")),
            Some(_) if !drained => (
                false,
                "exited without saying \"all work drained\" (see its log)".to_owned(),
            ),
            Some(_) => (true, "drained".to_owned()),
        };
        self.ended.push(Generation {
            host: format!("{}#{}", self.label, live.generation),
            end: End::Stopped { clean, detail },
            health,
            tail,
            notable: log.notable.into_iter().collect(),
        });
    }

    /// Memory and `/healthz` over every ended generation.
    pub fn health(&self) -> Health {
        let mut total = Health::default();
        for generation in &self.ended {
            total.merge(&generation.health);
        }
        total
    }

    /// A copy of the invocations read so far.
    pub fn invocations(&self) -> Vec<Invocation> {
        self.invocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut live) = self.live.take() {
            live.monitor_stop.store(true, Ordering::Release);
            let _ = live.child.kill();
            let _ = live.child.wait();
        }
    }
}

/// Parses `event=… handler=… group=… attempt=…` (the rest of the line is the host's fields).
fn parse_invocation(text: &str, host: &str) -> Option<Invocation> {
    let mut fields = text.split_whitespace();
    let mut take = |key: &str| {
        fields
            .next()
            .and_then(|field| field.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_owned)
    };
    Some(Invocation {
        event: take("event")?,
        handler: take("handler")?,
        group: take("group")?,
        attempt: take("attempt")?.parse().ok()?,
        host: host.to_owned(),
        at: Instant::now(),
    })
}

/// For a warning, an error or a lease rescue: the line without its timestamp, with the
/// values of `key=value` fields and every digit blanked, so that lines of one kind count
/// together.
fn notable(line: &str) -> Option<String> {
    let start = [" WARN ", " ERROR ", " INFO "]
        .iter()
        .find_map(|level| line.find(level))?;
    let text = line[start..].trim();
    if text.starts_with("INFO") && !text.contains("expired lease") {
        return None;
    }
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| match word.split_once('=') {
            Some((key, _)) => format!("{key}=…"),
            None => word
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect(),
        })
        .collect();
    let mut key = words.join(" ");
    if key.len() > 160 {
        let mut end = 160;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
        key.push('…');
    }
    Some(key)
}

fn wait_ready(url: &str, host: &str) {
    let client = reqwest::blocking::Client::builder()
        .timeout(HEALTH_PATIENCE)
        .build()
        .expect("http client");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = client
            .get(format!("{url}/readyz"))
            .send()
            .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()));
        if matches!(answer, Ok((200, _))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} did not become ready within {PATIENCE:?}: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples `VmRSS` and `/healthz` until `stop` is set.
fn monitor(pid: u32, url: &str, stop: &AtomicBool) -> Health {
    let client = reqwest::blocking::Client::builder()
        .timeout(HEALTH_PATIENCE)
        .build()
        .expect("http client");
    let mut health = Health::default();
    while !stop.load(Ordering::Acquire) {
        if let Some(rss) = rss_kib(pid) {
            health.max_rss_kib = health.max_rss_kib.max(rss);
        }
        let started = Instant::now();
        let answer = client.get(format!("{url}/healthz")).send();
        let latency = started.elapsed();
        health.probes += 1;
        health.max_latency = health.max_latency.max(latency);
        // A probe cut short by the test stopping the process is not a failure.
        if !stop.load(Ordering::Acquire) {
            match answer {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => health
                    .failures
                    .push(format!("/healthz answered {}", response.status())),
                Err(error) => health.failures.push(format!(
                    "/healthz did not answer after {latency:?}: {error}"
                )),
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    health
}

/// The resident set size of process `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}
