//! Rolling a stored model version out to every replica of an expert across the mesh,
//! and rolling back (`Control.Rollout`, `fogmesh rollout`, `fogmesh rollback`).
//!
//! A rollout is a change of the mesh spec (the expert's `model` and its pinned
//! `sha256`), made in two phases so that a bad version never reaches a replica:
//! 1. **Check** on the node asked: the version is in its store (copied from a peer if
//!    not), its bytes hash to the manifest's sha256, its network builds from the
//!    manifest and loads every tensor, and it takes the same window as the version
//!    serving now. Anything else is refused here, and nothing changes anywhere.
//! 2. **Prepare**: the version is uploaded to every usable node's `ModelStore`
//!    (chunked, sha256-checked on arrival). A node that refuses it rolls the rollout
//!    back: the spec is not changed, so no replica swaps. A node that is lost
//!    meanwhile (unreachable, or the transfer cut) does not stop the rollout: it is
//!    named in the reply and takes the version from a peer when it returns.
//! 3. **Commit**: the new spec is stored with the next version number; the deployment
//!    loop spreads it by gossip, and every node hot-swaps its replicas
//!    (`ExpertSpec::swaps_to` changes) between two batches, so no request fails and none is
//!    scored by a half-loaded model. A replica re-placed from a lost node starts on the
//!    new version, so once the mesh settles every replica serves one version.
//!
//! A mesh expert's continual learner promotes through the same three steps
//! ([`MeshPromoter`]), with one difference in step 1 ([`FitCheck::Manifest`]): the
//! learner built, validated and stored the candidate from these very bytes, so the
//! check reads its manifest and does not load and hash it a second time; the hot swap
//! loads it once, checked against the pinned hash.
//!
//! Every node also runs [`ensure_local`] before it parses an adopted spec: a version
//! the spec names that its store lacks is copied from the first peer that has it,
//! asking the peers it has a ready link to first ([`peer_addresses`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::continual_learner::BoxFuture;
use fogmesh_actors::{ExpertSpec, PromoteError};
use fogmesh_models::served::{Architecture, Assets, ServedModel};
use fogmesh_models::store::{Manifest, ModelStore, StoreError};
use fogmesh_models::ModelError;

use crate::config::ConfigError;
use crate::deployment::view::{
    candidates, lock, DeploymentState, NoQuorum, Quorum, RolloutOutcome, RolloutRecord,
};
use crate::dialer::Dialer;
use crate::membership::{Member, Membership};
use crate::mesh_spec::{MeshSpec, ModelPlaces, StoredSpec};
use crate::model_store::{download_version, upload_version, TransferError};
use crate::peer_links::{LinkState, LinkView};

/// Longest one node may take to receive a version in the prepare phase.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a rollout was refused before anything changed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("node `{0}` is not in a mesh: its config has no [cluster] section")]
    NotInMesh(String),
    #[error("no mesh spec has been applied yet: `fogmesh apply` one first")]
    NoSpec,
    #[error(transparent)]
    NoQuorum(NoQuorum),
    #[error("the mesh spec has no expert `{0}`")]
    UnknownExpert(String),
    #[error("expert `{expert}` serves {serving}, not a stored model: only experts with `model = \"name@version\"` roll out")]
    NotStored { expert: String, serving: String },
    #[error("`{0}` is not a version: give `name@version` or the version alone")]
    BadVersion(String),
    #[error("expert `{expert}` has no version before {current} to roll back to")]
    NothingBefore { expert: String, current: String },
    #[error("expert `{expert}` already serves {id}")]
    AlreadyServing { expert: String, id: String },
    #[error("{id} cannot serve expert `{expert}`: {reason}")]
    Unfit {
        expert: String,
        id: String,
        #[source]
        reason: Box<FitError>,
    },
    #[error("{id} is in no store of this mesh: {reason}")]
    Missing { id: String, reason: String },
    /// The adopted spec does not check here.
    #[error(transparent)]
    Spec(Box<ConfigError>),
    /// The adopted spec is not TOML (its stored versions cannot even be listed).
    #[error("mesh.toml: {0}")]
    SpecSyntax(#[source] Box<toml::de::Error>),
    /// The thread that checks a version against the expert panicked.
    #[error("checking the version failed: {0}")]
    Thread(#[source] tokio::task::JoinError),
    #[error("the mesh spec changed from version {from} to {to} while the rollout ran; nothing was changed: run it again")]
    Raced { from: u64, to: u64 },
    #[error("the mesh knows spec version {known}, the largest there is: no newer spec can be written (a forged or corrupt spec is in the mesh)")]
    SpecVersionExhausted { known: u64 },
    /// A rollout to a version signed as made before the one serving: an attacker's
    /// replay of an old, weaker version looks like this. `fogmesh rollback` may.
    #[error("{id} was made before {serving}, which expert `{expert}` serves: going back is a rollback (`fogmesh rollback {expert} VERSION`), never a rollout")]
    Downgrade {
        expert: String,
        id: String,
        serving: String,
    },
}

/// Why a version cannot replace the one an expert serves ([`RolloutError::Unfit`]).
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("it is a merge that never passed the validation gate: merge it through the Merger with held-out windows and the incumbent, so the gate can judge it")]
    UnvalidatedMerge,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("it takes windows of {takes} values; the expert's routers send {sends}")]
    Window { takes: usize, sends: usize },
}

