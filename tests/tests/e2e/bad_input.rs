//! Every kind of bad input over gRPC is refused with the right status and a message
//! that names the field, the value and the limit; nothing accepted before is lost; and
//! the refusals show in the metrics.

use fogmesh_proto::{AlertFilter, Sample, SampleBatch, ScoreRequest, StreamAck};
use fogmesh_tests::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Asserts that `result` is refused with `code` and a message containing every one of
/// `needles`.
fn check_refusal<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), code, "{case}: {status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{case}: the message should name `{needle}`: {}",
            status.message()
        );
    }
}

fn rejected(text: &str, transport: &str, reason: &str) -> f64 {
    metric_value(
        text,
        "fogmesh_ingest_rejected_total",
        &[("transport", transport), ("reason", reason)],
    )
    .unwrap_or_default()
}

#[tokio::test]
async fn every_bad_batch_is_refused_and_nothing_accepted_is_lost() {
    let node = TestNode::start("").await;
    let mut ingest = node.ingest().await;
    ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 0..20, normal_values),
        })
        .await
        .expect("good samples are accepted");

    let good = || samples(SENSOR, 20..24, normal_values);
    let with = |edit: fn(&mut Vec<Sample>)| {
        let mut batch = good();
        edit(&mut batch);
        batch
    };
    let backwards_to = timestamp_us(10).to_string();
    let oversized_values = MAX_MESSAGE_BYTES / 4 + 1;
    let [max_bytes, max_samples, over_max_samples, max_values, over_max_values] = [
        MAX_MESSAGE_BYTES,
        MAX_BATCH_SAMPLES,
        MAX_BATCH_SAMPLES + 1,
        MAX_VALUES_PER_SAMPLE,
        MAX_VALUES_PER_SAMPLE + 1,
    ]
    .map(|n| n.to_string());
    let cases: Vec<(&str, Vec<Sample>, Code, Vec<&str>)> = vec![
        (
            "NaN",
            with(|b| b[2].values[1] = f32::NAN),
            Code::InvalidArgument,
            vec![SENSOR, "sample 22", "values[1]", "NaN"],
        ),
        (
            "infinity",
            with(|b| b[0].values[0] = f32::INFINITY),
            Code::InvalidArgument,
            vec![SENSOR, "sample 20", "values[0]", "inf"],
        ),
        (
            "wrong channel count",
            with(|b| b[1].values.push(0.0)),
            Code::InvalidArgument,
            vec![SENSOR, "sample 21", "`values`", "3 channels", "has 2"],
        ),
        (
            "timestamp backwards",
            with(|b| b[3].timestamp_us = timestamp_us(10)),
            Code::InvalidArgument,
            vec![SENSOR, "sample 23", "timestamp_us", &backwards_to],
        ),
        (
            "unknown sensor",
            samples("no-such-sensor", 0..4, normal_values),
            Code::InvalidArgument,
            vec!["no-such-sensor"],
        ),
        (
            "unknown sensor after a good one",
            [good(), samples("no-such-sensor", 0..1, normal_values)].concat(),
            Code::InvalidArgument,
            vec!["no-such-sensor"],
        ),
        (
            "message over max_message_bytes",
            vec![Sample {
                sensor_id: SENSOR.into(),
                sequence: 20,
                timestamp_us: timestamp_us(20),
                values: vec![0.0; oversized_values],
            }],
            Code::ResourceExhausted,
            vec!["max_message_bytes", &max_bytes],
        ),
        (
            "too many samples",
            samples(SENSOR, 20..20 + MAX_BATCH_SAMPLES as u64 + 1, normal_values),
            Code::ResourceExhausted,
            vec![
                "`samples`",
                "max_batch_samples",
                &over_max_samples,
                &max_samples,
            ],
        ),
        (
            "too many values",
            with(|b| b[0].values = vec![0.0; MAX_VALUES_PER_SAMPLE + 1]),
            Code::ResourceExhausted,
            vec![
                "samples[0].values",
                "max_values_per_sample",
                &over_max_values,
                &max_values,
            ],
        ),
    ];
    for (case, batch, code, needles) in cases {
        check_refusal(
            case,
            ingest.push(SampleBatch { samples: batch }).await,
            code,
            &needles,
        );
    }

    let status = node.sensor_status(SENSOR).await;
    assert_eq!(
        (status.accepted, status.last_sequence),
        (20, 19),
        "refused batches accepted nothing and lost nothing"
    );
    // Four batches of four reached the stream and were refused there; the rest were
    // refused before reaching it.
    assert_eq!(status.rejected, 16);

    let ack = ingest
        .push(SampleBatch { samples: good() })
        .await
        .expect("a good batch is still accepted")
        .into_inner();
    assert_eq!((ack.accepted, ack.streams[0].acked_through), (4, 23));
    assert_eq!(node.sensor_status(SENSOR).await.accepted, 24);

    let text = node.metrics_text().await;
    for reason in [
        "not_finite",
        "wrong_channel_count",
        "timestamp_backwards",
        "unknown_sensor",
        "message_too_large",
        "too_many_samples",
        "too_many_values",
    ] {
        assert!(
            rejected(&text, "grpc", reason) >= 1.0,
            "no grpc rejection counted for {reason}"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn a_batch_across_streams_resent_after_a_refusal_is_not_windowed_twice() {
    let node = TestNode::start("").await;
    let mut ingest = node.ingest().await;
    let mut bad_other = samples(OTHER_SENSOR, 0..16, normal_values);
    bad_other[5].values[0] = f32::NAN;
    let refused = ingest
        .push(SampleBatch {
            samples: [samples(SENSOR, 0..16, normal_values), bad_other].concat(),
        })
        .await;
    check_refusal(
        "NaN in the second stream",
        refused,
        Code::InvalidArgument,
        &[OTHER_SENSOR, "values[0]"],
    );
    // The first stream's group was accepted before the second was refused.
    assert_eq!(node.sensor_status(SENSOR).await.accepted, 16);
    assert_eq!(node.sensor_status(OTHER_SENSOR).await.accepted, 0);

    let ack = ingest
        .push(SampleBatch {
            samples: [
                samples(SENSOR, 0..16, normal_values),
                samples(OTHER_SENSOR, 0..16, normal_values),
            ]
            .concat(),
        })
        .await
        .expect("the fixed batch is accepted")
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (16, 16));
    assert_eq!(
        ack.streams,
        vec![
            StreamAck {
                sensor_id: SENSOR.into(),
                acked_through: 15
            },
            StreamAck {
                sensor_id: OTHER_SENSOR.into(),
                acked_through: 15
            },
        ]
    );
    let first = node.sensor_status(SENSOR).await;
    assert_eq!(
        (first.accepted, first.duplicates, first.windows),
        (16, 16, 1)
    );
    node.stop().await;
}

#[tokio::test]
async fn push_stream_ends_at_the_first_bad_batch_and_keeps_earlier_acks() {
    let node = TestNode::start("").await;
    let (batches, batches_rx) = tokio::sync::mpsc::channel(4);
    let mut acks = node
        .ingest()
        .await
        .push_stream(ReceiverStream::new(batches_rx))
        .await
        .expect("the stream opens")
        .into_inner();
    batches
        .send(SampleBatch {
            samples: samples(SENSOR, 0..8, normal_values),
        })
        .await
        .expect("the request stream is open");
    let ack = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
        .await
        .expect("an ack arrives in time")
        .expect("the good batch is accepted")
        .expect("the stream stays open");
    assert_eq!(ack.streams[0].acked_through, 7);

    let mut bad = samples(SENSOR, 8..16, normal_values);
    bad[0].values[1] = f32::NEG_INFINITY;
    batches
        .send(SampleBatch { samples: bad })
        .await
        .expect("the request stream is open");
    let refused = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
        .await
        .expect("the refusal arrives in time");
    check_refusal(
        "infinity in a stream",
        refused,
        Code::InvalidArgument,
        &["sample 8", "values[1]", "-inf"],
    );
    let end = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
        .await
        .expect("the stream ends in time");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no ack follows the refusal: {end:?}"
    );
    let status = node.sensor_status(SENSOR).await;
    assert_eq!((status.accepted, status.last_sequence), (8, 7));
    node.stop().await;
}

