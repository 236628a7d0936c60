//! The `ModelStore` service of a node: versions uploaded from one store, listed,
//! downloaded into another byte for byte (with their lineage), and every refusal:
//! bytes that do not hash to the header's sha256, streams that end short or run over,
//! unknown versions, a damaged blob on the serving node, a node without a store, a
//! mesh node's upload without the mesh's cluster key, and versions whose signature
//! the node does not trust (unsigned, tampered, another CA's, a sensor's). The models span several
//! chunks (an autoencoder of ~750 KB against [`CHUNK_BYTES`] of 256 KiB).

use std::path::Path;
use std::sync::Arc;

use fogmesh_actors::Annunciator;
use fogmesh_cluster::cluster_key::ClusterKey;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::model_seal::MeshSeal;
use fogmesh_cluster::{
    download_version, list_versions, upload_version, TransferError, CHUNK_BYTES,
    MAX_CONCURRENT_UPLOADS,
};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder};
use fogmesh_proto::model_store_client::ModelStoreClient;
use fogmesh_proto::{ListModelsRequest, ModelRef, WeightChunk, WeightHeader};
use fogmesh_tests::{node_toml_with, TestNode};
use fogmesh_trust::Role;
use tch::Device;
use tonic::Code;

const SECRET: &str = "model-store-test-secret";

/// An autoencoder whose safetensors span three chunks, stored as `pump-ae@version`.
fn store_autoencoder(
    store: &ModelStore,
    version: &str,
    seed: i64,
    parents: &[&str],
) -> (Manifest, Vec<u8>) {
    let config = AutoencoderConfig {
        channels: 8,
        window: 32,
        hidden: 128,
        bottleneck: 96,
        kernel: 7,
    };
    let (weights, _) = ConvAutoencoder::new(config.clone(), Device::Cpu, seed)
        .unwrap()
        .to_safetensors()
        .unwrap();
    assert!(
        weights.len() > 2 * CHUNK_BYTES,
        "{} bytes must span several chunks",
        weights.len()
    );
    let architecture = Architecture::ConvAutoencoder(config);
    let manifest = Manifest {
        training: serde_json::json!({"seed": seed}),
        metrics: [("threshold".to_string(), 0.5)].into(),
        parents: parents.iter().map(|p| p.to_string()).collect(),
        ..architecture.manifest("pump-ae", version)
    };
    let stored = store.import(manifest, &weights).unwrap();
    (stored, weights)
}

/// The fixture node with a model store (`models/` beside its config) and `extra`
/// appended to its config.
async fn node_with_store(extra: &str) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    TestNode::start_config(
        dir,
        &node_toml_with("models = \"models\"", extra),
        Annunciator::new(16),
    )
    .await
}

fn addr(node: &TestNode) -> String {
    node.server.grpc_addr().to_string()
}

/// The node's store, opened beside it as an operator would (signing what it imports).
fn node_store(node: &TestNode) -> ModelStore {
    node.pki.signing_store(&node.dir.path().join("models"))
}

fn blob_count(root: &Path) -> usize {
    std::fs::read_dir(root.join("blobs")).map_or(0, |d| d.count())
}

/// The sizes of the files of uploads still arriving.
fn staged_sizes(root: &Path) -> Vec<u64> {
    std::fs::read_dir(root.join("staging")).map_or(Vec::new(), |d| {
        d.map(|f| f.unwrap().metadata().unwrap().len()).collect()
    })
}

/// Uploads `chunks` as they are, bypassing the client's checks.
async fn raw_upload(node: &TestNode, chunks: Vec<WeightChunk>) -> tonic::Status {
    ModelStoreClient::new(node.channel(&node.operator).await)
        .upload(futures::stream::iter(chunks))
        .await
        .expect_err("the node refuses the upload")
}

/// The header of `manifest` with its signature in `store`, and its weights split at
/// `CHUNK_BYTES`.
fn chunks_of(store: &ModelStore, manifest: &Manifest, weights: &[u8]) -> Vec<WeightChunk> {
    let header = WeightHeader {
        model: manifest.id(),
        sha256: manifest.weights_sha256.clone(),
        total_bytes: manifest.weights_bytes,
        manifest: serde_json::to_vec_pretty(manifest).unwrap(),
        signature: store.signature(manifest).unwrap().unwrap_or_default(),
    };
    std::iter::once(WeightChunk {
        header: Some(header),
        data: Vec::new(),
    })
    .chain(weights.chunks(CHUNK_BYTES).map(|data| WeightChunk {
        header: None,
        data: data.to_vec(),
    }))
    .collect()
}

fn refused_code(error: &TransferError) -> Code {
    match error {
        TransferError::Refused { code, .. } => *code,
        other => panic!("expected a refusal from the node, got {other}"),
    }
}

