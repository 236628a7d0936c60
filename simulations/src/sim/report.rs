//! A run's report: one JSON object (`report.json`, and what `fogmesh sim` prints) and
//! a self-contained HTML page (`report.html`: inline SVG and CSS, no script, nothing
//! fetched) with the topology, the timeline of faults and of the mesh's reactions,
//! the expectations and the traffic between zones.
//!
//! Two hashes say what a rerun can be compared on. `schedule_sha256` covers every
//! input (zones, nodes, links, faults, expectations, seed, mesh): the same scenario and
//! seed give the same one. `trace_sha256` covers what happened without when: per
//! stretch between two faults, the set of events (who saw whom go down or come back,
//! who fell silent, spec versions, applies). Times are left out because the nodes run
//! on the wall clock (ARCHITECTURE.md, "The simulator").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::sim::expect::{CheckResult, FaultRecord};
use crate::sim::fleet::NodeLife;
use crate::sim::network::LinkTraffic;
use crate::sim::observer::{EventKind, TraceEvent};
use crate::sim::scenario::Scenario;
use crate::sim::sensors::{NodeWindows, SensorSummary};
use crate::sim::SimError;

/// What a finished run hands the report.
pub struct Run<'a> {
    pub scenario: &'a Scenario,
    pub formed_after_s: f64,
    pub simulated_s: f64,
    pub wall_s: f64,
    /// Resident and proportional MiB per node process, the most seen at once.
    pub memory_mib: (f64, f64),
    pub trace: Vec<TraceEvent>,
    pub faults: Vec<FaultRecord>,
    pub checks: Vec<CheckResult>,
    pub traffic: Vec<LinkTraffic>,
    pub lives: Vec<NodeLife>,
    pub sensors: Vec<SensorSummary>,
    pub windows: Vec<NodeWindows>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub zones: usize,
    pub levels: usize,
    /// The nodes ran with certificates of a mesh CA made for the run.
    pub tls: bool,
    pub passed: bool,
    /// Seconds from the moment the mesh formed to the end.
    pub simulated_s: f64,
    /// The whole run, the mesh's formation included.
    pub wall_s: f64,
    pub formed_after_s: f64,
    pub sim_to_wall: f64,
    pub rss_mib_per_node: f64,
    /// Libtorch's pages are shared by every node process; this shares them out.
    pub pss_mib_per_node: f64,
    pub trace_events: usize,
    pub trace_sha256: String,
    pub schedule_sha256: String,
    pub expectations: Vec<CheckResult>,
    pub faults: Vec<FaultRecord>,
    pub topology: Topology,
    pub nodes_summary: Vec<NodeSummary>,
    pub traffic: Vec<ZoneTraffic>,
    /// Which model version each node's replica of each expert served, as it changed.
    pub versions: Vec<VersionChange>,
    /// What each field device sent and had acknowledged.
    pub sensors: Vec<SensorSummary>,
    /// Each node's windows at the end, by its own counters (nodes that answered).
    pub windows: Vec<NodeWindows>,
    pub timeline: Vec<TraceEvent>,
}

