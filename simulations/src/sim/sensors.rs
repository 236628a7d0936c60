//! Simulated field devices: each scenario `[[sensors]]` entry replays a fogrec
//! recording into one node's sensor stream over gRPC `Ingest`, at the node's home
//! address (the device's own wire to its gateway, not a simulated link), at `speed`
//! recording seconds per simulated second, from the moment the clock starts.
//!
//! A batch that is not acknowledged (the node killed, frozen or not yet holding the
//! mesh spec that declares the sensor) is sent again, with the same sequence numbers,
//! until it is: the node drops samples it already holds and acknowledges them again,
//! so a resend never counts twice and no row is skipped. The device keeps the rows due
//! meanwhile and sends them as they are acknowledged, as a plant's store-and-forward
//! producer does.
//!
//! At the end the simulator reads every running node's counters (`Telemetry.Metrics`)
//! for the samples its streams accepted, the windows they cut, its routers scored,
//! failed or dropped, and those still waiting in its outbox ([`NodeWindows`]); the
//! `no_acked_sample_lost` check compares each device's acknowledged rows with what
//! its node accepted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fogmesh_cluster::dialer::Dialer;
use fogmesh_models::Recording;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::telemetry_client::TelemetryClient;
use fogmesh_proto::{MetricsRequest, Sample, SampleBatch};

use crate::sim::scenario::SensorPlan;

/// How long a device waits before sending an unacknowledged batch again.
const RESEND_AFTER: Duration = Duration::from_millis(250);
/// How long one push may take before the device gives up on it and resends.
const PUSH_WITHIN: Duration = Duration::from_secs(2);

/// What one device did, as it saw it.
#[derive(Debug, Default)]
pub struct DeviceCounts {
    pub rows_sent: AtomicU64,
    pub rows_acked: AtomicU64,
    pub resends: AtomicU64,
    pub last_refusal: Mutex<Option<String>>,
}

/// One device's figures in the report.
#[derive(Debug, Clone, Serialize)]
pub struct SensorSummary {
    pub id: String,
    pub node: String,
    /// Rows sent at least once.
    pub rows_sent: u64,
    /// Rows the node acknowledged (it holds them durably or has windowed them).
    pub rows_acked: u64,
    /// Batches sent again after no acknowledgement.
    pub resends: u64,
    /// The last refusal or failure a push met, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<String>,
}

impl SensorSummary {
    pub fn new(plan: &SensorPlan, counts: &DeviceCounts) -> SensorSummary {
        SensorSummary {
            id: plan.id.clone(),
            node: plan.node.clone(),
            rows_sent: counts.rows_sent.load(Ordering::Relaxed),
            rows_acked: counts.rows_acked.load(Ordering::Relaxed),
            resends: counts.resends.load(Ordering::Relaxed),
            last_refusal: counts
                .last_refusal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

/// A device ready to run: its plan, its recording and the recording columns it sends,
/// in the stream's channel order.
pub struct Device {
    pub plan: SensorPlan,
    pub recording: Arc<Recording>,
    pub columns: Vec<usize>,
}

/// Why a device cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("sensors[{index}].recording ({path}): {source}")]
    Recording {
        index: usize,
        path: String,
        #[source]
        source: Box<fogmesh_models::ModelError>,
    },
    #[error("sensors[{index}].columns: {path} has no column {column:?}")]
    Column {
        index: usize,
        path: String,
        column: String,
    },
}

impl Device {
    /// Reads the recording of `plan` (`sensors[index]`) and finds its columns.
    pub fn load(index: usize, plan: &SensorPlan) -> Result<Device, DeviceError> {
        let path = plan.recording.display().to_string();
        let recording =
            Recording::read(&plan.recording).map_err(|source| DeviceError::Recording {
                index,
                path: path.clone(),
                source: Box::new(source),
            })?;
        let columns = plan
            .columns
            .iter()
            .map(|c| {
                recording
                    .column_index(c)
                    .ok_or_else(|| DeviceError::Column {
                        index,
                        path: path.clone(),
                        column: c.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Device {
            plan: plan.clone(),
            recording: Arc::new(recording),
            columns,
        })
    }

    /// Replays the recording (from its first row, around again at its end) into the
    /// node at `address` until `stop`; the rows are due from `clock` on.
    pub async fn run(
        self,
        address: String,
        dialer: Dialer,
        clock: Instant,
        stop: CancellationToken,
        counts: Arc<DeviceCounts>,
    ) {
        let period = self.recording.header.sample_period_s / self.plan.speed;
        let rows = self.recording.rows().max(1);
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let mut client: Option<IngestClient<tonic::transport::Channel>> = None;
        let mut next = 0u64;
        loop {
            let batch_end = next + self.plan.batch_rows as u64;
            let due = clock + Duration::from_secs_f64(period * batch_end as f64);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
            }
            let batch = SampleBatch {
                samples: (next..batch_end)
                    .map(|i| {
                        let row = self.recording.row(i as usize % rows);
                        Sample {
                            sensor_id: self.plan.id.clone(),
                            sequence: i + 1,
                            timestamp_us: base_us + (period * 1e6 * i as f64) as i64,
                            values: self.columns.iter().map(|&c| row[c]).collect(),
                        }
                    })
                    .collect(),
            };
            counts
                .rows_sent
                .fetch_add(self.plan.batch_rows as u64, Ordering::Relaxed);
            loop {
                let pushed = async {
                    let mut ingest = match client.take() {
                        Some(c) => c,
                        None => IngestClient::new(
                            dialer
                                .channel(&address)
                                .await
                                .map_err(|e| e.to_string())?
                                .channel,
                        ),
                    };
                    let ack = ingest
                        .push(batch.clone())
                        .await
                        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                    Ok::<_, String>((ingest, ack.into_inner()))
                };
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    outcome = tokio::time::timeout(PUSH_WITHIN, pushed) => outcome,
                };
                match outcome {
                    Ok(Ok((ingest, ack)))
                        if ack.streams.iter().any(|s| s.acked_through >= batch_end) =>
                    {
                        client = Some(ingest);
                        counts
                            .rows_acked
                            .fetch_add(self.plan.batch_rows as u64, Ordering::Relaxed);
                        break;
                    }
                    Ok(Ok((ingest, _))) => {
                        client = Some(ingest);
                        self.refused(&counts, "acknowledged short of the batch".into());
                    }
                    Ok(Err(e)) => self.refused(&counts, e),
                    Err(_) => self.refused(&counts, format!("no answer within {PUSH_WITHIN:?}")),
                }
                counts.resends.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RESEND_AFTER) => {}
                }
            }
            next = batch_end;
        }
    }

    fn refused(&self, counts: &DeviceCounts, why: String) {
        *counts
            .last_refusal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
    }
}

/// One node's windows at the end of a run, from its own counters (since its process
/// last started: a restarted node counts afresh).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeWindows {
    pub node: String,
    /// Cut by its sensor streams.
    pub cut: u64,
    /// Scored by its routers.
    pub scored: u64,
    /// Its routers could not score them (no replica answered in time, and the like).
    pub failed: u64,
    /// Dropped from its outbox without a verdict (full, or too old).
    pub dropped: u64,
    /// Still waiting in its outbox for a verdict.
    pub waiting: u64,
    /// Samples its streams accepted, by sensor id.
    pub accepted: BTreeMap<String, u64>,
}