#[tokio::test]
async fn versions_go_up_and_come_down_byte_for_byte_with_their_lineage() {
    let node = node_with_store("").await;
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    let (v1, weights_v1) = store_autoencoder(&local, "1", 1, &[]);
    let (v2, weights_v2) = store_autoencoder(&local, "2", 2, &["pump-ae@1"]);

    // The child goes up; its parent, which the node lacks, goes first.
    let sent = upload_version(&addr(&node), &node.operator, "pump-ae@2", &local)
        .await
        .unwrap();
    assert_eq!(sent, v2);
    let listed = list_versions(&addr(&node), &node.operator).await.unwrap();
    assert_eq!(
        listed,
        [&v1, &v2]
            .map(|m| ModelRef {
                model: m.id(),
                sha256: m.weights_sha256.clone(),
                total_bytes: m.weights_bytes,
            })
            .to_vec()
    );
    // The same version again with the same bytes is accepted and changes nothing.
    upload_version(&addr(&node), &node.operator, "pump-ae@2", &local)
        .await
        .unwrap();
    assert_eq!(
        list_versions(&addr(&node), &node.operator)
            .await
            .unwrap()
            .len(),
        2
    );

    // A bare name comes down as the newest version, after its parent.
    let third_dir = tempfile::tempdir().unwrap();
    let third = node.pki.signing_store(third_dir.path());
    let copied = download_version(&addr(&node), &node.operator, "pump-ae", &third)
        .await
        .unwrap();
    assert_eq!(copied, v2);
    assert_eq!(third.get("pump-ae@1").unwrap(), v1);
    assert_eq!(
        third.weights(&third.get("pump-ae@1").unwrap()).unwrap(),
        weights_v1
    );
    assert_eq!(third.weights(&copied).unwrap(), weights_v2);
    assert_eq!(
        std::fs::read(third_dir.path().join("manifests/pump-ae/2.json")).unwrap(),
        std::fs::read(local_dir.path().join("manifests/pump-ae/2.json")).unwrap(),
        "the manifest arrives as the store wrote it"
    );

    // Other bytes under a stored version are refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = node.pki.signing_store(other_dir.path());
    store_autoencoder(&other, "1", 99, &[]);
    let error = upload_version(&addr(&node), &node.operator, "pump-ae@1", &other)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::AlreadyExists, "{error}");
    assert!(error.to_string().contains("pump-ae@1"), "{error}");
    node.stop().await;
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_hash_to_its_header_stores_nothing() {
    let node = node_with_store("").await;
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    let (manifest, mut weights) = store_autoencoder(&local, "1", 1, &[]);
    let last = weights.len() - 1;
    weights[last] ^= 0xff;
    let actual = fogmesh_models::weights::sha256_hex(&weights);

    let status = raw_upload(&node, chunks_of(&local, &manifest, &weights)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("header.sha256")
            && message.contains(&manifest.weights_sha256)
            && message.contains(&actual),
        "names the field and both hashes: {message}"
    );
    assert!(list_versions(&addr(&node), &node.operator)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(blob_count(node_store(&node).root()), 0);
    assert!(staged_sizes(node_store(&node).root()).is_empty());
    node.stop().await;
}

#[tokio::test]
async fn an_upload_that_ends_short_or_runs_over_stores_nothing() {
    let node = node_with_store("").await;
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    let (manifest, weights) = store_autoencoder(&local, "1", 1, &[]);
    let declared = weights.len();

    let mut short = chunks_of(&local, &manifest, &weights);
    short.truncate(2);
    let status = raw_upload(&node, short).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "{CHUNK_BYTES} bytes came where its header declares {declared}"
        )) && status.message().contains("nothing was stored"),
        "{}",
        status.message()
    );

    let mut over = chunks_of(&local, &manifest, &weights);
    over.push(WeightChunk {
        header: None,
        data: vec![0; 10],
    });
    let status = raw_upload(&node, over).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "{} bytes came where its header declares {declared}",
            declared + 10
        )),
        "{}",
        status.message()
    );

    let no_header = raw_upload(
        &node,
        vec![WeightChunk {
            header: None,
            data: weights[..10].to_vec(),
        }],
    )
    .await;
    assert_eq!(no_header.code(), Code::InvalidArgument);
    assert!(no_header.message().contains("header"), "{no_header:?}");

    assert!(list_versions(&addr(&node), &node.operator)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(blob_count(node_store(&node).root()), 0);
    assert!(staged_sizes(node_store(&node).root()).is_empty());
    node.stop().await;
}

