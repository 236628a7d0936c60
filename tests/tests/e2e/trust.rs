//! Trust at a node's gRPC port: callers without a certificate of the mesh CA never
//! reach a handler; callers with one get what their role allows and nothing else.

use fogmesh_actors::Annunciator;
use fogmesh_cluster::cluster_key::ClusterKey;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::dialer::LinkError;
use fogmesh_cluster::link;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::{ApplyRequest, SampleBatch};
use fogmesh_tests::{
    metric_value, node_toml, normal_values, samples, TestNode, TestPki, NODE, OTHER_SENSOR, SENSOR,
};
use fogmesh_trust::Role;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

/// A node of a mesh whose cluster secret is `secret`.
async fn mesh_node(secret: &str) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[cluster]\nsecret = {secret:?}\ndata = \"mesh\"\n",
        node_toml("")
    );
    TestNode::start_config(dir, &config, Annunciator::new(16)).await
}

/// Applies [`legitimate_spec`] as an operator and returns the version it got.
async fn apply_legitimate_spec(
    control: &fogmesh_proto::control_client::ControlClient<tonic::transport::Channel>,
) -> u64 {
    let mut control = control.clone();
    control
        .apply(ApplyRequest {
            spec_toml: legitimate_spec(),
            dry_run: false,
        })
        .await
        .expect("a legitimate apply still wins")
        .into_inner()
        .version
}

/// An operator's mesh spec: one expert and one sensor on the fixture node.
fn legitimate_spec() -> String {
    format!(
        "[[experts]]\nname = \"ae\"\nmodel_version = \"v1\"\nchannels = 2\nwindow = 16\nthreshold = 1.0\n\n[[routers]]\nname = \"r\"\npolicy = \"static\"\nroutes = {{ s9 = [\"ae\"] }}\n\n[[sensors]]\nnode = \"{NODE}\"\nid = \"s9\"\nchannels = 2\nwindow = 16\nstride = 16\nrouter = \"r\"\n"
    )
}

