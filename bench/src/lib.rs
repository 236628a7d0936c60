//! The benchmark workloads behind `fogmesh bench`, each printing one JSON object:
//! W1 (routing + inference) in one process (`w1`) and with its experts on a second node
//! process to price the cluster link (`w1_remote`), W1 while every expert is hot-swapped
//! (`swap`), training and inference speed against the same networks in PyTorch eager
//! (`training_speed`), merge bandwidth against memcpy (`merge`), one sensor
//! flooding a node while another keeps its pace (`flood`), and durable ingest through
//! the edge log against the same log in memory (`ingest`), and W2, federated rounds of
//! site actors (`federated`).
//!
//! Nothing here is a mock: every workload starts real [`fogmesh_actors::Node`]s (or real
//! `fogmesh node` processes) and measures them from outside, the way a load generator
//! would. Targets are checked by reading these reports, never by timed tests.

pub mod federated;
pub mod flood;
pub mod ingest;
pub mod merge;
pub mod swap;
pub mod training_speed;
pub mod w1;
pub mod w1_remote;

/// The first of a workload's numeric options that is not a positive finite number.
pub(crate) fn not_positive(options: &[(&'static str, f64)]) -> Option<(&'static str, f64)> {
    options
        .iter()
        .copied()
        .find(|(_, value)| !(value.is_finite() && *value > 0.0))
}

/// A latency histogram in microseconds, 1 µs to one minute at three significant
/// digits. Fixed bounds on purpose: hdrhistogram's auto-resizing `new` starts with a
/// range of about two milliseconds, and `saturating_record` clamps to that range
/// instead of growing it, so every longer round trip would be recorded as 2 µs.
pub(crate) fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_longer_than_two_milliseconds_are_recorded_as_they_are() {
        let mut histogram = super::latency_histogram();
        for micros in [4_500, 4_600, 4_700, 30_000_000] {
            histogram.saturating_record(micros);
        }
        let p50 = histogram.value_at_quantile(0.5);
        assert!((4_590..=4_610).contains(&p50), "p50 {p50}");
        assert!(histogram.max() >= 29_000_000, "max {}", histogram.max());
    }
}
