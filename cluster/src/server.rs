//! A node on the network: the actors of a [`NodeConfig`] behind gRPC, MQTT, file
//! replay and a Prometheus endpoint, with an orderly start and stop.
//!
//! Start, in order (each step can fail, and a failure leaves nothing running):
//! 1. Read every file the config points at (weights, gates, recordings): a bad config
//!    is refused before anything starts.
//! 2. Install the Prometheus recorder: the actors bind their counters when they start.
//! 3. Bind the gRPC and metrics sockets: a port in use is refused before the actors
//!    start.
//! 4. Open the edge log (`[node] edge_log`), start the node's actors
//!    ([`Node::start_with_log`] returns once all run, every stream resumed from the
//!    log), then one continual learner per expert with `[experts.learning]` (after the
//!    experts it watches; a learner that does not start stops the node again).
//! 5. Serve gRPC and metrics, start one task per MQTT broker and per replay.
//!
//! Stop ([`RunningNodeServer::shutdown`]), in order:
//! 1. Raise the shutdown signal: the gRPC server stops accepting connections, open
//!    `PushStream` and `WatchAlerts` streams end at their next batch or alert boundary
//!    (model `Download`s at their next chunk: the client sees them end short),
//!    MQTT tasks disconnect after the message in hand, replays stop after the batch in
//!    hand.
//! 2. Wait for the gRPC server to finish the calls in flight, then for the MQTT and
//!    replay tasks (each bounded by [`DRAIN_TIMEOUT`], after which it is aborted).
//! 3. Stop the continual learners (a round in flight is abandoned, the serving
//!    version stays), then the node's actors. Every source has stopped pushing by now,
//!    so no producer sees a half-stopped node, and every acknowledged batch was
//!    accepted before its acknowledgement left.
//!
//! Learners are not restarted: one that stops on its own is logged and shows as
//! `stopped` in `status` while its expert keeps serving (see
//! [`fogmesh_actors::continual_learner`]).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use fogmesh_actors::replay::replay;
use fogmesh_actors::{
    Annunciator, ContinualLearner, EdgeStorage, LearnerError, LocalPromoter, Node, RunningLearner,
    SpecError,
};
use fogmesh_edge_log::{EdgeLog, EdgeLogOptions};
use fogmesh_models::store::ModelStore;
use fogmesh_proto::cluster_link_server::ClusterLinkServer;
use fogmesh_proto::control_server::ControlServer;
use fogmesh_proto::federation_server::FederationServer;
use fogmesh_proto::inference_server::InferenceServer;
use fogmesh_proto::ingest_server::IngestServer;
use fogmesh_proto::model_store_server::ModelStoreServer;
use fogmesh_proto::telemetry_server::TelemetryServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::authorization::AuthorizationLayer;
use crate::capabilities::Capabilities;
use crate::cluster_key::ClusterKey;
use crate::config::{ConfigError, NodeConfig, ReplayJob};
use crate::dialer::{self, Dialer};
use crate::federation::FederationService;
use crate::ingest::Ingestor;
use crate::mesh::{Mesh, MeshError, MeshSettings};
use crate::metrics_endpoint::{self, MetricsError};
use crate::model_store::ModelStoreService;
use crate::services::{MeshView, NodeServices};
use crate::{mqtt, mqtt_alerts, telemetry};

/// Scored windows a `WatchAlerts` subscriber may fall behind before it skips some
/// (the capacity of the annunciator [`NodeServer::start`] creates).
pub const ALERT_BUFFER: usize = 1024;
/// Calls one connection may have in a handler at once; more are refused at once with
/// `RESOURCE_EXHAUSTED` (load shedding) rather than queued without bound. A stream
/// holds its slot only until its handler returns the stream.
pub const MAX_CALLS_PER_CONNECTION: usize = 256;
/// HTTP/2 streams one connection may open at once (long-lived ones included:
/// cluster links, alert subscriptions, ingest streams).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Longest a stopping server waits for one of its tasks before aborting it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node server did not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node `{node}` did not start: {source}")]
    Node {
        node: String,
        #[source]
        source: Box<SpecError>,
    },
    #[error("node `{node}` did not start: {source}")]
    Learner {
        node: String,
        #[source]
        source: Box<LearnerError>,
    },
    #[error("the gRPC server on {addr} failed: {source}")]
    Grpc {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("node `{node}`: the TLS settings do not load: {source}")]
    Tls {
        node: String,
        #[source]
        source: Box<tonic::transport::Error>,
    },
    #[error("node `{node}`: the model store's staging folder cannot be emptied: {source}")]
    Staging {
        node: String,
        source: fogmesh_models::store::StoreError,
    },
    #[error("node `{node}`: {source}")]
    EdgeLog {
        node: String,
        #[source]
        source: fogmesh_edge_log::EdgeLogError,
    },
    #[error("the gRPC server on {addr} stopped on its own: {reason}")]
    GrpcStopped { addr: SocketAddr, reason: String },
    #[error("node `{node}` stopped on its own: its supervisor gave up (the log names the failing actor)")]
    NodeStopped { node: String },
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