/// How much of a version a rollout reads before it uploads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitCheck {
    /// Load the network from its stored bytes, hash checked: an operator's version
    /// that no expert here has run yet.
    Load,
    /// Its manifest only: a learner's candidate, which the learner built, validated
    /// and stored (hashing it) from these bytes moments before, so the hot swap's load
    /// is the only one left.
    Manifest,
}

/// What a rollout reads and changes on the node that runs it.
pub struct RolloutContext<'a> {
    pub me: &'a str,
    pub places: &'a ModelPlaces,
    /// How this node reaches the others' model stores.
    pub dialer: &'a Dialer,
    pub membership: &'a Membership,
    pub links: &'a tokio::sync::watch::Receiver<LinkView>,
    pub state: &'a Mutex<DeploymentState>,
}

/// Runs one rollout (or rollback) of `expert` to `requested` through the three phases
/// of the module doc. `Err` means it was refused before anything changed; `Ok` carries
/// whether it committed or rolled back, which is also kept as the node's last rollout.
pub async fn run(
    ctx: &RolloutContext<'_>,
    expert: &str,
    requested: &str,
    rollback: bool,
    check: FitCheck,
) -> Result<RolloutRecord, RolloutError> {
    let store = ctx
        .places
        .models
        .clone()
        .ok_or_else(|| RolloutError::NotInMesh(ctx.me.to_string()))?;
    let current = lock(ctx.state).spec.clone().ok_or(RolloutError::NoSpec)?;
    let members = ctx.membership.members();
    let quorum = Quorum::of(
        ctx.me,
        &ctx.membership.known().await,
        &members,
        &ctx.links.borrow(),
    );
    quorum
        .require("a rollout")
        .map_err(RolloutError::NoQuorum)?;
    let peers = peer_addresses(&members, ctx.me, &ctx.links.borrow());
    let named = MeshSpec::stored_models(&current.text)
        .map_err(|e| RolloutError::SpecSyntax(Box::new(e)))?;
    ensure_local(&named, &store, &peers, ctx.dialer).await?;
    let file = Path::new("mesh.toml");
    let spec = MeshSpec::parse_with(&current.text, file, ctx.places)
        .map_err(|e| RolloutError::Spec(Box::new(e)))?;
    let serving = spec
        .expert_spec(expert)
        .ok_or_else(|| RolloutError::UnknownExpert(expert.to_string()))?
        .clone();
    let Some(from) = serving.source.stored().map(|s| s.manifest.clone()) else {
        return Err(RolloutError::NotStored {
            expert: expert.to_string(),
            serving: serving.model_name(),
        });
    };
    let to = target_version(&store, expert, &from, requested, rollback)?;
    ensure_local(std::slice::from_ref(&to), &store, &peers, ctx.dialer).await?;
    let manifest = {
        let (store, expert, to) = (store.clone(), expert.to_string(), to.clone());
        let assets = Assets {
            minilm: ctx.places.minilm.clone(),
        };
        tokio::task::spawn_blocking(move || {
            check_fit(&store, &expert, &serving, &to, &assets, check)
        })
        .await
        .map_err(RolloutError::Thread)??
    };
    if !rollback && manifest.created_us < from.created_us {
        let error = RolloutError::Downgrade {
            expert: expert.to_string(),
            id: to.clone(),
            serving: from.id(),
        };
        crate::model_seal::record_refusal(ctx.me, &to, "downgrade", &error);
        return Err(error);
    }
    let text = MeshSpec::with_model(&current.text, expert, &to, &manifest.weights_sha256)
        .map_err(|e| RolloutError::SpecSyntax(Box::new(e)))?
        .ok_or_else(|| RolloutError::UnknownExpert(expert.to_string()))?;
    // The edited spec must read as every node will read it (routes, shapes).
    MeshSpec::parse_with(&text, file, ctx.places).map_err(|e| RolloutError::Spec(Box::new(e)))?;

    let link_view = ctx.links.borrow().clone();
    let nodes: Vec<(String, String)> = candidates(&members, &link_view, ctx.me, &spec)
        .into_iter()
        .filter(|c| c.name != ctx.me)
        .filter_map(|c| members.get(&c.name).map(|m| (c.name, m.card.grpc.clone())))
        .collect();
    let (mut prepared, failed) = prepare(&nodes, &to, &store, ctx.dialer).await;
    prepared.insert(0, ctx.me.to_string());
    // A node that could not be reached was lost, not refusing: it copies the
    // version from a peer when it returns.
    let (lost, refused): (Vec<_>, Vec<_>) = failed.into_iter().partition(|(_, e)| unreachable(e));
    let mut record = RolloutRecord {
        expert: expert.to_string(),
        from: from.id(),
        to: to.clone(),
        spec_version: current.version,
        outcome: RolloutOutcome::RolledBack,
        prepared,
        lost: lost.iter().map(|(name, _)| name.clone()).collect(),
        detail: String::new(),
    };
    if !refused.is_empty() {
        let reasons: Vec<String> = refused
            .iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect();
        record.detail = format!(
            "rolled back before any replica swapped: {}; every replica stays on {}",
            reasons.join("; "),
            record.from
        );
        tracing::warn!(expert, to = %to, detail = %record.detail, "rollout rolled back");
        lock(ctx.state).rollout = Some(record.clone());
        return Ok(record);
    }

    let mut state = lock(ctx.state);
    let now = state.spec.as_ref().map_or(0, |s| s.version);
    if now != current.version {
        return Err(RolloutError::Raced {
            from: current.version,
            to: now,
        });
    }
    let known = state
        .usable_specs(&members)
        .map(|s| s.version)
        .chain([now])
        .max()
        .unwrap_or(0);
    let version = known
        .checked_add(1)
        .ok_or(RolloutError::SpecVersionExhausted { known })?;
    state.spec = Some(StoredSpec {
        version,
        applied_at_us: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
        text,
    });
    record.spec_version = version;
    record.outcome = RolloutOutcome::Committed;
    record.detail = if lost.is_empty() {
        format!("every usable node holds {to}; replicas swap to it as they adopt spec {version}")
    } else {
        let reasons: Vec<String> = lost
            .iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect();
        format!(
            "resumed without node(s) lost while {to} was shipped ({}): they copy it from a peer when they return, and their replicas are re-placed on nodes serving it meanwhile",
            reasons.join("; ")
        )
    };
    tracing::info!(expert, from = %record.from, to = %to, version, "rollout committed");
    state.rollout = Some(record.clone());
    Ok(record)
}

