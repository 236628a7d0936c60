//! Gossip datagrams sealed with a key only the mesh's members hold.
//!
//! chitchat gossips over plain UDP and adopts whatever state a datagram carries, so
//! anyone who can send a packet to a node could forge member cards, specs and
//! placements. [`SealedUdpTransport`] is the chitchat `Transport` every node uses
//! instead: each datagram carries an HMAC-SHA256 tag (truncated to 16 bytes) over its
//! contents, keyed with a digest of the mesh's `[cluster] secret` (never of its public
//! fingerprint, which gossip itself carries). A datagram without a valid tag is dropped
//! before chitchat decodes it, and counted in `fogmesh_gossip_refused_total`. A
//! replayed datagram carries state chitchat already holds, at versions no newer than
//! it has, so it changes nothing.
//!
//! chitchat keeps its wire format to itself, so its own `UdpSocket` does the encoding
//! and decoding here, talking only to relay sockets on loopback: an envelope to send is
//! encoded by that socket into a relay, sealed and sent on; a sealed datagram that
//! arrives is opened and handed to a second chitchat socket, which decodes it. chitchat
//! fills a datagram up to the UDP maximum, so a sealed message may not fit in one: it
//! then travels as two sealed fragments, reassembled on arrival (a few incomplete ones
//! are kept, the oldest dropped first).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::ChitchatEnvelope;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::telemetry;

/// The largest UDP payload (IPv4).
const MAX_DATAGRAM: usize = 65_507;
const TAG_BYTES: usize = 16;
const WHOLE: u8 = 0;
const FRAGMENT: u8 = 1;
/// Message id (u64), fragment index and count (u8 each).
const FRAGMENT_HEADER: usize = 10;
/// Incomplete messages kept while their other fragment is on its way.
const PENDING_MESSAGES: usize = 16;
/// Opened messages waiting for chitchat to take them.
const INBOX: usize = 256;
/// How long the decoding socket may take with one message before it is skipped (it
/// did not decode: a member of another fogmesh version).
const DECODE_TIMEOUT: Duration = Duration::from_millis(200);

type Tag = Hmac<Sha256>;

/// See the module doc.
pub struct SealedUdpTransport {
    key: [u8; 32],
}

impl SealedUdpTransport {
    /// Seals with a key derived from the mesh's secret.
    pub fn new(secret: &str) -> SealedUdpTransport {
        let key = Sha256::digest(format!("fogmesh gossip seal\0{secret}").as_bytes());
        SealedUdpTransport { key: key.into() }
    }
}

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}/UDP for {what}: {e}"))
}

#[tonic::async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = Arc::new(bind(listen_addr, "gossip").await?);
        let encoder = UdpSocket::open(loopback()).await?;
        let encoded = bind(loopback(), "gossip encoding").await?;
        let decoder = UdpSocket::open(loopback()).await?;
        let feeder = bind(loopback(), "gossip decoding").await?;
        let (inbox, received) = mpsc::channel(INBOX);
        let receiver = tokio::spawn(receive(
            Seal { key: self.key },
            outer.clone(),
            feeder,
            decoder,
            inbox,
        ));
        Ok(Box::new(SealedSocket {
            seal: Seal { key: self.key },
            outer,
            encoded_addr: encoded.local_addr()?,
            encoder,
            encoded,
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            next_id: first_id(),
            received,
            receiver,
        }))
    }
}

/// Fragment ids start somewhere different on every start, so a restarted node's
/// fragments do not pair with its former self's.
fn first_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

#[derive(Clone, Copy)]
struct Seal {
    key: [u8; 32],
}

impl Seal {
    fn mac(&self) -> Tag {
        <Tag as Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length")
    }

