//! `PeerLinks`: keeps one cluster link to every other live node, and says which are up.
//!
//! **Owns** the state of each link (down, dialing, handshaking, ready), its backoff and
//! heartbeat record, and publishes them on a watch channel ([`LinkView`]). **Takes**
//! [`PeerLinksMsg`]: the live peers from membership, ractor_cluster session events,
//! dial outcomes, heartbeat outcomes and its own tick. **Supervised by** nobody: the
//! mesh starts it and stops it with the node; it holds no state a restart could not
//! rebuild from the next membership update. **On failure**: the mesh sees it stop and
//! the node stops with it (a node that cannot link is not part of the mesh).
//!
//! What ractor_cluster leaves to us (see ARCHITECTURE.md): it never redials, has no
//! handshake timeout, and its pings have no deadline. So:
//! - one side dials each pair (the node whose name sorts first), redialing with
//!   exponential backoff from [`MIN_BACKOFF`] to [`MAX_BACKOFF`] ([`REDIAL`]), jittered
//!   so that the links one lost peer took down are not all redialed at once;
//! - a session not ready within [`HANDSHAKE_TIMEOUT`] is killed (a peer that accepts
//!   TCP and then says nothing would otherwise hold the slot forever);
//! - every [`HEARTBEAT_INTERVAL`] each ready link carries an echo to the peer's
//!   [`NodeProbe`]; [`MISSED_BEATS`] unanswered in a row kill the session. HTTP/2
//!   keepalive usually closes a silent link first; the heartbeat also covers a peer
//!   whose transport is alive but whose actors are stuck.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{
    NodeEventSubscription, NodeServerMessage, NodeSessionMessage, RactorClusterMessage,
};
use tokio::sync::watch;

use crate::cluster_key::ClusterKey;
use crate::dialer::{self, Dialer, LinkError};
use crate::link;
use crate::telemetry;

pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest redial backoff, before jitter.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The waits before each redial of a link that went down. Jitter adds up to the wait
/// itself, so a wait lies between the backoff and twice it.
const REDIAL: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(MIN_BACKOFF)
    .with_max_delay(MAX_BACKOFF)
    .with_jitter()
    .without_max_times();
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
pub const MISSED_BEATS: u32 = 3;
const TICK: Duration = Duration::from_millis(100);

/// The process-group scope of node probes; the group is the node's name.
pub const NODE_SCOPE: &str = "fogmesh.nodes";

/// The state of the link to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No session; the dialing side retries after its backoff.
    Down,
    /// Waiting for the gRPC stream to be admitted.
    Dialing,
    /// Stream open, ractor's handshake and initial sync running.
    Handshaking,
    /// Authenticated and synced: the peer's actors and process groups are known here.
    Ready,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Dialing => "dialing",
            LinkState::Handshaking => "handshaking",
            LinkState::Ready => "ready",
        }
    }
}

/// What the rest of the node reads about one link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInfo {
    pub state: LinkState,
    pub since: Instant,
    /// Median-free, last heartbeat round trip.
    pub rtt: Option<Duration>,
    pub last_error: Option<String>,
    /// The link has been ready since this node last heard of the peer: it is a node
    /// that passed admission, not only a name in gossip.
    pub ever_ready: bool,
}

/// Peer name → link.
pub type LinkView = BTreeMap<String, LinkInfo>;

/// A remotable echo, one per node: the heartbeat's target and a round-trip probe.
#[derive(RactorClusterMessage)]
pub enum NodeProbeMsg {
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

pub struct NodeProbe;

impl Actor for NodeProbe {
    type Msg = NodeProbeMsg;
    type State = ();
    type Arguments = String;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        node: String,
    ) -> Result<(), ActorProcessingErr> {
        ractor::pg::join_scoped(NODE_SCOPE.to_string(), node, vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NodeProbeMsg::Echo(payload, reply) => {
                let _ = reply.send(payload);
            }
        }
        Ok(())
    }
}

/// The probe of `peer`, when a link to it is up.
pub fn probe_of(peer: &str) -> Option<ActorRef<NodeProbeMsg>> {
    ractor::pg::get_scoped_members(&NODE_SCOPE.to_string(), &peer.to_string())
        .into_iter()
        .find(|cell| !cell.get_id().is_local())
        .map(Into::into)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    Opened,
    Authenticated,
    Ready,
    Disconnected,
}

pub enum PeerLinksMsg {
    /// The live peers (name → gRPC address), this node excluded.
    Peers(BTreeMap<String, String>),
    Session(SessionEvent, Box<NodeServerSessionInformation>),
    DialFailed {
        peer: String,
        error: LinkError,
    },
    Beat {
        peer: String,
        rtt: Option<Duration>,
    },
    Tick,
}

impl ractor::Message for PeerLinksMsg {}

pub struct PeerLinks;

pub struct PeerLinksArgs {
    pub node: String,
    pub key: ClusterKey,
    pub dialer: Dialer,
    pub node_server: ActorRef<NodeServerMessage>,
    pub view: watch::Sender<LinkView>,
}