/// Promotes a version a `ContinualLearner` validated by rolling it out to every
/// replica of the expert across the mesh: the same path as `fogmesh rollout`, so the
/// version is checked, shipped to every node and only then named by the spec.
#[derive(Clone)]
pub struct MeshPromoter {
    pub me: String,
    pub places: ModelPlaces,
    pub dialer: Dialer,
    pub membership: std::sync::Arc<Membership>,
    pub links: tokio::sync::watch::Receiver<LinkView>,
    pub state: std::sync::Arc<Mutex<DeploymentState>>,
}

impl fogmesh_actors::Promoter for MeshPromoter {
    fn promote(
        &self,
        expert: &str,
        version: &Manifest,
    ) -> BoxFuture<'static, Result<(), PromoteError>> {
        let promoter = self.clone();
        let expert = expert.to_string();
        let id = version.id();
        Box::pin(async move {
            let context = RolloutContext {
                me: &promoter.me,
                places: &promoter.places,
                dialer: &promoter.dialer,
                membership: &promoter.membership,
                links: &promoter.links,
                state: &promoter.state,
            };
            match run(&context, &expert, &id, false, FitCheck::Manifest).await {
                Ok(record) if record.outcome == RolloutOutcome::Committed => Ok(()),
                Ok(record) => Err(PromoteError::RolledBack {
                    detail: record.detail,
                }),
                Err(e) => Err(PromoteError::Rollout(Arc::new(e))),
            }
        })
    }
}

