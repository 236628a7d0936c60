//! `fogmesh sim scenario.toml`: a plant's fog mesh run on one machine, every node a
//! real `fogmesh node` process, every byte between nodes carried by a simulated
//! network with the scenario's latency, jitter, bandwidth and loss, and a seeded
//! schedule of faults; a report (JSON and a self-contained HTML page) at the end.
//!
//! A run:
//! 1. [`SimulatedNetwork::start`] binds a front address per node on a free
//!    `127.<net>/16`; [`Fleet::prepare`] writes each node's `node.toml` (home address,
//!    fronts advertised, `dial_from`; plaintext, or with `tls` certificates of a mesh
//!    CA made for the run) and starts the nodes that form the mesh.
//! 2. The mesh forms: the simulator waits until every node sees every other over a
//!    ready link (at most `formation_s`), then starts the clock (t = 0) and applies the
//!    scenario's `mesh.toml`, if any.
//! 3. Every `observe_ms` the [`Observer`] reads each node's view; faults and joins are
//!    carried out at their times, as close as the simulator's own work allows (each
//!    fault records when it was done).
//! 4. At `duration_s` the expectations are checked on the trace ([`expect`]) and the
//!    report written ([`report`]).
//!
//! Why processes, and what that costs, is in ARCHITECTURE.md ("The simulator"): the
//! simulated clock is the wall clock, so a run takes as long as it simulates, and the
//! trace's timings vary from run to run with the machine's scheduling.

pub mod expect;
pub mod fleet;
pub mod network;
pub mod observer;
pub mod report;
pub mod scenario;
pub mod sensors;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fogmesh_cluster::cluster_key::ClusterKey;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::mesh_spec::MeshSpec;
use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::ApplyRequest;
use fogmesh_trust::{IssueRequest, MeshCa, MeshTls, Role, TlsFiles, TrustError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::expect::{Evidence, FaultRecord, RoundRecord};
use self::fleet::{Fleet, FleetError, Joining, NodeLife};
use self::network::SimulatedNetwork;
use self::observer::{EventKind, Observer, TraceEvent};
use self::report::SimReport;
use self::scenario::{FaultAction, Scenario};
use self::sensors::{Device, DeviceCounts, DeviceError, NodeWindows, SensorSummary};

/// How long an apply may take before it counts as unanswered.
const APPLY_WITHIN: Duration = Duration::from_secs(20);
/// How often the memory of the node processes is read.
const MEMORY_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind the simulated network on loopback: {0}")]
    Network(std::io::Error),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("the mesh did not form within {formation_s} s: {detail} (node logs under {folder})")]
    Formation {
        formation_s: f64,
        detail: String,
        folder: PathBuf,
    },
    #[error("cannot make the run's mesh CA and certificates: {0}")]
    Identity(#[from] TrustError),
    #[error("a field device cannot run: {0}")]
    Device(#[from] DeviceError),
    #[error("stopped by a signal; every node process was killed")]
    Stopped,
    #[error("cannot write the report to {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a run keeps its nodes' folders and report, and which binary runs a node.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The `fogmesh` binary (`fogmesh sim` passes its own).
    pub binary: PathBuf,
    /// Nodes' folders (`nodes/<name>`), `report.json` and `report.html`.
    pub out: PathBuf,
}

/// The identities of a run over TLS.
struct Identities {
    /// Node `i`'s files.
    nodes: Vec<TlsFiles>,
    /// The observer's operator identity: the simulator's `Control` calls (views,
    /// applies) present it.
    observer: MeshTls,
    /// The field devices' sensor identity, naming every `[[sensors]]` id.
    devices: MeshTls,
}

/// A mesh CA made afresh under `out/ca`, a certificate for every node (in its folder,
/// `certs/`), the observer's and the devices'.
fn identities(scenario: &Scenario, out: &Path) -> Result<Identities, SimError> {
    let ca_folder = out.join("ca");
    match std::fs::remove_dir_all(&ca_folder) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SimError::Identity(TrustError::Io {
                path: ca_folder,
                source: e,
            }))
        }
        _ => {}
    }
    let ca = MeshCa::init(&ca_folder, &format!("sim-{}", scenario.name))?;
    let issue = |name: &str,
                 role: Role,
                 sensors: Vec<String>,
                 folder: PathBuf|
     -> Result<TlsFiles, SimError> {
        let files = MeshCa::issued_files(&folder, name);
        for old in [&files.cert, &files.key, &files.ca] {
            let _ = std::fs::remove_file(old);
        }
        let request = IssueRequest {
            name: name.into(),
            role,
            sensors,
            days: 2,
        };
        Ok(ca.issue(&request, &folder)?)
    };
    let mut nodes = Vec::with_capacity(scenario.nodes.len());
    for plan in &scenario.nodes {
        let role = plan.role.parse::<Role>()?;
        let folder = out.join("nodes").join(&plan.name).join("certs");
        nodes.push(issue(&plan.name, role, Vec::new(), folder)?);
    }
    let observer = issue(
        "sim-observer",
        Role::Operator,
        Vec::new(),
        out.join("observer"),
    )?;
    let ids = scenario.sensors.iter().map(|s| s.id.clone()).collect();
    let devices = issue("sim-devices", Role::Sensor, ids, out.join("devices"))?;
    Ok(Identities {
        nodes,
        observer: MeshTls::load(&observer)?,
        devices: MeshTls::load(&devices)?,
    })
}

