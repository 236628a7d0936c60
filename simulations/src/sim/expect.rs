//! Checks a scenario's expectations on the trace a run left: each gives its figure
//! (seconds to detect, spurious downs counted, seconds to converge) whether it passed
//! or not, so a failing run still says by how much.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::sim::observer::{EventKind, TraceEvent};
use crate::sim::scenario::{Expectation, FaultAction, Scenario};

/// A fault as it was carried out.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub index: usize,
    pub action: FaultAction,
    pub at_s: f64,
    /// When the simulator carried it out (later than `at_s` by its own lag).
    pub done_at_s: f64,
    /// The nodes the fault acted on (kill, freeze, thaw, restart, apply) or the two
    /// sides of the links it cut, healed or degraded.
    pub nodes: Vec<String>,
    pub from: Vec<String>,
    pub to: Vec<String>,
    /// Apply: `accepted` or the refusal.
    pub outcome: Option<String>,
}

impl FaultRecord {
    /// One line: the action and what it acted on (long lists cut short).
    pub fn describe(&self) -> String {
        let action = format!("{:?}", self.action).to_lowercase();
        if self.from.is_empty() {
            format!("{action} {}", summarise(&self.nodes))
        } else {
            format!(
                "{action} {} → {}",
                summarise(&self.from),
                summarise(&self.to)
            )
        }
    }
}

fn summarise(names: &[String]) -> String {
    match names.len() {
        0..=3 => names.join(", "),
        n => format!("{}, … ({n} nodes)", names[..2].join(", ")),
    }
}

/// A round of observation: when, whether the mesh had converged, and which model
/// versions of each expert the answering nodes served.
#[derive(Debug, Clone)]
pub struct RoundRecord {
    pub t_s: f64,
    pub converged: bool,
    pub versions: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub expectation: Expectation,
    pub passed: bool,
    /// The measured figure: seconds (declared_down, converged) or a count
    /// (no_spurious_down; active_versions: the most versions seen at once); `None`
    /// when what it waits for never happened.
    pub figure: Option<f64>,
    pub detail: String,
}

pub struct Evidence<'a> {
    pub scenario: &'a Scenario,
    pub trace: &'a [TraceEvent],
    pub faults: &'a [FaultRecord],
    pub rounds: &'a [RoundRecord],
    /// For each node, whether it ran (answered at least once) after the clock started.
    pub ran: &'a [bool],
}

pub fn check(evidence: &Evidence<'_>) -> Vec<CheckResult> {
    evidence
        .scenario
        .expect
        .iter()
        .map(|e| check_one(evidence, e))
        .collect()
}

