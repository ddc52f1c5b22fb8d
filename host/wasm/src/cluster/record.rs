//! What the cluster handler store holds, as the registry reads and writes it: one
//! [`Deployment`] record per handler (its releases, the stable one, a canary, the canary
//! decisions taken) and one [`HostReport`] per host. Pure data and the rules that change it;
//! no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::WasmError;

/// One deployed version of a handler: a component and the manifest it runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// Release number, 1 for the first deploy of a name, growing by one per deploy.
    pub number: u64,
    /// The component's content hash (the version recorded on every event it handles), the key
    /// of its bytes in the store.
    pub component: String,
    /// The manifest (TOML), if one was deployed.
    pub manifest: Option<String>,
    /// The subscription patterns it resolved to when deployed.
    pub patterns: Vec<String>,
    /// When it was deployed.
    pub deployed_at: DateTime<Utc>,
    /// The host that deployed it (`event_broker.instance_id`).
    pub deployed_by: String,
}

impl Release {
    /// Whether `other` runs the same component with the same manifest.
    pub fn same_content(&self, component: &str, manifest: Option<&str>) -> bool {
        self.component == component && self.manifest.as_deref() == manifest
    }
}

/// A canary in progress: a share of the handler's events goes to `release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// The release on trial.
    pub release: u64,
    /// Percentage (1–99) of matching events it receives, chosen by a stable hash of the
    /// event id.
    pub percent: u8,
    /// When it started; with `release` it identifies the trial in host reports.
    pub started_at: DateTime<Utc>,
    /// How long the trial runs before it is promoted (if no failure rate is worse).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Canary invocations (across the cluster) needed before any automatic decision.
    pub min_sample: u64,
    /// How much higher (absolute, 0–1) the canary's rate of any failure kind may be than the
    /// stable version's before it is rolled back.
    pub tolerance: f64,
}

/// Invocations of one version during a canary trial, by outcome kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Invocations.
    pub invocations: u64,
    /// Failures by kind (`trap`, `out_of_fuel`, `timeout`, `memory_limit`, `fail`).
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Adds `other` to this tally.
    pub fn add(&mut self, other: &Tally) {
        self.invocations += other.invocations;
        for (kind, count) in &other.failures {
            *self.failures.entry(kind.clone()).or_default() += count;
        }
    }

    /// The share of invocations that failed with `kind` (0 without invocations).
    pub fn rate(&self, kind: &str) -> f64 {
        if self.invocations == 0 {
            return 0.0;
        }
        self.failures.get(kind).copied().unwrap_or(0) as f64 / self.invocations as f64
    }
}

/// The failure kinds a canary is judged on.
pub const JUDGED_KINDS: [&str; 5] = ["trap", "out_of_fuel", "timeout", "memory_limit", "fail"];

/// What became of a canary, with the figures it was decided on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The canary release.
    pub release: u64,
    /// The stable release it was compared with.
    pub stable: u64,
    /// `promoted`, `rolled_back` (automatic), `promoted_manually` or `aborted` (manual).
    pub outcome: String,
    /// Why, in words.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The host that took it.
    pub by: String,
    /// The canary's invocations across the cluster.
    pub canary: Tally,
    /// The stable version's invocations across the cluster during the trial.
    pub stable_tally: Tally,
}

/// How many canary decisions a record keeps.
pub const KEPT_DECISIONS: usize = 10;

/// A handler's deployment record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Handler name.
    pub name: String,
    /// Kept releases, oldest first.
    pub releases: Vec<Release>,
    /// The release every host runs (and the canary's counterpart).
    pub stable: u64,
    /// A canary in progress.
    #[serde(default)]
    pub canary: Option<Canary>,
    /// Recent canary decisions, oldest first.
    #[serde(default)]
    pub decisions: Vec<Decision>,
}

impl Deployment {
    /// Parses a stored record.
    ///
    /// # Errors
    /// [`WasmError::Store`] when the document is not a deployment record.
    pub fn parse(doc: &str) -> Result<Deployment, WasmError> {
        serde_json::from_str(doc)
            .map_err(|e| WasmError::Store(format!("unreadable deployment record: {e}")))
    }