/// Starts node servers; see the module doc for the order of events.
pub struct NodeServer;

/// A started node server. Call [`RunningNodeServer::shutdown`] to stop it in order;
/// dropping it only signals everything to stop.
pub struct RunningNodeServer {
    mesh: Option<Mesh>,
    node: Node,
    node_join: Option<JoinHandle<()>>,
    learners: Vec<RunningLearner>,
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    /// The stop signal of every task the server started (the gRPC server, open
    /// `PushStream`, `WatchAlerts` and `Download` streams, the mesh, MQTT connections,
    /// replays and the metrics endpoint). A token rather than a `Notify`: a task that
    /// starts waiting after cancellation still sees it.
    shutdown: CancellationToken,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// MQTT and replay tasks.
    sources: Vec<JoinHandle<()>>,
    metrics_http: Option<JoinHandle<()>>,
}

impl NodeServer {
    /// Starts everything `config` describes and returns once it serves.
    pub async fn start(config: NodeConfig) -> Result<RunningNodeServer, ServeError> {
        NodeServer::start_with(config, Annunciator::new(ALERT_BUFFER)).await
    }

    /// [`NodeServer::start`] publishing to `annunciator`: subscribe to it before the
    /// call to see every scored window, including those of replays that begin as the
    /// node starts (the demo's live report, tests).
    pub async fn start_with(
        config: NodeConfig,
        annunciator: Annunciator,
    ) -> Result<RunningNodeServer, ServeError> {
        // 1. Files; 2. the recorder; 3. sockets; 4. actors (see the module doc).
        // The identity is read once. A config without `[tls]` is refused only after
        // its own settings were checked, so one with several mistakes names them in
        // order; its store is unsealed meanwhile and never serves.
        let configured = config.configured_tls()?;
        let places = config.model_places(configured.as_ref())?;
        if let Some(store) = &places.models {
            store
                .clear_staging()
                .map_err(|source| ServeError::Staging {
                    node: config.node.name.clone(),
                    source,
                })?;
        }
        let spec = config.to_node_spec_with(&places)?;
        let replays = config.replay_jobs()?;
        let log_options = EdgeLogOptions {
            journal_retention: config.node.alerts.retention,
        };
        let log_error = |source| ServeError::EdgeLog {
            node: config.node.name.clone(),
            source,
        };
        let storage = match &config.node.edge_log {
            Some(folder) => Some(EdgeStorage {
                log: EdgeLog::open_with(&config.resolve(folder), log_options).map_err(log_error)?,
                limits: config.outbox_limits(),
            }),
            None => {
                if !spec.sensors.is_empty() {
                    tracing::warn!(node = %config.node.name, "no [node] edge_log: acknowledged samples are held in memory only, and a crash loses those of unfinished windows and the alerts kept for subscribers");
                }
                None
            }
        };
        // Alerts are journaled in the edge log, or in memory without one: subscribers
        // resume from a cursor either way, across a restart only with the log.
        let journal = match &storage {
            Some(storage) => storage.log.clone(),
            None => EdgeLog::in_memory_with(log_options).map_err(log_error)?,
        };
        let annunciator = annunciator.with_journal(journal, config.node.alerts.journal_verdicts);
        let tls = match config.tls {
            Some(_) => configured,
            None => config.tls()?,
        };
        let brokers = config.mqtt_brokers(tls.as_ref())?;
        if tls.is_none() {
            tracing::warn!(node = %config.node.name, "INSECURE: [tls] insecure = true: this node serves and dials in plaintext, with no identities and no roles; anyone who reaches its port may change the mesh");
        }
        let metrics = metrics_endpoint::prometheus_handle()?;
        let (grpc_listener, grpc_addr) = bind("gRPC", config.node.listen).await?;
        let metrics_listener = match config.node.metrics_listen {
            Some(addr) => Some(bind("metrics", addr).await?),
            None => None,
        };
        let learning: Vec<_> = config
            .learners()
            .filter_map(|(name, learning)| {
                let expert = spec.experts.iter().find(|e| e.name == name)?;
                Some((expert.clone(), learning.clone()))
            })
            .collect();
        let spec_for_mesh = spec.clone();
        let (node, node_join) = Node::start_with_log(spec, annunciator, storage)
            .await
            .map_err(|source| ServeError::Node {
                node: config.node.name.clone(),
                source: Box::new(source),
            })?;
        let learners = match start_learners(places.models.clone(), &node, learning).await {
            Ok(learners) => learners,
            Err(source) => {
                node.shutdown(node_join).await;
                return Err(ServeError::Learner {
                    node: config.node.name.clone(),
                    source: Box::new(source),
                });
            }
        };

        // 5. Join the mesh, then serve.
        // Cancels on an early return below too, so the tasks already started stop.
        let stop = CancellationToken::new().drop_guard();
        let shutdown = stop.token().clone();
        let limits = config.limits;
        let mesh = match &config.cluster {
            Some(cluster) => {
                let settings = MeshSettings {
                    name: config.node.name.clone(),
                    role: config.node.role,
                    zone: config.node.zone.clone(),
                    conduits: config.node.conduits.clone(),
                    segmented: config.node.segmented,
                    data: config.resolve(&cluster.data),
                    cluster: cluster.clone(),
                    grpc_addr,
                    capabilities: Capabilities::probe(),
                    up_since_us: node.snapshot().up_since_us,
                    local: spec_for_mesh.clone(),
                    places: places.clone(),
                    dialer: Dialer::new(
                        tls.clone(),
                        Some(ClusterKey::from_secret(cluster.secret.expose())),
                    )
                    .dialing_from(cluster.dial_from),
                };
                Some(Mesh::start(settings, node.clone(), shutdown.clone()).await?)
            }
            None => None,
        };
        let mesh_view = mesh.as_ref().map(|m| MeshView {
            membership: m.membership.clone(),
            links: m.link_view.clone(),
            deployment: m.deployment.clone(),
            places: places.clone(),
            dialer: m.dialer.clone(),
        });

        let model_store = ModelStoreService::new(
            config.node.name.clone(),
            places.models.clone(),
            // Over TLS the certificate's role decides who may upload; the mesh key,
            // which every member learns by gossip, grants nothing there.
            mesh.as_ref()
                .filter(|_| tls.is_none())
                .map(|m| m.key.clone()),
            shutdown.clone(),
        );
        let federation = FederationService::new(
            config.node.name.clone(),
            node.clone(),
            // As for uploads: over TLS the certificate's role decides.
            mesh.as_ref()
                .filter(|_| tls.is_none())
                .map(|m| m.key.clone()),
            mesh_view.clone(),
        );
        let services = NodeServices::new(
            node.clone(),
            config.node.role,
            limits,
            metrics.clone(),
            shutdown.clone(),
            mesh_view,
            tls.is_none(),
        );
        // tonic refuses messages over its limit before a handler sees them, with
        // OUT_OF_RANGE and no field name; its limit is a backstop at twice ours so
        // that the handlers refuse oversized messages first, with RESOURCE_EXHAUSTED
        // naming the limit.
        let decode_backstop = limits.max_message_bytes.saturating_mul(2);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder =
                builder
                    .tls_config(tls.server_config())
                    .map_err(|source| ServeError::Tls {
                        node: config.node.name.clone(),
                        source: Box::new(source),
                    })?;
        }
        let router = builder
            .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
            .load_shed(true)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .layer(AuthorizationLayer::new(tls.is_some()))
            .http2_keepalive_interval(Some(dialer::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(dialer::KEEPALIVE_TIMEOUT))
            .initial_stream_window_size(Some(dialer::STREAM_WINDOW))
            .initial_connection_window_size(Some(dialer::CONNECTION_WINDOW))
            .add_optional_service(
                mesh.as_ref()
                    .map(|m| ClusterLinkServer::new(m.link_service())),
            )
            .add_service(
                IngestServer::new(services.clone()).max_decoding_message_size(decode_backstop),
            )
            .add_service(
                InferenceServer::new(services.clone()).max_decoding_message_size(decode_backstop),
            )
            .add_service(ControlServer::new(services.clone()))
            .add_service(ModelStoreServer::new(model_store))
            .add_service(FederationServer::new(federation))
            .add_service(TelemetryServer::new(services));
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(
            nodelay(grpc_listener),
            shutdown.clone().cancelled_owned(),
        ));
        tracing::info!(node = %config.node.name, %grpc_addr, "serving gRPC");