/// A node started serving `version` of `expert` at `t_s`, or stopped (`None`).
#[derive(Debug, Clone, Serialize)]
pub struct VersionChange {
    pub t_s: f64,
    pub node: String,
    pub expert: String,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub zones: Vec<ZoneEntry>,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZoneEntry {
    pub name: String,
    pub parent: Option<String>,
    pub level: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeEntry {
    pub name: String,
    pub role: String,
    pub zone: String,
    pub at_end: NodeLife,
}

/// How one node fared, as the others saw it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSummary {
    pub name: String,
    /// Times another node saw it go down.
    pub seen_down: usize,
    /// Times it saw another node go down.
    pub saw_down: usize,
    /// Times it stopped answering the simulator.
    pub silent: usize,
}

/// What crossed from one zone to another (or inside one).
#[derive(Debug, Clone, Serialize)]
pub struct ZoneTraffic {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    pub datagrams: u64,
    pub dropped: u64,
    pub delayed: u64,
}

impl SimReport {
    pub fn new(run: Run<'_>) -> SimReport {
        let scenario = run.scenario;
        let zone_of = |i: usize| scenario.nodes[i].zone.clone();
        let mut traffic: BTreeMap<(String, String), ZoneTraffic> = BTreeMap::new();
        for link in &run.traffic {
            let key = (zone_of(link.from), zone_of(link.to));
            let entry = traffic.entry(key.clone()).or_insert_with(|| ZoneTraffic {
                from: key.0,
                to: key.1,
                bytes: 0,
                datagrams: 0,
                dropped: 0,
                delayed: 0,
            });
            entry.bytes += link.bytes;
            entry.datagrams += link.datagrams;
            entry.dropped += link.dropped;
            entry.delayed += link.delayed;
        }
        let count = |kind: EventKind, name: &str, as_peer: bool| {
            run.trace
                .iter()
                .filter(|e| e.kind == kind)
                .filter(|e| {
                    if as_peer {
                        e.peer.as_deref() == Some(name)
                    } else {
                        e.node == name
                    }
                })
                .count()
        };
        let nodes_summary = scenario
            .nodes
            .iter()
            .map(|n| NodeSummary {
                name: n.name.clone(),
                seen_down: count(EventKind::SeesDown, &n.name, true),
                saw_down: count(EventKind::SeesDown, &n.name, false),
                silent: count(EventKind::Silent, &n.name, false),
            })
            .collect();
        let topology = Topology {
            zones: scenario
                .zones
                .iter()
                .map(|z| ZoneEntry {
                    name: z.name.clone(),
                    parent: z.parent.clone(),
                    level: scenario.level(&z.name),
                })
                .collect(),
            nodes: scenario
                .nodes
                .iter()
                .zip(&run.lives)
                .map(|(n, life)| NodeEntry {
                    name: n.name.clone(),
                    role: n.role.clone(),
                    zone: n.zone.clone(),
                    at_end: *life,
                })
                .collect(),
        };
        let levels = topology.zones.iter().map(|z| z.level).max().unwrap_or(0) + 1;
        SimReport {
            scenario: scenario.name.clone(),
            seed: scenario.seed,
            nodes: scenario.nodes.len(),
            zones: scenario.zones.len(),
            levels,
            tls: scenario.tls,
            passed: run.checks.iter().all(|c| c.passed),
            simulated_s: round3(run.simulated_s),
            wall_s: round3(run.wall_s),
            formed_after_s: round3(run.formed_after_s),
            sim_to_wall: round3(run.simulated_s / run.wall_s.max(1e-9)),
            rss_mib_per_node: round3(run.memory_mib.0),
            pss_mib_per_node: round3(run.memory_mib.1),
            trace_events: run.trace.len(),
            trace_sha256: trace_hash(&run.trace),
            schedule_sha256: schedule_hash(scenario),
            expectations: run.checks,
            faults: run.faults,
            topology,
            nodes_summary,
            traffic: traffic.into_values().collect(),
            sensors: run.sensors,
            windows: run.windows,
            versions: run
                .trace
                .iter()
                .filter(|e| e.kind == EventKind::Serves)
                .filter_map(|e| {
                    let (expert, version) = e.detail.as_deref()?.split_once(' ')?;
                    Some(VersionChange {
                        t_s: round3(e.t_s),
                        node: e.node.clone(),
                        expert: expert.to_string(),
                        version: (version != "-").then(|| version.to_string()),
                    })
                })
                .collect(),
            timeline: run
                .trace
                .into_iter()
                .map(|mut e| {
                    e.t_s = round3(e.t_s);
                    e
                })
                .collect(),
        }
    }

    /// `report.json` and `report.html` under `folder`.
    pub fn write(&self, folder: &Path) -> Result<(), SimError> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        for (name, text) in [("report.json", json), ("report.html", self.html())] {
            let path = folder.join(name);
            std::fs::write(&path, text).map_err(|source| SimError::Report { path, source })?;
        }
        Ok(())
    }