#[tokio::test]
async fn malformed_score_requests_and_alert_filters_are_refused() {
    let node = TestNode::start("").await;
    let mut inference = node.inference().await;
    let request = |channels: u32, length: u32, values: Vec<f32>| ScoreRequest {
        router: ROUTER.into(),
        sensor_id: SENSOR.into(),
        channels,
        length,
        values,
    };
    let good = window(0, u64::MAX);
    let max_bytes = MAX_MESSAGE_BYTES.to_string();
    let mut with_nan = good.clone();
    with_nan[7] = f32::NAN;
    let cases: Vec<(&str, ScoreRequest, Code, Vec<&str>)> = vec![
        (
            "no channels",
            request(0, 16, vec![]),
            Code::InvalidArgument,
            vec!["`channels`", "= 0"],
        ),
        (
            "no length",
            request(2, 0, vec![]),
            Code::InvalidArgument,
            vec!["`length`", "= 0"],
        ),
        (
            "values do not fill the shape",
            request(2, 16, vec![0.0; 31]),
            Code::InvalidArgument,
            vec!["`values`", "31 values", "2 x 16 = 32"],
        ),
        (
            "NaN",
            request(2, 16, with_nan),
            Code::InvalidArgument,
            vec!["values[7]", "NaN"],
        ),
        (
            "shape the expert does not take",
            request(2, 8, vec![0.0; 16]),
            Code::InvalidArgument,
            vec![EXPERT, "16 values", "takes 32"],
        ),
        (
            "unknown router",
            ScoreRequest {
                router: "no-such-router".into(),
                ..request(2, 16, good.clone())
            },
            Code::NotFound,
            vec!["`router`", "no-such-router"],
        ),
        (
            "no route for the sensor",
            ScoreRequest {
                sensor_id: "no-such-sensor".into(),
                ..request(2, 16, good.clone())
            },
            Code::InvalidArgument,
            vec![ROUTER, "no-such-sensor"],
        ),
        (
            "message over max_message_bytes",
            request(
                1,
                (MAX_MESSAGE_BYTES / 4 + 1) as u32,
                vec![0.0; MAX_MESSAGE_BYTES / 4 + 1],
            ),
            Code::ResourceExhausted,
            vec!["max_message_bytes", &max_bytes],
        ),
    ];
    for (case, request, code, needles) in cases {
        check_refusal(case, inference.score(request).await, code, &needles);
    }
    let watch = inference
        .watch_alerts(AlertFilter {
            sensor_ids: vec![SENSOR.into(), "no-such-sensor".into()],
            include_normal: false,
            from_cursor: None,
        })
        .await;
    check_refusal(
        "unknown sensor in the alert filter",
        watch,
        Code::InvalidArgument,
        &["sensor_ids[1]", "no-such-sensor"],
    );
    let text = node.metrics_text().await;
    let refused = |rpc: &str, reason: &str| {
        metric_value(
            &text,
            "fogmesh_inference_rejected_total",
            &[("rpc", rpc), ("reason", reason)],
        )
        .unwrap_or_default()
    };
    assert!(refused("score", "invalid_field") >= 4.0);
    assert!(refused("score", "unknown_router") >= 1.0);
    assert!(refused("score", "no_route") >= 1.0);
    assert!(refused("watch_alerts", "invalid_field") >= 1.0);
    node.stop().await;
}