        let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);
        let metrics_http = metrics_listener.map(|(listener, addr)| {
            tracing::info!(%addr, "serving prometheus metrics");
            tokio::spawn(metrics_endpoint::serve(listener, metrics, shutdown.clone()))
        });

        let mut sources = Vec::new();
        let mqtt_ingest = Ingestor::new(node.clone(), limits, telemetry::TRANSPORT_MQTT);
        for (index, broker) in brokers.into_iter().enumerate() {
            if let (true, Some((log, _))) = (broker.config.alerts, node.annunciator.journal()) {
                sources.push(tokio::spawn(mqtt_alerts::run(
                    broker.clone(),
                    config.node.name.clone(),
                    index,
                    log.clone(),
                    shutdown.clone(),
                )));
            }
            sources.push(tokio::spawn(mqtt::run(
                broker,
                config.node.name.clone(),
                index,
                mqtt_ingest.clone(),
                limits.max_message_bytes,
                shutdown.clone(),
            )));
        }
        for job in replays {
            sources.push(tokio::spawn(run_replay(
                node.clone(),
                job,
                shutdown.clone(),
            )));
        }

        Ok(RunningNodeServer {
            mesh,
            node,
            node_join: Some(node_join),
            learners,
            grpc_addr,
            metrics_addr,
            // From here on the server's own drop cancels.
            shutdown: stop.disarm(),
            grpc: Some(grpc),
            sources,
            metrics_http,
        })
    }
}

