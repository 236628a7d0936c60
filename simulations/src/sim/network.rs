//! The simulated plant network: every byte one simulated node sends another crosses
//! [`SimulatedNetwork`], which gives it the latency, jitter, bandwidth and loss of
//! the link between them, or holds it while the link is cut.
//!
//! How it stands between the nodes without a line of simulator code in them: node
//! `i` binds its gRPC and gossip port on its own loopback address ([`Addresses::home`])
//! and dials from it (`[cluster] dial_from`), but advertises its *front* address
//! ([`Addresses::front`], `advertise` and `advertise_gossip`), where this relay
//! listens (TCP and UDP on the same port). A connection or a datagram arriving at
//! front `i` from home `j` is the link `j → i`; the relay passes it on to home `i`
//! from front `j`, so replies come back through the relay as `i → j`.
//!
//! - **TCP** (gRPC: cluster links, model transfers, federation): each direction of a
//!   connection is read in chunks; a chunk is delivered after the link's latency
//!   (± jitter, never overtaking the chunk before it) once the link's bandwidth has
//!   carried it; with the link's loss a chunk waits one [`RETRANSMISSION_TIMEOUT`]
//!   more, as TCP would after a lost segment (bytes are never dropped from a stream).
//!   A cut link stops reading, so the sender's socket buffer fills as behind a
//!   pulled cable, and carries on from where it was when healed.
//! - **UDP** (gossip): each datagram is dropped with the link's loss, or while the
//!   link is cut, and otherwise sent after the link's latency.
//!
//! Links are made on first use from [`Scenario::link`] and are one-way: a cut can
//! take one direction only. Every link counts what it carried and what it dropped.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use fogmesh_models::SplitMix64;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sim::scenario::{LinkSpec, Scenario};

/// What a lost TCP segment costs: Linux's smallest retransmission timeout.
pub const RETRANSMISSION_TIMEOUT: Duration = Duration::from_millis(200);
/// Nodes per third octet of an address (so that no address ends in 0 or 255).
const PER_OCTET: usize = 250;
/// Chunks in flight on one direction of one connection before reading stops.
const CHUNKS_IN_FLIGHT: usize = 64;
const CHUNK_BYTES: usize = 64 * 1024;

/// The addresses of one simulation: `127.<net>.<hi>.<lo>` for node homes, the same
/// with 128 added to `<hi>` for fronts, one port for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Addresses {
    pub net: u8,
    pub port: u16,
}

impl Addresses {
    pub fn home_ip(&self, node: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            self.net,
            (node / PER_OCTET) as u8,
            (node % PER_OCTET + 1) as u8,
        )
    }

    pub fn front_ip(&self, node: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            self.net,
            (128 + node / PER_OCTET) as u8,
            (node % PER_OCTET + 1) as u8,
        )
    }

    pub fn home(&self, node: usize) -> SocketAddr {
        (self.home_ip(node), self.port).into()
    }

    pub fn front(&self, node: usize) -> SocketAddr {
        (self.front_ip(node), self.port).into()
    }

    /// The node whose home address is `ip`, if any.
    fn node_at_home(&self, ip: IpAddr, nodes: usize) -> Option<usize> {
        let IpAddr::V4(ip) = ip else { return None };
        let [a, b, hi, lo] = ip.octets();
        if a != 127 || b != self.net || hi >= 128 || lo == 0 {
            return None;
        }
        let node = usize::from(hi) * PER_OCTET + usize::from(lo) - 1;
        (usize::from(lo) <= PER_OCTET && node < nodes).then_some(node)
    }
}

/// One direction between two nodes.
struct Link {
    open: watch::Sender<bool>,
    state: Mutex<LinkState>,
    bytes: AtomicU64,
    datagrams: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
}

struct LinkState {
    spec: LinkSpec,
    rng: SplitMix64,
    /// When the link's bandwidth is free again.
    busy_until: Instant,
    /// When the last chunk is delivered (a later chunk never overtakes it).
    last_delivery: Instant,
}

