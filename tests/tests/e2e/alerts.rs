//! Alerts that survive their subscribers: a `WatchAlerts` subscriber away for 30 s
//! resumes from its cursor and gets every alert it missed, once and in order, exactly
//! the alerts a subscriber that never left saw; an MQTT subscriber of the node's alert
//! topics gets the same alerts; a subscriber that fell behind the journal's retention
//! is told what it missed.

use std::time::Duration;

use fogmesh_proto::{Alert, SampleBatch};
use fogmesh_tests::*;

/// How long the first subscriber stays away: the 30 s.
const AWAY: Duration = Duration::from_secs(30);

/// Pushes `count` windows' worth of spiked samples from `first`: one alert per window.
async fn spike(node: &TestNode, first: u64, count: u64) -> u64 {
    let last = first + count * STRIDE as u64;
    node.ingest()
        .await
        .push(SampleBatch {
            samples: samples(SENSOR, first..last, spiked_values),
        })
        .await
        .expect("the spikes are accepted");
    last
}

async fn alerts_until(stream: &mut tonic::Streaming<Alert>, cursor: u64) -> Vec<Alert> {
    let mut alerts = Vec::new();
    while alerts.last().is_none_or(|a: &Alert| a.cursor < cursor) {
        alerts.push(next_alert(stream).await);
    }
    alerts
}

fn cursors(alerts: &[Alert]) -> Vec<u64> {
    alerts.iter().map(|a| a.cursor).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_away_for_30_s_resumes_from_its_cursor_and_mqtt_gets_the_same_alerts() {
    let port = free_port();
    let _broker = Broker::start(port);
    let node = TestNode::start_config(
        tempfile::tempdir().expect("a temporary folder"),
        &node_toml_with(
            "edge_log = \"edge-log\"",
            &format!("[[mqtt]]\nhost = \"127.0.0.1\"\nport = {port}\ninsecure = true\n"),
        ),
        fogmesh_actors::Annunciator::new(1024),
    )
    .await;
    let mut scada = MqttProducer::connect(port, "scada", &format!("fogmesh/{NODE}/alerts/+")).await;
    // The reference: a subscriber that never leaves.
    let mut staying = node.watch_alerts_from(&[], Some(1)).await;
    let mut leaving = node.watch_alerts_from(&[], Some(1)).await;

    let mut next = spike(&node, 0, 4).await;
    let before = next_alert(&mut leaving).await;
    assert!(before.cursor >= 1 && before.gap.is_none(), "{before:?}");
    drop(leaving);

    // Alerts keep coming while it is away.
    let away = tokio::time::Instant::now();
    while away.elapsed() < AWAY {
        next = spike(&node, next, 2).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let reference = {
        // Everything the staying subscriber has seen once the spikes are scored.
        let mut seen = alerts_until(&mut staying, before.cursor).await;
        let windows = (next - WINDOW as u64) / STRIDE as u64 + 1;
        while seen.last().is_none_or(|a| a.window_sequence + 1 < windows) {
            seen.push(next_alert(&mut staying).await);
        }
        seen
    };
    let last_cursor = reference.last().expect("alerts").cursor;

    let mut resumed = node.watch_alerts_from(&[], Some(before.cursor + 1)).await;
    let missed = alerts_until(&mut resumed, last_cursor).await;
    let mut whole = vec![before];
    whole.extend(missed);
    assert_eq!(
        cursors(&whole),
        cursors(&reference),
        "the resumed subscriber saw every alert once, in order"
    );
    assert_eq!(whole, reference);
    assert!(whole
        .windows(2)
        .all(|w| w[0].window_sequence < w[1].window_sequence));

    // The MQTT subscriber: the same alerts (at least once: duplicates by cursor allowed).
    let mut over_mqtt: Vec<u64> = Vec::new();
    while over_mqtt.last().is_none_or(|c| *c < last_cursor) {
        let alert = scada
            .next_ack(EVENT_TIMEOUT)
            .await
            .expect("an alert over MQTT");
        assert_eq!(alert["sensor_id"], SENSOR, "{alert}");
        assert_eq!(alert["anomalous"], true, "{alert}");
        let cursor = alert["cursor"].as_u64().expect("a cursor");
        if over_mqtt.last() != Some(&cursor) {
            over_mqtt.push(cursor);
        }
    }
    assert_eq!(
        over_mqtt,
        cursors(&reference),
        "MQTT got the same alerts in order"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_subscriber_behind_the_retention_is_told_what_it_missed() {
    let node = TestNode::start_config(
        tempfile::tempdir().expect("a temporary folder"),
        &node_toml_with("alerts = { retention = 3 }", ""),
        fogmesh_actors::Annunciator::new(1024),
    )
    .await;
    let mut live = node.watch_alerts(&[]).await;
    // 8 windows, each spiked: 8 alerts, of which the journal keeps the last 3.
    let last = spike(&node, 0, 9).await;
    let windows = (last - WINDOW as u64) / STRIDE as u64 + 1;
    // A subscriber may itself fall behind a retention this short: it sees a marker.
    let newest = loop {
        let alert = next_alert(&mut live).await;
        if alert.gap.is_none() && alert.window_sequence + 1 == windows {
            break alert.cursor;
        }
    };
    assert_eq!(newest, windows, "one alert per window");

    let mut late = node.watch_alerts_from(&[], Some(1)).await;
    let gap = next_alert(&mut late).await;
    let marker = gap.gap.expect("a gap marker first");
    assert_eq!(
        (marker.first_missed, marker.last_missed),
        (1, newest - 3),
        "{gap:?}"
    );
    let kept = alerts_until(&mut late, newest).await;
    assert_eq!(cursors(&kept), (newest - 2..=newest).collect::<Vec<_>>());
    node.stop().await;
}
