//! How a validated version comes to serve: the [`Promoter`] a learner hands its stored
//! candidates to, and [`LocalPromoter`], which hot-swaps the expert on this node. A mesh
//! rolls a version out to every replica behind the same trait (the cluster crate's
//! `MeshPromoter`, which answers with a [`BoxFuture`] from here).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fogmesh_models::store::{Manifest, ModelStore, StoreError};
use tokio::task::JoinError;

use crate::error::SpecError;
use crate::expert::{ExpertSpec, ModelSource, StoredModel};
use crate::node_agent::Node;

/// A boxed future that can cross threads (the shape of `futures::future::BoxFuture`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Makes the replicas of an expert serve a new stored version. The node's own
/// [`LocalPromoter`] swaps the expert on this node; a mesh can roll a version out to
/// every replica behind the same trait.
pub trait Promoter: Send + Sync + 'static {
    /// Makes every replica of `expert` serve `version` (a stored manifest id
    /// "name@version"); answers when done.
    fn promote(
        &self,
        expert: &str,
        version: &Manifest,
    ) -> BoxFuture<'static, Result<(), PromoteError>>;
}

/// Why a version was not promoted; the version serving before keeps serving. Causes sit
/// behind `Arc` because the learner's error that carries this one is cloned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoteError {
    #[error("expert `{expert}` is not served on this node")]
    NotServed { expert: String },
    #[error("expert `{expert}` does not serve a stored model")]
    NotStored { expert: String },
    #[error("reading the weights failed: {0}")]
    ReadThread(#[source] Arc<JoinError>),
    /// The node's store could not give the version's weights (missing, tampered with).
    #[error(transparent)]
    Read(Arc<StoreError>),
    /// The expert (or its node agent) refused the hot swap.
    #[error(transparent)]
    Swap(Arc<SpecError>),
    /// A mesh rollout that ran and rolled back; `detail` says why.
    #[error("{detail}")]
    RolledBack { detail: String },
    /// A mesh rollout refused before anything changed. Its error type belongs to the
    /// crate that runs rollouts, which this one does not depend on.
    #[error(transparent)]
    Rollout(Arc<dyn std::error::Error + Send + Sync>),
}

/// Promotes on this node only: reads the version's weights from the node's store
/// (checked against the manifest's hash), builds the expert's spec from the one serving
/// with `stored` replaced, and hot-swaps it ([`Node::swap_expert`]).
#[derive(Clone)]
pub struct LocalPromoter {
    node: Node,
    store: ModelStore,
    /// The spec each expert serves, as this promoter last set it.
    serving: Arc<Mutex<HashMap<String, ExpertSpec>>>,
}

impl LocalPromoter {
    /// `experts`: the specs the node started these experts from.
    pub fn new(
        node: Node,
        store: ModelStore,
        experts: impl IntoIterator<Item = ExpertSpec>,
    ) -> Self {
        let serving = experts.into_iter().map(|e| (e.name.clone(), e)).collect();
        LocalPromoter {
            node,
            store,
            serving: Arc::new(Mutex::new(serving)),
        }
    }
}

impl Promoter for LocalPromoter {
    fn promote(
        &self,
        expert: &str,
        version: &Manifest,
    ) -> BoxFuture<'static, Result<(), PromoteError>> {
        let promoter = self.clone();
        let expert = expert.to_string();
        let manifest = version.clone();
        Box::pin(async move {
            let serving = promoter
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&expert)
                .cloned()
                .ok_or_else(|| PromoteError::NotServed {
                    expert: expert.clone(),
                })?;
            let assets = serving
                .source
                .stored()
                .map(|s| s.assets.clone())
                .ok_or_else(|| PromoteError::NotStored {
                    expert: expert.clone(),
                })?;
            let store = promoter.store.clone();
            let read = manifest.clone();
            let weights = tokio::task::spawn_blocking(move || store.weights(&read))
                .await
                .map_err(|e| PromoteError::ReadThread(Arc::new(e)))?
                .map_err(|e| PromoteError::Read(Arc::new(e)))?;
            let spec = ExpertSpec {
                model_version: manifest.id(),
                // A calibrated candidate brings its own limit; otherwise keep the one
                // the expert had.
                threshold: if manifest.metrics.contains_key("threshold") {
                    None
                } else {
                    serving.threshold
                },
                source: ModelSource::Stored(Box::new(StoredModel {
                    manifest,
                    weights: weights.into(),
                    assets,
                })),
                ..serving
            };
            promoter
                .node
                .swap_expert(spec.clone())
                .await
                .map_err(|e| PromoteError::Swap(Arc::new(e)))?;
            promoter
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(expert, spec);
            Ok(())
        })
    }
}