#[tokio::test]
async fn uploads_arrive_on_disk_a_chunk_at_a_time_and_beyond_the_limit_at_once_are_refused() {
    let node = node_with_store("").await;
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    let (manifest, weights) = store_autoencoder(&local, "1", 1, &[]);
    let chunks = chunks_of(&local, &manifest, &weights);
    let root = node_store(&node).root().to_path_buf();

    // As many uploads as a node takes at once, each stopped after its first chunk.
    let mut open = Vec::new();
    for _ in 0..MAX_CONCURRENT_UPLOADS {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(chunks[0].clone()).await.unwrap();
        tx.send(chunks[1].clone()).await.unwrap();
        let mut client = ModelStoreClient::new(node.channel(&node.operator).await);
        let call = tokio::spawn(async move {
            client
                .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        open.push((tx, call));
    }
    fogmesh_tests::poll(
        "each upload's first chunk in its staged file",
        std::time::Duration::from_secs(30),
        || async {
            (staged_sizes(&root) == vec![CHUNK_BYTES as u64; MAX_CONCURRENT_UPLOADS]).then_some(())
        },
    )
    .await;

    let status = raw_upload(&node, chunks.clone()).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "receiving {MAX_CONCURRENT_UPLOADS} uploads already"
        )),
        "{}",
        status.message()
    );
    let metrics = node.metrics_text().await;
    assert!(
        metrics.contains(
            "fogmesh_model_store_rejected_total{rpc=\"upload\",reason=\"too_many_uploads\"} 1"
        ),
        "{metrics}"
    );

    // One finishes and is stored; the others break off and leave no file behind.
    for chunk in &chunks[2..] {
        open[0].0.send(chunk.clone()).await.unwrap();
    }
    let (tx, call) = open.remove(0);
    drop(tx);
    let stored = call.await.unwrap().expect("the finished upload is stored");
    assert_eq!(stored.into_inner().model, manifest.id());
    for (tx, call) in open.drain(..) {
        drop(tx);
        let status = call.await.unwrap().expect_err("a broken upload is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert!(staged_sizes(&root).is_empty());
    assert_eq!(blob_count(&root), 1);
    node.stop().await;
}

#[tokio::test]
async fn unknown_and_damaged_versions_are_not_served() {
    let node = node_with_store("").await;
    let target_dir = tempfile::tempdir().unwrap();
    let target = node.pki.signing_store(target_dir.path());

    let error = download_version(&addr(&node), &node.operator, "pump-ae@7", &target)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::NotFound, "{error}");
    assert!(error.to_string().contains("pump-ae@7"), "{error}");

    // A blob changed on the serving node after it was stored is refused, not sent.
    let (stored, _) = store_autoencoder(&node_store(&node), "1", 1, &[]);
    let blob = node_store(&node)
        .root()
        .join(format!("blobs/{}.safetensors", stored.weights_sha256));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let error = download_version(&addr(&node), &node.operator, "pump-ae@1", &target)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::DataLoss, "{error}");
    assert!(
        error.to_string().contains(&stored.weights_sha256),
        "{error}"
    );
    assert!(target.list().unwrap().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn a_node_without_a_store_says_how_to_give_it_one() {
    let node = TestNode::start("").await;
    let error = list_versions(&addr(&node), &node.operator)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::FailedPrecondition, "{error}");
    assert!(
        error
            .to_string()
            .contains("has no model store: set `models` in [node]"),
        "{error}"
    );
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    store_autoencoder(&local, "1", 1, &[]);
    let error = upload_version(&addr(&node), &node.operator, "pump-ae@1", &local)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::FailedPrecondition, "{error}");
    let error = download_version(&addr(&node), &node.operator, "pump-ae@1", &local)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::FailedPrecondition, "{error}");
    node.stop().await;
}