/// Starts a learner for each `(expert, learning)`, promoting on this node; on the
/// first that does not start, stops those already started.
async fn start_learners(
    store: Option<ModelStore>,
    node: &Node,
    learning: Vec<(fogmesh_actors::ExpertSpec, fogmesh_actors::LearningSpec)>,
) -> Result<Vec<RunningLearner>, LearnerError> {
    let mut learners = Vec::new();
    if learning.is_empty() {
        return Ok(learners);
    }
    // The config refuses learning for experts without a stored model, and stored
    // models without a store; this only guards a config built by hand.
    let Some(store) = store else {
        return Err(LearnerError::NotStored {
            expert: learning[0].0.name.clone(),
        });
    };
    let promoter = std::sync::Arc::new(LocalPromoter::new(
        node.clone(),
        store.clone(),
        learning.iter().map(|(expert, _)| expert.clone()),
    ));
    for (expert, spec) in learning {
        let name = expert.name.clone();
        match ContinualLearner::start(node, expert, spec, store.clone(), promoter.clone()).await {
            Ok(learner) => {
                tracing::info!(expert = %name, "continual learner started");
                learners.push(learner);
            }
            Err(e) => {
                for learner in learners {
                    learner.shutdown().await;
                }
                return Err(e);
            }
        }
    }
    Ok(learners)
}

/// The accepted connections with Nagle's algorithm off: small replies (acks, verdicts,
/// cluster-link frames) would otherwise wait for the peer's delayed ACK, 40 ms on
/// Linux, which showed up as the p99 of windows scored on another node.
fn nodelay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot turn Nagle's algorithm off");
            }
        })
    })
}

/// Binds `addr` and returns the listener with the address it got (the real port
/// when `addr` asked for port 0).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServeError> {
    let error = |source| ServeError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// Feeds one recording into the node; stops early on shutdown.
async fn run_replay(node: Node, job: ReplayJob, shutdown: CancellationToken) {
    let file = job.file.display().to_string();
    tokio::select! {
        () = shutdown.cancelled() => tracing::info!(%file, "replay stopped by shutdown"),
        result = replay(&node, &job.recording, &job.plan) => match result {
            Ok(report) => tracing::info!(%file, rows = report.rows, samples = report.samples, "replay finished"),
            Err(e) => {
                metrics::counter!(telemetry::REPLAY_FAILURES, "file" => file.clone()).increment(1);
                tracing::error!(%file, error = %e, "replay stopped at a refused batch");
            }
        },
    }
}

impl RunningNodeServer {
    /// The bound gRPC address (the real port when the config said port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound Prometheus endpoint, when the config has `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The running node, for in-process callers (the demo, tests).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Waits until the node or the gRPC server stops on its own, and says which.
    ///
    /// Cancel safety: cancel-safe; after it returns, it returns at once with
    /// `NodeStopped` or `Grpc` only for a part that has not been reported yet, and
    /// otherwise waits for the other part.
    pub async fn stopped(&mut self) -> ServeError {
        let node = self.node.name.clone();
        let addr = self.grpc_addr;
        tokio::select! {
            _ = async { self.node_join.as_mut()?.await.ok() }, if self.node_join.is_some() => {
                self.node_join = None;
                ServeError::NodeStopped { node }
            }
            result = async { self.grpc.as_mut()?.await.ok() }, if self.grpc.is_some() => {
                self.grpc = None;
                match result {
                    Some(Err(source)) => ServeError::Grpc { addr, source },
                    Some(Ok(())) => ServeError::GrpcStopped { addr, reason: "it returned without an error".into() },
                    None => ServeError::GrpcStopped { addr, reason: "its task panicked".into() },
                }
            }
        }
    }