/// Regression (security): one sample numbered 2^63 made every later real reading a
/// silently dropped "duplicate", and one far-future timestamp made every later real
/// reading "go back in time". Both are refused now, and the stream goes on.
#[tokio::test]
async fn a_sequence_jump_or_a_far_future_timestamp_cannot_poison_a_stream() {
    let node = TestNode::start("").await;
    let mut ingest = node.ingest().await;
    let good = samples(SENSOR, 0..8, normal_values);
    ingest
        .push(SampleBatch {
            samples: good.clone(),
        })
        .await
        .expect("good samples are accepted");

    let mut jump = good[7].clone();
    jump.sequence = 1 << 63;
    check_refusal(
        "a sequence far past the next expected",
        ingest
            .push(SampleBatch {
                samples: vec![jump],
            })
            .await,
        Code::InvalidArgument,
        &[
            "`sequence`",
            "9223372036854775808",
            "max_sequence_gap = 1000000",
        ],
    );

    let mut ahead = samples(SENSOR, 8..9, normal_values).remove(0);
    ahead.timestamp_us = i64::MAX;
    check_refusal(
        "a timestamp far ahead of the node's clock",
        ingest
            .push(SampleBatch {
                samples: vec![ahead],
            })
            .await,
        Code::InvalidArgument,
        &[
            "`timestamp_us`",
            &i64::MAX.to_string(),
            "max_clock_skew_ms = 300000",
        ],
    );

    // The next real readings are accepted and windowed as if nothing had happened.
    let ack = ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 8..(2 * WINDOW as u64), normal_values),
        })
        .await
        .expect("the next good samples are accepted")
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (2 * WINDOW as u32 - 8, 0));
    let status = node.sensor_status(SENSOR).await;
    assert_eq!(status.last_sequence, 2 * WINDOW as u64 - 1);
    assert!(status.windows >= 2, "{status:?}");
    let text = node.metrics_text().await;
    assert_eq!(rejected(&text, "grpc", "sequence_jump"), 1.0, "{text}");
    assert_eq!(rejected(&text, "grpc", "timestamp_ahead"), 1.0, "{text}");
    node.stop().await;
}

