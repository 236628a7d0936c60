//! Reads every simulated node's view of the mesh (`Control.GetMesh`, at its home
//! address: the simulator's own control plane, outside the simulated links) and turns
//! changes into trace events: node A starts or stops seeing peer B up (a member over a
//! ready link), a node stops or starts answering, a node's spec version changes, a
//! node starts serving another model version of an expert or stops serving it.
//!
//! A node that does not answer within [`ANSWER_WITHIN`] (frozen, killed, overloaded)
//! gives no view that round; its last view is kept, so no event is made up for it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use fogmesh_cluster::dialer::Dialer;
use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::{MeshRequest, MeshStatus};
use serde::Serialize;
use tonic::transport::Channel;

use crate::sim::network::Addresses;

/// How long a node may take to give its view before it counts as not answering.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(400);

/// What the trace records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The simulator started the node's process (`detail`: first or again).
    Started,
    /// A scheduled fault was carried out (`detail`: what).
    Fault,
    /// `node` stopped seeing `peer` as a member over a ready link.
    SeesDown,
    /// `node` sees `peer` as a member over a ready link again (or for the first time
    /// after the mesh formed).
    SeesUp,
    /// `node` stopped answering the simulator.
    Silent,
    /// `node` answers again.
    Answering,
    /// `node` holds a new spec version (`detail`).
    Spec,
    /// A `mesh.toml` was applied through `node` (`detail`: accepted or the refusal).
    Applied,
    /// `node` serves another model version of an expert (`detail`: `expert version`),
    /// or stopped serving it (`expert -`).
    Serves,
}

/// One thing that happened, `t_s` seconds after the clock started (negative while
/// the mesh formed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceEvent {
    pub t_s: f64,
    pub kind: EventKind,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One node's view in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Peers seen as members over a ready link.
    pub up: BTreeSet<usize>,
    pub spec_version: u64,
    /// Expert → the model version the node's own replica serves.
    pub serving: BTreeMap<String, String>,
}

pub struct Observer {
    addresses: Addresses,
    names: Vec<String>,
    index: BTreeMap<String, usize>,
    dialer: Dialer,
    channels: Vec<Option<Channel>>,
    last: Vec<Option<View>>,
    answering: Vec<bool>,
}

impl Observer {
    pub fn new(addresses: Addresses, names: Vec<String>, dialer: Dialer) -> Observer {
        let n = names.len();
        Observer {
            addresses,
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            names,
            dialer,
            channels: vec![None; n],
            last: vec![None; n],
            answering: vec![false; n],
        }
    }

    /// Reads the views of `nodes` at once; appends what changed to `trace`, each event
    /// timed from `clock` by when its node answered (or was given up on), and returns
    /// this round's views (`None`: did not answer).
    pub async fn round(
        &mut self,
        nodes: &[usize],
        clock: Instant,
        trace: &mut Vec<TraceEvent>,
    ) -> BTreeMap<usize, Option<View>> {
        let reads = nodes.iter().map(|&i| {
            let channel = self.channels[i].clone();
            let dialer = self.dialer.clone();
            let addr = self.addresses.home(i).to_string();
            async move {
                let read = async {
                    let channel = match channel {
                        Some(c) => c,
                        None => dialer.channel(&addr).await.ok()?.channel,
                    };
                    let status = ControlClient::new(channel.clone())
                        .get_mesh(MeshRequest {})
                        .await
                        .ok()?
                        .into_inner();
                    Some((channel, status))
                };
                let answer = tokio::time::timeout(ANSWER_WITHIN, read)
                    .await
                    .ok()
                    .flatten();
                (i, clock.elapsed().as_secs_f64(), answer)
            }
        });
        let answers = futures::future::join_all(reads).await;
        let mut views = BTreeMap::new();
        for (i, t_s, answer) in answers {
            let node = self.names[i].clone();
            let event = |kind, peer: Option<&str>, detail: Option<String>| TraceEvent {
                t_s,
                kind,
                node: node.clone(),
                peer: peer.map(str::to_string),
                detail,
            };
            let Some((channel, status)) = answer else {
                self.channels[i] = None;
                if self.answering[i] {
                    self.answering[i] = false;
                    trace.push(event(EventKind::Silent, None, None));
                }
                views.insert(i, None);
                continue;
            };
            self.channels[i] = Some(channel);
            if !self.answering[i] {
                self.answering[i] = true;
                if self.last[i].is_some() {
                    trace.push(event(EventKind::Answering, None, None));
                }
            }
            let view = self.view_of(i, &status);
            let before = self.last[i].take();
            if let Some(before) = &before {
                for gone in before.up.difference(&view.up) {
                    trace.push(event(EventKind::SeesDown, Some(&self.names[*gone]), None));
                }
                for back in view.up.difference(&before.up) {
                    trace.push(event(EventKind::SeesUp, Some(&self.names[*back]), None));
                }
            }
            if before
                .as_ref()
                .is_none_or(|b| b.spec_version != view.spec_version)
                && view.spec_version > 0
            {
                trace.push(event(
                    EventKind::Spec,
                    None,
                    Some(format!("v{}", view.spec_version)),
                ));
            }
            let before_serving = before.as_ref().map(|b| &b.serving);
            let experts: BTreeSet<&String> = view
                .serving
                .keys()
                .chain(before_serving.into_iter().flat_map(BTreeMap::keys))
                .collect();
            for expert in experts {
                let now = view.serving.get(expert);
                if before_serving.and_then(|b| b.get(expert)) != now {
                    let version = now.map_or("-", String::as_str);
                    trace.push(event(
                        EventKind::Serves,
                        None,
                        Some(format!("{expert} {version}")),
                    ));
                }
            }
            self.last[i] = Some(view.clone());
            views.insert(i, Some(view));
        }
        views
    }

    fn view_of(&self, i: usize, status: &MeshStatus) -> View {
        View {
            up: status
                .members
                .iter()
                .filter(|m| m.link == "ready")
                .filter_map(|m| self.index.get(&m.node).copied())
                .filter(|&peer| peer != i)
                .collect(),
            spec_version: status.spec_version,
            serving: status
                .versions
                .iter()
                .filter(|v| v.node == self.names[i])
                .map(|v| (v.expert.clone(), v.model_version.clone()))
                .collect(),
        }
    }
}

/// Expert → the distinct model versions the answering nodes' own replicas serve.
pub fn active_versions(
    views: &BTreeMap<usize, Option<View>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut active: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for view in views.values().flatten() {
        for (expert, version) in &view.serving {
            active
                .entry(expert.clone())
                .or_default()
                .insert(version.clone());
        }
    }
    active
}

/// Whether every node of `expected` answered and sees every other one it may link to
/// up (`may_link`: every pair in a flat mesh, those sharing a zone in a segmented
/// one), all on the same spec version.
pub fn converged(
    views: &BTreeMap<usize, Option<View>>,
    expected: &[usize],
    may_link: &dyn Fn(usize, usize) -> bool,
) -> bool {
    let mut versions = BTreeSet::new();
    for &i in expected {
        let Some(Some(view)) = views.get(&i) else {
            return false;
        };
        if expected
            .iter()
            .any(|&p| p != i && may_link(i, p) && !view.up.contains(&p))
        {
            return false;
        }
        versions.insert(view.spec_version);
    }
    versions.len() <= 1
}