    /// The record as stored.
    pub fn to_doc(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A release by number.
    pub fn release(&self, number: u64) -> Option<&Release> {
        self.releases.iter().find(|r| r.number == number)
    }

    /// The stable release.
    pub fn stable_release(&self) -> Option<&Release> {
        self.release(self.stable)
    }

    /// The canary's release, while one runs.
    pub fn canary_release(&self) -> Option<&Release> {
        self.canary.as_ref().and_then(|c| self.release(c.release))
    }

    fn next_number(&self) -> u64 {
        self.releases.iter().map(|r| r.number).max().unwrap_or(0) + 1
    }

    /// Adds `release` (numbered here) as the new stable release, ending any canary; keeps the
    /// last `keep` releases. Returns its number. A release with the same content as the
    /// stable one (and no canary) changes nothing and returns `None`.
    pub fn deploy(&mut self, mut release: Release, keep: usize) -> Option<u64> {
        if self.canary.is_none()
            && self
                .stable_release()
                .is_some_and(|s| s.same_content(&release.component, release.manifest.as_deref()))
        {
            return None;
        }
        release.number = self.next_number();
        let number = release.number;
        self.releases.push(release);
        self.stable = number;
        self.canary = None;
        self.trim(keep);
        Some(number)
    }

    /// Adds `release` as a canary next to the stable release.
    ///
    /// # Errors
    /// [`WasmError::Conflict`] when a canary already runs or there is no stable release;
    /// [`WasmError::Manifest`] when its patterns differ from the stable release's.
    pub fn start_canary(
        &mut self,
        mut release: Release,
        mut canary: Canary,
        keep: usize,
    ) -> Result<u64, WasmError> {
        if let Some(running) = &self.canary {
            return Err(WasmError::Conflict(format!(
                "handler {:?} already runs release #{} as a canary; promote or abort it first",
                self.name, running.release
            )));
        }
        let stable = self.stable_release().ok_or_else(|| {
            WasmError::Conflict(format!(
                "handler {:?} has no stable release to compare a canary with; deploy it without --canary first",
                self.name
            ))
        })?;
        if stable.patterns != release.patterns {
            return Err(WasmError::Manifest(format!(
                "a canary must subscribe to the stable release's patterns ({}), not {}; deploy without --canary to change patterns",
                stable.patterns.join(" "),
                release.patterns.join(" ")
            )));
        }
        let number = self.next_number();
        release.number = number;
        canary.release = number;
        self.releases.push(release);
        self.canary = Some(canary);
        self.trim(keep);
        Ok(number)
    }

    /// Ends the canary: `promote` makes it the stable release, otherwise the stable release
    /// stays. Records the decision.
    pub fn end_canary(&mut self, promote: bool, mut decision: Decision) -> bool {
        let Some(canary) = self.canary.take() else {
            return false;
        };
        decision.release = canary.release;
        decision.stable = self.stable;
        if promote {
            self.stable = canary.release;
        }
        self.decisions.push(decision);
        let skip = self.decisions.len().saturating_sub(KEPT_DECISIONS);
        self.decisions.drain(..skip);
        true
    }

    /// Makes release `to` (default: the newest release older than the stable one) stable
    /// again, ending any canary. Returns the release now stable.
    ///
    /// # Errors
    /// [`WasmError::NoRelease`] when there is no such release (or none older to return to).
    pub fn rollback(&mut self, to: Option<&str>) -> Result<u64, WasmError> {
        let target = match to {
            Some(wanted) => self.find(wanted).ok_or_else(|| {
                WasmError::NoRelease(format!(
                    "{} has no release {wanted:?} (kept: {})",
                    self.name,
                    self.kept()
                ))
            })?,
            None => self
                .releases
                .iter()
                .filter(|r| r.number < self.stable)
                .map(|r| r.number)
                .max()
                .ok_or_else(|| {
                    WasmError::NoRelease(format!(
                        "{} has no release older than #{} to roll back to (kept: {})",
                        self.name,
                        self.stable,
                        self.kept()
                    ))
                })?,
        };
        self.canary = None;
        self.stable = target;
        Ok(target)
    }

    /// A release by `#N`, `N` or a prefix (4+ characters) of its component hash; the newest
    /// match wins.
    fn find(&self, wanted: &str) -> Option<u64> {
        let number = wanted.trim_start_matches('#');
        if let Ok(n) = number.parse::<u64>()
            && self.release(n).is_some()
        {
            return Some(n);
        }
        if wanted.len() < 4 {
            return None;
        }
        self.releases
            .iter()
            .rev()
            .find(|r| r.component.starts_with(wanted))
            .map(|r| r.number)
    }

    fn kept(&self) -> String {
        self.releases
            .iter()
            .map(|r| format!("#{} ({})", r.number, r.component))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Drops the oldest releases beyond `keep`, never the stable one or the canary.
    fn trim(&mut self, keep: usize) {
        let keep = keep.max(1);
        while self.releases.len() > keep {
            let protected = |r: &Release| {
                r.number == self.stable
                    || self.canary.as_ref().is_some_and(|c| c.release == r.number)
            };
            match self.releases.iter().position(|r| !protected(r)) {
                Some(oldest) => {
                    self.releases.remove(oldest);
                }
                None => break,
            }
        }
    }
}

/// What a host runs of one handler, as it reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHandler {
    /// The store revision of the record this host applied last.
    pub revision: u64,
    /// The stable release it runs (`None` while it has none loaded).
    pub stable: Option<u64>,
    /// The canary release it runs.
    pub canary: Option<u64>,
    /// `converged` (runs what the record says), `loading`, or `failed` (could not load the
    /// record's releases: it defers the handler's events to hosts that could).
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// This host's canary figures, for the trial identified by (canary release, start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<TrialFigures>,
}

/// One host's invocations of a canary trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialFigures {
    /// The canary release.
    pub release: u64,
    /// When the trial started (identifies it).
    pub started_at: DateTime<Utc>,
    /// The canary's invocations on this host.
    pub canary: Tally,
    /// The stable version's invocations on this host.
    pub stable: Tally,
}

