//! Checks a scenario's expectations on the trace a run left: each gives its figure
//! (seconds to detect, spurious downs counted, seconds to converge) whether it passed
//! or not, so a failing run still says by how much.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::sim::observer::{EventKind, TraceEvent};
use crate::sim::scenario::{Expectation, FaultAction, Scenario};
use crate::sim::sensors::{NodeWindows, SensorSummary};

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
    /// (no_spurious_down; active_versions: the most versions seen at once;
    /// no_acked_sample_lost: acknowledged rows its node does not hold); `None` when
    /// what it waits for never happened.
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
    /// What each field device sent and had acknowledged.
    pub sensors: &'a [SensorSummary],
    /// The counters of the nodes that answered at the end.
    pub windows: &'a [NodeWindows],
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
        Expectation::NoAckedSampleLost {} => {
            let mut lost = 0;
            let mut checked = 0;
            let mut problems = Vec::new();
            for device in ev.sensors {
                let restarted = ev.faults.iter().any(|f| {
                    matches!(f.action, FaultAction::Kill | FaultAction::Restart)
                        && f.nodes.contains(&device.node)
                });
                if restarted {
                    continue;
                }
                let Some(node) = ev.windows.iter().find(|w| w.node == device.node) else {
                    problems.push(format!("{} did not answer at the end", device.node));
                    continue;
                };
                checked += 1;
                let accepted = node.accepted.get(&device.id).copied().unwrap_or(0);
                if accepted < device.rows_acked {
                    lost += device.rows_acked - accepted;
                    problems.push(format!(
                        "{} acknowledged {} rows of {} but holds {accepted}",
                        device.node, device.rows_acked, device.id
                    ));
                }
            }
            let detail = match problems.first() {
                None if checked > 0 => {
                    format!("every acknowledged row was held by its node ({checked} devices)")
                }
                None => "no device on a node that was neither killed nor restarted".to_string(),
                Some(first) => format!("{} problem(s); the first: {first}", problems.len()),
            };
            result(
                problems.is_empty() && checked > 0,
                Some(lost as f64),
                detail,
            )
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
            sensors: &[],
            windows: &[],
        })
        .remove(0)
    }

    #[test]
    fn an_acknowledged_row_its_node_does_not_hold_is_lost() {
        let scenario = Scenario::parse(
            "[simulation]\nname = \"s\"\nduration_s = 10\n\n[[nodes]]\nname = \"gw\"\ncount = 2\n\
             role = \"edge\"\n\n[[sensors]]\nid = \"r\"\nnode = \"gw-1\"\nrecording = \"r.fogrec\"\n\
             columns = [\"a\"]\n\n[[sensors]]\nid = \"q\"\nnode = \"gw-2\"\n\
             recording = \"q.fogrec\"\ncolumns = [\"a\"]\n\n[[expect]]\ncheck = \"no_acked_sample_lost\"\n",
            Path::new("s.toml"),
        )
        .expect("a valid scenario");
        let device = |id: &str, node: &str, rows_acked| SensorSummary {
            id: id.into(),
            node: node.into(),
            rows_sent: rows_acked,
            rows_acked,
            resends: 0,
            last_refusal: None,
        };
        let node = |name: &str, sensor: &str, accepted| NodeWindows {
            node: name.into(),
            accepted: [(sensor.to_string(), accepted)].into(),
            ..NodeWindows::default()
        };
        let sensors = [device("r", "gw-1", 600), device("q", "gw-2", 300)];
        let judge = |windows: &[NodeWindows]| {
            check(&Evidence {
                scenario: &scenario,
                trace: &[],
                faults: &[],
                rounds: &[],
                ran: &[true, true],
                sensors: &sensors,
                windows,
            })
            .remove(0)
        };
        let held = judge(&[node("gw-1", "r", 610), node("gw-2", "q", 300)]);
        assert!(held.passed, "{}", held.detail);
        assert_eq!(held.figure, Some(0.0));
        let short = judge(&[node("gw-1", "r", 590), node("gw-2", "q", 300)]);
        assert!(!short.passed);
        assert_eq!(short.figure, Some(10.0));
        assert!(
            short
                .detail
                .contains("gw-1 acknowledged 600 rows of r but holds 590"),
            "{}",
            short.detail
        );
        let silent = judge(&[node("gw-1", "r", 600)]);
        assert!(!silent.passed);
        assert!(
            silent.detail.contains("gw-2 did not answer"),
            "{}",
            silent.detail
        );
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