/// Whether a failed upload means the node is gone (connection refused or reset,
/// stream cut, no answer) rather than that it looked at the version and said no.
fn unreachable(error: &TransferError) -> bool {
    match error {
        TransferError::Connect { .. } | TransferError::ShortStream { .. } => true,
        TransferError::Refused { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
        ),
        TransferError::HashMismatch { .. }
        | TransferError::Invalid { .. }
        | TransferError::Store { .. } => false,
    }
}

/// The peers a version may come from: every member but `me`, by gRPC address, those
/// `me` has a ready link to first. In a segmented plant the others may be out of its
/// reach, and asking one of them first waits out a dial that cannot succeed.
pub fn peer_addresses(
    members: &BTreeMap<String, Member>,
    me: &str,
    links: &LinkView,
) -> Vec<(String, String)> {
    let mut peers: Vec<&Member> = members.values().filter(|m| m.name != me).collect();
    peers.sort_by_key(|m| {
        links
            .get(&m.name)
            .is_none_or(|l| l.state != LinkState::Ready)
    });
    peers
        .into_iter()
        .map(|m| (m.name.clone(), m.card.grpc.clone()))
        .collect()
}

/// Copies each of `ids` that `store` lacks from the first of `peers` that has it.
/// Returns the ids copied; an id no peer could give is an error naming what each said.
pub async fn ensure_local(
    ids: &[String],
    store: &ModelStore,
    peers: &[(String, String)],
    dialer: &Dialer,
) -> Result<Vec<String>, RolloutError> {
    let mut copied = Vec::new();
    for id in ids {
        match store.get(id) {
            Ok(_) => continue,
            // Missing, or its manifest damaged on this disk: a peer's copy repairs it.
            Err(StoreError::NotFound(_) | StoreError::Manifest { .. }) => {}
            Err(e) => {
                return Err(RolloutError::Missing {
                    id: id.clone(),
                    reason: e.to_string(),
                })
            }
        }
        let mut reasons = Vec::new();
        let mut found = false;
        for (name, addr) in peers {
            match download_version(addr, dialer, id, store).await {
                Ok(manifest) => {
                    tracing::info!(model = %manifest.id(), from = %name, "copied a model version from a peer");
                    copied.push(manifest.id());
                    found = true;
                    break;
                }
                Err(e) => reasons.push(format!("{name}: {e}")),
            }
        }
        if !found {
            return Err(RolloutError::Missing {
                id: id.clone(),
                reason: if reasons.is_empty() {
                    "this node has no peers to ask".into()
                } else {
                    reasons.join("; ")
                },
            });
        }
    }
    Ok(copied)
}

/// The stored version a rollout or rollback goes to. `requested` may be
/// `name@version`, a version of the serving model's name, or (rollback only) empty:
/// the serving version's parent of the same name, else the newest older one.
pub fn target_version(
    store: &ModelStore,
    expert: &str,
    current: &Manifest,
    requested: &str,
    rollback: bool,
) -> Result<String, RolloutError> {
    let id = match (requested.trim(), rollback) {
        ("", false) => return Err(RolloutError::BadVersion(String::new())),
        ("", true) => {
            previous_version(store, current).ok_or_else(|| RolloutError::NothingBefore {
                expert: expert.into(),
                current: current.id(),
            })?
        }
        (id, _) if id.contains('@') => id.to_string(),
        (version, _) => format!("{}@{version}", current.name),
    };
    match fogmesh_models::store::parse_id(&id) {
        (name, Some(version)) if !name.is_empty() && !version.is_empty() => {}
        _ => return Err(RolloutError::BadVersion(id)),
    }
    if id == current.id() {
        return Err(RolloutError::AlreadyServing {
            expert: expert.into(),
            id,
        });
    }
    Ok(id)
}

