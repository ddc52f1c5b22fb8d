//! Handlers of a cluster: deployed once into the store the hosts share, followed by every
//! host.
//!
//! - **The store** ([`eventbroker::HandlerStore`], implemented by the PostgreSQL, Redis and
//!   NATS backends) holds component bytes by content hash, one [`Deployment`] record per
//!   handler (releases, stable release, canary, decisions) written by compare-and-set, and one
//!   [`HostReport`] per host.
//! - **Deploys** (`PUT /v1/handlers/{name}`, `eventbroker deploy`, a file changed in the
//!   handlers directory with `handlers.source = both`) check and compile the version on the
//!   deploying host first, store the bytes, then write the record.
//! - **Every host follows the records** ([`HandlerSet::sync_cluster`]): on a change
//!   notification, and every `handlers.store.poll_interval` in case one was lost. When a
//!   record asks for something the host does not run, the handler's subscription first turns
//!   *converging* (matching events are deferred, not run on the old version), the releases are
//!   fetched and compiled off the event path, then swapped in. A host that cannot load them
//!   reports why and keeps deferring the handler's events to the hosts that could.
//! - **Canaries** ([`route`]) run a share of events on a new release; every host reports its
//!   tallies, and every host judges the cluster's sum each report interval
//!   ([`record::judge`]): the first to write the decision (compare-and-set) wins.

pub mod record;
pub(crate) mod route;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventbroker::HandlerStore;
use eventbroker::broker::SubscribeOptions;
use eventbroker::handler_store::Written;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::record::{
    Canary, Decision, Deployment, HostHandler, HostReport, Release, Tally, Verdict, judge,
};
use self::route::{CanaryRoute, Route, RoutedHandler, Trial};
use crate::WasmError;
use crate::component::CompiledHandler;
use crate::config::{CanaryConfig, HandlerSource, StoreConfig};
use crate::engine::ComponentBytes;
use crate::manifest::validate_name;
use crate::registry::{
    Entry, HandlerInfo, HandlerSet, Source, TIMEOUT_GRACE, file_stem, info, read_files, reject,
};

/// How many times a deploy re-reads and rewrites a record another host changed meanwhile.
const WRITE_ATTEMPTS: u32 = 8;

/// The store a host follows and how.
pub(crate) struct ClusterLink {
    store: Arc<dyn HandlerStore>,
    host: String,
    source: HandlerSource,
    settings: StoreConfig,
    canary: CanaryConfig,
    /// The live hosts' reports, as last read.
    hosts: Mutex<Vec<HostReport>>,
    /// `GROUP.`: the store keys of this consumer group's records and reports start with it.
    /// Each consumer group is an application of its own, with its own handlers.
    prefix: String,
}

impl ClusterLink {
    /// The store key of handler `name`'s record.
    fn record_key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The store key of this host's report.
    fn report_key(&self) -> String {
        format!("{}{}", self.prefix, key_part(&self.host))
    }

    /// The handler name or host part of `key` when it belongs to this consumer group.
    fn own_group<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())
    }
}

/// Options of a cluster deploy.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// Run the new version as a canary on this percentage (1–99) of the handler's events.
    pub canary: Option<u8>,
}

/// Whether this host has loaded what the record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// It runs the record's stable release (and canary).
    Converged,
    /// It is fetching and compiling them; matching events are deferred meanwhile.
    Loading,
    /// It could not load them; matching events are deferred to hosts that could.
    Failed,
}

impl SyncState {
    fn as_str(self) -> &'static str {
        match self {
            SyncState::Converged => "converged",
            SyncState::Loading => "loading",
            SyncState::Failed => "failed",
        }
    }
}

/// A loaded release: its number, content and compiled version.
#[derive(Clone)]
pub(crate) struct Loaded {
    release: u64,
    component: String,
    manifest: Option<String>,
    version: Arc<CompiledHandler>,
}

impl Loaded {
    fn holds(&self, release: &Release) -> bool {
        release.same_content(&self.component, self.manifest.as_deref())
    }
}

/// What this host knows of one handler's record and made of it.
pub(crate) struct ClusterEntry {
    /// The store revision of the record applied (or being applied).
    revision: u64,
    deployment: Deployment,
    state: SyncState,
    error: Option<String>,
    stable: Option<Loaded>,
    canary: Option<(Loaded, Arc<Trial>)>,
    /// Failed loads of this revision in a row, and when to try again: a failure can be this
    /// host's passing trouble (the store unreachable, the instance pool full), so it is
    /// retried, with a backoff so that a version that never loads is not recompiled at every
    /// poll.
    failures: u32,
    retry_at: Option<std::time::Instant>,
}

/// The longest wait before a failed load is tried again.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

impl ClusterEntry {
    /// Whether this host should (re)apply the record at `revision` now.
    fn wants(&self, revision: u64) -> bool {
        self.revision < revision
            || (self.revision == revision
                && self.state == SyncState::Failed
                && self
                    .retry_at
                    .is_none_or(|at| std::time::Instant::now() >= at))
    }
}

