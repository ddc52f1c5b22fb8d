//! The promises, checked over everything that happened in one provider's run:
//!
//! - every accepted event is stored and in a final state (`completed` or `failed`) within the
//!   settle bound; every event that exists at all (also one whose client hung up) is final;
//! - every consumer group's handlers ran every stored event: an event a group never handled is
//!   *lost* for that group;
//! - per (event, handler, group) the guest ran once, or more only where a crash or a cut
//!   explains it (an earlier run on a host that was then killed with SIGKILL, or a first run
//!   inside a cut's window); every other repeat is an unexplained duplicate;
//! - each stored per-handler outcome says what the guest did (failed for the planned traps,
//!   succeeded otherwise);
//! - a handler removed under load runs no event published after its removal returned;
//! - resident memory stayed under the bound, `/healthz` answered every probe, and every host
//!   stopped with SIGTERM drained its work and exited cleanly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::clients::{Answer, Attempt, Kind, Stored};
use crate::serve::{End, Generation, Health, Invocation};

/// Violations described in full per category and key (the counts are always complete).
const EXAMPLES: usize = 4;

/// Kinds of log lines reported per host process.
const NOTES_PER_HOST: usize = 6;

/// What the run expected of its handlers.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// (handler, group) pairs that must run every stored event.
    pub required: Vec<(String, String)>,
    /// The handler that traps when `n` is a multiple of [`Expectations::trap_every`].
    pub trapping: String,
    /// See [`Expectations::trapping`].
    pub trap_every: u64,
    /// The handler deployed and removed under load.
    pub transient: String,
    /// Largest resident set allowed per host, in KiB.
    pub rss_bound_kib: u64,
}

/// What happened in the run.
pub struct Evidence {
    /// Every publish the suite tried.
    pub attempts: Vec<Attempt>,
    /// The stored state of every attempted id after the settle bound.
    pub stored: HashMap<String, Stored>,
    /// Every guest run the hosts logged.
    pub invocations: Vec<Invocation>,
    /// `<label>#<generation>` of every process killed with SIGKILL.
    pub killed: HashSet<String>,
    /// Windows in which a backend cut explains a repeated run (a first run inside one).
    pub cut_windows: Vec<(Instant, Instant)>,
    /// When the removal of the transient handler returned, if it was removed.
    pub removed_at: Option<Instant>,
    /// Per host label: memory and `/healthz` over its generations, and how each ended.
    pub hosts: Vec<(String, Health, Vec<Generation>)>,
    /// Problems the fault script itself ran into (a deploy refused, no recovery after a cut).
    pub script: Vec<String>,
}

/// One category of violations.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    /// How many.
    pub count: usize,
    /// Per key (publish kind, handler or host): how many, and up to [`EXAMPLES`] described in
    /// full.
    pub by: BTreeMap<String, (usize, Vec<String>)>,
}

impl Findings {
    fn add(&mut self, key: &str, describe: impl FnOnce() -> String) {
        self.count += 1;
        let (count, examples) = self.by.entry(key.to_owned()).or_default();
        *count += 1;
        if examples.len() < EXAMPLES {
            examples.push(describe());
        }
    }
}

/// The checked run.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Events the hosts accepted (202, or 200 with the processed event).
    pub accepted: usize,
    /// Events stored (accepted or not).
    pub stored: usize,
    /// What the publishing clients were told, by answer.
    pub answers: BTreeMap<String, usize>,
    /// Largest resident set per host label, in KiB.
    pub host_rss_kib: Vec<(String, u64)>,
    /// Accepted but not stored, or not run by some group.
    pub lost: Findings,
    /// Stored but not final after the settle bound (or unreadable).
    pub stuck: Findings,
    /// Handler runs the broker stored as succeeded whose invocation line the host never
    /// logged (a guest's log lines were dropped).
    pub unlogged: Findings,
    /// (event, handler, group) keys that ran more than once.
    pub duplicates: usize,
    /// (event, handler, group) keys that ran at all.
    pub keys: usize,
    /// Repeats that neither a crash nor a cut explains.
    pub unexplained: Findings,
    /// Stored outcomes that contradict what the guest did.
    pub wrong_outcomes: Findings,
    /// Runs of the removed handler on events published after its removal.
    pub after_removal: Findings,
    /// Largest resident set of any host, in KiB.
    pub max_rss_kib: u64,
    /// Hosts over the memory bound.
    pub memory: Findings,
    /// Slowest `/healthz` answer.
    pub max_health: Duration,
    /// `/healthz` probes that failed.
    pub health: Findings,
    /// Hosts that did not stop cleanly on SIGTERM.
    pub stops: Findings,
    /// Stops that were clean.
    pub clean_stops: usize,
    /// Everything else (fault script problems).
    pub other: Findings,
    /// The most frequent warnings, errors and lease rescues each host process logged.
    pub notes: Vec<String>,
}