impl Link {
    fn new(spec: LinkSpec, seed: u64) -> Link {
        let now = Instant::now();
        Link {
            open: watch::Sender::new(true),
            state: Mutex::new(LinkState {
                spec,
                rng: SplitMix64::new(seed),
                busy_until: now,
                last_delivery: now,
            }),
            bytes: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait_open(&self) {
        let mut open = self.open.subscribe();
        // The sender lives as long as the link; an error cannot happen while we hold it.
        let _ = open.wait_for(|o| *o).await;
    }

    fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// When a TCP chunk of `bytes` sent now arrives.
    fn schedule_chunk(&self, bytes: usize) -> Instant {
        let now = Instant::now();
        let mut state = self.lock();
        let spec = state.spec;
        let start = state.busy_until.max(now);
        let carried = match spec.bandwidth_mbps {
            Some(mbps) => Duration::from_secs_f64(bytes as f64 * 8.0 / (mbps * 1e6)),
            None => Duration::ZERO,
        };
        state.busy_until = start + carried;
        let mut delay = latency(&spec, &mut state.rng);
        if spec.loss > 0.0 && state.rng.next_f64() < spec.loss {
            delay += RETRANSMISSION_TIMEOUT;
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        let at = (state.busy_until + delay).max(state.last_delivery);
        state.last_delivery = at;
        at
    }

    /// When a datagram sent now arrives, or `None` when it is lost.
    fn schedule_datagram(&self) -> Option<Duration> {
        if !self.is_open() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut state = self.lock();
        let spec = state.spec;
        if spec.loss > 0.0 && state.rng.next_f64() < spec.loss {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(latency(&spec, &mut state.rng))
    }
}

fn latency(spec: &LinkSpec, rng: &mut SplitMix64) -> Duration {
    let jitter = spec.jitter_ms * (2.0 * rng.next_f64() - 1.0);
    Duration::from_secs_f64((spec.latency_ms + jitter).max(0.0) / 1e3)
}

/// What one link carried, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct LinkTraffic {
    pub from: usize,
    pub to: usize,
    pub bytes: u64,
    pub datagrams: u64,
    pub dropped: u64,
    /// TCP chunks that waited a retransmission timeout.
    pub delayed: u64,
}

/// The relay between every pair of simulated nodes. Dropping it stops every relay task.
pub struct SimulatedNetwork {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

struct Inner {
    addresses: Addresses,
    /// Its links are made from it on first use.
    scenario: Scenario,
    links: DashMap<(usize, usize), Arc<Link>>,
    /// Front UDP sockets by node: a datagram for `i` from `j` leaves from `j`'s.
    fronts: Vec<Arc<UdpSocket>>,
}

impl SimulatedNetwork {
    /// Binds every node's front (TCP and UDP) on a free `127.<net>/16` and starts
    /// relaying.
    pub async fn start(scenario: &Scenario) -> io::Result<SimulatedNetwork> {
        let nodes = scenario.nodes.len();
        let mut last_error = None;
        for attempt in 0..32u64 {
            let mut draw = SplitMix64::new(
                scenario.seed ^ u64::from(std::process::id()).rotate_left(17) ^ attempt,
            );
            let addresses = Addresses {
                net: 100 + (draw.next_u64() % 150) as u8,
                port: 7400,
            };
            match bind_fronts(addresses, nodes).await {
                Ok((tcp, udp)) => {
                    let inner = Arc::new(Inner {
                        addresses,
                        scenario: scenario.clone(),
                        links: DashMap::new(),
                        fronts: udp,
                    });
                    let stop = CancellationToken::new();
                    for (node, listener) in tcp.into_iter().enumerate() {
                        tokio::spawn(accept(inner.clone(), node, listener, stop.clone()));
                    }
                    for node in 0..nodes {
                        tokio::spawn(relay_datagrams(inner.clone(), node, stop.clone()));
                    }
                    return Ok(SimulatedNetwork { inner, stop });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no free loopback network")))
    }

    pub fn addresses(&self) -> Addresses {
        self.inner.addresses
    }

    /// Cuts (`open = false`) or heals every link from each of `from` to each of `to`.
    pub fn set_open(&self, from: &[usize], to: &[usize], open: bool) {
        for &a in from {
            for &b in to {
                if a != b {
                    self.inner.link(a, b).open.send_replace(open);
                }
            }
        }
    }

    /// Gives every link from each of `from` to each of `to` the characteristics `spec`.
    pub fn degrade(&self, from: &[usize], to: &[usize], spec: LinkSpec) {
        for &a in from {
            for &b in to {
                if a != b {
                    self.inner.link(a, b).lock().spec = spec;
                }
            }
        }
    }

    /// Whether the link `from → to` carries now.
    pub fn is_open(&self, from: usize, to: usize) -> bool {
        self.inner
            .links
            .get(&(from, to))
            .is_none_or(|l| l.is_open())
    }

    /// What every link used so far carried, ordered by (from, to).
    pub fn traffic(&self) -> Vec<LinkTraffic> {
        let mut out: BTreeMap<(usize, usize), LinkTraffic> = BTreeMap::new();
        for entry in self.inner.links.iter() {
            let (from, to) = *entry.key();
            let l = entry.value();
            out.insert(
                (from, to),
                LinkTraffic {
                    from,
                    to,
                    bytes: l.bytes.load(Ordering::Relaxed),
                    datagrams: l.datagrams.load(Ordering::Relaxed),
                    dropped: l.dropped.load(Ordering::Relaxed),
                    delayed: l.delayed.load(Ordering::Relaxed),
                },
            );
        }
        out.into_values().collect()
    }
}

impl Drop for SimulatedNetwork {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn link(&self, from: usize, to: usize) -> Arc<Link> {
        self.links
            .entry((from, to))
            .or_insert_with(|| {
                let seed =
                    self.scenario.seed ^ ((from as u64) << 32 | to as u64).wrapping_mul(0x9E37);
                Arc::new(Link::new(self.scenario.link(from, to), seed))
            })
            .clone()
    }
}

async fn bind_fronts(
    addresses: Addresses,
    nodes: usize,
) -> io::Result<(Vec<TcpListener>, Vec<Arc<UdpSocket>>)> {
    let mut tcp = Vec::with_capacity(nodes);
    let mut udp = Vec::with_capacity(nodes);
    for node in 0..nodes {
        // A home port taken by something else would only show when the node fails
        // to bind: check it here, where another network can still be chosen.
        drop(TcpListener::bind(addresses.home(node)).await?);
        tcp.push(TcpListener::bind(addresses.front(node)).await?);
        udp.push(Arc::new(UdpSocket::bind(addresses.front(node)).await?));
    }
    Ok((tcp, udp))
}

async fn accept(inner: Arc<Inner>, to: usize, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, peer)) = accepted else {
            continue;
        };
        let from = inner
            .addresses
            .node_at_home(peer.ip(), inner.scenario.nodes.len());
        tokio::spawn(carry_connection(
            inner.clone(),
            from,
            to,
            client,
            stop.clone(),
        ));
    }
}

/// Relays one TCP connection from node `from` (`None`: from outside the simulated
/// plant, carried as is) to node `to`.
async fn carry_connection(
    inner: Arc<Inner>,
    from: Option<usize>,
    to: usize,
    client: TcpStream,
    stop: CancellationToken,
) {
    let socket = match TcpSocket::new_v4() {
        Ok(socket) => socket,
        Err(_) => return,
    };
    if let Some(from) = from {
        if socket
            .bind((inner.addresses.front_ip(from), 0).into())
            .is_err()
        {
            return;
        }
    }
    let Ok(server) = socket.connect(inner.addresses.home(to)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (links_up, links_down) = match from {
        Some(from) => (Some(inner.link(from, to)), Some(inner.link(to, from))),
        None => (None, None),
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async {
            tokio::join!(
                carry(client_read, server_write, links_up),
                carry(server_read, client_write, links_down),
            )
        } => {}
    }
}

/// One direction of a connection through `link`.
async fn carry<R, W>(mut from: R, mut to: W, link: Option<Arc<Link>>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (chunks, mut arriving) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reader_link = link.clone();
    let read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            if let Some(link) = &reader_link {
                link.wait_open().await;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let at = reader_link
                .as_ref()
                .map_or_else(Instant::now, |l| l.schedule_chunk(n));
            if chunks.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = arriving.recv().await {
            tokio::time::sleep_until(at).await;
            if let Some(link) = &link {
                link.wait_open().await;
                link.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Datagrams arriving at node `to`'s front.
async fn relay_datagrams(inner: Arc<Inner>, to: usize, stop: CancellationToken) {
    let socket = inner.fronts[to].clone();
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let Ok((n, peer)) = received else {
            continue;
        };
        let Some(from) = inner
            .addresses
            .node_at_home(peer.ip(), inner.scenario.nodes.len())
        else {
            continue;
        };
        let link = inner.link(from, to);
        let Some(delay) = link.schedule_datagram() else {
            continue;
        };
        link.datagrams.fetch_add(1, Ordering::Relaxed);
        link.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let out = inner.fronts[from].clone();
        let target = inner.addresses.home(to);
        let datagram = buf[..n].to_vec();
        if delay.is_zero() {
            let _ = out.send_to(&datagram, target).await;
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = out.send_to(&datagram, target).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_and_front_addresses_map_back_to_their_node() {
        let addresses = Addresses {
            net: 120,
            port: 7400,
        };
        for node in [0, 1, 249, 250, 999, 1_999] {
            let home = addresses.home_ip(node);
            assert_eq!(
                addresses.node_at_home(home.into(), 2_000),
                Some(node),
                "{home}"
            );
            assert_eq!(
                addresses.node_at_home(addresses.front_ip(node).into(), 2_000),
                None
            );
            assert_ne!(home.octets()[3], 0);
        }
        assert_eq!(
            addresses.node_at_home(Ipv4Addr::new(127, 0, 0, 1).into(), 10),
            None
        );
        assert_eq!(
            addresses.node_at_home(addresses.home_ip(10).into(), 10),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_keep_their_order_and_pay_for_bandwidth() {
        let spec = LinkSpec {
            latency_ms: 10.0,
            jitter_ms: 9.0,
            bandwidth_mbps: Some(8.0),
            loss: 0.0,
        };
        let link = Link::new(spec, 3);
        let start = Instant::now();
        let mut last = start;
        for _ in 0..100 {
            let at = link.schedule_chunk(1_000);
            assert!(at >= last, "a chunk overtook the one before it");
            last = at;
        }
        // 100 kB at 8 Mbit/s take 100 ms on the wire, plus at least 1 ms of latency.
        assert!(
            last - start >= Duration::from_millis(101),
            "{:?}",
            last - start
        );
        assert!(
            last - start <= Duration::from_millis(120),
            "{:?}",
            last - start
        );
    }

    #[test]
    fn a_cut_link_drops_every_datagram_and_loss_drops_its_share() {
        let link = Link::new(
            LinkSpec {
                loss: 0.25,
                ..LinkSpec::default()
            },
            9,
        );
        let lost = (0..4_000)
            .filter(|_| link.schedule_datagram().is_none())
            .count();
        assert!((800..1_200).contains(&lost), "{lost} of 4000 lost at 25 %");
        link.open.send_replace(false);
        assert!((0..100).all(|_| link.schedule_datagram().is_none()));
    }
}
