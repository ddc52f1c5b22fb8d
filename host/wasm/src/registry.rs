//! The handler set: handler name → current version, registered with the broker.
//!
//! Every change — loading the handlers directory at start, a file change, an HTTP or CLI
//! deploy — goes through [`HandlerSet::apply`]: the new version is compiled and checked off the
//! event path, then swapped in atomically with [`Broker::replace_subscription`]. A version that
//! fails is rejected with its reason and time, and the previous version keeps serving.
//!
//! Bytes are checked and hashed once ([`ComponentBytes`]) and compiled once ([`Compiled`]);
//! the compiled component is handed to the registry in memory (the on-disk cache is written for
//! the next start). Files a deploy writes are remembered by size and modification time, so the
//! directory watcher does not read, hash or reload what the host itself just wrote.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::WasmError;
use super::component::{CompiledHandler, HandlerCounters, OUTCOMES, VersionInfo};
use super::engine::{Compiled, ComponentBytes, WasmEngine};
use super::handler::WasmHandler;
use super::manifest::{Manifest, validate_name};
use super::percentiles::Percentiles;
use crate::cluster::{ClusterEntry, ClusterInfo, ClusterLink, DeployOptions};
use crate::config::HandlersConfig;
use eventbroker::broker::{Broker, SubscribeOptions};
use eventbroker::config::RetryPolicy;

/// Extra time the broker allows beyond a handler's own timeout, so the guest's deadline
/// (enforced inside the sandbox) fires first and is reported as such.
pub(crate) const TIMEOUT_GRACE: Duration = Duration::from_millis(500);

/// Why a version was not loaded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    /// The reason.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Content hash of the rejected component, when it was readable.
    pub version: Option<String>,
}

/// A handler as listed by `GET /v1/handlers`.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerInfo {
    /// Name.
    pub name: String,
    /// `active` (a version serves events) or `rejected` (no version could be loaded).
    pub state: &'static str,
    /// The version serving events.
    pub current: Option<VersionInfo>,
    /// The last rejected version, if any.
    pub last_rejection: Option<Rejection>,
    /// Invocations by outcome: `ok`, `retry`, `fail`, `timeout`, `out_of_fuel`,
    /// `memory_limit`, `trap`, `host`.
    pub invocations: BTreeMap<&'static str, u64>,
    /// Fuel consumed by all invocations.
    pub fuel_used: u64,
    /// Total invocation time.
    #[serde(with = "humantime_serde")]
    pub busy_time: Duration,
    /// Percentiles of invocation durations in microseconds since start (`null` before the
    /// first invocation).
    pub duration_us: Option<Percentiles>,
    /// Percentiles of fuel consumed per invocation since start.
    pub fuel_per_invocation: Option<Percentiles>,
    /// Versions loaded since start (first load included).
    pub loads: u64,
    /// Versions rejected since start.
    pub rejections: u64,
    /// Times the same component and manifest as the serving version were applied again and
    /// changed nothing (a `touch`, a redeploy of identical files); not counted as loads.
    pub unchanged: u64,
    /// In a cluster: the desired release, the kept releases, the canary and its decisions,
    /// and which hosts run what (absent on a host without a handler store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterInfo>,
}

/// All WebAssembly handlers of a host.
#[derive(Clone)]
pub struct HandlerSet {
    pub(crate) inner: Arc<SetInner>,
}

pub(crate) struct SetInner {
    pub(crate) engine: WasmEngine,
    pub(crate) broker: Broker,
    pub(crate) config: HandlersConfig,
    retry: RetryPolicy,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Serialises changes so two deploys of one name cannot interleave.
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// The files of each handler as a deploy of this host last wrote them.
    written: Mutex<HashMap<String, Written>>,
    /// The cluster handler store this host follows, when it has one.
    pub(crate) cluster: Option<ClusterLink>,
}

/// A handler's files as written by [`HandlerSet::deploy`]: what the watcher must not reload.
#[derive(Debug, Clone, PartialEq)]
struct Written {
    wasm: Option<Stamp>,
    manifest: Option<Stamp>,
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, PartialEq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
}