/// A host's view of a handler in the cluster, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    /// The store revision of the handler's record.
    pub revision: u64,
    /// The release every host should run.
    pub desired: Option<Release>,
    /// The canary on trial, if any.
    pub canary: Option<Canary>,
    /// The kept releases, oldest first (rollback targets).
    pub releases: Vec<ReleaseSummary>,
    /// Recent canary decisions, oldest first.
    pub decisions: Vec<Decision>,
    /// Whether this host runs the desired releases.
    pub state: SyncState,
    /// Why this host could not load them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every live host (this one included) and what it runs.
    pub hosts: Vec<HostView>,
    /// Whether every live host runs the desired releases.
    pub converged: bool,
}

/// A release as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseSummary {
    /// Release number.
    pub number: u64,
    /// Component content hash.
    pub component: String,
    /// Whether a manifest came with it.
    pub has_manifest: bool,
    /// When and by which host it was deployed.
    pub deployed_at: DateTime<Utc>,
    /// The deploying host.
    pub deployed_by: String,
}

/// One host's state of a handler.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    /// The host (`event_broker.instance_id`).
    pub host: String,
    /// The stable release it runs.
    pub stable: Option<u64>,
    /// The canary release it runs.
    pub canary: Option<u64>,
    /// `converged`, `loading` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether it runs the record's current revision.
    pub current: bool,
    /// When it last reported.
    pub reported_at: DateTime<Utc>,
}

/// The running store follower; dropping it stops it.
pub struct ClusterSync {
    stop: CancellationToken,
}

impl Drop for ClusterSync {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the start of a cluster host did.
#[derive(Debug, Default)]
pub struct ClusterStart {
    /// Handlers loaded from the store.
    pub loaded: Vec<String>,
    /// Handlers that failed, with the reason.
    pub failed: Vec<(String, WasmError)>,
    /// Directory files published to the store (handlers it did not have).
    pub published: Vec<String>,
}

/// The error of a cluster operation on a host without a handler store.
fn no_store() -> WasmError {
    WasmError::Conflict(
        "this host has no cluster handler store: deploying to a cluster, versions, rollback and canaries need a shared backend (PostgreSQL, Redis or NATS)".into(),
    )
}

fn store_error(error: impl std::fmt::Display) -> WasmError {
    WasmError::Store(error.to_string())
}

/// `text` as a store key part: itself when it is letters, digits, `-` and `_` only (every
/// backend accepts those), else `h` and a hash of it.
fn key_part(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        text.to_owned()
    } else {
        format!("h{}", crate::engine::version_id(text.as_bytes()))
    }
}

impl ClusterLink {
    /// A link to `store` for host `host` of consumer group `group`.
    pub(crate) fn new(
        store: Arc<dyn HandlerStore>,
        host: String,
        group: &str,
        source: HandlerSource,
        settings: StoreConfig,
        canary: CanaryConfig,
    ) -> Self {
        ClusterLink {
            store,
            prefix: format!("{}.", key_part(group)),
            host,
            source,
            settings,
            canary,
            hosts: Mutex::new(Vec::new()),
        }
    }
}

impl HandlerSet {
    /// A set whose handlers live in the cluster's `store` (`source` says whether the
    /// handlers directory also feeds it); `host` is this host's name in reports.
    pub fn clustered(
        engine: crate::WasmEngine,
        broker: eventbroker::Broker,
        config: crate::config::HandlersConfig,
        store: Arc<dyn HandlerStore>,
        source: HandlerSource,
    ) -> Self {
        let link = ClusterLink::new(
            store,
            broker.config().instance_id.clone(),
            broker.provider().group(),
            source,
            config.store.clone(),
            config.canary.clone(),
        );
        HandlerSet::with_cluster(engine, broker, config, Some(link))
    }

    fn link(&self) -> Option<&ClusterLink> {
        self.inner.cluster.as_ref()
    }

    /// Whether this host follows a cluster handler store.
    pub fn is_clustered(&self) -> bool {
        self.link().is_some()
    }

    /// Whether the handlers directory is read (and may be watched): not with
    /// `handlers.source = store`.
    pub fn reads_directory(&self) -> bool {
        self.link().is_none_or(|l| l.source != HandlerSource::Store)
    }

    /// Loads what the store holds, first publishing the directory's handlers the store does
    /// not have (with `handlers.source = both`; a file of a handler the store has is left
    /// alone: the cluster's version wins at start).
    pub async fn start_cluster(&self) -> ClusterStart {
        let mut start = ClusterStart::default();
        let Some(link) = self.link() else {
            return start;
        };
        if link.source == HandlerSource::Both {
            self.publish_directory(&mut start).await;
        }
        if let Err(error) = self.sync_cluster().await {
            tracing::error!(%error, "cannot read the cluster handler store at start; retrying in the background");
            start.failed.push(("*".into(), error));
        }
        for (name, entry) in self.entries().iter() {
            match entry.cluster.as_ref().map(|c| (c.state, c.error.clone())) {
                Some((SyncState::Converged, _)) => start.loaded.push(name.clone()),
                Some((_, error)) => start.failed.push((
                    name.clone(),
                    WasmError::Store(error.unwrap_or_else(|| "not loaded".into())),
                )),
                None => {}
            }
        }
        start
    }