struct Peer {
    addr: Option<String>,
    state: LinkState,
    since: Instant,
    session: Option<(u64, ActorRef<NodeSessionMessage>)>,
    /// Started afresh each time the link becomes ready.
    backoff: ExponentialBackoff,
    next_dial: Instant,
    last_beat: Instant,
    missed_beats: u32,
    rtt: Option<Duration>,
    last_error: Option<String>,
    ever_ready: bool,
}

impl Peer {
    fn new(addr: Option<String>, ever_ready: bool) -> Peer {
        let now = Instant::now();
        Peer {
            addr,
            state: LinkState::Down,
            since: now,
            session: None,
            backoff: REDIAL.build(),
            next_dial: now,
            last_beat: now,
            missed_beats: 0,
            rtt: None,
            last_error: None,
            ever_ready,
        }
    }

    fn enter(&mut self, peer: &str, state: LinkState) {
        if self.state != state {
            tracing::info!(%peer, from = self.state.as_str(), to = state.as_str(), "cluster link");
            metrics::counter!(telemetry::LINK_TRANSITIONS, "peer" => peer.to_string(), "state" => state.as_str()).increment(1);
            self.state = state;
            self.since = Instant::now();
            self.ever_ready |= state == LinkState::Ready;
        }
    }

    fn down(&mut self, peer: &str, reason: String) {
        self.enter(peer, LinkState::Down);
        self.session = None;
        self.missed_beats = 0;
        // Never exhausted (no max times); the cap stands in should that change.
        self.next_dial = Instant::now() + self.backoff.next().unwrap_or(MAX_BACKOFF);
        self.last_error = Some(reason);
    }
}

pub struct PeerLinksState {
    node: String,
    key: ClusterKey,
    dialer: Dialer,
    node_server: ActorRef<NodeServerMessage>,
    view: watch::Sender<LinkView>,
    peers: BTreeMap<String, Peer>,
    /// Every peer whose link has been ready since this node started: a peer gossip
    /// drops and brings back keeps `ever_ready` (a healed partition's far side is
    /// still part of the mesh before its links re-form).
    admitted: BTreeSet<String>,
}

/// Forwards ractor_cluster's (synchronous) session callbacks to the actor.
struct SessionEvents(ActorRef<PeerLinksMsg>);

impl SessionEvents {
    fn send(&self, event: SessionEvent, info: NodeServerSessionInformation) {
        let _ = self.0.cast(PeerLinksMsg::Session(event, Box::new(info)));
    }
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        self.send(SessionEvent::Opened, ses);
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        self.send(SessionEvent::Disconnected, ses);
    }
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.send(SessionEvent::Authenticated, ses);
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        self.send(SessionEvent::Ready, ses);
    }
}

/// The peer a session belongs to: its authenticated name when known, else the label
/// its stream was opened with (the name the dialer claimed, or the one we dialed).
fn peer_of(info: &NodeServerSessionInformation) -> String {
    match &info.peer_name {
        Some(name) => name
            .name
            .split_once('@')
            .map_or(name.name.as_str(), |(node, _)| node)
            .to_string(),
        None => info.peer_addr.clone(),
    }
}

impl Actor for PeerLinks {
    type Msg = PeerLinksMsg;
    type State = PeerLinksState;
    type Arguments = PeerLinksArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PeerLinksArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.node_server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "fogmesh-peer-links".into(),
                subscription: Box::new(SessionEvents(myself.clone())),
            })?;
        myself.send_interval(TICK, || PeerLinksMsg::Tick);
        Ok(PeerLinksState {
            node: args.node,
            key: args.key,
            dialer: args.dialer,
            node_server: args.node_server,
            view: args.view,
            peers: BTreeMap::new(),
            admitted: BTreeSet::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PeerLinksMsg::Peers(live) => {
                for (name, addr) in &live {
                    let admitted = state.admitted.contains(name);
                    let peer = state
                        .peers
                        .entry(name.clone())
                        .or_insert_with(|| Peer::new(None, admitted));
                    if peer.addr.as_deref() != Some(addr.as_str()) {
                        peer.addr = Some(addr.clone());
                        peer.next_dial = Instant::now();
                    }
                }
                // A peer gossip no longer knows keeps its entry while a session is up;
                // the link, not gossip, is the fresher witness.
                state
                    .peers
                    .retain(|name, peer| live.contains_key(name) || peer.session.is_some());
            }
            PeerLinksMsg::Session(event, info) => state.on_session(event, &info),
            PeerLinksMsg::DialFailed { peer, error } => {
                if let Some(p) = state.peers.get_mut(&peer) {
                    if p.state == LinkState::Dialing {
                        match &error {
                            LinkError::Refused { .. } => {
                                tracing::error!(%peer, %error, "cluster link refused: this node's cluster secret differs from the peer's");
                            }
                            _ => tracing::debug!(%peer, %error, "dial failed"),
                        }
                        p.down(&peer, error.to_string());
                    }
                }
            }
            PeerLinksMsg::Beat { peer, rtt } => {
                if let Some(p) = state.peers.get_mut(&peer) {
                    match rtt {
                        Some(rtt) => {
                            p.missed_beats = 0;
                            p.rtt = Some(rtt);
                        }
                        None if p.state == LinkState::Ready => {
                            p.missed_beats += 1;
                            if p.missed_beats >= MISSED_BEATS {
                                tracing::warn!(%peer, beats = p.missed_beats, "peer stopped answering heartbeats; dropping the link");
                                if let Some((_, session)) = &p.session {
                                    session.kill();
                                }
                                p.down(&peer, format!("{MISSED_BEATS} heartbeats unanswered"));
                            }
                        }
                        None => {}
                    }
                }
            }
            PeerLinksMsg::Tick => state.tick(&myself),
        }
        state.publish();
        Ok(())
    }
}

