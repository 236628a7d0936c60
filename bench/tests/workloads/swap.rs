//! `fogmesh bench swap` in small: W1's load through a node while its experts are
//! hot-swapped several times; every request is answered and every swap installs.
//! (Latency is the benchmark's business, not this test's.)

use std::time::Duration;

use fogmesh_bench::swap::{self as bench_swap, BenchSwapOptions};
use fogmesh_bench::w1::W1Options;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_fail_no_request() {
    let options = BenchSwapOptions {
        load: W1Options {
            seconds: 3.0,
            warmup_seconds: 0.5,
            inflight: 32,
            ..W1Options::default()
        },
        swap_every: Duration::from_millis(400),
        versions: 3,
    };
    let report = bench_swap::run(&options).await.expect("the benchmark runs");
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert_eq!(report.failed_requests, 0);
    assert_eq!(report.failed_swaps, 0);
    // Rounds every 400 ms within 3 s, 4 experts each.
    assert!(report.swaps >= 4 * 4, "{} swaps", report.swaps);
    assert!(report.steady_windows_per_s > 0.0 && report.swap_windows_per_s > 0.0);
}