    async fn publish_directory(&self, start: &mut ClusterStart) {
        let Some(link) = self.link() else { return };
        let Ok(dir) = std::fs::read_dir(self.dir()) else {
            return;
        };
        let mut files: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        files.sort();
        for path in files {
            let Ok(name) = file_stem(&path) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            match link.store.record(&link.record_key(&name)).await {
                Ok(Some(record)) => {
                    let same = read_files(&path).ok().and_then(|(bytes, manifest)| {
                        let version = crate::engine::version_id(&bytes);
                        Deployment::parse(&record.doc).ok().map(|d| {
                            d.stable_release()
                                .is_some_and(|r| r.same_content(&version, manifest.as_deref()))
                        })
                    });
                    if same != Some(true) {
                        tracing::warn!(handler = %name, file = %path.display(), "the handlers directory holds a version the cluster does not run; the store's version wins at start (change the file, or deploy it, to roll it out)");
                    }
                }
                Ok(None) => match self.deploy_file(&path).await {
                    Ok(_) => start.published.push(name),
                    Err(error) => {
                        tracing::error!(handler = %name, %error, "handler file not published to the cluster");
                        start.failed.push((name, error));
                    }
                },
                Err(error) => start.failed.push((name, store_error(error))),
            }
        }
    }

    /// Deploys the files of the handler at `wasm_path` to the cluster.
    pub(crate) async fn deploy_file(&self, wasm_path: &Path) -> Result<HandlerInfo, WasmError> {
        let name = file_stem(wasm_path)?;
        let (bytes, manifest) = read_files(wasm_path)?;
        self.deploy_to_cluster(&name, bytes, manifest.as_deref(), DeployOptions::default())
            .await
    }

    /// Deploys a version to every host of the cluster: checks and compiles it here, stores
    /// its bytes, writes the handler's record (as the new stable release, or as a canary),
    /// and swaps it in here at once; the other hosts follow their store notifications.
    ///
    /// # Errors
    /// [`WasmError`] if the version is rejected here (nothing is stored then), a canary does
    /// not apply, or the store fails.
    pub async fn deploy_to_cluster(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Option<&str>,
        options: DeployOptions,
    ) -> Result<HandlerInfo, WasmError> {
        let link = self.link().ok_or_else(no_store)?;
        validate_name(name)?;
        if let Some(percent) = options.canary
            && !(1..=99).contains(&percent)
        {
            return Err(WasmError::Manifest(format!(
                "canary share {percent}% is out of range: give 1% to 99%"
            )));
        }
        let checked = ComponentBytes::new(bytes).map_err(|e| self.rejected(name, e, None))?;
        let component = checked.version();
        let compiled = self
            .engine()
            .compile_off_thread(checked.clone())
            .await
            .map_err(|e| self.rejected(name, e, Some(component.clone())))?;
        let built = self
            .build_version(name, Source::Compiled(compiled), manifest, false)
            .await
            .map_err(|(e, v)| self.rejected(name, e, v))?
            .ok_or_else(|| WasmError::Engine("the version was not built".into()))?;
        let built = Arc::new(built);
        link.store
            .put_component(&component, checked.bytes())
            .await
            .map_err(store_error)?;
        let release = Release {
            number: 0,
            component: component.clone(),
            manifest: manifest.map(str::to_owned),
            patterns: built.patterns().to_vec(),
            deployed_at: Utc::now(),
            deployed_by: link.host.clone(),
        };
        let canary = options.canary.map(|percent| Canary {
            release: 0,
            percent,
            started_at: Utc::now(),
            window: link.canary.window,
            min_sample: link.canary.min_sample,
            tolerance: link.canary.tolerance,
        });
        let keep = link.settings.keep_versions;
        let changed = self
            .change_record(name, true, |deployment| {
                let deployment = deployment.get_or_insert_with(|| Deployment {
                    name: name.to_owned(),
                    releases: Vec::new(),
                    stable: 0,
                    canary: None,
                    decisions: Vec::new(),
                });
                match &canary {
                    Some(canary) => deployment
                        .start_canary(release.clone(), canary.clone(), keep)
                        .map(|_| true),
                    None => Ok(deployment.deploy(release.clone(), keep).is_some()),
                }
            })
            .await?;
        match changed {
            Some((revision, deployment)) => {
                let loaded = Loaded {
                    release: 0,
                    component,
                    manifest: manifest.map(str::to_owned),
                    version: built,
                };
                self.apply_record(name, revision, deployment, Some(loaded))
                    .await;
            }
            None => {
                if let Some(entry) = self.entries().get_mut(name) {
                    entry.unchanged += 1;
                }
            }
        }
        self.get(name)
            .ok_or_else(|| WasmError::NotFound(name.to_owned()))
    }