impl Stamp {
    /// The stamp of `path`, `None` when it does not exist (or cannot be read).
    fn of(path: &Path) -> Option<Stamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: metadata.len(),
            modified: metadata.modified().ok()?,
        })
    }
}

/// A version to apply: its checked bytes, or its compiled component.
pub(crate) enum Source {
    Bytes(ComponentBytes),
    Compiled(Compiled),
}

impl Source {
    fn version(&self) -> String {
        match self {
            Source::Bytes(bytes) => bytes.version(),
            Source::Compiled(compiled) => compiled.version().to_owned(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Entry {
    /// The version serving events (in a cluster: the stable release, as loaded).
    pub(crate) current: Option<Arc<CompiledHandler>>,
    pub(crate) counters: Arc<HandlerCounters>,
    pub(crate) last_rejection: Option<Rejection>,
    pub(crate) loads: u64,
    pub(crate) rejections: u64,
    pub(crate) unchanged: u64,
    /// What the cluster's record says and what this host made of it (cluster mode).
    pub(crate) cluster: Option<ClusterEntry>,
}

/// What applying a version did.
struct Applied {
    info: HandlerInfo,
    /// False when the version was identical to the serving one.
    changed: bool,
}

/// What [`HandlerSet::load_dir`] did with each file.
#[derive(Debug)]
pub struct LoadReport {
    /// Handlers loaded.
    pub loaded: Vec<String>,
    /// Files that failed, with the reason.
    pub failed: Vec<(PathBuf, WasmError)>,
}

impl HandlerSet {
    /// An empty set for `broker`.
    pub fn new(engine: WasmEngine, broker: Broker, config: HandlersConfig) -> Self {
        Self::with_cluster(engine, broker, config, None)
    }

    pub(crate) fn with_cluster(
        engine: WasmEngine,
        broker: Broker,
        config: HandlersConfig,
        cluster: Option<ClusterLink>,
    ) -> Self {
        let retry = broker.config().retry_policy.clone();
        HandlerSet {
            inner: Arc::new(SetInner {
                engine,
                broker,
                config,
                retry,
                entries: Mutex::new(BTreeMap::new()),
                changes: tokio::sync::Mutex::new(()),
                written: Mutex::new(HashMap::new()),
                cluster,
            }),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &WasmEngine {
        &self.inner.engine
    }

    /// The handlers directory.
    pub fn dir(&self) -> &Path {
        &self.inner.config.dir
    }

    pub(crate) fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads every `NAME.wasm` (with its optional `NAME.toml`) in the handlers directory.
    /// A file that fails is reported and does not stop the others; one whose name is not a
    /// valid handler name is reported without becoming an entry. A missing directory is an
    /// empty set.
    pub async fn load_dir(&self) -> LoadReport {
        let mut report = LoadReport {
            loaded: Vec::new(),
            failed: Vec::new(),
        };
        let dir = self.dir().to_path_buf();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(dir = %dir.display(), "no handlers directory; starting without WebAssembly handlers");
                return report;
            }
            Err(error) => {
                report.failed.push((
                    dir.clone(),
                    WasmError::Io(format!("cannot read {}: {error}", dir.display())),
                ));
                return report;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "wasm"))
            .collect();
        files.sort();
        // Compile every component at once before loading them one by one: a large component
        // does not hold up the others. Each is compiled once and handed over in memory.
        let compiling: Vec<_> = files
            .iter()
            .map(|path| async move {
                let bytes = std::fs::read(path).ok()?;
                let bytes = ComponentBytes::new(bytes).ok()?;
                self.inner.engine.compile_off_thread(bytes).await.ok()
            })
            .collect();
        let compiled = futures::future::join_all(compiling).await;
        for (path, compiled) in files.into_iter().zip(compiled) {
            match self.read_and_apply(&path, compiled).await.map(|a| a.info) {
                Ok(info) => {
                    let (version, patterns) = info
                        .current
                        .as_ref()
                        .map(|c| (c.version.as_str(), c.patterns.join(" ")))
                        .unwrap_or_default();
                    tracing::info!(handler = %info.name, %version, %patterns, "handler loaded");
                    report.loaded.push(info.name);
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "handler not loaded");
                    report.failed.push((path, error));
                }
            }
        }
        report
    }

    /// Loads (or reloads) the handler in `wasm_path`, with `NAME.toml` beside it if present.
    ///
    /// # Errors
    /// As [`HandlerSet::apply`], plus unreadable files.
    pub async fn load_file(&self, wasm_path: &Path) -> Result<HandlerInfo, WasmError> {
        self.read_and_apply(wasm_path, None)
            .await
            .map(|applied| applied.info)
    }

    /// [`HandlerSet::load_file`] for the directory watcher: `None` when the files hold the
    /// version already serving (nothing changed), or are exactly the files a deploy of this
    /// host wrote (recognised without reading them).
    pub(crate) async fn reload_file(
        &self,
        wasm_path: &Path,
    ) -> Result<Option<HandlerInfo>, WasmError> {
        if self.written_by_this_host(wasm_path) {
            return Ok(None);
        }
        if self.is_clustered() {
            // A file changed on this host is a deploy to the whole cluster.
            let before = self
                .get(&file_stem(wasm_path)?)
                .and_then(|i| i.cluster)
                .map(|c| c.revision);
            let info = self.deploy_file(wasm_path).await?;
            let after = info.cluster.as_ref().map(|c| c.revision);
            return Ok((after != before).then_some(info));
        }
        let applied = self.read_and_apply(wasm_path, None).await?;
        Ok(applied.changed.then_some(applied.info))
    }

    /// Whether the files of the handler at `wasm_path` are the ones a deploy of this host
    /// last wrote (same size and modification time).
    fn written_by_this_host(&self, wasm_path: &Path) -> bool {
        let Ok(name) = file_stem(wasm_path) else {
            return false;
        };
        let written = self
            .inner
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        written.is_some_and(|written| {
            written
                == Written {
                    wasm: Stamp::of(wasm_path),
                    manifest: Stamp::of(&wasm_path.with_extension("toml")),
                }
        })
    }

    /// Reads the files of the handler at `wasm_path` and applies them; `compiled` is its
    /// component compiled beforehand (used when it is the one the file holds).
    async fn read_and_apply(
        &self,
        wasm_path: &Path,
        compiled: Option<Compiled>,
    ) -> Result<Applied, WasmError> {
        let name = file_stem(wasm_path)?;
        validate_name(&name)
            .map_err(|e| WasmError::Manifest(format!("{e} (file {})", wasm_path.display())))?;
        // Read the files under the change lock, so that a deploy writing them cannot interleave.
        let _change = self.inner.changes.lock().await;
        let (bytes, manifest) = read_files(wasm_path)?;
        let source = match ComponentBytes::new(bytes) {
            Ok(bytes) => match compiled {
                Some(compiled) if compiled.version() == bytes.version() => {
                    Source::Compiled(compiled)
                }
                _ => Source::Bytes(bytes),
            },
            Err(error) => return Err(self.rejected(&name, error, None)),
        };
        self.apply_locked(&name, source, manifest.as_deref()).await
    }

    /// Records `error` as the rejection of a version of `name` and returns it.
    pub(crate) fn rejected(
        &self,
        name: &str,
        error: WasmError,
        version: Option<String>,
    ) -> WasmError {
        let mut entries = self.entries();
        reject(
            entries.entry(name.to_owned()).or_default(),
            name,
            &error,
            version,
        );
        self.inner.broker.metrics().handler_rejected(name);
        error
    }

    /// Compiles, checks and swaps in a version of handler `name`. On failure the rejection is
    /// recorded (visible in [`HandlerSet::list`]) and the previous version keeps serving.
    /// Applying the same component and manifest again changes nothing. An invalid name is
    /// refused before anything is recorded: it never becomes an entry or a metric label.
    ///
    /// # Errors
    /// [`WasmError`] saying why the version was rejected.
    pub async fn apply(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Option<&str>,
    ) -> Result<HandlerInfo, WasmError> {
        validate_name(name)?;
        let bytes = ComponentBytes::new(bytes).map_err(|e| self.rejected(name, e, None))?;
        let _change = self.inner.changes.lock().await;
        self.apply_locked(name, Source::Bytes(bytes), manifest)
            .await
            .map(|applied| applied.info)
    }

    /// [`HandlerSet::apply`] for a caller holding the change lock, with a valid `name`.
    async fn apply_locked(
        &self,
        name: &str,
        source: Source,
        manifest: Option<&str>,
    ) -> Result<Applied, WasmError> {
        let result = self.build(name, source, manifest).await;
        let mut entries = self.entries();
        let entry = entries.entry(name.to_owned()).or_default();
        match result {
            Ok(Some(version)) => {
                let version = Arc::new(version);
                let spec = version.spec();
                let patterns: Vec<&str> = version.patterns().iter().map(String::as_str).collect();
                let swapped = self.inner.broker.replace_subscription(
                    &patterns,
                    Arc::new(WasmHandler::new(version.clone())),
                    SubscribeOptions {
                        name: Some(spec.name.clone()),
                        timeout: Some(spec.timeout + TIMEOUT_GRACE),
                        retry: Some(spec.retry.clone()),
                    },
                );
                if let Err(error) = swapped {
                    let error = WasmError::Manifest(error.to_string());
                    reject(entry, name, &error, Some(version.version().to_owned()));
                    return Err(error);
                }
                entry.counters = version.counters().clone();
                entry.current = Some(version);
                entry.loads += 1;
                self.inner.broker.metrics().handler_loaded(name);
                Ok(Applied {
                    info: info(name, entry),
                    changed: true,
                })
            }
            Ok(None) => {
                entry.unchanged += 1;
                Ok(Applied {
                    info: info(name, entry),
                    changed: false,
                })
            }
            Err((error, version)) => {
                reject(entry, name, &error, version);
                self.inner.broker.metrics().handler_rejected(name);
                Err(error)
            }
        }
    }

    /// Builds the new version, or `None` when it is identical to the current one.
    async fn build(
        &self,
        name: &str,
        source: Source,
        manifest: Option<&str>,
    ) -> Result<Option<CompiledHandler>, (WasmError, Option<String>)> {
        self.build_version(name, source, manifest, true).await
    }

    /// Builds a version of `name` from `source` and `manifest`: the manifest is resolved
    /// against the host's defaults, the component compiled (unless it is already), linked and
    /// checked, and its patterns read. With `skip_current`, `None` when it is identical to the
    /// version serving now.
    pub(crate) async fn build_version(
        &self,
        name: &str,
        source: Source,
        manifest: Option<&str>,
        skip_current: bool,
    ) -> Result<Option<CompiledHandler>, (WasmError, Option<String>)> {
        let version = source.version();
        let fail = |e: WasmError| (e, Some(version.clone()));
        let manifest = match manifest {
            Some(text) => Manifest::parse(text).map_err(fail)?,
            None => Manifest::default(),
        };
        if let Some(declared) = &manifest.name
            && declared != name
        {
            return Err(fail(WasmError::Manifest(format!(
                "manifest names the handler {declared:?} but it is deployed as {name:?}; make them equal or drop `name` from the manifest"
            ))));
        }
        let spec = manifest
            .resolve(
                name,
                &self.inner.config.defaults,
                &self.inner.retry,
                &self.inner.config.pool,
            )
            .map_err(fail)?;
        let (current, counters) = {
            let entries = self.entries();
            let entry = entries.get(name);
            (
                entry.and_then(|e| e.current.clone()),
                // An entry made by a rejection has counters without metrics: a version that
                // loads gets ones that feed the host's metrics.
                entry
                    .map(|e| e.counters.clone())
                    .filter(|c| c.metrics.is_some())
                    .unwrap_or_else(|| {
                        Arc::new(HandlerCounters::with_metrics(
                            self.inner.broker.metrics().clone(),
                        ))
                    }),
            )
        };
        if skip_current
            && let Some(current) = &current
            && current.version() == version
            && *current.spec() == spec
        {
            return Ok(None);
        }
        let engine = self.inner.engine.clone();
        let compiled = match source {
            Source::Compiled(compiled) => compiled,
            Source::Bytes(bytes) => engine.compile_off_thread(bytes).await.map_err(fail)?,
        };
        let runtime = tokio::runtime::Handle::current();
        // Linking and reading the default patterns run guest code: keep them off the async
        // workers that run events.
        let loaded = tokio::task::spawn_blocking(move || {
            runtime.block_on(CompiledHandler::load(&engine, compiled, spec, counters))
        })
        .await
        .map_err(|e| fail(WasmError::Engine(format!("loader task failed: {e}"))))?;
        let loaded = loaded.map_err(fail)?;
        if loaded.patterns().is_empty() {
            return Err(fail(WasmError::Manifest(
                "no subscription patterns: the manifest gives none and the component does not export resolvespec:eventbroker/subscriptions (or exports an empty list)".into(),
            )));
        }
        Ok(Some(loaded))
    }

    /// Unsubscribes handler `name`, waits for its running invocations to finish, and forgets
    /// it. Returns whether it existed. Files are left alone (see [`HandlerSet::undeploy`]).
    pub async fn remove(&self, name: &str) -> bool {
        if validate_name(name).is_err() {
            return false;
        }
        let _change = self.inner.changes.lock().await;
        self.remove_locked(name).await
    }

    /// [`HandlerSet::remove`] for a caller holding the change lock.
    async fn remove_locked(&self, name: &str) -> bool {
        let entry = self.entries().remove(name);
        let Some(entry) = entry else { return false };
        let _ = self.inner.broker.unsubscribe_name(name);
        if let Some(current) = entry.current {
            current.quiesce().await;
        }
        tracing::info!(handler = name, "handler removed");
        true
    }

    /// Deploys a handler the way an operator would by copying files: checks it first, then
    /// writes `NAME.wasm` and `NAME.toml` into the handlers directory atomically (so it
    /// survives a restart) and swaps it in.
    ///
    /// # Errors
    /// [`WasmError`] if the name is invalid, the version is rejected or the files cannot be
    /// written; a rejected upload is never written and the previous version keeps serving.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Option<&str>,
    ) -> Result<HandlerInfo, WasmError> {
        self.deploy_with(name, bytes, manifest, DeployOptions::default())
            .await
    }

    /// [`HandlerSet::deploy`] with options. On a host that follows a cluster handler store,
    /// the version goes to the store (see [`HandlerSet::deploy_to_cluster`]) instead of the
    /// directory, and may be a canary; elsewhere a canary is refused.
    ///
    /// # Errors
    /// As [`HandlerSet::deploy`]; [`WasmError::Conflict`] for a canary without a store.
    pub async fn deploy_with(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Option<&str>,
        options: DeployOptions,
    ) -> Result<HandlerInfo, WasmError> {
        if self.is_clustered() {
            return self.deploy_to_cluster(name, bytes, manifest, options).await;
        }
        if options.canary.is_some() {
            return Err(WasmError::Conflict(
                "canary deploys need a cluster handler store (a PostgreSQL, Redis or NATS backend); this host keeps handlers in its directory".into(),
            ));
        }
        validate_name(name)?;
        // Check, hash and compile once, before taking the change lock, so a large component
        // does not hold up other deploys; the compiled component is handed over in memory.
        let checked = ComponentBytes::new(bytes).map_err(|e| self.rejected(name, e, None))?;
        let version = checked.version();
        let compiled = self
            .inner
            .engine
            .compile_off_thread(checked.clone())
            .await
            .map_err(|e| self.rejected(name, e, Some(version)))?;
        // Holding the change lock until the files are written keeps a concurrent reload from
        // the directory watcher from reading the previous files in between.
        let _change = self.inner.changes.lock().await;
        let info = self
            .apply_locked(name, Source::Compiled(compiled), manifest)
            .await?
            .info;
        let dir = self.dir();
        std::fs::create_dir_all(dir)
            .map_err(|e| WasmError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let toml_path = dir.join(format!("{name}.toml"));
        match manifest {
            Some(text) => write_atomically(&toml_path, text.as_bytes())?,
            None => match std::fs::remove_file(&toml_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(WasmError::Io(format!(
                        "cannot remove {}: {e}",
                        toml_path.display()
                    )));
                }
            },
        }
        let wasm_path = dir.join(format!("{name}.wasm"));
        write_atomically(&wasm_path, checked.bytes())?;
        // The watcher will see these writes: it recognises them by these stamps.
        self.inner
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_owned(),
                Written {
                    wasm: Stamp::of(&wasm_path),
                    manifest: Stamp::of(&toml_path),
                },
            );
        Ok(info)
    }

    /// Removes handler `name` and deletes its files from the handlers directory.
    ///
    /// # Errors
    /// [`WasmError::NotFound`] if there is no such handler; I/O errors deleting files.
    pub async fn undeploy(&self, name: &str) -> Result<(), WasmError> {
        validate_name(name)?;
        if self.is_clustered() {
            return self.undeploy_from_cluster(name).await;
        }
        let _change = self.inner.changes.lock().await;
        let existed = self.remove_locked(name).await;
        // Its files go: what a deploy wrote no longer describes them.
        self.inner
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let mut deleted = false;
        for ext in ["wasm", "toml"] {
            let path = self.dir().join(format!("{name}.{ext}"));
            match std::fs::remove_file(&path) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(WasmError::Io(format!(
                        "cannot delete {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        if existed || deleted {
            Ok(())
        } else {
            Err(WasmError::NotFound(name.to_owned()))
        }
    }

    /// Every handler, by name.
    pub fn list(&self) -> Vec<HandlerInfo> {
        self.entries()
            .iter()
            .map(|(name, entry)| self.full_info(name, entry))
            .collect()
    }

    /// One handler.
    pub fn get(&self, name: &str) -> Option<HandlerInfo> {
        self.entries()
            .get(name)
            .map(|entry| self.full_info(name, entry))
    }
}

pub(crate) fn reject(entry: &mut Entry, name: &str, error: &WasmError, version: Option<String>) {
    tracing::warn!(handler = name, %error, "handler version rejected; the previous version keeps serving");
    entry.rejections += 1;
    entry.last_rejection = Some(Rejection {
        reason: error.to_string(),
        at: Utc::now(),
        version,
    });
}

pub(crate) fn info(name: &str, entry: &Entry) -> HandlerInfo {
    let invocations = OUTCOMES
        .iter()
        .zip(entry.counters.outcomes.iter())
        .map(|(outcome, count)| (*outcome, count.load(Ordering::Relaxed)))
        .collect();
    HandlerInfo {
        name: name.to_owned(),
        state: if entry.current.is_some() {
            "active"
        } else {
            "rejected"
        },
        current: entry.current.as_ref().map(|c| c.info()),
        last_rejection: entry.last_rejection.clone(),
        invocations,
        fuel_used: entry.counters.fuel.load(Ordering::Relaxed),
        busy_time: Duration::from_micros(entry.counters.micros.load(Ordering::Relaxed)),
        duration_us: entry.counters.durations.percentiles(),
        fuel_per_invocation: entry.counters.fuel_per_invocation.percentiles(),
        loads: entry.loads,
        rejections: entry.rejections,
        unchanged: entry.unchanged,
        cluster: None,
    }
}

pub(crate) fn file_stem(path: &Path) -> Result<String, WasmError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .ok_or_else(|| WasmError::Io(format!("{} has no usable file name", path.display())))
}

/// Reads `NAME.wasm` and the `NAME.toml` beside it, if any.
pub(crate) fn read_files(wasm_path: &Path) -> Result<(Vec<u8>, Option<String>), WasmError> {
    let bytes = std::fs::read(wasm_path)
        .map_err(|e| WasmError::Io(format!("cannot read {}: {e}", wasm_path.display())))?;
    let manifest_path = wasm_path.with_extension("toml");
    let manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return Err(WasmError::Io(format!(
                "cannot read {}: {error}",
                manifest_path.display()
            )));
        }
    };
    Ok((bytes, manifest))
}

/// Writes a file so that readers see either the old or the new content, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WasmError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| WasmError::Io(format!("{} has no usable file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{file_name}.partial"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WasmError::Io(format!("cannot write {}: {e}", path.display())))
}