/// A host's report: what it runs of each handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host (`event_broker.instance_id`).
    pub host: String,
    /// When it wrote the report.
    pub at: DateTime<Utc>,
    /// By handler name.
    pub handlers: BTreeMap<String, HostHandler>,
}

/// What an automatic canary judgement concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough invocations yet, or the window still runs.
    Wait,
    /// Roll back: the reason.
    RollBack(String),
    /// Promote: the reason.
    Promote(String),
}

/// Judges a canary from the cluster's tallies at `now`.
pub fn judge(canary: &Canary, canary_tally: &Tally, stable: &Tally, now: DateTime<Utc>) -> Verdict {
    if canary_tally.invocations < canary.min_sample {
        return Verdict::Wait;
    }
    for kind in JUDGED_KINDS {
        let (c, s) = (canary_tally.rate(kind), stable.rate(kind));
        if c > s + canary.tolerance {
            return Verdict::RollBack(format!(
                "{kind} rate {:.1}% on the canary against {:.1}% on the stable version ({} and {} invocations; tolerance {:.1} points)",
                c * 100.0,
                s * 100.0,
                canary_tally.invocations,
                stable.invocations,
                canary.tolerance * 100.0
            ));
        }
    }
    let elapsed = (now - canary.started_at).to_std().unwrap_or_default();
    if elapsed >= canary.window {
        return Verdict::Promote(format!(
            "no failure kind worse than the stable version's by more than {:.1} points over {} ({} canary and {} stable invocations)",
            canary.tolerance * 100.0,
            humantime::format_duration(canary.window),
            canary_tally.invocations,
            stable.invocations
        ));
    }
    Verdict::Wait
}