impl PeerLinksState {
    fn dials(&self, peer: &str) -> bool {
        self.node.as_str() < peer
    }

    fn on_session(&mut self, event: SessionEvent, info: &NodeServerSessionInformation) {
        let name = peer_of(info);
        if name == self.node {
            return;
        }
        let admitted = self.admitted.contains(&name);
        let peer = self
            .peers
            .entry(name.clone())
            .or_insert_with(|| Peer::new(None, admitted));
        let id = info.node_id;
        let current = peer.session.as_ref().map(|(id, _)| *id);
        match event {
            SessionEvent::Opened | SessionEvent::Authenticated => {
                peer.session = Some((id, info.actor.clone()));
                if peer.state != LinkState::Ready {
                    peer.enter(&name, LinkState::Handshaking);
                }
            }
            SessionEvent::Ready => {
                peer.session = Some((id, info.actor.clone()));
                peer.backoff = REDIAL.build();
                peer.missed_beats = 0;
                peer.last_error = None;
                peer.enter(&name, LinkState::Ready);
            }
            SessionEvent::Disconnected => {
                // A late event of a session already replaced says nothing of the link.
                if current.is_none() || current == Some(id) {
                    peer.down(&name, "session closed".into());
                }
            }
        }
    }

    fn tick(&mut self, myself: &ActorRef<PeerLinksMsg>) {
        let now = Instant::now();
        let dialer: Vec<String> = self
            .peers
            .keys()
            .filter(|name| self.dials(name))
            .cloned()
            .collect();
        for (name, peer) in self.peers.iter_mut() {
            match peer.state {
                LinkState::Down if dialer.contains(name) && now >= peer.next_dial => {
                    if let Some(addr) = peer.addr.clone() {
                        peer.enter(name, LinkState::Dialing);
                        spawn_dial(
                            myself.clone(),
                            self.node_server.clone(),
                            addr,
                            name.clone(),
                            self.dialer.clone(),
                            self.key.clone(),
                            self.node.clone(),
                        );
                    }
                }
                LinkState::Dialing | LinkState::Handshaking
                    if now.duration_since(peer.since)
                        > HANDSHAKE_TIMEOUT + dialer::CONNECT_TIMEOUT =>
                {
                    tracing::warn!(peer = %name, state = peer.state.as_str(), "cluster link stalled; dropping it");
                    if let Some((_, session)) = &peer.session {
                        session.kill();
                    }
                    peer.down(name, format!("stalled {}", peer.state.as_str()));
                }
                LinkState::Ready if now.duration_since(peer.last_beat) >= HEARTBEAT_INTERVAL => {
                    peer.last_beat = now;
                    spawn_beat(myself.clone(), name.clone());
                }
                _ => {}
            }
        }
    }

    fn publish(&mut self) {
        for (name, peer) in &self.peers {
            if peer.ever_ready && !self.admitted.contains(name) {
                self.admitted.insert(name.clone());
            }
        }
        let view: LinkView = self
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    LinkInfo {
                        state: p.state,
                        since: p.since,
                        rtt: p.rtt,
                        last_error: p.last_error.clone(),
                        ever_ready: p.ever_ready,
                    },
                )
            })
            .collect();
        self.view.send_if_modified(|old| {
            if *old == view {
                false
            } else {
                *old = view;
                true
            }
        });
    }
}

fn spawn_dial(
    links: ActorRef<PeerLinksMsg>,
    node_server: ActorRef<NodeServerMessage>,
    addr: String,
    peer: String,
    dialer: Dialer,
    key: ClusterKey,
    node: String,
) {
    tokio::spawn(async move {
        if let Err(error) = link::dial(&node_server, &addr, &peer, &dialer, &key, &node).await {
            let _ = links.cast(PeerLinksMsg::DialFailed { peer, error });
        }
    });
}

fn spawn_beat(links: ActorRef<PeerLinksMsg>, peer: String) {
    tokio::spawn(async move {
        let started = Instant::now();
        let rtt = match probe_of(&peer) {
            Some(probe) => match probe
                .call(
                    |reply| NodeProbeMsg::Echo(vec![0; 8], reply),
                    Some(HEARTBEAT_INTERVAL),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(_)) => Some(started.elapsed()),
                _ => None,
            },
            None => None,
        };
        let _ = links.cast(PeerLinksMsg::Beat { peer, rtt });
    });
}