    /// Stops everything in order (see the module doc) and waits for it.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        let mut outcome = Ok(());
        if let Some(grpc) = self.grpc.take() {
            if let Some(Ok(Err(source))) = drain("grpc server", grpc).await {
                outcome = Err(ServeError::Grpc {
                    addr: self.grpc_addr,
                    source,
                });
            }
        }
        for source in self.sources.drain(..) {
            drain("ingest source", source).await;
        }
        if let Some(metrics_http) = self.metrics_http.take() {
            drain("metrics endpoint", metrics_http).await;
        }
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown().await;
        }
        for learner in self.learners.drain(..) {
            learner.shutdown().await;
        }
        match self.node_join.take() {
            Some(join) => self.node.shutdown(join).await,
            None if outcome.is_ok() => {
                outcome = Err(ServeError::NodeStopped {
                    node: self.node.name.clone(),
                })
            }
            None => {}
        }
        outcome
    }
}

/// Awaits a task for at most [`DRAIN_TIMEOUT`], aborting it after that.
async fn drain<T>(
    what: &'static str,
    mut task: JoinHandle<T>,
) -> Option<Result<T, tokio::task::JoinError>> {
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::warn!(task = what, timeout = ?DRAIN_TIMEOUT, "task did not stop in time; aborting it");
            task.abort();
            None
        }
    }
}

impl Drop for RunningNodeServer {
    /// Without [`RunningNodeServer::shutdown`] (a panicking test, say), still stop the
    /// tasks and the actors rather than leak them; nothing waits for them.
    fn drop(&mut self) {
        self.shutdown.cancel();
        for learner in &self.learners {
            learner.stop();
        }
        if self.node_join.is_some() {
            self.node.agent.stop(Some("node server dropped".into()));
        }
    }
}

/// Runs a node until `shutdown_signal` completes (Ctrl-C in the binary), then stops
/// it in order. Returns an error when the node cannot start, or stops on its own
/// before the signal (after stopping the rest).
pub async fn run_until(
    config: NodeConfig,
    shutdown_signal: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut server = NodeServer::start(config).await?;
    tokio::select! {
        () = shutdown_signal => server.shutdown().await,
        error = server.stopped() => {
            tracing::error!(%error, "node stopping");
            // The first failure is the one to report; stopping the rest may add none.
            let _ = server.shutdown().await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// Regression: accepted connections kept Nagle's algorithm on, and small replies
    /// waited 40 ms for the peer's delayed ACK (W1 across nodes had a 48 ms p99).
    #[tokio::test]
    async fn accepted_grpc_connections_send_small_replies_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(nodelay(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn an_expert_with_learning_gets_a_learner_that_stops_with_the_node() {
        use fogmesh_actors::continual_learner::Phase;
        use fogmesh_models::served::Architecture;
        use fogmesh_models::store::{Manifest, ModelStore};
        use fogmesh_models::{AutoencoderConfig, ConvAutoencoder};

        let dir = tempfile::tempdir().unwrap();
        let config = AutoencoderConfig::w1(2, 8);
        let model = ConvAutoencoder::new(config.clone(), tch::Device::Cpu, 1).unwrap();
        let (weights, _) = model.to_safetensors().unwrap();
        ModelStore::open(dir.path().join("models"))
            .import(
                Manifest {
                    metrics: [("threshold".to_string(), 0.5)].into(),
                    ..Architecture::ConvAutoencoder(config).manifest("pump-ae", "v1")
                },
                &weights,
            )
            .unwrap();
        let text = "[node]\nname = \"edge-1\"\nrole = \"edge\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\n\n[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nmin_new_windows = 16\n\n[[experts]]\nname = \"plain-ae\"\nmodel = \"pump-ae@v1\"\n\n[tls]\ninsecure = true\n";
        let config = NodeConfig::parse(text, &dir.path().join("node.toml")).unwrap();
        let server = NodeServer::start(config).await.expect("the node starts");
        let directory = server.node().directory.clone();
        assert_eq!(directory.learners.len(), 1, "only the expert that learns");
        let learner = directory.learner("pump-ae").expect("a learner");
        let snapshot = learner.shared.snapshot();
        assert_eq!(snapshot.phase, Phase::Watching);
        assert_eq!(snapshot.serving_version, "pump-ae@v1");
        server.shutdown().await.expect("an orderly stop");
        assert_eq!(learner.shared.phase(), Phase::Stopped);
    }
}