fn check_one(ev: &Evidence<'_>, expectation: &Expectation) -> CheckResult {
    let result = |passed: bool, figure: Option<f64>, detail: String| CheckResult {
        expectation: expectation.clone(),
        passed,
        figure,
        detail,
    };
    match expectation {
        Expectation::DeclaredDown {
            node,
            fault,
            within_s,
            by,
        } => {
            let Some(record) = ev.faults.get(*fault) else {
                return result(false, None, format!("fault {fault} was not carried out"));
            };
            let start = record.done_at_s;
            let watchers = watchers(ev, node, by, start);
            let mut slowest: f64 = 0.0;
            let mut missing = Vec::new();
            for watcher in &watchers {
                let seen = ev.trace.iter().find(|e| {
                    e.kind == EventKind::SeesDown
                        && e.t_s >= start
                        && &e.node == watcher
                        && e.peer.as_deref() == Some(node.as_str())
                });
                match seen {
                    Some(e) => slowest = slowest.max(e.t_s - start),
                    None => missing.push(watcher.clone()),
                }
            }
            if watchers.is_empty() {
                return result(false, None, "no running node was left to watch".into());
            }
            if !missing.is_empty() {
                return result(
                    false,
                    None,
                    format!("{} never saw {node} down: {missing:?}", missing.len()),
                );
            }
            result(
                slowest <= *within_s,
                Some(round3(slowest)),
                format!(
                    "all {} watchers saw {node} down {:.2} s after the {:?}",
                    watchers.len(),
                    slowest,
                    record.action
                ),
            )
        }
        Expectation::NoSpuriousDown { nodes } => {
            let watched: BTreeSet<&str> = ev
                .scenario
                .resolve(nodes)
                .into_iter()
                .map(|i| ev.scenario.nodes[i].name.as_str())
                .collect();
            let spurious: Vec<&TraceEvent> = ev
                .trace
                .iter()
                .filter(|e| e.kind == EventKind::SeesDown && e.t_s >= 0.0)
                .filter(|e| {
                    let peer = e.peer.as_deref().unwrap_or_default();
                    (watched.is_empty()
                        || watched.contains(e.node.as_str())
                        || watched.contains(peer))
                        && !excused(ev, &e.node, peer, e.t_s)
                })
                .collect();
            let detail = match spurious.first() {
                None => "no node saw an untouched peer go down".to_string(),
                Some(e) => format!(
                    "{} spurious; the first: {} saw {} down at {:.2} s",
                    spurious.len(),
                    e.node,
                    e.peer.as_deref().unwrap_or_default(),
                    e.t_s
                ),
            };
            result(spurious.is_empty(), Some(spurious.len() as f64), detail)
        }
        Expectation::Converged { fault, within_s } => {
            let Some(record) = ev.faults.get(*fault) else {
                return result(false, None, format!("fault {fault} was not carried out"));
            };
            match ev
                .rounds
                .iter()
                .find(|r| r.t_s >= record.done_at_s && r.converged)
            {
                Some(r) => {
                    let took = r.t_s - record.done_at_s;
                    result(
                        took <= *within_s,
                        Some(round3(took)),
                        format!("converged {took:.2} s after the {:?}", record.action),
                    )
                }
                None => result(
                    false,
                    None,
                    format!("never converged after the {:?}", record.action),
                ),
            }
        }
        Expectation::Applied { fault, accepted } => {
            let outcome = ev.faults.get(*fault).and_then(|f| f.outcome.clone());
            match outcome {
                Some(outcome) => {
                    let was_accepted = outcome == "accepted";
                    result(was_accepted == *accepted, None, outcome)
                }
                None => result(false, None, "the apply did not answer".into()),
            }
        }
        Expectation::ActiveVersions { expert, at_most } => {
            let busiest = ev
                .rounds
                .iter()
                .filter(|r| r.t_s >= 0.0)
                .filter_map(|r| Some((r.t_s, r.versions.get(expert)?)))
                .max_by_key(|(_, versions)| versions.len());
            match busiest {
                None => result(
                    false,
                    None,
                    format!("no answering node served {expert} after the clock started"),
                ),
                Some((t_s, versions)) => result(
                    versions.len() <= *at_most,
                    Some(versions.len() as f64),
                    format!(
                        "at most {} version(s) of {expert} served at once ({} at {t_s:.2} s)",
                        versions.len(),
                        versions.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ),
            }
        }
    }
}

/// The running nodes that must see `node` go down.
fn watchers(ev: &Evidence<'_>, node: &str, by: &[String], start: f64) -> Vec<String> {
    let chosen = if by.is_empty() {
        (0..ev.scenario.nodes.len()).collect()
    } else {
        ev.scenario.resolve(by)
    };
    chosen
        .into_iter()
        .map(|i| &ev.scenario.nodes[i].name)
        .filter(|name| name.as_str() != node)
        .filter(|name| {
            let i = ev.scenario.index_of(name).unwrap_or(usize::MAX);
            ev.ran.get(i).copied().unwrap_or(false) && !touched_by(ev, name, start)
        })
        .cloned()
        .collect()
}

/// Whether a fault carried out by `t_s` acted on `node`'s process.
fn touched_by(ev: &Evidence<'_>, node: &str, t_s: f64) -> bool {
    ev.faults.iter().any(|f| {
        f.done_at_s <= t_s
            && matches!(
                f.action,
                FaultAction::Kill | FaultAction::Freeze | FaultAction::Restart
            )
            && f.nodes.iter().any(|n| n == node)
    })
}

/// Whether `watcher` seeing `peer` down at `t_s` has a cause in the schedule: either
/// one's process was acted on, or a link between them was cut or degraded, or `peer`
/// joined after the clock started (a node restarting its links can flap once).
fn excused(ev: &Evidence<'_>, watcher: &str, peer: &str, t_s: f64) -> bool {
    if touched_by(ev, watcher, t_s) || touched_by(ev, peer, t_s) {
        return true;
    }
    let (Some(w), Some(p)) = (ev.scenario.index_of(watcher), ev.scenario.index_of(peer)) else {
        return false;
    };
    ev.faults.iter().any(|f| {
        f.done_at_s <= t_s && matches!(f.action, FaultAction::Cut | FaultAction::Degrade) && {
            let from = ev.scenario.resolve(&f.from);
            let to: BTreeSet<usize> = ev
                .scenario
                .resolve(&f.to)
                .difference(&from)
                .copied()
                .collect();
            (from.contains(&w) && to.contains(&p)) || (from.contains(&p) && to.contains(&w))
        }
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn round(t_s: f64, versions: &[(&str, &[&str])]) -> RoundRecord {
        RoundRecord {
            t_s,
            converged: true,
            versions: versions
                .iter()
                .map(|(expert, v)| {
                    (
                        expert.to_string(),
                        v.iter().map(|s| s.to_string()).collect(),
                    )
                })
                .collect(),
        }
    }

    fn active_versions(rounds: &[RoundRecord]) -> CheckResult {
        let scenario = Scenario::parse(
            "[simulation]\nname = \"v\"\nduration_s = 10\n\n[[nodes]]\nname = \"n\"\ncount = 2\n\
             role = \"fog\"\n\n[[expect]]\ncheck = \"active_versions\"\nexpert = \"ae\"\nat_most = 1\n",
            Path::new("v.toml"),
        )
        .expect("a valid scenario");
        check(&Evidence {
            scenario: &scenario,
            trace: &[],
            faults: &[],
            rounds,
            ran: &[true, true],
        })
        .remove(0)
    }

    #[test]
    fn two_versions_served_at_once_fail_and_one_at_a_time_passes() {
        let rollout = [
            round(-1.0, &[("ae", &["v0", "v1"])]),
            round(0.5, &[("ae", &["v1"])]),
            round(1.0, &[("ae", &["v2"]), ("other", &["a", "b"])]),
        ];
        let passed = active_versions(&rollout);
        assert!(passed.passed, "{}", passed.detail);
        assert_eq!(passed.figure, Some(1.0));

        let split = [
            round(0.5, &[("ae", &["v1"])]),
            round(1.0, &[("ae", &["v1", "v2"])]),
        ];
        let failed = active_versions(&split);
        assert!(!failed.passed);
        assert_eq!(failed.figure, Some(2.0));
        assert!(
            failed.detail.contains("v1, v2 at 1.00 s"),
            "{}",
            failed.detail
        );

        let never = active_versions(&[round(0.5, &[])]);
        assert!(!never.passed);
        assert_eq!(never.figure, None);
    }
}