    /// Removes handler `name` from the cluster: its record and the bytes of its releases.
    ///
    /// # Errors
    /// [`WasmError::NotFound`] without such a handler; store failures.
    pub(crate) async fn undeploy_from_cluster(&self, name: &str) -> Result<(), WasmError> {
        let link = self.link().ok_or_else(no_store)?;
        for _ in 0..WRITE_ATTEMPTS {
            let Some(record) = link
                .store
                .record(&link.record_key(name))
                .await
                .map_err(store_error)?
            else {
                return Err(WasmError::NotFound(name.to_owned()));
            };
            if link
                .store
                .delete_record(&link.record_key(name), record.revision)
                .await
                .map_err(store_error)?
            {
                if let Ok(deployment) = Deployment::parse(&record.doc) {
                    let components: BTreeSet<String> = deployment
                        .releases
                        .into_iter()
                        .map(|r| r.component)
                        .collect();
                    self.delete_unreferenced(components).await;
                }
                let _change = self.inner.changes.lock().await;
                self.remove_cluster_entry(name).await;
                return Ok(());
            }
        }
        Err(WasmError::Conflict(format!(
            "handler {name:?} kept changing while it was being removed; try again"
        )))
    }

    /// Makes an earlier release stable again (`to`: `#N`, `N` or a component hash prefix;
    /// default the release before the stable one), ending any canary.
    ///
    /// # Errors
    /// [`WasmError::NoRelease`] when there is no such release; store failures.
    pub async fn rollback(&self, name: &str, to: Option<&str>) -> Result<HandlerInfo, WasmError> {
        self.change_and_apply(name, |deployment| {
            let deployment = deployment
                .as_mut()
                .ok_or_else(|| WasmError::NotFound(name.to_owned()))?;
            deployment.rollback(to).map(|_| true)
        })
        .await
    }

    /// Ends the running canary by hand: `promote` makes it stable, otherwise it is aborted.
    ///
    /// # Errors
    /// [`WasmError::Conflict`] when no canary runs; store failures.
    pub async fn end_canary(&self, name: &str, promote: bool) -> Result<HandlerInfo, WasmError> {
        let host = self.link().map(|l| l.host.clone()).unwrap_or_default();
        let outcome = if promote {
            "promoted_manually"
        } else {
            "aborted"
        };
        let (canary, stable) = self.trial_sums(name).await;
        self.change_and_apply(name, |deployment| {
            let deployment = deployment
                .as_mut()
                .ok_or_else(|| WasmError::NotFound(name.to_owned()))?;
            let decision = Decision {
                release: 0,
                stable: 0,
                outcome: outcome.into(),
                reason: format!("{outcome} by an operator"),
                at: Utc::now(),
                by: host.clone(),
                canary: canary.clone(),
                stable_tally: stable.clone(),
            };
            if deployment.end_canary(promote, decision) {
                Ok(true)
            } else {
                Err(WasmError::Conflict(format!(
                    "handler {name:?} runs no canary"
                )))
            }
        })
        .await
        .inspect(|_| self.inner.broker.metrics().canary_decision(name, outcome))
    }

    async fn change_and_apply(
        &self,
        name: &str,
        change: impl Fn(&mut Option<Deployment>) -> Result<bool, WasmError>,
    ) -> Result<HandlerInfo, WasmError> {
        self.link().ok_or_else(no_store)?;
        validate_name(name)?;
        if let Some((revision, deployment)) = self.change_record(name, false, change).await? {
            self.apply_record(name, revision, deployment, None).await;
        }
        self.get(name)
            .ok_or_else(|| WasmError::NotFound(name.to_owned()))
    }

    /// Reads handler `name`'s record, lets `change` edit it (`Ok(false)`: nothing to write),
    /// and writes it back by compare-and-set, again from a fresh read when another host wrote
    /// first. Components the new record no longer keeps are deleted. Returns the written
    /// revision and record, `None` when nothing changed.
    async fn change_record(
        &self,
        name: &str,
        create: bool,
        change: impl Fn(&mut Option<Deployment>) -> Result<bool, WasmError>,
    ) -> Result<Option<(u64, Deployment)>, WasmError> {
        let link = self.link().ok_or_else(no_store)?;
        for _ in 0..WRITE_ATTEMPTS {
            let record = link
                .store
                .record(&link.record_key(name))
                .await
                .map_err(store_error)?;
            let (mut deployment, expected) = match &record {
                Some(record) => (Some(Deployment::parse(&record.doc)?), Some(record.revision)),
                None if create => (None, None),
                None => return Err(WasmError::NotFound(name.to_owned())),
            };
            let before: BTreeSet<String> = deployment
                .iter()
                .flat_map(|d| d.releases.iter().map(|r| r.component.clone()))
                .collect();
            if !change(&mut deployment)? {
                return Ok(None);
            }
            let Some(deployment) = deployment else {
                return Ok(None);
            };
            match link
                .store
                .write_record(&link.record_key(name), &deployment.to_doc(), expected)
                .await
                .map_err(store_error)?
            {
                Written::Done(revision) => {
                    let after: BTreeSet<String> = deployment
                        .releases
                        .iter()
                        .map(|r| r.component.clone())
                        .collect();
                    self.delete_unreferenced(before.difference(&after).cloned().collect())
                        .await;
                    return Ok(Some((revision, deployment)));
                }
                Written::Conflict => continue,
            }
        }
        Err(WasmError::Conflict(format!(
            "handler {name:?} kept changing on other hosts while this change was written; try again"
        )))
    }