/// Whether an event id goes to a canary receiving `percent` % of events: a stable hash of the
/// id, the same on every host and across restarts.
pub fn routes_to_canary(event_id: &str, percent: u8) -> bool {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(event_id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head) % 100 < u64::from(percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(component: &str, manifest: Option<&str>) -> Release {
        Release {
            number: 0,
            component: component.into(),
            manifest: manifest.map(str::to_owned),
            patterns: vec!["a.>".into()],
            deployed_at: Utc::now(),
            deployed_by: "h".into(),
        }
    }

    fn empty() -> Deployment {
        Deployment {
            name: "h".into(),
            releases: vec![],
            stable: 0,
            canary: None,
            decisions: vec![],
        }
    }

    fn canary(percent: u8) -> Canary {
        Canary {
            release: 0,
            percent,
            started_at: Utc::now(),
            window: Duration::from_secs(60),
            min_sample: 10,
            tolerance: 0.05,
        }
    }

    #[test]
    fn deploys_number_releases_keep_the_last_n_and_skip_identical_content() {
        let mut d = empty();
        assert_eq!(d.deploy(release("c1", None), 2), Some(1));
        assert_eq!(d.deploy(release("c1", None), 2), None, "same content");
        assert_eq!(d.deploy(release("c1", Some("fuel = 1")), 2), Some(2));
        assert_eq!(d.deploy(release("c2", None), 2), Some(3));
        assert_eq!(
            d.releases.iter().map(|r| r.number).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(d.stable, 3);
    }

    #[test]
    fn rollback_goes_to_the_previous_release_or_the_named_one() {
        let mut d = empty();
        for c in ["c1", "c2", "c3"] {
            d.deploy(release(c, None), 5);
        }
        assert_eq!(d.rollback(None).expect("rollback"), 2);
        assert_eq!(d.rollback(None).expect("rollback"), 1);
        assert!(d.rollback(None).is_err(), "nothing older than #1");
        assert_eq!(d.rollback(Some("#3")).expect("to #3"), 3);
        assert_eq!(d.rollback(Some("2")).expect("to 2"), 2);
        assert!(d.rollback(Some("#9")).is_err());
        // A new deploy after a rollback gets the next number, not a reused one.
        assert_eq!(d.deploy(release("c4", None), 5), Some(4));
    }

    #[test]
    fn a_canary_needs_a_stable_release_with_its_patterns_and_is_never_trimmed() {
        let mut d = empty();
        assert!(d.start_canary(release("c0", None), canary(10), 1).is_err());
        d.deploy(release("c1", None), 1);
        let mut other = release("c2", None);
        other.patterns = vec!["b.>".into()];
        assert!(
            d.start_canary(other, canary(10), 1).is_err(),
            "patterns differ"
        );
        assert_eq!(
            d.start_canary(release("c2", None), canary(10), 1)
                .expect("canary"),
            2
        );
        assert!(
            d.release(1).is_some() && d.release(2).is_some(),
            "both kept"
        );
        assert!(
            d.start_canary(release("c3", None), canary(10), 1).is_err(),
            "one at a time"
        );
        let decision = Decision {
            release: 0,
            stable: 0,
            outcome: "rolled_back".into(),
            reason: "x".into(),
            at: Utc::now(),
            by: "h".into(),
            canary: Tally::default(),
            stable_tally: Tally::default(),
        };
        assert!(d.end_canary(false, decision.clone()));
        assert_eq!((d.stable, d.canary.is_none()), (1, true));
        assert_eq!((d.decisions[0].release, d.decisions[0].stable), (2, 1));
        d.start_canary(release("c3", None), canary(10), 5)
            .expect("canary");
        assert!(d.end_canary(true, decision));
        assert_eq!(d.stable, 3);
    }

    #[test]
    fn judging_waits_for_the_sample_rolls_back_a_worse_kind_and_promotes_after_the_window() {
        let mut trial = canary(10);
        let tally = |invocations, traps| Tally {
            invocations,
            failures: BTreeMap::from([("trap".to_owned(), traps)]),
        };
        let now = trial.started_at;
        assert_eq!(
            judge(&trial, &tally(9, 9), &tally(100, 0), now),
            Verdict::Wait
        );
        assert!(matches!(
            judge(&trial, &tally(10, 5), &tally(100, 0), now),
            Verdict::RollBack(reason) if reason.contains("trap rate 50.0%")
        ));
        assert_eq!(
            judge(&trial, &tally(10, 0), &tally(100, 0), now),
            Verdict::Wait
        );
        trial.started_at = now - chrono::Duration::seconds(61);
        assert!(matches!(
            judge(&trial, &tally(10, 0), &tally(100, 0), now),
            Verdict::Promote(_)
        ));
        // Within the tolerance of the stable version's own rate.
        assert!(matches!(
            judge(&trial, &tally(100, 12), &tally(100, 10), now),
            Verdict::Promote(_)
        ));
    }

    #[test]
    fn canary_routing_is_stable_and_close_to_its_share() {
        let ids: Vec<String> = (0..10_000).map(|n| format!("event-{n}")).collect();
        let routed = ids.iter().filter(|id| routes_to_canary(id, 10)).count();
        assert!((800..1200).contains(&routed), "{routed} of 10000 at 10%");
        assert_eq!(
            ids.iter()
                .map(|id| routes_to_canary(id, 10))
                .collect::<Vec<_>>(),
            ids.iter()
                .map(|id| routes_to_canary(id, 10))
                .collect::<Vec<_>>()
        );
        assert!(!ids.iter().any(|id| routes_to_canary(id, 0)));
    }
}