    /// The report as one HTML page that needs nothing else to open.
    pub fn html(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "passed" } else { "FAILED" };
        let _ = write!(
            out,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>fogmesh sim: {name}</title><style>{CSS}</style></head><body>\
             <h1>fogmesh sim: {name}</h1>\
             <p class=\"{class}\" id=\"verdict\">{verdict}</p>\
             <p>Nodes: {nodes}; zones: {zones}; levels: {levels}; seed {seed}; \
             mesh formed in {formed:.1} s, then {sim:.1} s simulated in {wall:.1} s of wall time \
             (simulated / wall {ratio:.2}); {pss:.1} MiB per node (proportional), \
             {rss:.1} MiB resident; trace {events} events, sha256 <code>{hash}</code>.</p>",
            name = escape(&self.scenario),
            class = if self.passed { "pass" } else { "fail" },
            nodes = self.nodes,
            zones = self.zones,
            levels = self.levels,
            seed = self.seed,
            formed = self.formed_after_s,
            sim = self.simulated_s,
            wall = self.wall_s,
            ratio = self.sim_to_wall,
            pss = self.pss_mib_per_node,
            rss = self.rss_mib_per_node,
            events = self.trace_events,
            hash = &self.trace_sha256[..16],
        );
        out.push_str("<h2>Expectations</h2><table id=\"expectations\"><tr><th>check</th><th>result</th><th>figure</th><th>detail</th></tr>");
        for c in &self.expectations {
            let check = serde_json::to_string(&c.expectation).unwrap_or_default();
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(&check),
                if c.passed { "pass" } else { "fail" },
                if c.passed { "passed" } else { "failed" },
                c.figure.map_or("–".into(), |f| format!("{f}")),
                escape(&c.detail)
            );
        }
        out.push_str("</table><h2>Topology</h2>");
        out.push_str(&self.topology_svg());
        out.push_str("<h2>Timeline</h2><p>Time 0 is when the mesh had formed (the nodes started before it). Each row is a node; red where other nodes saw it down (darker: more of them), grey where it did not answer the simulator; a dashed line per fault, numbered as in the table below.</p>");
        out.push_str(&self.timeline_svg());
        out.push_str("<h2>Faults</h2><table id=\"faults\"><tr><th>#</th><th>planned (s)</th><th>done (s)</th><th>what</th><th>outcome</th></tr>");
        for f in &self.faults {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
                f.index,
                f.at_s,
                f.done_at_s,
                escape(&f.describe()),
                escape(f.outcome.as_deref().unwrap_or(""))
            );
        }
        out.push_str("</table><h2>Sensors and windows</h2><p>Each field device replays its recording into its node from the moment the mesh formed, sending a batch again until the node acknowledges it.</p><table id=\"sensors\"><tr><th>sensor</th><th>node</th><th>rows sent</th><th>rows acknowledged</th><th>batches sent again</th><th>last refusal</th></tr>");
        for d in &self.sensors {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&d.id),
                escape(&d.node),
                d.rows_sent,
                d.rows_acked,
                d.resends,
                escape(d.last_refusal.as_deref().unwrap_or(""))
            );
        }
        out.push_str("</table><p>Windows per node at the end, by the node's own counters since its process last started (nodes that cut, scored or hold none are left out).</p><table id=\"windows\"><tr><th>node</th><th>cut</th><th>scored</th><th>failed</th><th>dropped</th><th>waiting in the outbox</th></tr>");
        for w in self.windows.iter().filter(|w| !w.is_idle()) {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&w.node),
                w.cut,
                w.scored,
                w.failed,
                w.dropped,
                w.waiting
            );
        }
        out.push_str("</table><h2>Versions served</h2><p>Each change of the model version a node's replica of an expert serves (times as in the timeline; negative: before the mesh had formed).</p><table id=\"versions\"><tr><th>t (s)</th><th>node</th><th>expert</th><th>version</th></tr>");
        for v in &self.versions {
            let _ = write!(
                out,
                "<tr><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                v.t_s,
                escape(&v.node),
                escape(&v.expert),
                escape(v.version.as_deref().unwrap_or("stopped"))
            );
        }
        out.push_str("</table><h2>Traffic between zones</h2><table id=\"traffic\"><tr><th>from</th><th>to</th><th>bytes</th><th>datagrams</th><th>dropped</th><th>delayed TCP chunks</th></tr>");
        for t in &self.traffic {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&t.from),
                escape(&t.to),
                t.bytes,
                t.datagrams,
                t.dropped,
                t.delayed
            );
        }
        out.push_str("</table></body></html>\n");
        out
    }

    fn topology_svg(&self) -> String {
        let levels = self.levels.max(1);
        let mut by_level: Vec<Vec<&ZoneEntry>> = vec![Vec::new(); levels];
        for z in &self.topology.zones {
            by_level[z.level.min(levels - 1)].push(z);
        }
        let nodes_in = |zone: &str| {
            self.topology
                .nodes
                .iter()
                .filter(|n| n.zone == zone)
                .collect::<Vec<_>>()
        };
        const PER_ROW: usize = 10;
        const DOT: f64 = 18.0;
        let zone_width = |zone: &str| {
            let n = nodes_in(zone).len().clamp(1, PER_ROW);
            (n as f64 * DOT + 24.0).max(110.0)
        };
        let zone_height = |zone: &str| {
            let rows = nodes_in(zone).len().div_ceil(PER_ROW).max(1);
            rows as f64 * DOT + 34.0
        };
        let width = by_level
            .iter()
            .map(|zs| zs.iter().map(|z| zone_width(&z.name) + 16.0).sum::<f64>())
            .fold(400.0, f64::max);
        let mut y = 10.0;
        let mut boxes: BTreeMap<&str, (f64, f64, f64, f64)> = BTreeMap::new();
        let mut body = String::new();
        for zones in &by_level {
            let row_height = zones
                .iter()
                .map(|z| zone_height(&z.name))
                .fold(0.0, f64::max);
            let mut x = 8.0;
            for zone in zones {
                let (w, h) = (zone_width(&zone.name), zone_height(&zone.name));
                boxes.insert(&zone.name, (x, y, w, h));
                let _ = write!(
                    body,
                    "<g class=\"zone\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" rx=\"6\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{} (level {})</text>",
                    x + 6.0,
                    y + 14.0,
                    escape(&zone.name),
                    zone.level
                );
                for (k, node) in nodes_in(&zone.name).iter().enumerate() {
                    let cx = x + 16.0 + (k % PER_ROW) as f64 * DOT;
                    let cy = y + 30.0 + (k / PER_ROW) as f64 * DOT;
                    let _ = write!(
                        body,
                        "<circle class=\"node {:?} {}\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"6\"><title>{} ({}, {:?} at the end)</title></circle>",
                        node.at_end,
                        escape(&node.role),
                        escape(&node.name),
                        escape(&node.role),
                        node.at_end
                    );
                }
                body.push_str("</g>");
                x += w + 16.0;
            }
            y += row_height + 28.0;
        }
        let mut lines = String::new();
        for z in &self.topology.zones {
            if let (Some(parent), Some(&(x, y, w, _))) =
                (z.parent.as_deref(), boxes.get(z.name.as_str()))
            {
                if let Some(&(px, py, pw, ph)) = boxes.get(parent) {
                    let _ = write!(
                        lines,
                        "<line class=\"conduit\" x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/>",
                        x + w / 2.0,
                        px + pw / 2.0,
                        py + ph
                    );
                }
            }
        }
        format!("<svg id=\"topology\" width=\"{width:.0}\" height=\"{y:.0}\">{lines}{body}</svg>")
    }

    fn timeline_svg(&self) -> String {
        const LEFT: f64 = 110.0;
        const PLOT: f64 = 800.0;
        let names: Vec<&str> = self
            .topology
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        let row = if names.len() > 60 { 5.0 } else { 14.0 };
        let start = -self.formed_after_s;
        let end = self.simulated_s.max(start + 1.0);
        let x = |t: f64| LEFT + (t - start) / (end - start) * PLOT;
        let height = names.len() as f64 * row + 40.0;
        let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut body = String::new();
        // Down spans: per node, how many watchers see it down, from event to event.
        let mut watchers_down: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); names.len()];
        let mut since: Vec<f64> = vec![start; names.len()];
        let mut silent_since: Vec<Option<f64>> = vec![None; names.len()];
        let total = names.len().saturating_sub(1).max(1) as f64;
        let span = |body: &mut String, i: usize, from: f64, to: f64, down: usize| {
            if down > 0 && to > from {
                let _ = write!(
                    body,
                    "<rect class=\"down\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill-opacity=\"{:.2}\"/>",
                    x(from),
                    20.0 + i as f64 * row,
                    (x(to) - x(from)).max(0.5),
                    row - 1.0,
                    0.25 + 0.75 * down as f64 / total
                );
            }
        };
        for e in &self.timeline {
            match e.kind {
                EventKind::SeesDown | EventKind::SeesUp => {
                    let Some(&i) = e.peer.as_deref().and_then(|p| index.get(p)) else {
                        continue;
                    };
                    span(&mut body, i, since[i], e.t_s, watchers_down[i].len());
                    since[i] = e.t_s;
                    if e.kind == EventKind::SeesDown {
                        watchers_down[i].insert(&e.node);
                    } else {
                        watchers_down[i].remove(e.node.as_str());
                    }
                }
                EventKind::Silent => {
                    if let Some(&i) = index.get(e.node.as_str()) {
                        silent_since[i] = Some(e.t_s);
                    }
                }
                EventKind::Answering => {
                    if let Some(&i) = index.get(e.node.as_str()) {
                        if let Some(from) = silent_since[i].take() {
                            silent(&mut body, x(from), x(e.t_s), 20.0 + i as f64 * row, row);
                        }
                    }
                }
                _ => {}
            }
        }
        for i in 0..names.len() {
            span(&mut body, i, since[i], end, watchers_down[i].len());
            if let Some(from) = silent_since[i] {
                silent(&mut body, x(from), x(end), 20.0 + i as f64 * row, row);
            }
        }
        let mut labels = String::new();
        if row >= 10.0 {
            for (i, name) in names.iter().enumerate() {
                let _ = write!(
                    labels,
                    "<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    LEFT - 6.0,
                    20.0 + i as f64 * row + row - 3.0,
                    escape(name)
                );
            }
        }
        let mut marks = String::new();
        for f in &self.faults {
            let fx = x(f.done_at_s);
            let _ = write!(
                marks,
                "<g class=\"fault\"><line x1=\"{fx:.1}\" y1=\"12\" x2=\"{fx:.1}\" y2=\"{:.1}\"/>\
                 <text x=\"{:.1}\" y=\"10\">{}</text><title>{}</title></g>",
                height - 18.0,
                fx + 2.0,
                f.index,
                escape(&f.describe())
            );
        }
        let zero = x(0.0);
        let bottom = height - 4.0;
        let _ = write!(
            marks,
            "<line class=\"clock\" x1=\"{zero:.1}\" y1=\"12\" x2=\"{zero:.1}\" y2=\"{:.1}\"/>\
             <text class=\"axis mid\" x=\"{zero:.1}\" y=\"{bottom:.1}\">0 s</text>\
             <text class=\"axis end\" x=\"{:.1}\" y=\"{bottom:.1}\">{end:.1} s</text>",
            height - 18.0,
            LEFT + PLOT,
        );
        // The nodes' start, when it does not crowd the clock's start.
        if zero - LEFT > 40.0 {
            let _ = write!(
                marks,
                "<text class=\"axis\" x=\"{LEFT:.1}\" y=\"{bottom:.1}\">{start:.1} s</text>"
            );
        }
        format!(
            "<svg id=\"timeline\" width=\"{:.0}\" height=\"{height:.0}\">{body}{labels}{marks}</svg>",
            LEFT + PLOT + 20.0
        )
    }
}