#[tokio::test]
async fn a_tls_mesh_node_takes_uploads_by_role_and_the_mesh_key_grants_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[node]\nname = \"store-mesh\"\nrole = \"fog\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\n\n[cluster]\nsecret = {SECRET:?}\ndata = \"mesh\"\n"
    );
    let node = TestNode::start_config(dir, &config, Annunciator::new(16)).await;
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    store_autoencoder(&local, "1", 1, &[]);

    // A sensor's certificate, even with the mesh key, may not upload.
    let key = ClusterKey::from_secret(SECRET);
    let sensor = Dialer::new(
        Some(node.pki.tls("line-3", Role::Sensor, &[])),
        Some(key.clone()),
    );
    let error = upload_version(&addr(&node), &sensor, "pump-ae@1", &local)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Code::PermissionDenied, "{error}");
    assert!(
        error
            .to_string()
            .contains("role sensor may not call /fogmesh.v1.ModelStore/Upload"),
        "{error}"
    );
    assert!(list_versions(&addr(&node), &node.operator)
        .await
        .unwrap()
        .is_empty());

    // An operator's certificate needs no key.
    upload_version(&addr(&node), &node.operator, "pump-ae@1", &local)
        .await
        .unwrap();
    let listed = ModelStoreClient::new(node.channel(&node.operator).await)
        .list(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.models.len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn an_insecure_mesh_node_takes_uploads_only_with_the_mesh_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[node]\nname = \"store-mesh\"\nrole = \"fog\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\n\n[cluster]\nsecret = {SECRET:?}\ndata = \"mesh\"\n\n[tls]\ninsecure = true\n"
    );
    let node = TestNode::start_config(dir, &config, Annunciator::new(16)).await;
    assert!(node.status().await.insecure);
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    store_autoencoder(&local, "1", 1, &[]);

    let wrong = ClusterKey::from_secret("another-mesh-secret");
    for key in [None, Some(wrong)] {
        let error = upload_version(&addr(&node), &Dialer::new(None, key), "pump-ae@1", &local)
            .await
            .unwrap_err();
        assert_eq!(refused_code(&error), Code::PermissionDenied, "{error}");
        assert!(error.to_string().contains("fogmesh-cluster-key"), "{error}");
    }
    let key = ClusterKey::from_secret(SECRET);
    upload_version(
        &addr(&node),
        &Dialer::new(None, Some(key)),
        "pump-ae@1",
        &local,
    )
    .await
    .unwrap();
    assert_eq!(
        list_versions(&addr(&node), &Dialer::new(None, None))
            .await
            .unwrap()
            .len(),
        1
    );
    node.stop().await;
}

#[tokio::test]
async fn unsigned_tampered_and_wrongly_signed_versions_are_refused_and_counted() {
    let node = node_with_store("").await;
    let refused = |text: &str, reason: &str| {
        fogmesh_tests::metric_value(text, "fogmesh_models_refused_total", &[("reason", reason)])
            .unwrap_or(0.0)
    };
    let before = node.metrics_text().await;

    // Unsigned: stored in a store without a seal.
    let unsigned_dir = tempfile::tempdir().unwrap();
    let unsigned = ModelStore::open(unsigned_dir.path());
    store_autoencoder(&unsigned, "1", 1, &[]);
    // Signed by an operator of another mesh CA.
    let foreign_pki = fogmesh_tests::TestPki::open(&unsigned_dir.path().join("foreign"));
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = foreign_pki.signing_store(foreign_dir.path());
    store_autoencoder(&foreign, "2", 2, &[]);
    // Signed by a sensor of this mesh, a role that never signs models.
    let sensor = node.pki.tls("line-3", Role::Sensor, &[]);
    let sensor_seal = MeshSeal::new(&sensor, &[Role::Sensor]).unwrap();
    let by_sensor_dir = tempfile::tempdir().unwrap();
    let by_sensor = ModelStore::open(by_sensor_dir.path()).sealed(Arc::new(sensor_seal));
    store_autoencoder(&by_sensor, "3", 3, &[]);
    for (store, id, reason) in [
        (&unsigned, "pump-ae@1", "no signature"),
        (&foreign, "pump-ae@2", "not issued by the mesh CA"),
        (&by_sensor, "pump-ae@3", "role sensor"),
    ] {
        let error = upload_version(&addr(&node), &node.operator, id, store)
            .await
            .unwrap_err();
        assert_eq!(refused_code(&error), Code::PermissionDenied, "{error}");
        assert!(error.to_string().contains(reason), "{id}: {error}");
    }

    // Tampered: an operator-signed manifest whose alarm limit was raised afterwards,
    // the change that silences every alarm, sent with the original signature.
    let local_dir = tempfile::tempdir().unwrap();
    let local = node.pki.signing_store(local_dir.path());
    let (signed, weights) = store_autoencoder(&local, "4", 4, &[]);
    let mut raised = signed.clone();
    raised.metrics.insert("threshold".into(), 1e30);
    let mut chunks = chunks_of(&local, &raised, &weights);
    let header = chunks[0].header.as_mut().unwrap();
    header.signature = local.signature(&signed).unwrap().unwrap();
    let status = raw_upload(&node, chunks).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("other content"), "{status:?}");

    assert!(list_versions(&addr(&node), &node.operator)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(blob_count(node_store(&node).root()), 0, "nothing stored");
    let after = node.metrics_text().await;
    for reason in ["unsigned", "unknown_signer", "signer_role", "tampered"] {
        assert!(
            refused(&after, reason) >= refused(&before, reason) + 1.0,
            "{reason} is counted"
        );
    }

    // The same version as signed uploads, and serves its weights back.
    upload_version(&addr(&node), &node.operator, "pump-ae@4", &local)
        .await
        .unwrap();
    let node_side = node_store(&node);
    assert_eq!(
        node_side
            .weights(&node_side.get("pump-ae@4").unwrap())
            .unwrap(),
        weights
    );
    node.stop().await;
}