#[tokio::test]
async fn a_flooding_sensor_is_held_to_its_rate_and_the_others_are_not() {
    let config = node_toml("").replacen(
        &format!("id = \"{SENSOR}\"\n"),
        &format!("id = \"{SENSOR}\"\nmax_rate = 40\n"),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_config(dir, &config, fogmesh_actors::Annunciator::new(16)).await;
    let mut ingest = node.ingest().await;

    // One second's worth passes at once; the next sample is over the budget.
    ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 0..40, normal_values),
        })
        .await
        .expect("a second's worth is accepted");
    check_refusal(
        "a burst past one second's worth",
        ingest
            .push(SampleBatch {
                samples: samples(SENSOR, 40..80, normal_values),
            })
            .await,
        Code::ResourceExhausted,
        &[SENSOR, "40 samples", "max_rate = 40"],
    );

    // Another sensor on the same node is not held back.
    for first in [0u64, 500] {
        ingest
            .push(SampleBatch {
                samples: samples(OTHER_SENSOR, first..first + 500, normal_values),
            })
            .await
            .expect("the other sensor's samples are accepted");
    }
    assert_eq!(node.sensor_status(OTHER_SENSOR).await.last_sequence, 999);

    // As the budget refills, the flooded sensor's next samples are accepted.
    let ack = poll("the budget to refill", EVENT_TIMEOUT, || {
        let mut ingest = ingest.clone();
        async move {
            ingest
                .push(SampleBatch {
                    samples: samples(SENSOR, 40..50, normal_values),
                })
                .await
                .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (10, 0));
    let text = node.metrics_text().await;
    assert!(rejected(&text, "grpc", "rate_exceeded") >= 1.0, "{text}");
    node.stop().await;
}