/// The version before `current`: its first parent of the same name that is stored,
/// else the newest stored version of that name created before it.
fn previous_version(store: &ModelStore, current: &Manifest) -> Option<String> {
    let same_name = |id: &String| fogmesh_models::store::parse_id(id).0 == current.name;
    if let Some(parent) = current
        .parents
        .iter()
        .filter(|p| same_name(p))
        .find(|p| store.get(p).is_ok())
    {
        return Some(parent.clone());
    }
    let order = |m: &Manifest| (m.version.parse::<u64>().ok(), m.created_us);
    store
        .list()
        .ok()?
        .into_iter()
        .filter(|m| m.name == current.name && order(m) < order(current))
        .max_by_key(order)
        .map(|m| m.id())
}

/// Step 1: the version is fit to replace `current`: not an unvalidated merge, a
/// network that takes the expert's windows and, with [`FitCheck::Load`], bytes that
/// match their hash and load.
pub fn check_fit(
    store: &ModelStore,
    expert: &str,
    current: &ExpertSpec,
    id: &str,
    assets: &Assets,
    check: FitCheck,
) -> Result<Manifest, RolloutError> {
    let unfit = |reason: FitError| RolloutError::Unfit {
        expert: expert.into(),
        id: id.into(),
        reason: Box::new(reason),
    };
    let manifest = store.get(id).map_err(|e| unfit(e.into()))?;
    if unvalidated_merge(&manifest) {
        return Err(unfit(FitError::UnvalidatedMerge));
    }
    let architecture = match check {
        FitCheck::Load => {
            let weights = store.weights(&manifest).map_err(|e| unfit(e.into()))?;
            ServedModel::load(&manifest, &weights, assets, tch::Device::Cpu)
                .map_err(|e| unfit(e.into()))?
                .architecture()
                .clone()
        }
        FitCheck::Manifest => {
            Architecture::from_manifest(&manifest).map_err(|e| unfit(e.into()))?
        }
    };
    let takes = architecture.window_len();
    if takes != current.window_len() {
        return Err(unfit(FitError::Window {
            takes,
            sends: current.window_len(),
        }));
    }
    Ok(manifest)
}

/// A merged version stored without a gate's verdict (`fogmesh merge` without
/// validation): merged versions pass the validation gate before they serve.
fn unvalidated_merge(manifest: &Manifest) -> bool {
    manifest.training.get("merge").is_some()
        && manifest
            .training
            .get("validation")
            .is_none_or(serde_json::Value::is_null)
}