impl Verdict {
    /// Every category with violations: (name, findings).
    pub fn violations(&self) -> Vec<(&'static str, &Findings)> {
        [
            ("lost", &self.lost),
            ("stuck", &self.stuck),
            ("runs missing from the log", &self.unlogged),
            ("unexplained duplicates", &self.unexplained),
            ("wrong stored outcomes", &self.wrong_outcomes),
            ("removed handler still ran", &self.after_removal),
            ("memory over the bound", &self.memory),
            ("/healthz failures", &self.health),
            ("unclean stops", &self.stops),
            ("fault script", &self.other),
        ]
        .into_iter()
        .filter(|(_, findings)| findings.count > 0)
        .collect()
    }
}

type Key = (String, String, String);

/// Checks every promise over the evidence.
pub fn judge(expect: &Expectations, evidence: &Evidence) -> Verdict {
    let mut verdict = Verdict::default();
    let mut runs: HashMap<Key, Vec<&Invocation>> = HashMap::new();
    for invocation in &evidence.invocations {
        runs.entry((
            invocation.event.clone(),
            invocation.handler.clone(),
            invocation.group.clone(),
        ))
        .or_default()
        .push(invocation);
    }
    for list in runs.values_mut() {
        list.sort_by_key(|invocation| invocation.at);
    }
    let describe = |attempt: &Attempt, extra: &str| {
        let stored = evidence.stored.get(&attempt.id);
        let mut text = format!(
            "{} (n={}, {} to {}, {:?}): {extra}\n      stored: {}",
            attempt.id,
            attempt.n,
            attempt.kind.name(),
            attempt.host,
            attempt.answer,
            stored.map_or_else(|| "(not read)".to_owned(), summarize),
        );
        let mut seen: Vec<String> = evidence
            .invocations
            .iter()
            .filter(|i| i.event == attempt.id)
            .map(|i| {
                format!(
                    "{}/{} on {} attempt {}",
                    i.handler, i.group, i.host, i.attempt
                )
            })
            .collect();
        seen.sort();
        let _ = write!(
            text,
            "\n      guest runs: {}",
            if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            }
        );
        text
    };

    for attempt in &evidence.attempts {
        let kind = attempt.kind.name();
        if attempt.accepted() {
            verdict.accepted += 1;
        }
        let answer = match &attempt.answer {
            Answer::Accepted => "accepted".to_owned(),
            Answer::Refused(reason) => format!("refused {reason}"),
            Answer::Unanswered(_)
                if matches!(attempt.kind, Kind::AsyncHangUp | Kind::SyncHangUp) =>
            {
                "client hung up".to_owned()
            }
            Answer::Unanswered(_) => "no answer".to_owned(),
        };
        *verdict.answers.entry(answer).or_default() += 1;
        let stored = evidence.stored.get(&attempt.id);
        let event = match stored {
            Some(Stored::Found(event)) => event,
            Some(Stored::NotFound) | None => {
                if attempt.accepted() {
                    verdict
                        .lost
                        .add(kind, || describe(attempt, "accepted but not stored"));
                }
                continue;
            }
            Some(Stored::Unreadable(reason)) => {
                verdict.stuck.add(kind, || {
                    describe(attempt, &format!("state unreadable: {reason}"))
                });
                continue;
            }
        };
        verdict.stored += 1;
        if !stored.is_some_and(Stored::is_final) {
            verdict.stuck.add(kind, || {
                describe(attempt, "not in a final state after the settle bound")
            });
            continue;
        }
        // A handler whose stored outcome says it succeeded did run, even without its line.
        let stored_success = |handler: &str| {
            event["handlers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["handler"] == handler && o["state"] == "succeeded")
        };
        let (unlogged, missing): (Vec<_>, Vec<_>) = expect
            .required
            .iter()
            .filter(|(handler, group)| {
                !runs.contains_key(&(attempt.id.clone(), handler.clone(), group.clone()))
            })
            .partition(|(handler, _)| stored_success(handler));
        let names = |pairs: &[&(String, String)]| {
            pairs
                .iter()
                .map(|(handler, group)| format!("{handler} of group {group}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !missing.is_empty() {
            let mut who: Vec<String> = missing
                .iter()
                .map(|(handler, group)| format!("{handler}/{group}"))
                .collect();
            who.sort();
            verdict
                .lost
                .add(&format!("{kind} not run by {}", who.join("+")), || {
                    describe(
                        attempt,
                        &format!("final, but never run by {}", names(&missing)),
                    )
                });
        }
        for (handler, group) in &unlogged {
            verdict.unlogged.add(handler, || {
                describe(
                    attempt,
                    &format!(
                        "{handler} of group {group} is stored as succeeded, but its invocation \
                         line never reached the host's log"
                    ),
                )
            });
        }
        for outcome in event["handlers"].as_array().into_iter().flatten() {
            let Some(handler) = outcome["handler"].as_str() else {
                continue;
            };
            if handler == expect.transient
                || !expect.required.iter().any(|(name, _)| name == handler)
            {
                continue;
            }
            let traps = handler == expect.trapping && attempt.n % expect.trap_every == 0;
            let expected = if traps { "failed" } else { "succeeded" };
            let state = outcome["state"].as_str().unwrap_or("(none)");
            if state != expected {
                verdict.wrong_outcomes.add(handler, || {
                    describe(
                        attempt,
                        &format!(
                            "{handler}'s stored outcome is {state}, but the guest {}",
                            if traps { "trapped" } else { "succeeded" }
                        ),
                    )
                });
            }
        }
    }

    let by_id: HashMap<&str, &Attempt> = evidence
        .attempts
        .iter()
        .map(|attempt| (attempt.id.as_str(), attempt))
        .collect();
    for ((event, handler, group), list) in &runs {
        verdict.keys += 1;
        if list.len() < 2 {
            continue;
        }
        verdict.duplicates += 1;
        let first = list[0];
        let crash = list[..list.len() - 1]
            .iter()
            .any(|run| evidence.killed.contains(&run.host));
        let cut = evidence
            .cut_windows
            .iter()
            .any(|(from, to)| first.at >= *from && first.at <= *to);
        if !crash && !cut {
            let text = || {
                let runs = list
                    .iter()
                    .map(|i| format!("{} attempt {}", i.host, i.attempt))
                    .collect::<Vec<_>>()
                    .join(", ");
                let what = format!(
                    "{handler} of group {group} ran {} times ({runs}) with no crash or cut to explain it",
                    list.len()
                );
                match by_id.get(event.as_str()) {
                    Some(attempt) => describe(attempt, &what),
                    None => format!("{event}: {what}"),
                }
            };
            verdict.unexplained.add(handler, text);
        }
    }

    if let Some(removed_at) = evidence.removed_at {
        let mut ran = false;
        for ((event, handler, _), list) in &runs {
            if *handler != expect.transient {
                continue;
            }
            ran = true;
            if let Some(attempt) = by_id.get(event.as_str())
                && attempt.started > removed_at
            {
                verdict.after_removal.add(attempt.kind.name(), || {
                    describe(
                        attempt,
                        &format!(
                            "published after {} was removed, yet it ran {} time(s)",
                            expect.transient,
                            list.len()
                        ),
                    )
                });
            }
        }
        if !ran {
            verdict.other.add("deploy", || {
                format!(
                    "{} was deployed under load but never ran an event",
                    expect.transient
                )
            });
        }
    }

    for (label, health, generations) in &evidence.hosts {
        verdict.max_rss_kib = verdict.max_rss_kib.max(health.max_rss_kib);
        verdict
            .host_rss_kib
            .push((label.clone(), health.max_rss_kib));
        verdict.max_health = verdict.max_health.max(health.max_latency);
        if health.max_rss_kib > expect.rss_bound_kib {
            verdict.memory.add(label, || {
                format!(
                    "{label}: resident memory reached {} MiB; the bound is {} MiB",
                    health.max_rss_kib / 1024,
                    expect.rss_bound_kib / 1024
                )
            });
        }
        for failure in &health.failures {
            verdict.health.add(label, || format!("{label}: {failure}"));
        }
        for generation in generations {
            let mut notable = generation.notable.clone();
            notable.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
            for (line, count) in notable.iter().take(NOTES_PER_HOST) {
                verdict
                    .notes
                    .push(format!("{}: {count}× {line}", generation.host));
            }
            if let End::Stopped { clean, detail } = &generation.end {
                if *clean {
                    verdict.clean_stops += 1;
                } else {
                    verdict.stops.add(label, || {
                        let tail = generation.tail[generation.tail.len().saturating_sub(15)..]
                            .join("\n        ");
                        format!(
                            "{}: {detail}; its last log lines:\n        {tail}",
                            generation.host
                        )
                    });
                }
            }
        }
    }
    for problem in &evidence.script {
        verdict.other.add("script", || problem.clone());
    }
    verdict
}

/// The stored event in one line: status, error, retries and per-handler outcomes.
fn summarize(stored: &Stored) -> String {
    match stored {
        Stored::NotFound => "not found".to_owned(),
        Stored::Unreadable(reason) => format!("unreadable: {reason}"),
        Stored::Found(event) => {
            let handlers: Vec<Value> = event["handlers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    json!({
                        "handler": o["handler"],
                        "state": o["state"],
                        "attempts": o["attempts"],
                        "error": o["last_error"]["kind"],
                        "message": clip(o["last_error"]["message"].as_str().unwrap_or(""), 160),
                    })
                })
                .collect();
            json!({
                "status": event["status"],
                "error": clip(event["error"].as_str().unwrap_or(""), 200),
                "retry_count": event["retry_count"],
                "instance_id": event["instance_id"],
                "handlers": handlers,
            })
            .to_string()
        }
    }
}