    /// Deletes the bytes of `components` that no record keeps any more.
    async fn delete_unreferenced(&self, components: BTreeSet<String>) {
        let Some(link) = self.link() else { return };
        if components.is_empty() {
            return;
        }
        let Ok(records) = link.store.records().await else {
            return;
        };
        let kept: BTreeSet<String> = records
            .iter()
            .filter_map(|r| Deployment::parse(&r.doc).ok())
            .flat_map(|d| d.releases.into_iter().map(|r| r.component))
            .collect();
        for component in components.difference(&kept) {
            if let Err(error) = link.store.delete_component(component).await {
                tracing::warn!(%component, %error, "could not delete a component no release keeps");
            }
        }
    }

    /// Reads every record and applies those this host has not applied; forgets handlers
    /// whose record is gone.
    ///
    /// # Errors
    /// [`WasmError::Store`] when the store cannot be read.
    pub async fn sync_cluster(&self) -> Result<(), WasmError> {
        let Some(link) = self.link() else {
            return Ok(());
        };
        let records = link.store.records().await.map_err(store_error)?;
        let mut present = BTreeSet::new();
        // Only this consumer group's handlers: each group is an application of its own.
        let records = records.into_iter().filter_map(|mut record| {
            record.name = link.own_group(&record.name)?.to_owned();
            Some(record)
        });
        for record in records {
            present.insert(record.name.clone());
            let wanted = self
                .entries()
                .get(&record.name)
                .and_then(|e| e.cluster.as_ref().map(|c| c.wants(record.revision)))
                .unwrap_or(true);
            if !wanted {
                continue;
            }
            match Deployment::parse(&record.doc) {
                Ok(deployment) => {
                    self.apply_record(&record.name, record.revision, deployment, None)
                        .await
                }
                Err(error) => {
                    tracing::error!(handler = %record.name, %error, "unreadable handler record in the store; ignored")
                }
            }
        }
        let gone: Vec<String> = self
            .entries()
            .iter()
            .filter(|(name, entry)| entry.cluster.is_some() && !present.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let _change = self.inner.changes.lock().await;
            if self.remove_cluster_entry(&name).await {
                tracing::info!(handler = %name, "handler removed from the cluster");
            }
        }
        Ok(())
    }

    async fn remove_cluster_entry(&self, name: &str) -> bool {
        let entry = self.entries().remove(name);
        let Some(entry) = entry else { return false };
        let _ = self.inner.broker.unsubscribe_name(name);
        if let Some(current) = entry.current {
            current.quiesce().await;
        }
        if let Some(cluster) = entry.cluster
            && let Some((canary, _)) = cluster.canary
        {
            canary.version.quiesce().await;
        }
        true
    }

