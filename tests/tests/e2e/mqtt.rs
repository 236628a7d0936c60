//! MQTT ingest through a real broker (Debian's mosquitto): samples published by a
//! plant-side producer are acknowledged on the ack topic and raise the alert over
//! gRPC; malformed, oversized and bad payloads get an error ack without stopping
//! ingest; the node reconnects when the broker restarts. Over mutual TLS with
//! passwords, the node and a producer with certificates get through, and a plaintext
//! client does not.

use fogmesh_tests::*;
use serde_json::Value;

fn acked_through(sequence: u64) -> impl Fn(&Value) -> bool {
    move |ack| ack["acked_through"] == sequence
}

fn is_error(ack: &Value) -> bool {
    ack.get("error").is_some()
}

fn check_error(ack: &Value, needles: &[&str]) {
    assert_eq!(ack["sensor_id"], SENSOR, "{ack}");
    let message = ack["error"].as_str().expect("the error is text");
    for needle in needles {
        assert!(
            message.contains(needle),
            "the error should name `{needle}`: {message}"
        );
    }
}

#[tokio::test]
async fn mqtt_ingest_through_a_real_broker() {
    let port = free_port();
    let broker = Broker::start(port);
    let node = TestNode::start(&format!(
        "[[mqtt]]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"node-under-test\"\ninsecure = true\n"
    ))
    .await;
    let prefix = format!("fogmesh/{NODE}");
    let ingest_topic = format!("{prefix}/ingest/{SENSOR}");
    let mut alerts = node.watch_alerts(&[SENSOR]).await;
    let mut producer =
        MqttProducer::connect(port, "plant-producer", &format!("{prefix}/ack/{SENSOR}")).await;

    // The node may still be subscribing: the producer resends until acknowledged.
    let ack = producer
        .publish_until_acked(
            &ingest_topic,
            json_batch(&samples(SENSOR, 0..32, normal_values)),
            acked_through(31),
        )
        .await;
    assert!(ack["accepted"] == 32 || ack["duplicates"] == 32, "{ack}");

    let malformed = producer
        .publish_until_acked(
            &ingest_topic,
            b"{\"samples\": [{\"sequence\": 32,".to_vec(),
            is_error,
        )
        .await;
    check_error(&malformed, &["not a JSON sample batch"]);

    // JSON has no NaN or infinity, and a number beyond f32's range is malformed.
    let beyond_f32 = format!(
        r#"{{"samples":[{{"sequence":32,"timestamp_us":{},"values":[1e39,0.0]}}]}}"#,
        timestamp_us(32)
    );
    let out_of_range = producer
        .publish_until_acked(&ingest_topic, beyond_f32.into_bytes(), is_error)
        .await;
    check_error(&out_of_range, &["not a JSON sample batch", "out of range"]);

    let mut three_channels = samples(SENSOR, 32..34, normal_values);
    three_channels[1].values.push(0.0);
    let wrong_channels = producer
        .publish_until_acked(&ingest_topic, json_batch(&three_channels), is_error)
        .await;
    check_error(&wrong_channels, &["sample 33", "`values`", "3 channels"]);

    let mut oversized = b"{\"samples\": []}".to_vec();
    oversized.resize(MAX_MESSAGE_BYTES + 1, b' ');
    let too_large = producer
        .publish_until_acked(&ingest_topic, oversized, is_error)
        .await;
    check_error(
        &too_large,
        &["max_message_bytes", &MAX_MESSAGE_BYTES.to_string()],
    );

    // Ingest goes on: the spiked samples are accepted and raise the alert.
    producer
        .publish_until_acked(
            &ingest_topic,
            json_batch(&samples(SENSOR, 32..48, spiked_values)),
            acked_through(47),
        )
        .await;
    let alert = next_alert(&mut alerts).await;
    assert_eq!(alert.sensor_id, SENSOR);
    assert!(
        alert.window_sequence == 3 || alert.window_sequence == 4,
        "{alert:?}"
    );

    // The broker restarts on the same port: the node reconnects and re-subscribes.
    drop(broker);
    let broker = Broker::start(port);
    producer
        .publish_until_acked(
            &ingest_topic,
            json_batch(&samples(SENSOR, 48..56, normal_values)),
            acked_through(55),
        )
        .await;

    let status = node.sensor_status(SENSOR).await;
    assert_eq!((status.accepted, status.last_sequence), (56, 55));
    let text = node.metrics_text().await;
    for reason in ["malformed", "wrong_channel_count", "message_too_large"] {
        let refused = metric_value(
            &text,
            "fogmesh_ingest_rejected_total",
            &[("transport", "mqtt"), ("reason", reason)],
        );
        assert!(
            refused.is_some_and(|n| n >= 1.0),
            "no mqtt rejection counted for {reason}"
        );
    }
    node.stop().await;
    drop(broker);
}

#[tokio::test]
async fn mqtt_over_mutual_tls_with_passwords_takes_samples_and_refuses_plaintext() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::open(&dir.path().join("pki"));
    let certificate = BrokerCertificate::issue(&dir.path().join("broker"));
    let _broker = Broker::start_tls(
        port,
        &certificate,
        &pki.ca_path(),
        &[("edge-node", "node-pass"), ("producer", "producer-pass")],
    );
    std::fs::write(dir.path().join("mqtt-password"), "node-pass\n").unwrap();
    let node = TestNode::start_config(
        dir,
        &node_toml(&format!(
            "[[mqtt]]\nhost = \"127.0.0.1\"\nport = {port}\nca = \"broker/plant-ca.pem\"\nusername = \"edge-node\"\npassword_file = \"mqtt-password\"\n"
        )),
        fogmesh_actors::Annunciator::new(16),
    )
    .await;
    let prefix = format!("fogmesh/{NODE}");
    let producer_tls = fogmesh_trust::MeshTls::load(&pki.issue(
        "plant-producer",
        fogmesh_trust::Role::Sensor,
        &[],
    ))
    .unwrap();
    let mut producer = MqttProducer::connect_tls(
        port,
        "plant-producer",
        &format!("{prefix}/ack/{SENSOR}"),
        &producer_tls,
        &certificate.ca,
        ("producer", "producer-pass"),
    )
    .await;
    let ack = producer
        .publish_until_acked(
            &format!("{prefix}/ingest/{SENSOR}"),
            json_batch(&samples(SENSOR, 0..16, normal_values)),
            acked_through(15),
        )
        .await;
    assert!(ack["accepted"] == 16 || ack["duplicates"] == 16, "{ack}");
    assert_eq!(node.sensor_status(SENSOR).await.accepted, 16);

    // The TLS listener takes no plaintext client.
    let (_client, mut events) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("intruder", "127.0.0.1", port), 8);
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), events.poll())
        .await
        .expect("the broker answers a plaintext client at once");
    assert!(refused.is_err(), "a plaintext client got {refused:?}");
    node.stop().await;
}
