//! The simulated nodes: one `fogmesh node` process each, the same binary and code a
//! plant runs, configured so that all its traffic to other nodes crosses the
//! [`SimulatedNetwork`](crate::sim::network::SimulatedNetwork).
//!
//! Each node gets a folder (`nodes/<name>/`: `node.toml`, its data and `node.log`).
//! Faults act on the process: `kill` is SIGKILL, `freeze` SIGSTOP (the process holds
//! its sockets and answers nothing, like a hung machine), `thaw` SIGCONT, `restart`
//! starts it again on the same folder. Dropping the fleet kills every process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use fogmesh_trust::TlsFiles;

use crate::sim::network::Addresses;
use crate::sim::scenario::NodePlan;

/// Where a simulated node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeLife {
    NotStarted,
    Running,
    Frozen,
    Killed,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start node {node} ({binary}): {source}")]
    Spawn {
        node: String,
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot signal node {node}: {source}")]
    Signal { node: String, source: nix::Error },
}

struct FleetNode {
    name: String,
    folder: PathBuf,
    child: Option<Child>,
    life: NodeLife,
}

pub struct Fleet {
    binary: PathBuf,
    nodes: Vec<FleetNode>,
}

/// How every node of a run joins the mesh.
pub struct Joining<'a> {
    /// `[cluster] secret`.
    pub secret: &'a str,
    /// The nodes the others dial first.
    pub seeds: &'a [usize],
    /// Node `i` proves itself with `identities[i]`; `None`: every node runs plaintext.
    pub identities: Option<&'a [TlsFiles]>,
    /// `[cluster] gossip_interval_ms`.
    pub gossip_interval_ms: u64,
}

impl Fleet {
    /// Writes every node's `node.toml` under `folder` (node `i` with `zones[i]`, the
    /// `[node]` lines placing it: its zone path, and a gateway's conduits); starts none.
    pub fn prepare(
        binary: &Path,
        folder: &Path,
        plans: &[NodePlan],
        zones: &[String],
        addresses: Addresses,
        joining: Joining<'_>,
    ) -> Result<Fleet, FleetError> {
        let Joining {
            secret,
            seeds,
            identities,
            gossip_interval_ms,
        } = joining;
        let seed_list = seeds
            .iter()
            .map(|&s| format!("{:?}", addresses.front(s).to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::with_capacity(plans.len());
        for (i, plan) in plans.iter().enumerate() {
            let node_folder = folder.join("nodes").join(&plan.name);
            let prepare = |source| FleetError::Prepare {
                path: node_folder.clone(),
                source,
            };
            std::fs::create_dir_all(&node_folder).map_err(prepare)?;
            let front = addresses.front(i).to_string();
            let config = format!(
                "# Written by fogmesh sim: node {i} of the scenario.\n\
                 [node]\nname = {name:?}\nrole = {role:?}\n{zone}\
                 listen = {listen:?}\n\n\
                 [cluster]\nsecret = {secret:?}\nseeds = [{seed_list}]\n\
                 advertise = {front:?}\nadvertise_gossip = {front:?}\n\
                 dial_from = {dial_from:?}\ndata = \"data\"\n\
                 gossip_interval_ms = {gossip_interval_ms}\n\n\
                 [tls]\n{tls}",
                tls = match identities.map(|files| &files[i]) {
                    // Absolute: the node runs in its own folder.
                    Some(files) => {
                        let whole = |path: &Path| std::fs::canonicalize(path).map_err(prepare);
                        format!(
                            "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
                            whole(&files.ca)?,
                            whole(&files.cert)?,
                            whole(&files.key)?
                        )
                    }
                    None => "insecure = true\n".into(),
                },
                zone = zones[i],
                name = plan.name,
                role = plan.role,
                listen = addresses.home(i).to_string(),
                dial_from = addresses.home_ip(i).to_string(),
            );
            std::fs::write(node_folder.join("node.toml"), config).map_err(prepare)?;
            nodes.push(FleetNode {
                name: plan.name.clone(),
                folder: node_folder,
                child: None,
                life: NodeLife::NotStarted,
            });
        }
        Ok(Fleet {
            binary: binary.to_path_buf(),
            nodes,
        })
    }

    /// Starts node `i` (again, after a kill).
    pub fn start(&mut self, i: usize) -> Result<(), FleetError> {
        let binary = self.binary.clone();
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.folder.join("node.log"))
            .map_err(|source| FleetError::Prepare {
                path: node.folder.join("node.log"),
                source,
            })?;
        let err = log.try_clone().map_err(|source| FleetError::Prepare {
            path: node.folder.join("node.log"),
            source,
        })?;
        let child = Command::new(&binary)
            .arg("node")
            .arg("--config")
            .arg("node.toml")
            .current_dir(&node.folder)
            .env(
                "RUST_LOG",
                std::env::var("FOGMESH_SIM_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| FleetError::Spawn {
                node: node.name.clone(),
                binary: binary.clone(),
                source,
            })?;
        node.child = Some(child);
        node.life = NodeLife::Running;
        Ok(())
    }

    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.life = NodeLife::Killed;
    }

    pub fn freeze(&mut self, i: usize) -> Result<(), FleetError> {
        self.signal(i, Signal::SIGSTOP, NodeLife::Frozen)
    }

    pub fn thaw(&mut self, i: usize) -> Result<(), FleetError> {
        self.signal(i, Signal::SIGCONT, NodeLife::Running)
    }

    fn signal(&mut self, i: usize, signal: Signal, life: NodeLife) -> Result<(), FleetError> {
        let node = &mut self.nodes[i];
        let Some(child) = &node.child else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        kill(pid, signal).map_err(|source| FleetError::Signal {
            node: node.name.clone(),
            source,
        })?;
        node.life = life;
        Ok(())
    }

    pub fn life(&self, i: usize) -> NodeLife {
        self.nodes[i].life
    }

    /// Whether node `i` can answer (started, not frozen, not killed), and its
    /// process has not exited on its own.
    pub fn answering(&mut self, i: usize) -> bool {
        let node = &mut self.nodes[i];
        if node.life != NodeLife::Running {
            return false;
        }
        match node.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            _ => {
                node.life = NodeLife::Killed;
                false
            }
        }
    }

    /// The resident and proportional set sizes (MiB) of every running process, summed:
    /// proportional shares libtorch's pages among the processes that map them.
    pub fn memory_mib(&self) -> (f64, f64, usize) {
        let mut rss = 0.0;
        let mut pss = 0.0;
        let mut counted = 0;
        for node in &self.nodes {
            let Some(child) = &node.child else { continue };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.id()))
            else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
                    .map_or(0.0, |kb| kb / 1024.0)
            };
            rss += field("Rss:");
            pss += field("Pss:");
            counted += 1;
        }
        (rss, pss, counted)
    }

    /// The last lines of node `i`'s log (for a report on a node that failed).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.nodes[i].folder.join("node.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if node.life == NodeLife::Frozen {
                    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