    /// Makes this host run what `deployment` (at store `revision`) says; `prebuilt` is a
    /// version this host just built for the record's newest release.
    async fn apply_record(
        &self,
        name: &str,
        revision: u64,
        deployment: Deployment,
        prebuilt: Option<Loaded>,
    ) {
        let _change = self.inner.changes.lock().await;
        // Another change may have applied this or a newer record meanwhile.
        let (wanted, failures) = self
            .entries()
            .get(name)
            .and_then(|e| e.cluster.as_ref())
            .map_or((true, 0), |c| {
                (
                    c.wants(revision),
                    if c.revision == revision {
                        c.failures
                    } else {
                        0
                    },
                )
            });
        if !wanted {
            return;
        }
        let Some(stable) = deployment.stable_release().cloned() else {
            tracing::error!(
                handler = name,
                "handler record has no stable release; ignored"
            );
            return;
        };
        let canary = deployment
            .canary
            .clone()
            .zip(deployment.canary_release().cloned());
        // What this host has loaded that the record still wants.
        let (mut have_stable, mut have_canary, previous_trial) = {
            let entries = self.entries();
            let cluster = entries.get(name).and_then(|e| e.cluster.as_ref());
            let loaded: Vec<Loaded> = cluster
                .into_iter()
                .flat_map(|c| {
                    c.stable
                        .iter()
                        .cloned()
                        .chain(c.canary.iter().map(|(l, _)| l.clone()))
                })
                .chain(prebuilt.clone())
                .collect();
            let find = |release: &Release| {
                loaded.iter().find(|l| l.holds(release)).map(|l| Loaded {
                    release: release.number,
                    ..l.clone()
                })
            };
            let trial = cluster.and_then(|c| c.canary.as_ref().map(|(_, t)| t.clone()));
            (
                find(&stable),
                canary.as_ref().and_then(|(_, r)| find(r)),
                trial,
            )
        };
        let needs_load = have_stable.is_none() || (canary.is_some() && have_canary.is_none());
        let counters = self.counters(name);
        if needs_load {
            // Nothing runs on a version the cluster no longer wants while the new one loads.
            self.subscribe(
                name,
                &stable.patterns,
                Route::Converging {
                    reason: format!(
                        "this host is loading release #{} of handler {name:?}; deferred without counting an attempt",
                        stable.number
                    ),
                },
                &stable,
            );
            self.set_cluster(
                name,
                revision,
                &deployment,
                SyncState::Loading,
                None,
                counters.clone(),
            );
            let mut failure = None;
            if have_stable.is_none() {
                match self.load_release(name, &stable).await {
                    Ok(loaded) => have_stable = Some(loaded),
                    Err(error) => failure = Some(error),
                }
            }
            if failure.is_none()
                && let Some((_, release)) = &canary
                && have_canary.is_none()
            {
                match self.load_release(name, release).await {
                    Ok(loaded) => have_canary = Some(loaded),
                    Err(error) => failure = Some(error),
                }
            }
            if let Some(error) = failure {
                tracing::error!(handler = name, %error, "cannot load the cluster's version of this handler; its events are deferred to hosts that can");
                let mut entries = self.entries();
                let entry = entries.entry(name.to_owned()).or_default();
                reject(entry, name, &error, Some(stable.component.clone()));
                if let Some(cluster) = entry.cluster.as_mut() {
                    cluster.state = SyncState::Failed;
                    cluster.error = Some(error.to_string());
                    cluster.failures = failures + 1;
                    let poll = self
                        .link()
                        .map_or(Duration::from_secs(5), |l| l.settings.poll_interval);
                    let backoff = poll
                        .saturating_mul(1 << failures.min(16))
                        .min(MAX_RETRY_BACKOFF);
                    cluster.retry_at = Some(std::time::Instant::now() + backoff);
                }
                self.inner.broker.metrics().handler_rejected(name);
                return;
            }
        }
        let (Some(stable_loaded), canary_loaded) = (have_stable, have_canary) else {
            return;
        };
        let trial = canary.as_ref().map(|(c, _)| {
            previous_trial
                .filter(|t| t.release == c.release && t.started_at == c.started_at)
                .unwrap_or_else(|| Arc::new(Trial::new(c.release, c.started_at)))
        });
        let canary_route = canary
            .as_ref()
            .zip(canary_loaded.clone())
            .zip(trial.clone())
            .map(|(((c, _), loaded), trial)| CanaryRoute {
                version: loaded.version.clone(),
                release: c.release,
                percent: c.percent,
                trial,
            });
        self.subscribe(
            name,
            &stable.patterns,
            Route::Ready {
                stable: stable_loaded.version.clone(),
                canary: canary_route,
            },
            &stable,
        );
        let mut entries = self.entries();
        let entry = entries.entry(name.to_owned()).or_default();
        let changed = entry
            .current
            .as_ref()
            .is_none_or(|c| !Arc::ptr_eq(c, &stable_loaded.version));
        if changed {
            entry.loads += 1;
            self.inner.broker.metrics().handler_loaded(name);
            tracing::info!(handler = name, release = stable.number, version = %stable.component, "handler release loaded from the cluster store");
        }
        entry.counters = counters;
        entry.current = Some(stable_loaded.version.clone());
        entry.cluster = Some(ClusterEntry {
            revision,
            deployment,
            state: SyncState::Converged,
            error: None,
            stable: Some(stable_loaded),
            canary: canary_loaded.zip(trial),
            failures: 0,
            retry_at: None,
        });
    }

    fn counters(&self, name: &str) -> Arc<crate::component::HandlerCounters> {
        self.entries()
            .get(name)
            .map(|e| e.counters.clone())
            .filter(|c| c.metrics.is_some())
            .unwrap_or_else(|| {
                Arc::new(crate::component::HandlerCounters::with_metrics(
                    self.inner.broker.metrics().clone(),
                ))
            })
    }

    fn set_cluster(
        &self,
        name: &str,
        revision: u64,
        deployment: &Deployment,
        state: SyncState,
        error: Option<String>,
        counters: Arc<crate::component::HandlerCounters>,
    ) {
        let mut entries = self.entries();
        let entry: &mut Entry = entries.entry(name.to_owned()).or_default();
        entry.counters = counters;
        match entry.cluster.as_mut() {
            Some(cluster) => {
                cluster.revision = revision;
                cluster.deployment = deployment.clone();
                cluster.state = state;
                cluster.error = error;
            }
            None => {
                entry.cluster = Some(ClusterEntry {
                    revision,
                    deployment: deployment.clone(),
                    state,
                    error,
                    stable: None,
                    canary: None,
                    failures: 0,
                    retry_at: None,
                });
            }
        }
    }