    /// `tag || body`.
    fn close(&self, body: &[u8]) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        let mut datagram = Vec::with_capacity(TAG_BYTES + body.len());
        datagram.extend_from_slice(&tag[..TAG_BYTES]);
        datagram.extend_from_slice(body);
        datagram
    }

    /// The body of a datagram whose tag is valid.
    fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        if datagram.len() <= TAG_BYTES {
            return None;
        }
        let (tag, body) = datagram.split_at(TAG_BYTES);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_truncated_left(tag).ok().map(|()| body)
    }

    /// The datagrams that carry `message`: one, or two fragments when it is too big.
    fn datagrams(&self, message: &[u8], id: u64) -> Vec<Vec<u8>> {
        if TAG_BYTES + 1 + message.len() <= MAX_DATAGRAM {
            let mut body = Vec::with_capacity(1 + message.len());
            body.push(WHOLE);
            body.extend_from_slice(message);
            return vec![self.close(&body)];
        }
        let (first, second) = message.split_at(message.len() / 2);
        [first, second]
            .into_iter()
            .zip(0u8..)
            .map(|(chunk, index)| {
                let mut body = Vec::with_capacity(1 + FRAGMENT_HEADER + chunk.len());
                body.push(FRAGMENT);
                body.extend_from_slice(&id.to_le_bytes());
                body.push(index);
                body.push(2);
                body.extend_from_slice(chunk);
                self.close(&body)
            })
            .collect()
    }
}

/// Fragments of one message from one sender.
struct Pending {
    from: SocketAddr,
    id: u64,
    parts: [Option<Vec<u8>>; 2],
}

/// Keeps a fragment (`body` after its kind byte); returns the whole message once both
/// parts are in.
fn reassemble(pending: &mut VecDeque<Pending>, from: SocketAddr, body: &[u8]) -> Option<Vec<u8>> {
    let header = body.get(..FRAGMENT_HEADER)?;
    let id = u64::from_le_bytes(header[..8].try_into().ok()?);
    let (index, count) = (usize::from(header[8]), header[9]);
    if count != 2 || index >= 2 {
        return None;
    }
    let i = match pending.iter().position(|p| p.from == from && p.id == id) {
        Some(i) => i,
        None => {
            if pending.len() == PENDING_MESSAGES {
                pending.pop_front();
            }
            pending.push_back(Pending {
                from,
                id,
                parts: [None, None],
            });
            pending.len() - 1
        }
    };
    pending[i].parts[index] = Some(body[FRAGMENT_HEADER..].to_vec());
    if pending[i].parts.iter().any(Option::is_none) {
        return None;
    }
    let [Some(mut whole), Some(second)] = pending.remove(i)?.parts else {
        return None;
    };
    whole.extend_from_slice(&second);
    Some(whole)
}

/// Opens every datagram that arrives, decodes it with chitchat's own socket and hands
/// it on; drops (and counts) what is not sealed with this mesh's key.
async fn receive(
    seal: Seal,
    outer: Arc<tokio::net::UdpSocket>,
    feeder: tokio::net::UdpSocket,
    mut decoder: UdpSocket,
    inbox: mpsc::Sender<(SocketAddr, ChitchatEnvelope, usize)>,
) {
    let mut buf = vec![0; MAX_DATAGRAM];
    let mut pending = VecDeque::new();
    let Ok(decoder_addr) = decoder.local_addr() else {
        return;
    };
    loop {
        let (n, from) = match outer.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "gossip receive failed; this node hears no more gossip");
                return;
            }
        };
        let Some(body) = seal.open(&buf[..n]) else {
            metrics::counter!(telemetry::GOSSIP_REFUSED).increment(1);
            tracing::debug!(%from, bytes = n, "dropped a gossip datagram without this mesh's seal");
            continue;
        };
        let message = match body.split_first() {
            Some((&WHOLE, rest)) => rest.to_vec(),
            Some((&FRAGMENT, rest)) => match reassemble(&mut pending, from, rest) {
                Some(whole) => whole,
                None => continue,
            },
            _ => continue,
        };
        if feeder.send_to(&message, decoder_addr).await.is_err() {
            continue;
        }
        match tokio::time::timeout(DECODE_TIMEOUT, decoder.recv()).await {
            Ok(Ok(decoded)) => {
                if inbox.send((from, decoded.envelope, n)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "gossip decoding socket failed; this node hears no more gossip");
                return;
            }
            Err(_) => tracing::warn!(%from, "a sealed gossip message did not decode"),
        }
    }
}

