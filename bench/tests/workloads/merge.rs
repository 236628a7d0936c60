//! `fogmesh bench merge` as the command runs it, at 1M parameters: the report has
//! every field, positive, and the merge it timed is the one a plain loop over the same
//! inputs computes, so a fast but wrong merge fails here.

use fogmesh_bench::merge::{self as bench_merge, BenchMergeOptions, BenchMethod};
use fogmesh_models::merge::Weights;

fn options(method: BenchMethod) -> BenchMergeOptions {
    BenchMergeOptions {
        params: 1_000_003,
        method,
        threads: 2,
        ..Default::default()
    }
}

fn check_report(options: &BenchMergeOptions, run: &bench_merge::BenchMerge) {
    let json = serde_json::to_value(&run.report).unwrap();
    eprintln!("{json}");
    assert_eq!(json["method"], options.method.to_string());
    assert_eq!(json["params"], options.params);
    assert_eq!(json["models"], options.model_count());
    assert_eq!(json["threads"], 2);
    for field in [
        "merge_seconds",
        "merge_gb_per_s",
        "memcpy_gb_per_s",
        "fraction_of_memcpy",
    ] {
        let value = json[field].as_f64().unwrap_or(f64::NAN);
        assert!(value > 0.0 && value.is_finite(), "{field} = {value}");
    }
    assert_eq!(run.merged.parameters(), options.params);
}

/// Compares every tensor of `merged` with `reference(name, index)`.
fn assert_matches(merged: &Weights, reference: impl Fn(&str, usize) -> f32) {
    let mut tensors = 0;
    for (name, _, values) in merged.tensors() {
        tensors += 1;
        for (j, &v) in values.iter().enumerate() {
            let expected = reference(name, j);
            assert!(
                (v - expected).abs() <= 1e-6,
                "{name}[{j}]: merged {v}, reference {expected}"
            );
        }
    }
    assert_eq!(tensors, 10);
}

#[test]
fn the_weighted_average_bench_reports_and_merges_the_plain_mean() {
    let options = options(BenchMethod::WeightedAverage);
    let run = bench_merge::run(&options).unwrap();
    check_report(&options, &run);
    let (base, models) = bench_merge::inputs(&options).unwrap();
    assert!(base.is_none());
    assert_eq!(models.len(), 4);
    assert_matches(&run.merged, |name, j| {
        models
            .iter()
            .map(|m| m.tensor(name).unwrap().1[j])
            .sum::<f32>()
            / 4.0
    });
}

#[test]
fn the_task_arithmetic_bench_adds_the_mean_delta_to_the_base() {
    let options = options(BenchMethod::TaskArithmetic);
    let run = bench_merge::run(&options).unwrap();
    check_report(&options, &run);
    let (base, models) = bench_merge::inputs(&options).unwrap();
    let base = base.expect("task arithmetic has a base");
    assert_matches(&run.merged, |name, j| {
        let b = base.tensor(name).unwrap().1[j];
        let deltas: f32 = models
            .iter()
            .map(|m| m.tensor(name).unwrap().1[j] - b)
            .sum();
        b + deltas / 4.0
    });
}

#[test]
fn the_slerp_bench_merges_two_models_and_unknown_methods_are_refused() {
    let options = options(BenchMethod::Slerp);
    let run = bench_merge::run(&options).unwrap();
    check_report(&options, &run);
    assert_eq!(run.report.models, 2);
    let err = "average".parse::<BenchMethod>().unwrap_err().to_string();
    assert!(err.contains("invalid method = average"), "{err}");
    assert_eq!("ties".parse::<BenchMethod>().unwrap(), BenchMethod::Ties);
}