impl NodeWindows {
    /// Whether the node cut, scored and holds no window.
    pub fn is_idle(&self) -> bool {
        self.cut + self.scored + self.failed + self.dropped + self.waiting == 0
            && self.accepted.is_empty()
    }

    /// The figures of `node` from its Prometheus text.
    pub fn from_metrics(node: &str, text: &str) -> NodeWindows {
        let sum = |metric: &str| -> u64 {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    let name = series.split('{').next()?;
                    (name == metric).then(|| value.parse::<f64>().ok())?
                })
                .sum::<f64>() as u64
        };
        let mut accepted = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Some((name, labels)) = series.split_once('{') else {
                continue;
            };
            if name != fogmesh_actors::telemetry::SAMPLES_ACCEPTED {
                continue;
            }
            let sensor = labels
                .split_once("sensor=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(sensor, _)| sensor);
            if let (Some(sensor), Ok(value)) = (sensor, value.parse::<f64>()) {
                *accepted.entry(sensor.to_string()).or_default() += value as u64;
            }
        }
        NodeWindows {
            node: node.to_string(),
            accepted,
            cut: sum(fogmesh_actors::telemetry::WINDOWS_CUT),
            scored: sum(fogmesh_actors::telemetry::WINDOWS_ROUTED),
            failed: sum(fogmesh_actors::telemetry::ROUTING_FAILURES),
            dropped: sum(fogmesh_edge_log::OUTBOX_DROPPED),
            waiting: sum(fogmesh_edge_log::PARKED_WINDOWS),
        }
    }

    /// Reads the counters of `node` at `address`; `None` when it does not answer.
    pub async fn read(node: &str, address: String, dialer: &Dialer) -> Option<NodeWindows> {
        let read = async {
            let channel = dialer.channel(&address).await.ok()?.channel;
            let text = TelemetryClient::new(channel)
                .metrics(MetricsRequest {})
                .await
                .ok()?
                .into_inner()
                .text;
            Some(NodeWindows::from_metrics(node, &text))
        };
        tokio::time::timeout(PUSH_WITHIN, read).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_are_summed_over_labels_and_comments_skipped() {
        let text = "# TYPE fogmesh_windows_total counter\n\
                    fogmesh_windows_total{sensor=\"a\"} 10\n\
                    fogmesh_windows_total{sensor=\"b\"} 5\n\
                    fogmesh_windows_total_other 99\n\
                    fogmesh_router_windows_total{router=\"r\"} 12\n\
                    fogmesh_router_failures_total{router=\"r\",reason=\"unavailable\"} 2\n\
                    fogmesh_edge_log_parked_windows 3\n\
                    fogmesh_samples_accepted_total{sensor=\"a\"} 170\n\
                    fogmesh_samples_accepted_total{sensor=\"b\",x=\"y\"} 90\n";
        assert_eq!(
            NodeWindows::from_metrics("gw", text),
            NodeWindows {
                node: "gw".into(),
                cut: 15,
                scored: 12,
                failed: 2,
                dropped: 0,
                waiting: 3,
                accepted: [("a".to_string(), 170), ("b".to_string(), 90)].into(),
            }
        );
        assert!(NodeWindows::from_metrics("idle", "# nothing\n").is_idle());
    }
}