/// Step 2: uploads `id` to every node in `nodes` (name, address) at once. Returns the
/// nodes that hold it and, per failing node, its error.
pub async fn prepare(
    nodes: &[(String, String)],
    id: &str,
    store: &ModelStore,
    dialer: &Dialer,
) -> (Vec<String>, Vec<(String, TransferError)>) {
    let uploads = nodes.iter().map(|(name, addr)| async move {
        let outcome =
            tokio::time::timeout(PREPARE_TIMEOUT, upload_version(addr, dialer, id, store)).await;
        let outcome = match outcome {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(TransferError::Connect {
                addr: addr.clone(),
                model: id.to_string(),
                reason: format!("no answer within {PREPARE_TIMEOUT:?}"),
            }),
        };
        (name.clone(), outcome)
    });
    let mut prepared = Vec::new();
    let mut failed = Vec::new();
    for (name, outcome) in futures::future::join_all(uploads).await {
        match outcome {
            Ok(()) => prepared.push(name),
            Err(e) => failed.push((name, e)),
        }
    }
    (prepared, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_models::served::Architecture;
    use fogmesh_models::AutoencoderConfig;

    fn manifest(version: &str, parents: &[&str], created_us: i64) -> Manifest {
        Manifest {
            parents: parents.iter().map(|p| p.to_string()).collect(),
            created_us,
            ..Architecture::ConvAutoencoder(AutoencoderConfig::w1(2, 16)).manifest("ae", version)
        }
    }

    fn store_with(versions: &[Manifest]) -> (tempfile::TempDir, ModelStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        for (i, m) in versions.iter().enumerate() {
            store.import(m.clone(), &[i as u8; 8]).unwrap();
        }
        (dir, store)
    }

    #[test]
    fn versions_are_asked_of_linked_peers_first() {
        use crate::deployment::view::tests::member;
        use crate::peer_links::LinkInfo;
        let members: BTreeMap<String, Member> = ["a-cloud", "b-gateway", "c-me", "d-cell"]
            .into_iter()
            .map(|n| member(n, &[]))
            .collect();
        let link = |state| LinkInfo {
            state,
            since: std::time::Instant::now(),
            rtt: None,
            last_error: None,
            ever_ready: true,
        };
        let links: LinkView = [
            ("b-gateway".to_string(), link(LinkState::Ready)),
            ("d-cell".to_string(), link(LinkState::Ready)),
            ("a-cloud".to_string(), link(LinkState::Down)),
        ]
        .into();
        let order: Vec<String> = peer_addresses(&members, "c-me", &links)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(order, ["b-gateway", "d-cell", "a-cloud"]);
        assert_eq!(peer_addresses(&members, "c-me", &LinkView::new()).len(), 3);
    }

    #[test]
    fn a_merge_without_a_gate_verdict_does_not_roll_out() {
        let mut merged = manifest("5", &["ae@1", "ae@2"], 5);
        merged.training = serde_json::json!({"merge": "weighted_average", "validation": null});
        assert!(unvalidated_merge(&merged));
        merged.training["validation"] = serde_json::json!({"incumbent": "ae@1"});
        assert!(!unvalidated_merge(&merged));
        assert!(!unvalidated_merge(&manifest("2", &["ae@1"], 2)));
        let mut unvalidated = manifest("5", &[], 5);
        unvalidated.training = serde_json::json!({"merge": "ties", "validation": null});
        let dir = tempfile::tempdir().unwrap();
        let other = ModelStore::open(dir.path());
        other.import(manifest("1", &[], 1), &[0u8; 8]).unwrap();
        other.import(manifest("2", &[], 2), &[1u8; 8]).unwrap();
        other.import(unvalidated, &[2u8; 8]).unwrap();
        let serving = ExpertSpec {
            name: "ae".into(),
            model_version: "ae@1".into(),
            config: fogmesh_models::AutoencoderConfig::w1(2, 16),
            threshold: None,
            batching: Default::default(),
            intra_op_threads: 1,
            source: fogmesh_actors::ModelSource::seeded(0),
        };
        for check in [FitCheck::Load, FitCheck::Manifest] {
            let refused =
                check_fit(&other, "ae", &serving, "ae@5", &Assets::default(), check).unwrap_err();
            assert!(
                matches!(&refused, RolloutError::Unfit { reason, .. } if matches!(**reason, FitError::UnvalidatedMerge)),
                "{refused}"
            );
        }
    }

    #[test]
    fn rollback_goes_to_the_parent_else_the_newest_older_version() {
        let (_dir, store) = store_with(&[
            manifest("1", &[], 1),
            manifest("2", &[], 2),
            manifest("3", &["ae@1"], 3),
        ]);
        let v3 = store.get("ae@3").unwrap();
        assert_eq!(target_version(&store, "x", &v3, "", true).unwrap(), "ae@1");
        let v2 = store.get("ae@2").unwrap();
        assert_eq!(target_version(&store, "x", &v2, "", true).unwrap(), "ae@1");
        let v1 = store.get("ae@1").unwrap();
        assert!(matches!(
            target_version(&store, "x", &v1, "", true),
            Err(RolloutError::NothingBefore { .. })
        ));
        assert_eq!(
            target_version(&store, "x", &v1, "3", false).unwrap(),
            "ae@3"
        );
        assert_eq!(
            target_version(&store, "x", &v1, "other@9", false).unwrap(),
            "other@9"
        );
        assert!(matches!(
            target_version(&store, "x", &v1, "1", false),
            Err(RolloutError::AlreadyServing { .. })
        ));
        assert!(matches!(
            target_version(&store, "x", &v1, "", false),
            Err(RolloutError::BadVersion(_))
        ));
    }
}