/// The first line of `text`, at most `max` bytes, with `…` where something was left out.
fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    let more = line.len() < text.trim_end().len();
    if line.len() <= max {
        return if more {
            format!("{line} …")
        } else {
            line.to_owned()
        };
    }
    let text = line;
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The judge itself, on a made-up run with one violation of each kind.
#[test]
fn the_judge_finds_each_kind_of_violation_and_nothing_else() {
    use crate::serve::Invocation;

    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let attempt = |id: &str, n: u64, answer: Answer, started: Instant| Attempt {
        id: id.into(),
        n,
        kind: Kind::Async,
        host: "a0#0".into(),
        answer,
        started,
    };
    let run = |event: &str, handler: &str, host: &str, ms: u64| Invocation {
        event: event.into(),
        handler: handler.into(),
        group: "a".into(),
        attempt: 1,
        host: host.into(),
        at: at(ms),
    };
    let event = |status: &str, outcomes: Value| {
        Stored::Found(json!({"status": status, "handlers": outcomes, "retry_count": 0}))
    };
    let ok = |handler: &str| json!({"handler": handler, "state": "succeeded", "attempts": 1});
    let accepted = Answer::Accepted;
    let attempts = vec![
        attempt("fine", 1, accepted.clone(), at(0)),
        attempt("not-stored", 2, accepted.clone(), at(0)),
        attempt("stuck", 4, accepted.clone(), at(0)),
        attempt("beta-missing", 5, accepted.clone(), at(0)),
        attempt("beta-twice", 7, accepted.clone(), at(0)),
        attempt("crash-twice", 8, accepted.clone(), at(0)),
        attempt("cut-twice", 10, accepted.clone(), at(0)),
        attempt(
            "never-answered",
            11,
            Answer::Unanswered("hung up".into()),
            at(0),
        ),
        attempt("after-removal", 13, accepted.clone(), at(500)),
        attempt("trap-not-recorded", 3, accepted.clone(), at(0)),
        attempt("line-dropped", 14, accepted, at(0)),
    ];
    let stored: HashMap<String, Stored> = [
        ("fine", event("completed", json!([ok("alpha"), ok("beta")]))),
        ("not-stored", Stored::NotFound),
        ("stuck", event("processing", json!([]))),
        ("beta-missing", event("completed", json!([ok("alpha")]))),
        (
            "beta-twice",
            event("completed", json!([ok("alpha"), ok("beta")])),
        ),
        (
            "crash-twice",
            event("completed", json!([ok("alpha"), ok("beta")])),
        ),
        (
            "cut-twice",
            event("completed", json!([ok("alpha"), ok("beta")])),
        ),
        ("never-answered", Stored::NotFound),
        (
            "after-removal",
            event("completed", json!([ok("alpha"), ok("beta")])),
        ),
        (
            "trap-not-recorded",
            event("failed", json!([ok("alpha"), ok("beta")])),
        ),
        (
            "line-dropped",
            event("completed", json!([ok("alpha"), ok("beta")])),
        ),
    ]
    .into_iter()
    .map(|(id, stored)| (id.to_owned(), stored))
    .collect();
    let mut invocations = Vec::new();
    for id in [
        "fine",
        "beta-missing",
        "beta-twice",
        "crash-twice",
        "cut-twice",
        "after-removal",
        "trap-not-recorded",
        "line-dropped",
    ] {
        invocations.push(run(id, "alpha", "a0#0", 10));
    }
    for id in [
        "fine",
        "beta-twice",
        "crash-twice",
        "after-removal",
        "trap-not-recorded",
    ] {
        invocations.push(run(id, "beta", "a0#0", 10));
    }
    invocations.push(run("beta-twice", "beta", "a0#0", 20));
    invocations.push(run("crash-twice", "alpha", "a1#0", 5));
    invocations.push(run("cut-twice", "beta", "a0#0", 200));
    invocations.push(run("cut-twice", "beta", "a0#0", 300));
    invocations.push(run("after-removal", "transient", "a0#0", 600));
    let health = |rss_mib: u64, failures: Vec<String>| Health {
        max_rss_kib: rss_mib * 1024,
        max_latency: Duration::from_millis(5),
        failures,
        probes: 10,
    };
    let stopped = |host: &str, clean: bool| Generation {
        host: host.into(),
        end: End::Stopped {
            clean,
            detail: String::new(),
        },
        health: Health::default(),
        tail: Vec::new(),
        notable: Vec::new(),
    };
    let evidence = Evidence {
        attempts,
        stored,
        invocations,
        killed: ["a1#0".to_owned()].into(),
        cut_windows: vec![(at(150), at(250))],
        removed_at: Some(at(400)),
        hosts: vec![
            (
                "a0".into(),
                health(100, Vec::new()),
                vec![stopped("a0#0", true)],
            ),
            (
                "a1".into(),
                health(300, vec!["/healthz answered 500".into()]),
                vec![stopped("a1#1", false)],
            ),
        ],
        script: Vec::new(),
    };
    let expect = Expectations {
        required: vec![("alpha".into(), "a".into()), ("beta".into(), "a".into())],
        trapping: "alpha".into(),
        trap_every: 3,
        transient: "transient".into(),
        rss_bound_kib: 200 * 1024,
    };
    let verdict = judge(&expect, &evidence);
    let ids = |findings: &Findings| -> Vec<String> {
        let mut ids: Vec<String> = findings
            .by
            .values()
            .flat_map(|(_, examples)| examples.iter())
            .map(|text| text.split(' ').next().unwrap_or("").to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(verdict.accepted, 10);
    assert_eq!(ids(&verdict.unlogged), ["line-dropped"]);
    assert_eq!(ids(&verdict.lost), ["beta-missing", "not-stored"]);
    assert_eq!(ids(&verdict.stuck), ["stuck"]);
    assert_eq!(ids(&verdict.unexplained), ["beta-twice"]);
    assert_eq!(verdict.duplicates, 3, "beta-twice, crash-twice, cut-twice");
    assert_eq!(ids(&verdict.wrong_outcomes), ["trap-not-recorded"]);
    assert_eq!(ids(&verdict.after_removal), ["after-removal"]);
    assert_eq!(verdict.memory.count, 1);
    assert_eq!(verdict.health.count, 1);
    assert_eq!((verdict.stops.count, verdict.clean_stops), (1, 1));
    assert_eq!(verdict.other.count, 0);
}
