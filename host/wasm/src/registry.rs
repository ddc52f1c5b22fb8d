//! The handler set: handler name → current version, registered with the broker.
//!
//! Every change — loading the handlers directory at start, a file change, an HTTP or CLI
//! deploy — goes through [`HandlerSet::apply`]: the new version is compiled and checked off the
//! event path, then swapped in atomically with [`Broker::replace_subscription`]. A version that
//! fails is rejected with its reason and time, and the previous version keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::WasmError;
use super::component::{CompiledHandler, HandlerCounters, OUTCOMES, VersionInfo};
use super::engine::{WasmEngine, check_component_bytes, version_id};
use super::handler::WasmHandler;
use super::manifest::{Manifest, validate_name};
use crate::broker::{Broker, SubscribeOptions};
use crate::config::{HandlersConfig, RetryPolicy};

/// Extra time the broker allows beyond a handler's own timeout, so the guest's deadline
/// (enforced inside the sandbox) fires first and is reported as such.
const TIMEOUT_GRACE: Duration = Duration::from_millis(500);

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
    /// Versions loaded since start (first load included).
    pub loads: u64,
    /// Versions rejected since start.
    pub rejections: u64,
    /// Times the same component and manifest as the serving version were applied again and
    /// changed nothing (a `touch`, a redeploy of identical files); not counted as loads.
    pub unchanged: u64,
}

/// All WebAssembly handlers of a host.
#[derive(Clone)]
pub struct HandlerSet {
    inner: Arc<SetInner>,
}

struct SetInner {
    engine: WasmEngine,
    broker: Broker,
    config: HandlersConfig,
    retry: RetryPolicy,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Serialises changes so two deploys of one name cannot interleave.
    changes: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Entry {
    current: Option<Arc<CompiledHandler>>,
    counters: Arc<HandlerCounters>,
    last_rejection: Option<Rejection>,
    loads: u64,
    rejections: u64,
    unchanged: u64,
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
        let retry = broker.config().retry_policy.clone();
        HandlerSet {
            inner: Arc::new(SetInner {
                engine,
                broker,
                config,
                retry,
                entries: Mutex::new(BTreeMap::new()),
                changes: tokio::sync::Mutex::new(()),
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

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
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
        // Compile every component at once (into the cache) before loading them one by one:
        // a large component does not hold up the others.
        let warming: Vec<_> = files
            .iter()
            .filter_map(|path| std::fs::read(path).ok())
            .map(|bytes| self.inner.engine.warm_cache(bytes))
            .collect();
        futures::future::join_all(warming).await;
        for path in files {
            match self.load_file(&path).await {
                Ok(info) => {
                    tracing::info!(handler = %info.name, version = ?info.current.as_ref().map(|c| &c.version), patterns = ?info.current.as_ref().map(|c| &c.patterns), "handler loaded");
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
        self.read_and_apply(wasm_path)
            .await
            .map(|applied| applied.info)
    }

    /// [`HandlerSet::load_file`] for the directory watcher: `None` when the files hold the
    /// version already serving (nothing changed).
    pub(crate) async fn reload_file(
        &self,
        wasm_path: &Path,
    ) -> Result<Option<HandlerInfo>, WasmError> {
        let applied = self.read_and_apply(wasm_path).await?;
        Ok(applied.changed.then_some(applied.info))
    }

    async fn read_and_apply(&self, wasm_path: &Path) -> Result<Applied, WasmError> {
        let name = file_stem(wasm_path)?;
        validate_name(&name)
            .map_err(|e| WasmError::Manifest(format!("{e} (file {})", wasm_path.display())))?;
        // Read the files under the change lock, so that a deploy writing them cannot interleave.
        let _change = self.inner.changes.lock().await;
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
        self.apply_locked(&name, bytes, manifest.as_deref()).await
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
        let _change = self.inner.changes.lock().await;
        self.apply_locked(name, bytes, manifest)
            .await
            .map(|applied| applied.info)
    }

    /// [`HandlerSet::apply`] for a caller holding the change lock, with a valid `name`.
    async fn apply_locked(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Option<&str>,
    ) -> Result<Applied, WasmError> {
        let result = self.build(name, bytes, manifest).await;
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
        bytes: Vec<u8>,
        manifest: Option<&str>,
    ) -> Result<Option<CompiledHandler>, (WasmError, Option<String>)> {
        check_component_bytes(&bytes).map_err(|e| (e, None))?;
        let version = version_id(&bytes);
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
                entry.map(|e| e.counters.clone()).unwrap_or_else(|| {
                    Arc::new(HandlerCounters::with_metrics(
                        self.inner.broker.metrics().clone(),
                    ))
                }),
            )
        };
        if let Some(current) = &current
            && current.version() == version
            && *current.spec() == spec
        {
            return Ok(None);
        }
        let engine = self.inner.engine.clone();
        let runtime = tokio::runtime::Handle::current();
        // Compiling is CPU-heavy: keep it off the async workers that run events.
        let loaded = tokio::task::spawn_blocking(move || {
            runtime.block_on(CompiledHandler::load(&engine, &bytes, spec, counters))
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
        validate_name(name)?;
        // Compile before taking the change lock, so a large component does not hold up other
        // deploys; the locked load below then reads it from the cache.
        self.inner.engine.warm_cache(bytes.clone()).await;
        // Holding the change lock until the files are written keeps a concurrent reload from
        // the directory watcher from reading the previous files in between.
        let _change = self.inner.changes.lock().await;
        let info = self.apply_locked(name, bytes.clone(), manifest).await?.info;
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
        write_atomically(&dir.join(format!("{name}.wasm")), &bytes)?;
        Ok(info)
    }

    /// Removes handler `name` and deletes its files from the handlers directory.
    ///
    /// # Errors
    /// [`WasmError::NotFound`] if there is no such handler; I/O errors deleting files.
    pub async fn undeploy(&self, name: &str) -> Result<(), WasmError> {
        validate_name(name)?;
        let _change = self.inner.changes.lock().await;
        let existed = self.remove_locked(name).await;
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
            .map(|(name, entry)| info(name, entry))
            .collect()
    }

    /// One handler.
    pub fn get(&self, name: &str) -> Option<HandlerInfo> {
        self.entries().get(name).map(|entry| info(name, entry))
    }
}

fn reject(entry: &mut Entry, name: &str, error: &WasmError, version: Option<String>) {
    tracing::warn!(handler = name, %error, "handler version rejected; the previous version keeps serving");
    entry.rejections += 1;
    entry.last_rejection = Some(Rejection {
        reason: error.to_string(),
        at: Utc::now(),
        version,
    });
}

fn info(name: &str, entry: &Entry) -> HandlerInfo {
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
        loads: entry.loads,
        rejections: entry.rejections,
        unchanged: entry.unchanged,
    }
}

fn file_stem(path: &Path) -> Result<String, WasmError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .ok_or_else(|| WasmError::Io(format!("{} has no usable file name", path.display())))
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