    fn subscribe(&self, name: &str, patterns: &[String], route: Route, release: &Release) {
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let (timeout, retry) = match &route {
            Route::Ready { stable, .. } => {
                (stable.spec().timeout, Some(stable.spec().retry.clone()))
            }
            Route::Converging { .. } => (self.inner.config.defaults.timeout, None),
        };
        let subscribed = self.inner.broker.replace_subscription(
            &patterns,
            Arc::new(RoutedHandler::new(name, route)),
            SubscribeOptions {
                name: Some(name.to_owned()),
                timeout: Some(timeout + TIMEOUT_GRACE),
                retry,
            },
        );
        if let Err(error) = subscribed {
            tracing::error!(handler = name, release = release.number, %error, "cannot subscribe the handler's release");
        }
    }

    /// Fetches a release's component from the store and builds it.
    async fn load_release(&self, name: &str, release: &Release) -> Result<Loaded, WasmError> {
        let link = self
            .link()
            .ok_or_else(|| WasmError::Store("no cluster handler store".into()))?;
        let bytes = link
            .store
            .component(&release.component)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                WasmError::Store(format!(
                    "the store has no component {} (release #{})",
                    release.component, release.number
                ))
            })?;
        let bytes = ComponentBytes::new(bytes)?;
        if bytes.version() != release.component {
            return Err(WasmError::Store(format!(
                "the store's component {} hashes to {}: it is corrupt",
                release.component,
                bytes.version()
            )));
        }
        let built = self
            .build_version(
                name,
                Source::Bytes(bytes),
                release.manifest.as_deref(),
                false,
            )
            .await
            .map_err(|(e, _)| e)?
            .ok_or_else(|| WasmError::Engine("the version was not built".into()))?;
        Ok(Loaded {
            release: release.number,
            component: release.component.clone(),
            manifest: release.manifest.clone(),
            version: Arc::new(built),
        })
    }

    /// The cluster's tallies of handler `name`'s running canary (from the hosts' last
    /// reports and this host's own counts).
    async fn trial_sums(&self, name: &str) -> (Tally, Tally) {
        let Some(link) = self.link() else {
            return Default::default();
        };
        let (trial, own) = {
            let entries = self.entries();
            let trial = entries
                .get(name)
                .and_then(|e| e.cluster.as_ref())
                .and_then(|c| c.canary.as_ref().map(|(_, t)| t.figures()));
            (trial, link.host.clone())
        };
        let Some(trial) = trial else {
            return Default::default();
        };
        let (mut canary, mut stable) = (trial.canary.clone(), trial.stable.clone());
        let reports = link.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for report in reports.iter().filter(|r| r.host != own) {
            if let Some(figures) = report
                .handlers
                .get(name)
                .and_then(|h| h.trial.as_ref())
                .filter(|f| f.release == trial.release && f.started_at == trial.started_at)
            {
                canary.add(&figures.canary);
                stable.add(&figures.stable);
            }
        }
        (canary, stable)
    }

    /// Writes this host's report, reads every host's, and judges running canaries.
    async fn report_and_judge(&self) -> Result<(), WasmError> {
        let Some(link) = self.link() else {
            return Ok(());
        };
        let report = HostReport {
            host: link.host.clone(),
            at: Utc::now(),
            handlers: self
                .entries()
                .iter()
                .filter_map(|(name, entry)| {
                    let cluster = entry.cluster.as_ref()?;
                    Some((
                        name.clone(),
                        HostHandler {
                            revision: cluster.revision,
                            stable: cluster.stable.as_ref().map(|l| l.release),
                            canary: cluster.canary.as_ref().map(|(l, _)| l.release),
                            state: cluster.state.as_str().to_owned(),
                            error: cluster.error.clone(),
                            trial: cluster.canary.as_ref().map(|(_, t)| t.figures()),
                        },
                    ))
                })
                .collect(),
        };
        let ttl = link.settings.report_interval * 3 + Duration::from_secs(1);
        let doc = serde_json::to_string(&report).unwrap_or_default();
        link.store
            .put_report(&link.report_key(), &doc, ttl)
            .await
            .map_err(store_error)?;
        let reports: Vec<HostReport> = link
            .store
            .reports()
            .await
            .map_err(store_error)?
            .into_iter()
            .filter(|(key, _)| link.own_group(key).is_some())
            .filter_map(|(_, doc)| serde_json::from_str(&doc).ok())
            .collect();
        *link.hosts.lock().unwrap_or_else(|p| p.into_inner()) = reports;
        let trials: Vec<(String, Canary)> = self
            .entries()
            .iter()
            .filter_map(|(name, entry)| {
                let cluster = entry.cluster.as_ref()?;
                cluster.canary.as_ref()?;
                Some((name.clone(), cluster.deployment.canary.clone()?))
            })
            .collect();
        for (name, canary) in trials {
            let (canary_tally, stable_tally) = self.trial_sums(&name).await;
            let (promote, reason) = match judge(&canary, &canary_tally, &stable_tally, Utc::now()) {
                Verdict::Wait => continue,
                Verdict::Promote(reason) => (true, reason),
                Verdict::RollBack(reason) => (false, reason),
            };
            let outcome = if promote { "promoted" } else { "rolled_back" };
            let decided = self
                .change_record(&name, false, |deployment| {
                    let Some(deployment) = deployment.as_mut() else {
                        return Ok(false);
                    };
                    // Only the trial that was judged: another host may have ended it.
                    if deployment.canary.as_ref() != Some(&canary) {
                        return Ok(false);
                    }
                    Ok(deployment.end_canary(
                        promote,
                        Decision {
                            release: 0,
                            stable: 0,
                            outcome: outcome.into(),
                            reason: reason.clone(),
                            at: Utc::now(),
                            by: link.host.clone(),
                            canary: canary_tally.clone(),
                            stable_tally: stable_tally.clone(),
                        },
                    ))
                })
                .await;
            match decided {
                Ok(Some((revision, deployment))) => {
                    tracing::warn!(handler = %name, release = canary.release, %outcome, %reason, "canary decided");
                    self.inner.broker.metrics().canary_decision(&name, outcome);
                    self.apply_record(&name, revision, deployment, None).await;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(handler = %name, %error, "could not record a canary decision")
                }
            }
        }
        Ok(())
    }

    /// Starts following the store: applies changes on notification and every poll interval,
    /// reports this host and judges canaries every report interval. `None` without a store.
    pub fn follow_cluster(&self) -> Option<ClusterSync> {
        let link = self.link()?;
        let stop = CancellationToken::new();
        let set = self.clone();
        let (poll, report) = (link.settings.poll_interval, link.settings.report_interval);
        let token = stop.clone();
        tokio::spawn(async move {
            let Some(link) = set.link() else { return };
            let mut feed = link.store.changes().await.ok();
            let mut poll = tokio::time::interval(poll);
            let mut report = tokio::time::interval(report);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let notified = async {
                    match feed.as_mut() {
                        Some(feed) => feed.next().await.is_some(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = token.cancelled() => return,
                    open = notified => {
                        if !open {
                            tracing::warn!("cluster handler store notifications ended; polling until they are back");
                            feed = None;
                        }
                    }
                    _ = poll.tick() => {
                        if feed.is_none() {
                            feed = link.store.changes().await.ok();
                        }
                    }
                    _ = report.tick() => {
                        if let Err(error) = set.report_and_judge().await {
                            tracing::warn!(%error, "cannot report to the cluster handler store");
                        }
                        continue;
                    }
                }
                if let Err(error) = set.sync_cluster().await {
                    tracing::warn!(%error, "cannot read the cluster handler store; retrying");
                }
            }
        });
        Some(ClusterSync { stop })
    }

    /// The cluster view of handler `name`, from this host's entry and the last reports.
    pub(crate) fn cluster_info(&self, name: &str, entry: &Entry) -> Option<ClusterInfo> {
        let link = self.link()?;
        let cluster = entry.cluster.as_ref()?;
        let reports = link.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut hosts: BTreeMap<String, HostView> = reports
            .into_iter()
            .filter_map(|report| {
                let handler = report.handlers.get(name)?.clone();
                Some((
                    report.host.clone(),
                    HostView {
                        host: report.host,
                        stable: handler.stable,
                        canary: handler.canary,
                        current: handler.revision == cluster.revision,
                        state: handler.state,
                        error: handler.error,
                        reported_at: report.at,
                    },
                ))
            })
            .collect();
        // This host as it is now, not as it last reported.
        hosts.insert(
            link.host.clone(),
            HostView {
                host: link.host.clone(),
                stable: cluster.stable.as_ref().map(|l| l.release),
                canary: cluster.canary.as_ref().map(|(l, _)| l.release),
                state: cluster.state.as_str().to_owned(),
                error: cluster.error.clone(),
                current: true,
                reported_at: Utc::now(),
            },
        );
        let hosts: Vec<HostView> = hosts.into_values().collect();
        let converged = hosts
            .iter()
            .all(|h| h.current && h.state == SyncState::Converged.as_str());
        let deployment = &cluster.deployment;
        Some(ClusterInfo {
            revision: cluster.revision,
            desired: deployment.stable_release().cloned(),
            canary: deployment.canary.clone(),
            releases: deployment
                .releases
                .iter()
                .map(|r| ReleaseSummary {
                    number: r.number,
                    component: r.component.clone(),
                    has_manifest: r.manifest.is_some(),
                    deployed_at: r.deployed_at,
                    deployed_by: r.deployed_by.clone(),
                })
                .collect(),
            decisions: deployment.decisions.clone(),
            state: cluster.state,
            error: cluster.error.clone(),
            hosts,
            converged,
        })
    }

    /// [`info`] with the cluster view.
    pub(crate) fn full_info(&self, name: &str, entry: &Entry) -> HandlerInfo {
        let mut info = info(name, entry);
        info.cluster = self.cluster_info(name, entry);
        info
    }
}