fn silent(body: &mut String, from: f64, to: f64, y: f64, row: f64) {
    let _ = write!(
        body,
        "<rect class=\"silent\" x=\"{from:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"/>",
        (to - from).max(0.5),
        row - 1.0
    );
}

const CSS: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}\
.pass{color:#176a2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}\
.zone rect{fill:#f4f7fb;stroke:#7a8ca5}.zone text{font-size:12px;fill:#334}\
.node{stroke:#222;stroke-width:.5}.node.Running{fill:#3a9d5d}.node.Killed{fill:#c0392b}\
.node.Frozen{fill:#2e6fd8}.node.NotStarted{fill:#bbb}\
.conduit{stroke:#7a8ca5;stroke-width:2;stroke-dasharray:4 3}\
.down{fill:#c0392b}.silent{fill:#999;fill-opacity:.5}\
.fault line{stroke:#333;stroke-dasharray:3 2}.fault text,.axis{font-size:11px}\
.clock{stroke:#3a9d5d}.label{font-size:10px;text-anchor:end}.axis.end{text-anchor:end}.axis.mid{text-anchor:middle}";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What happened, without when: the events between two faults as a set, stretch by
/// stretch, from the moment the mesh formed.
pub fn trace_hash(trace: &[TraceEvent]) -> String {
    let mut hasher = Sha256::new();
    let mut stretch: BTreeSet<String> = BTreeSet::new();
    let flush = |stretch: &mut BTreeSet<String>, hasher: &mut Sha256| {
        for line in std::mem::take(stretch) {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        hasher.update(b"--\n");
    };
    for e in trace.iter().filter(|e| e.t_s >= 0.0) {
        if e.kind == EventKind::Fault {
            flush(&mut stretch, &mut hasher);
        }
        stretch.insert(format!(
            "{:?} {} {} {}",
            e.kind,
            e.node,
            e.peer.as_deref().unwrap_or("-"),
            e.detail.as_deref().unwrap_or("-")
        ));
    }
    flush(&mut stretch, &mut hasher);
    hex(&hasher.finalize())
}

/// Every input of the run.
pub fn schedule_hash(scenario: &Scenario) -> String {
    let text = serde_json::to_string(scenario).unwrap_or_default();
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(t_s: f64, kind: EventKind, node: &str, peer: Option<&str>) -> TraceEvent {
        TraceEvent {
            t_s,
            kind,
            node: node.into(),
            peer: peer.map(Into::into),
            detail: None,
        }
    }

    #[test]
    fn the_trace_hash_ignores_times_and_order_within_a_stretch_but_not_what_happened() {
        let a = vec![
            e(0.5, EventKind::Fault, "n1", None),
            e(2.0, EventKind::SeesDown, "n2", Some("n1")),
            e(2.4, EventKind::SeesDown, "n3", Some("n1")),
        ];
        let b = vec![
            e(0.6, EventKind::Fault, "n1", None),
            e(1.9, EventKind::SeesDown, "n3", Some("n1")),
            e(2.7, EventKind::SeesDown, "n2", Some("n1")),
        ];
        assert_eq!(trace_hash(&a), trace_hash(&b));
        let c = vec![
            e(0.5, EventKind::Fault, "n1", None),
            e(2.0, EventKind::SeesDown, "n2", Some("n1")),
        ];
        assert_ne!(trace_hash(&a), trace_hash(&c));
        // The same events on the other side of a fault are another trace.
        let d = vec![
            e(2.0, EventKind::SeesDown, "n2", Some("n1")),
            e(2.1, EventKind::Fault, "n1", None),
            e(2.4, EventKind::SeesDown, "n3", Some("n1")),
        ];
        assert_ne!(trace_hash(&a), trace_hash(&d));
    }
}