struct SealedSocket {
    seal: Seal,
    outer: Arc<tokio::net::UdpSocket>,
    encoder: UdpSocket,
    encoded: tokio::net::UdpSocket,
    encoded_addr: SocketAddr,
    buf: Box<[u8]>,
    next_id: u64,
    received: mpsc::Receiver<(SocketAddr, ChitchatEnvelope, usize)>,
    receiver: JoinHandle<()>,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

#[tonic::async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.outer.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        // Whatever a cancelled send left in the relay is not this envelope's.
        while self.encoded.try_recv_from(&mut self.buf).is_ok() {}
        self.encoder.send(self.encoded_addr, envelope).await?;
        // Loopback delivers before `send` returns, so this is the envelope just sent.
        let (n, _) = self.encoded.recv_from(&mut self.buf).await?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut num_bytes_sent = 0;
        for datagram in self.seal.datagrams(&self.buf[..n], id) {
            // A peer that is gone is for gossip to notice; only a broken socket is an
            // error (chitchat stops on one).
            match self.outer.send_to(&datagram, to).await {
                Ok(sent) => num_bytes_sent += sent,
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(anyhow::anyhow!("gossip send to {to}: {e}")),
            }
        }
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let (from_addr, envelope, num_bytes_received) = self
            .received
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the gossip receiver stopped"))?;
        Ok(RecvOutcome {
            from_addr,
            envelope,
            num_bytes_received,
        })
    }
}

fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::OutOfMemory
    )
}

#[cfg(test)]
mod tests {
    use chitchat::{ChitchatMessage, ProtocolVersion};

    use super::*;

    fn syn(cluster_id: String) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id,
                digest: Default::default(),
            },
        }
    }

    async fn open(secret: &str) -> Box<dyn Socket> {
        SealedUdpTransport::new(secret)
            .open(loopback())
            .await
            .unwrap()
    }

    async fn heard(socket: &mut Box<dyn Socket>) -> Option<RecvOutcome> {
        tokio::time::timeout(Duration::from_millis(500), socket.recv())
            .await
            .ok()
            .map(Result::unwrap)
    }

    #[tokio::test]
    async fn members_hear_each_other_and_nobody_else() {
        let mut a = open("plant-7-secret").await;
        let mut b = open("plant-7-secret").await;
        let mut outsider = open("another-secret").await;
        let to_b = b.local_addr().unwrap();

        a.send(to_b, syn("mesh".into())).await.unwrap();
        let outcome = heard(&mut b).await.expect("a member is heard");
        assert_eq!(outcome.envelope, syn("mesh".into()));
        assert_eq!(outcome.from_addr, a.local_addr().unwrap());

        outsider.send(to_b, syn("forged".into())).await.unwrap();
        let mut plain = UdpSocket::open(loopback()).await.unwrap();
        plain.send(to_b, syn("forged".into())).await.unwrap();
        assert!(heard(&mut b).await.is_none(), "forged gossip was heard");

        // Replies still flow after the refusals.
        a.send(to_b, syn("again".into())).await.unwrap();
        assert_eq!(heard(&mut b).await.unwrap().envelope, syn("again".into()));
    }

    #[tokio::test]
    async fn a_message_bigger_than_a_datagram_travels_in_two_sealed_fragments() {
        let mut a = open("plant-7-secret").await;
        let mut b = open("plant-7-secret").await;
        let big = "x".repeat(MAX_DATAGRAM - 10);
        a.send(b.local_addr().unwrap(), syn(big.clone()))
            .await
            .unwrap();
        assert_eq!(heard(&mut b).await.unwrap().envelope, syn(big));
    }

    #[test]
    fn a_tampered_datagram_does_not_open() {
        let seal = Seal { key: [7; 32] };
        let mut datagram = seal.close(b"\0hello");
        assert_eq!(seal.open(&datagram), Some(&b"\0hello"[..]));
        let last = datagram.len() - 1;
        datagram[last] ^= 1;
        assert_eq!(seal.open(&datagram), None);
        assert_eq!(Seal { key: [8; 32] }.open(&seal.close(b"\0hello")), None);
    }
}
