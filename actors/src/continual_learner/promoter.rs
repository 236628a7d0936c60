//! How a validated version comes to serve: the [`Promoter`] a learner hands its stored
//! candidates to, and [`LocalPromoter`], which hot-swaps the expert on this node. A mesh
//! rolls a version out to every replica behind the same trait (the cluster crate's
//! `MeshPromoter`, which answers with a [`BoxFuture`] from here).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fogmesh_models::store::{Manifest, ModelStore};

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
    fn promote(&self, expert: &str, version: &Manifest) -> BoxFuture<'static, Result<(), String>>;
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
    fn promote(&self, expert: &str, version: &Manifest) -> BoxFuture<'static, Result<(), String>> {
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
                .ok_or_else(|| format!("expert `{expert}` is not served on this node"))?;
            let assets = serving
                .source
                .stored()
                .map(|s| s.assets.clone())
                .ok_or_else(|| format!("expert `{expert}` does not serve a stored model"))?;
            let store = promoter.store.clone();
            let read = manifest.clone();
            let weights = tokio::task::spawn_blocking(move || store.weights(&read))
                .await
                .map_err(|e| format!("reading the weights failed: {e}"))?
                .map_err(|e| e.to_string())?;
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
                .map_err(|e| e.to_string())?;
            promoter
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(expert, spec);
            Ok(())
        })
    }
}