/// The node's view of the mesh, if it answers.
async fn mesh_view(
    control: &fogmesh_proto::control_client::ControlClient<tonic::transport::Channel>,
) -> Option<fogmesh_proto::MeshStatus> {
    let mut control = control.clone();
    Some(
        control
            .get_mesh(fogmesh_proto::MeshRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

fn batch(sensor: &str) -> SampleBatch {
    SampleBatch {
        samples: samples(sensor, 0..8, normal_values),
    }
}

/// Pushes with `dialer`; `Err` carries why the call did not get through.
async fn push_with(node: &TestNode, dialer: &Dialer, sensor: &str) -> Result<(), String> {
    let connected = dialer
        .channel(&node.endpoint())
        .await
        .map_err(|e| e.to_string())?;
    IngestClient::new(connected.channel)
        .push(batch(sensor))
        .await
        .map(drop)
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

#[tokio::test]
async fn callers_without_a_certificate_of_the_mesh_ca_are_refused_before_any_handler() {
    let node = TestNode::start("").await;

    // Plaintext.
    let plaintext = push_with(&node, &Dialer::new(None, None), SENSOR).await;
    assert!(plaintext.is_err(), "plaintext got through");

    // TLS that trusts the node but presents no certificate of its own.
    let ca = std::fs::read_to_string(node.pki.ca_path()).unwrap();
    let no_certificate = async {
        let channel = Endpoint::from_shared(format!("https://{}", node.endpoint()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(NODE),
            )
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        IngestClient::new(channel)
            .push(batch(SENSOR))
            .await
            .map(drop)
            .map_err(|status| status.to_string())
    }
    .await;
    assert!(
        no_certificate.is_err(),
        "a caller without a certificate got through"
    );

    // A certificate of another CA, even with the right name and role.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = TestPki::open(rogue_dir.path());
    let other_ca = push_with(&node, &rogue.sensor(), SENSOR).await;
    assert!(other_ca.is_err(), "another CA's certificate got through");

    // No handler ran: the stream accepted nothing.
    assert_eq!(node.sensor_status(SENSOR).await.accepted, 0);
    node.stop().await;
}

#[tokio::test]
async fn a_sensor_certificate_may_ingest_only_and_only_the_sensors_it_names() {
    let node = TestNode::start("").await;
    let pump_1_only = Dialer::new(Some(node.pki.tls("line-1", Role::Sensor, &[SENSOR])), None);
    push_with(&node, &pump_1_only, SENSOR)
        .await
        .expect("its own sensor is accepted");
    let refused = push_with(&node, &pump_1_only, OTHER_SENSOR)
        .await
        .unwrap_err();
    assert!(
        refused.starts_with("PermissionDenied")
            && refused.contains("line-1 (sensor)")
            && refused.contains(OTHER_SENSOR),
        "{refused}"
    );
    assert_eq!(node.sensor_status(OTHER_SENSOR).await.accepted, 0);

    // A sensor may not apply a spec; the refusal names the role and the method and is
    // counted.
    let connected = node.sensor.channel(&node.endpoint()).await.unwrap();
    let denied = fogmesh_proto::control_client::ControlClient::new(connected.channel)
        .apply(ApplyRequest {
            spec_toml: String::new(),
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "role sensor may not call /fogmesh.v1.Control/Apply"
    );
    let text = node.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "fogmesh_calls_denied_total",
            &[("role", "sensor"), ("method", "/fogmesh.v1.Control/Apply")]
        ),
        Some(1.0),
        "{text}"
    );
    // An operator may not pretend to be a sensor.
    let operator_ingest = push_with(&node, &node.operator, SENSOR).await.unwrap_err();
    assert!(
        operator_ingest.contains("role operator may not call /fogmesh.v1.Ingest/Push"),
        "{operator_ingest}"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_node_may_join_the_cluster_link_only_under_the_name_its_certificate_gives() {
    const SECRET: &str = "trust-test-secret";
    let node = mesh_node(SECRET).await;
    let key = ClusterKey::from_secret(SECRET);
    let fog_9 = node.pki.dialer("fog-9", Role::Fog);
    let impostor = link::ask_admission(&node.endpoint(), &fog_9, &key, "fog-1")
        .await
        .unwrap_err();
    assert!(
        matches!(&impostor, LinkError::Refused { reason, .. } if reason.contains("\"fog-9\"")),
        "{impostor}"
    );
    let admitted = link::ask_admission(&node.endpoint(), &fog_9, &key, "fog-9")
        .await
        .expect("its own name is admitted");
    assert_eq!(admitted, NODE);
    // Operators and sensors never get the link, whatever name they give.
    let refused = link::ask_admission(&node.endpoint(), &node.operator, &key, "operator")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("role operator may not call"),
        "{refused}"
    );
    node.stop().await;
}

/// Forged gossip: a chitchat peer that knows the mesh's public key (every gossip packet
/// carries it) but not its secret announces itself with an attacker's address and a
/// spec at version `u64::MAX`. The node drops every datagram before chitchat reads it:
/// nothing is adopted or persisted, and a later Apply still wins.
#[tokio::test]
async fn forged_gossip_is_neither_heard_nor_adopted() {
    use chitchat::transport::UdpTransport;
    use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig};
    use fogmesh_cluster::capabilities::Capabilities;
    use fogmesh_cluster::membership::{MemberCard, CARD_KEY, SPEC_KEY};
    use fogmesh_cluster::mesh_spec::StoredSpec;

    const SECRET: &str = "gossip-test-secret";
    let node = mesh_node(SECRET).await;
    let gossip_addr = node.server.grpc_addr();

    let attacker_addr: std::net::SocketAddr = ([127, 0, 0, 1], fogmesh_tests::free_port()).into();
    let card = MemberCard::new("cloud", "127.0.0.1:1".into(), &Capabilities::probe(), 0);
    let forged_spec = StoredSpec {
        version: u64::MAX,
        applied_at_us: 0,
        text: "[[experts]]\nname = \"silence\"\n".into(),
    };
    let attacker = chitchat::spawn_chitchat(
        ChitchatConfig {
            chitchat_id: ChitchatId::new("attacker", 1, attacker_addr),
            cluster_id: ClusterKey::from_secret(SECRET).as_str().to_string(),
            gossip_interval: std::time::Duration::from_millis(50),
            listen_addr: attacker_addr,
            seed_nodes: vec![gossip_addr.to_string()],
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: std::time::Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        },
        vec![
            (CARD_KEY.into(), serde_json::to_string(&card).unwrap()),
            (
                SPEC_KEY.into(),
                serde_json::to_string(&forged_spec).unwrap(),
            ),
        ],
        &UdpTransport,
    )
    .await
    .expect("the attacker gossips");

    // The barrier: the node has dropped the attacker's datagrams.
    fogmesh_tests::poll(
        "the node to drop forged gossip",
        fogmesh_tests::EVENT_TIMEOUT,
        || async {
            let text = node.metrics_text().await;
            (metric_value(&text, "fogmesh_gossip_refused_total", &[]).unwrap_or_default() >= 3.0)
                .then_some(())
        },
    )
    .await;
    let mut control = node.control().await;
    let mesh = control
        .get_mesh(fogmesh_proto::MeshRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mesh.members.len(), 1, "{:?}", mesh.members);
    assert_eq!(mesh.spec_version, 0);
    assert!(!node.dir.path().join("mesh/mesh-spec.json").exists());

    assert_eq!(apply_legitimate_spec(&control).await, 1);
    drop(attacker);
    node.stop().await;
}

#[tokio::test]
async fn a_member_gossiping_an_unreadable_spec_cannot_freeze_the_mesh() {
    use fogmesh_cluster::capabilities::Capabilities;
    use fogmesh_cluster::membership::{GossipSettings, MemberCard, Membership, SPEC_KEY};
    use fogmesh_cluster::mesh_spec::StoredSpec;

    const SECRET: &str = "member-test-secret";
    let node = mesh_node(SECRET).await;

    // A member holding the secret (its gossip is sealed) publishes a spec at the
    // largest version there is, which no node can read.
    let secret: fogmesh_trust::Secret = serde_json::from_str(&format!("{SECRET:?}")).unwrap();
    let member_addr: std::net::SocketAddr = ([127, 0, 0, 1], fogmesh_tests::free_port()).into();
    let card = MemberCard::new("cloud", "127.0.0.1:1".into(), &Capabilities::probe(), 0);
    let member = Membership::start(
        "rogue",
        1,
        GossipSettings::direct(member_addr),
        &[node.server.grpc_addr().to_string()],
        &ClusterKey::from_secret(SECRET),
        &secret,
        &card,
    )
    .await
    .expect("the member gossips");
    let unreadable = StoredSpec {
        version: u64::MAX,
        applied_at_us: 0,
        text: "[[experts]]\nname = \"silence\"\n".into(),
    };
    member
        .set(SPEC_KEY, serde_json::to_string(&unreadable).unwrap())
        .await;

    // The barrier: the node has read the spec and found it unusable.
    let control = node.control().await;
    let mesh = fogmesh_tests::poll(
        "the node to find the gossiped spec unusable",
        fogmesh_tests::EVENT_TIMEOUT,
        || async {
            mesh_view(&control)
                .await
                .filter(|mesh| mesh.last_error.contains("unusable here"))
        },
    )
    .await;
    assert_eq!(mesh.members.len(), 2, "{:?}", mesh.members);
    assert_eq!(mesh.spec_version, 0, "not adopted");
    assert!(
        !node.dir.path().join("mesh/mesh-spec.json").exists(),
        "not persisted"
    );

    // An operator's spec is numbered past what the node could read, and wins.
    assert_eq!(apply_legitimate_spec(&control).await, 1);
    fogmesh_tests::poll(
        "the applied spec to be adopted",
        fogmesh_tests::EVENT_TIMEOUT,
        || async {
            mesh_view(&control)
                .await
                .filter(|mesh| mesh.spec_version == 1)
        },
    )
    .await;
    member.shutdown().await;
    node.stop().await;
}