/// Runs `scenario` to its end and writes its report under `options.out`.
pub async fn run(scenario: &Scenario, options: &SimOptions) -> Result<SimReport, SimError> {
    let wall = Instant::now();
    std::fs::create_dir_all(&options.out).map_err(|source| SimError::Report {
        path: options.out.clone(),
        source,
    })?;
    let network = SimulatedNetwork::start(scenario)
        .await
        .map_err(SimError::Network)?;
    let addresses = network.addresses();
    let secret = format!("fogmesh-sim-{}-{}", scenario.name, scenario.seed);
    let initial: Vec<usize> = (0..scenario.nodes.len())
        .filter(|&i| scenario.nodes[i].join_at_s.is_none())
        .collect();
    let seeds = &initial[..1];
    let zones: Vec<String> = (0..scenario.nodes.len())
        .map(|i| scenario.zone_settings(i))
        .collect();
    let identities = match scenario.tls {
        true => Some(identities(scenario, &options.out)?),
        false => None,
    };
    let mut fleet = Fleet::prepare(
        &options.binary,
        &options.out,
        &scenario.nodes,
        &zones,
        addresses,
        Joining {
            secret: &secret,
            seeds,
            identities: identities.as_ref().map(|ids| ids.nodes.as_slice()),
            gossip_interval_ms: scenario.gossip_interval_ms,
        },
    )?;
    let (observer_tls, devices_tls) = match identities {
        Some(ids) => (Some(ids.observer), Some(ids.devices)),
        None => (None, None),
    };
    let dialer = Dialer::new(observer_tls, Some(ClusterKey::from_secret(&secret)));
    let devices_dialer = Dialer::new(devices_tls, Some(ClusterKey::from_secret(&secret)));
    let devices = scenario
        .sensors
        .iter()
        .enumerate()
        .map(|(i, plan)| Device::load(i, plan))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
    let mut observer = Observer::new(addresses, names.clone(), dialer.clone());
    let mut trace = Vec::new();

    for &i in &initial {
        fleet.start(i)?;
        trace.push(event(0.0, EventKind::Started, &names[i], None));
    }
    let formation_started = Instant::now();
    let observe = Duration::from_millis(scenario.observe_ms);
    let mut memory = MemoryRecord::default();
    loop {
        let views = observer
            .round(&initial, formation_started, &mut trace)
            .await;
        if observer::converged(&views, &initial, &|a, b| scenario.may_link(a, b)) {
            break;
        }
        if formation_started.elapsed().as_secs_f64() > scenario.formation_s {
            let detail = initial
                .iter()
                .map(|&i| match views.get(&i) {
                    Some(Some(v)) => {
                        format!("{} sees {} of {}", names[i], v.up.len(), initial.len() - 1)
                    }
                    _ => format!("{} does not answer ({})", names[i], last_line(&fleet, i)),
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(SimError::Formation {
                formation_s: scenario.formation_s,
                detail,
                folder: options.out.join("nodes"),
            });
        }
        tokio::time::sleep(observe).await;
    }
    let formed_after_s = formation_started.elapsed().as_secs_f64();
    // Events while the mesh formed were timed from its start: they come before t = 0.
    for e in &mut trace {
        e.t_s -= formed_after_s;
    }

    let clock = Instant::now();
    let mut faults: Vec<FaultRecord> = Vec::new();
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<Applied>();
    let mut applies_pending = usize::from(scenario.mesh.is_some());
    if let Some(mesh) = &scenario.mesh {
        spawn_apply(
            &dialer,
            addresses.home(initial[0]).to_string(),
            mesh_text(mesh, &scenario.folder),
            None,
            clock,
            applied_tx.clone(),
        );
    }
    let stop_devices = CancellationToken::new();
    let device_counts: Vec<Arc<DeviceCounts>> = devices
        .into_iter()
        .map(|device| {
            let counts = Arc::new(DeviceCounts::default());
            let node = scenario.index_of(&device.plan.node).unwrap_or_default();
            tokio::spawn(device.run(
                addresses.home(node).to_string(),
                devices_dialer.clone(),
                clock,
                stop_devices.clone(),
                counts.clone(),
            ));
            counts
        })
        .collect();
    let mut schedule: Vec<Step> = scenario
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| Step {
            at_s: f.at_s,
            what: StepKind::Fault(i),
        })
        .chain(scenario.nodes.iter().enumerate().filter_map(|(i, n)| {
            n.join_at_s.map(|at_s| Step {
                at_s,
                what: StepKind::Join(i),
            })
        }))
        .collect();
    schedule.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let mut next_step = 0;
    let mut rounds = Vec::new();
    let mut ran = vec![false; names.len()];
    let mut last_memory = Instant::now();
    memory.read(&fleet);
    loop {
        let t = clock.elapsed().as_secs_f64();
        while next_step < schedule.len() && schedule[next_step].at_s <= t {
            let step = &schedule[next_step];
            next_step += 1;
            match step.what {
                StepKind::Join(i) => {
                    fleet.start(i)?;
                    trace.push(event(
                        t,
                        EventKind::Started,
                        &names[i],
                        Some("joins".into()),
                    ));
                }
                StepKind::Fault(index) => {
                    let record = carry_out(
                        scenario,
                        index,
                        &mut fleet,
                        &network,
                        &dialer,
                        clock,
                        &applied_tx,
                    )?;
                    applies_pending += usize::from(record.action == FaultAction::Apply);
                    let detail = record.describe();
                    for node in record.nodes.iter().chain(record.from.iter()).take(1) {
                        trace.push(event(
                            record.done_at_s,
                            EventKind::Fault,
                            node,
                            Some(detail.clone()),
                        ));
                    }
                    faults.push(record);
                }
            }
        }
        while let Ok(applied) = applied_rx.try_recv() {
            applies_pending -= 1;
            applied.settle(&names[initial[0]], &mut faults, &mut trace);
        }
        if t >= scenario.duration_s {
            break;
        }
        let running: Vec<usize> = (0..names.len()).filter(|&i| fleet.answering(i)).collect();
        let views = observer.round(&running, clock, &mut trace).await;
        for (&i, view) in &views {
            ran[i] |= view.is_some();
        }
        rounds.push(RoundRecord {
            t_s: clock.elapsed().as_secs_f64(),
            converged: observer::converged(&views, &running, &|a, b| scenario.may_link(a, b)),
            versions: observer::active_versions(&views),
        });
        if last_memory.elapsed() >= MEMORY_EVERY {
            memory.read(&fleet);
            last_memory = Instant::now();
        }
        let next = clock + Duration::from_secs_f64(t) + observe;
        tokio::time::sleep_until(next.max(Instant::now())).await;
    }
    // An apply still in flight gets its answer (or its time-out) into the report.
    for _ in 0..applies_pending {
        match tokio::time::timeout(APPLY_WITHIN, applied_rx.recv()).await {
            Ok(Some(applied)) => applied.settle(&names[initial[0]], &mut faults, &mut trace),
            _ => break,
        }
    }
    memory.read(&fleet);
    let simulated_s = clock.elapsed().as_secs_f64();
    stop_devices.cancel();
    let sensors: Vec<SensorSummary> = scenario
        .sensors
        .iter()
        .zip(&device_counts)
        .map(|(plan, counts)| SensorSummary::new(plan, counts))
        .collect();
    let windows: Vec<NodeWindows> = futures::future::join_all(
        (0..names.len())
            .filter(|&i| fleet.answering(i))
            .map(|i| NodeWindows::read(&names[i], addresses.home(i).to_string(), &dialer)),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    trace.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let evidence = Evidence {
        scenario,
        trace: &trace,
        faults: &faults,
        rounds: &rounds,
        ran: &ran,
        sensors: &sensors,
        windows: &windows,
    };
    let checks = expect::check(&evidence);
    let lives: Vec<NodeLife> = (0..names.len()).map(|i| fleet.life(i)).collect();
    drop(fleet);
    let report = SimReport::new(report::Run {
        scenario,
        formed_after_s,
        simulated_s,
        wall_s: wall.elapsed().as_secs_f64(),
        memory_mib: memory.per_node(),
        trace,
        faults,
        checks,
        traffic: network.traffic(),
        lives,
        sensors,
        windows,
    });
    report.write(&options.out)?;
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
struct Step {
    at_s: f64,
    what: StepKind,
}

#[derive(Debug, Clone, Copy)]
enum StepKind {
    Fault(usize),
    Join(usize),
}

/// The most memory the node processes held at once, per node.
#[derive(Debug, Default)]
struct MemoryRecord {
    rss_per_node: f64,
    pss_per_node: f64,
}

impl MemoryRecord {
    fn read(&mut self, fleet: &Fleet) {
        let (rss, pss, nodes) = fleet.memory_mib();
        if nodes > 0 {
            self.rss_per_node = self.rss_per_node.max(rss / nodes as f64);
            self.pss_per_node = self.pss_per_node.max(pss / nodes as f64);
        }
    }

    fn per_node(&self) -> (f64, f64) {
        (self.rss_per_node, self.pss_per_node)
    }
}

fn event(t_s: f64, kind: EventKind, node: &str, detail: Option<String>) -> TraceEvent {
    TraceEvent {
        t_s,
        kind,
        node: node.to_string(),
        peer: None,
        detail,
    }
}

fn last_line(fleet: &Fleet, i: usize) -> String {
    let tail = fleet.log_tail(i, 1);
    if tail.is_empty() {
        "its log is empty".into()
    } else {
        format!("its log ends: {tail}")
    }
}

fn mesh_text(text: &str, folder: &Path) -> String {
    let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
    MeshSpec::absolute_text(text, &folder).unwrap_or_else(|_| text.to_string())
}

fn carry_out(
    scenario: &Scenario,
    index: usize,
    fleet: &mut Fleet,
    network: &SimulatedNetwork,
    dialer: &Dialer,
    clock: Instant,
    applied: &mpsc::UnboundedSender<Applied>,
) -> Result<FaultRecord, SimError> {
    let fault = &scenario.faults[index];
    // The moment it takes effect: a signal lands when sent, a link changes when set.
    let done_at_s = clock.elapsed().as_secs_f64();
    let nodes: Vec<usize> = fault
        .nodes
        .iter()
        .filter_map(|n| scenario.index_of(n))
        .collect();
    let from = scenario.resolve(&fault.from);
    // A zone on the `to` side may contain the `from` side (a cell cut off from the
    // plant above it): links inside the `from` side stay as they are.
    let to: Vec<usize> = scenario
        .resolve(&fault.to)
        .difference(&from)
        .copied()
        .collect();
    let from: Vec<usize> = from.into_iter().collect();
    match fault.action {
        FaultAction::Kill => nodes.iter().for_each(|&i| fleet.kill(i)),
        FaultAction::Freeze => {
            for &i in &nodes {
                fleet.freeze(i)?;
            }
        }
        FaultAction::Thaw => {
            for &i in &nodes {
                fleet.thaw(i)?;
            }
        }
        FaultAction::Restart => {
            for &i in &nodes {
                fleet.start(i)?;
            }
        }
        FaultAction::Cut | FaultAction::Heal => {
            let open = fault.action == FaultAction::Heal;
            network.set_open(&from, &to, open);
            if !fault.one_way {
                network.set_open(&to, &from, open);
            }
        }
        FaultAction::Degrade => {
            let link = fault.link.unwrap_or_default();
            network.degrade(&from, &to, link);
            if !fault.one_way {
                network.degrade(&to, &from, link);
            }
        }
        FaultAction::Apply => {
            let text = fault
                .mesh
                .as_ref()
                .and_then(|m| std::fs::read_to_string(scenario.folder.join(m)).ok())
                .or_else(|| scenario.mesh.clone())
                .unwrap_or_default();
            if let Some(&node) = nodes.first() {
                spawn_apply(
                    dialer,
                    network.addresses().home(node).to_string(),
                    mesh_text(&text, &scenario.folder),
                    Some(index),
                    clock,
                    applied.clone(),
                );
            }
        }
    }
    let name = |set: &[usize]| -> Vec<String> {
        set.iter()
            .map(|&i| scenario.nodes[i].name.clone())
            .collect()
    };
    Ok(FaultRecord {
        index,
        action: fault.action,
        at_s: fault.at_s,
        done_at_s,
        nodes: name(&nodes),
        from: name(&from),
        to: name(&to),
        outcome: None,
    })
}

fn spawn_apply(
    dialer: &Dialer,
    addr: String,
    text: String,
    fault: Option<usize>,
    clock: Instant,
    done: mpsc::UnboundedSender<Applied>,
) {
    let dialer = dialer.clone();
    tokio::spawn(async move {
        let asked = async {
            let channel = dialer
                .channel(&addr)
                .await
                .map_err(|e| e.to_string())?
                .channel;
            ControlClient::new(channel)
                .apply(ApplyRequest {
                    spec_toml: text,
                    dry_run: false,
                })
                .await
                .map(|_| "accepted".to_string())
                .map_err(|status| format!("refused: {}", status.message()))
        };
        let outcome = match tokio::time::timeout(APPLY_WITHIN, asked).await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(refused)) => refused,
            Err(_) => format!("no answer within {} s", APPLY_WITHIN.as_secs()),
        };
        let _ = done.send(Applied {
            fault,
            at_s: clock.elapsed().as_secs_f64(),
            outcome,
        });
    });
}

/// An apply's answer: for fault number `fault`, or (`None`) the scenario's own mesh
/// applied when the clock started.
struct Applied {
    fault: Option<usize>,
    at_s: f64,
    outcome: String,
}

impl Applied {
    /// Records the outcome on its fault and in the trace; the start's apply is told
    /// to `first_node`.
    fn settle(self, first_node: &str, faults: &mut [FaultRecord], trace: &mut Vec<TraceEvent>) {
        let record = self
            .fault
            .and_then(|index| faults.iter_mut().find(|f| f.index == index));
        let node = match record {
            Some(record) => {
                record.outcome = Some(self.outcome.clone());
                record.nodes.first().cloned().unwrap_or_default()
            }
            None => first_node.to_string(),
        };
        trace.push(event(
            self.at_s,
            EventKind::Applied,
            &node,
            Some(self.outcome),
        ));
    }
}
