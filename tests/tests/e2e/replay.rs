//! File replay from `[[replay]]`: a fogrec recording feeds a stream as the node
//! starts, its columns picked by name and in the stream's channel order.

use std::collections::BTreeMap;

use fogmesh_actors::Annunciator;
use fogmesh_models::{Recording, RecordingHeader};
use fogmesh_tests::*;

#[tokio::test]
async fn a_replayed_recording_raises_the_alert() {
    // Columns in another order than the stream's channels, plus one the stream must
    // not read: were it read, every window would be anomalous.
    let columns = ["spare", "flow", "pressure"];
    let rows = 48u64;
    let values: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let v = if r < 32 {
                normal_values(r)
            } else {
                spiked_values(r)
            };
            [10.0 * SPIKE, v[1], v[0]]
        })
        .collect();
    let header = RecordingHeader {
        source: "fogmesh tests".into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        sample_period_s: SAMPLE_PERIOD_US as f64 / 1e6,
        start_timestamp_us: START_US,
        rows,
        fault: Some(1),
        fault_onset_row: Some(32),
        seed: None,
        description: "spikes from row 32".into(),
    };
    let dir = tempfile::tempdir().expect("a temporary folder");
    Recording::new(header, values)
        .and_then(|r| r.write(&dir.path().join("plant.fogrec")))
        .expect("the recording is written");
    let replay = format!(
        "[[replay]]\nfile = \"plant.fogrec\"\nbatch_rows = 8\nstreams = [{{ sensor = \"{SENSOR}\", columns = [\"pressure\", \"flow\"] }}]\n"
    );

    let annunciator = Annunciator::new(1024);
    let mut windows = annunciator.subscribe();
    let node = TestNode::start_config(dir, &node_toml(&replay), annunciator).await;
    let mut verdicts = BTreeMap::new();
    while verdicts.len() < 5 {
        let window = tokio::time::timeout(EVENT_TIMEOUT, windows.recv())
            .await
            .expect("a scored window arrives in time")
            .expect("the test keeps up with the annunciator");
        verdicts.insert(window.window_sequence, (window.anomalous, window.start_us));
    }
    let expected: BTreeMap<u64, (bool, i64)> = (0..5u64)
        .map(|k| (k, (k >= 3, timestamp_us(k * STRIDE as u64))))
        .collect();
    assert_eq!(verdicts, expected);
    let status = node.sensor_status(SENSOR).await;
    assert_eq!((status.accepted, status.last_sequence), (rows, rows - 1));
    node.stop().await;
}
