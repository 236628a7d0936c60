//! The per-method math: the merged buffer computed from aligned input buffers in one
//! pass over the output, in cache-sized blocks spread over scoped threads.
//!
//! Every kernel works on one block of the output at a time (a weighted sum, the deltas
//! from the base with DARE's drops, TIES's trimmed and sign-elected mean, SLERP's two
//! coefficients per tensor), so each block is computed and checked finite while it is
//! still in cache. What needs the whole model first (TIES's magnitude threshold, SLERP's
//! angles) is a streaming pre-pass over the same parts. The result never depends on the
//! number of threads: DARE's drops are keyed by block, not drawn in order.

use std::ops::Range;
use std::thread;

use super::weights::{check_labelled, Weights};
use super::{MergeError, MergeMethod};
use crate::rng::SplitMix64;

/// Elements per block: one output block (8 KiB) stays in L1 while each input streams
/// through it once, and TIES's four per-block accumulators still fit in L2.
const BLOCK: usize = 2048;

/// Below this many elements per thread, spawning costs more than it saves.
const MIN_PER_THREAD: usize = 1 << 16;

/// Above this |cos| the two tensors are taken as colinear and SLERP interpolates
/// linearly, as mergekit and the original SLERP-merge script do: sin θ is too small to
/// divide by.
const COLINEAR: f64 = 0.9995;

/// The threads [`merge`] uses: every core the process may run on.
pub fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Merges `models` (and `base`, for the methods that need one) with [`default_threads`].
pub fn merge(
    method: &MergeMethod,
    base: Option<&Weights>,
    models: &[&Weights],
) -> Result<Weights, MergeError> {
    merge_with_threads(method, base, models, default_threads())
}

/// [`merge`] on at most `threads` threads (a fog node may keep cores for its experts).
/// The result does not depend on the thread count. Nothing is computed unless the
/// parameters are valid and every input is compatible with the others.
pub fn merge_with_threads(
    method: &MergeMethod,
    base: Option<&Weights>,
    models: &[&Weights],
    threads: usize,
) -> Result<Weights, MergeError> {
    let mut out = Weights {
        tensors: Vec::new(),
        values: Vec::new(),
    };
    merge_into(method, base, models, threads, &mut out)?;
    Ok(out)
}

/// [`merge_with_threads`] into `out`, reusing its buffer when it already holds as many
/// parameters: a merger that runs round after round skips the page faults of a fresh
/// buffer, which add over half to the time of averaging four 100 MB models. On error
/// `out` is left empty (no tensors), never half merged.
pub fn merge_into(
    method: &MergeMethod,
    base: Option<&Weights>,
    models: &[&Weights],
    threads: usize,
    out: &mut Weights,
) -> Result<(), MergeError> {
    match merge_values(method, base, models, threads, &mut out.values) {
        Ok(layout) => {
            out.tensors.clone_from(&layout.tensors);
            Ok(())
        }
        Err(err) => {
            out.tensors.clear();
            out.values.clear();
            Err(err)
        }
    }
}

/// Checks, then merges into `values`; returns the input whose tensor layout the merged
/// values follow.
fn merge_values<'w>(
    method: &MergeMethod,
    base: Option<&'w Weights>,
    models: &[&'w Weights],
    threads: usize,
    values: &mut Vec<f32>,
) -> Result<&'w Weights, MergeError> {
    method.validate(base.is_some(), models.len())?;
    let labelled: Vec<(String, &Weights)> = base
        .map(|b| ("the base".to_string(), b))
        .into_iter()
        .chain(
            models
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("model {i}"), *m)),
        )
        .collect();
    check_labelled(&labelled)?;
    let layout = labelled[0].1;
    let inputs: Vec<&[f32]> = models.iter().map(|m| m.values.as_slice()).collect();
    let base_values = base.map_or(&[][..], |b| b.values.as_slice());
    let threads = threads.max(1);
    if values.len() != layout.values.len() {
        // Zeroed pages from the allocator: no pass over the buffer before the merge's.
        *values = vec![0.0; layout.values.len()];
    }
    let first_bad = match method {
        MergeMethod::WeightedAverage { weights } => {
            let sum: f64 = weights.iter().sum();
            let weights: Vec<f32> = weights.iter().map(|w| (w / sum) as f32).collect();
            fill(values, threads, &|start, block| {
                weighted_block(&inputs, &weights, start, block)
            })
        }
        MergeMethod::TaskArithmetic { scale } => {
            let scale = *scale as f32;
            fill(values, threads, &|start, block| {
                delta_block(base_values, &inputs, None, scale, start, block)
            })
        }
        MergeMethod::Dare {
            drop_rate,
            seed,
            scale,
        } => {
            let dropout = (*drop_rate > 0.0).then(|| Dropout::new(*drop_rate, *seed));
            let scale = *scale as f32;
            fill(values, threads, &|start, block| {
                delta_block(base_values, &inputs, dropout.as_ref(), scale, start, block)
            })
        }
        MergeMethod::Ties { density, scale } => {
            let n = base_values.len();
            let keep = ((density * n as f64).round() as usize).clamp(1, n.max(1));
            let thresholds: Vec<f32> = inputs
                .iter()
                .map(|m| {
                    if keep >= n {
                        0.0
                    } else {
                        kth_largest_delta(m, base_values, keep, threads)
                    }
                })
                .collect();
            let scale = *scale as f32;
            fill(values, threads, &|start, block| {
                ties_block(base_values, &inputs, &thresholds, scale, start, block)
            })
        }
        MergeMethod::Slerp { t } => {
            let (a, b) = (inputs[0], inputs[1]);
            let coefficients: Vec<(f32, f32)> = layout
                .tensors
                .iter()
                .map(|e| {
                    let range = e.start..e.end;
                    let sums = map_parts(range.len(), threads, &|part| {
                        let part = part.start + range.start..part.end + range.start;
                        dot_products(&a[part.clone()], &b[part])
                    });
                    let [aa, bb, ab] = sums.iter().fold([0.0; 3], |acc, s| {
                        [acc[0] + s[0], acc[1] + s[1], acc[2] + s[2]]
                    });
                    slerp_coefficients(aa, bb, ab, *t)
                })
                .collect();
            fill(values, threads, &|start, block| {
                let end = start + block.len();
                let mut at = start;
                while at < end {
                    let k = layout.tensor_at(at);
                    let stop = layout.tensors[k].end.min(end);
                    let (s0, s1) = coefficients[k];
                    for ((o, &x), &y) in block[at - start..stop - start]
                        .iter_mut()
                        .zip(&a[at..stop])
                        .zip(&b[at..stop])
                    {
                        *o = s0 * x + s1 * y;
                    }
                    at = stop;
                }
            })
        }
    };
    if let Some(at) = first_bad {
        let entry = &layout.tensors[layout.tensor_at(at)];
        return Err(MergeError::NonFiniteResult {
            name: entry.name.clone(),
            index: at - entry.start,
        });
    }
    Ok(layout)
}

fn weighted_block<'a>(inputs: &[&'a [f32]], weights: &[f32], start: usize, out: &mut [f32]) {
    let range = start..start + out.len();
    let at = |input: &&'a [f32]| -> &'a [f32] { &input[range.clone()] };
    for (g, (group, w)) in inputs.chunks(4).zip(weights.chunks(4)).enumerate() {
        let first = g == 0;
        match (group, w) {
            ([a, b, c, d], &[wa, wb, wc, wd]) => {
                weighted_group(out, [at(a), at(b), at(c), at(d)], [wa, wb, wc, wd], first)
            }
            ([a, b, c], &[wa, wb, wc]) => {
                weighted_group(out, [at(a), at(b), at(c)], [wa, wb, wc], first)
            }
            ([a, b], &[wa, wb]) => weighted_group(out, [at(a), at(b)], [wa, wb], first),
            ([a], &[wa]) => weighted_group(out, [at(a)], [wa], first),
            // chunks(4) of equally long slices yields one to four of each.
            _ => {}
        }
    }
}

/// `out = Σₖ wₖ·inputₖ` (or `+=` after the `first` group). Inputs come in groups of up
/// to four, K fixed, so that one loop streams them all at once (the prefetcher follows
/// four streams better than it restarts one per input) and the sum over k unrolls.
fn weighted_group<const K: usize>(
    out: &mut [f32],
    inputs: [&[f32]; K],
    weights: [f32; K],
    first: bool,
) {
    let inputs = inputs.map(|input| &input[..out.len()]);
    for (j, o) in out.iter_mut().enumerate() {
        let mut sum = 0.0;
        for k in 0..K {
            sum += weights[k] * inputs[k][j];
        }
        *o = if first { sum } else { *o + sum };
    }
}

/// `out = Σₖ (inputₖ − base)` (or `+=` after the `first` group), as [`weighted_group`].
fn delta_group<const K: usize>(out: &mut [f32], base: &[f32], inputs: [&[f32]; K], first: bool) {
    let base = &base[..out.len()];
    let inputs = inputs.map(|input| &input[..out.len()]);
    for (j, o) in out.iter_mut().enumerate() {
        let mut sum = 0.0;
        for input in &inputs {
            sum += input[j] - base[j];
        }
        *o = if first { sum } else { *o + sum };
    }
}

/// DARE's drops: element `j` of model `i` survives when the `j % BLOCK`-th draw of a
/// stream keyed by (seed, i, j / BLOCK) reaches `cutoff`. Keying by block rather than
/// drawing one stream in order lets blocks run on any thread in any order.
struct Dropout {
    seed: u64,
    cutoff: u64,
    rescale: f32,
}

impl Dropout {
    fn new(drop_rate: f64, seed: u64) -> Self {
        Dropout {
            seed,
            // drop_rate < 1, so the product is below 2⁶⁴ and the cast exact enough.
            cutoff: (drop_rate * 18_446_744_073_709_551_616.0) as u64,
            rescale: (1.0 / (1.0 - drop_rate)) as f32,
        }
    }

    /// Distinct (model, block) pairs give distinct keys for models < 2²⁴ and blocks
    /// < 2⁴⁰ (2⁵¹ parameters), and SplitMix64 scatters neighbouring keys.
    fn stream(&self, model: usize, block: usize) -> SplitMix64 {
        let key = self.seed ^ ((model as u64) << 40) ^ block as u64;
        SplitMix64::new(SplitMix64::new(key).next_u64())
    }
}

/// `base + scale·Σ kept(modelᵢ − base)`: task arithmetic, or DARE with `dropout`.
fn delta_block<'a>(
    base: &[f32],
    inputs: &[&'a [f32]],
    dropout: Option<&Dropout>,
    scale: f32,
    start: usize,
    out: &mut [f32],
) {
    let range = start..start + out.len();
    let base = &base[range.clone()];
    let at = |input: &&'a [f32]| -> &'a [f32] { &input[range.clone()] };
    match dropout {
        None => {
            for (g, group) in inputs.chunks(4).enumerate() {
                let first = g == 0;
                match group {
                    [a, b, c, d] => delta_group(out, base, [at(a), at(b), at(c), at(d)], first),
                    [a, b, c] => delta_group(out, base, [at(a), at(b), at(c)], first),
                    [a, b] => delta_group(out, base, [at(a), at(b)], first),
                    [a] => delta_group(out, base, [at(a)], first),
                    // chunks(4) yields one to four.
                    _ => {}
                }
            }
        }
        Some(dropout) => {
            out.fill(0.0);
            for (i, input) in inputs.iter().enumerate() {
                let mut rng = dropout.stream(i, start / BLOCK);
                for ((o, &x), &b) in out.iter_mut().zip(at(input)).zip(base) {
                    if rng.next_u64() >= dropout.cutoff {
                        *o += (x - b) * dropout.rescale;
                    }
                }
            }
        }
    }
    for (o, &b) in out.iter_mut().zip(base) {
        *o = b + scale * *o;
    }
}

fn ties_block(
    base: &[f32],
    inputs: &[&[f32]],
    thresholds: &[f32],
    scale: f32,
    start: usize,
    out: &mut [f32],
) {
    let range = start..start + out.len();
    let base = &base[range.clone()];
    let len = out.len();
    let mut positive = [0.0f32; BLOCK];
    let mut positive_count = [0.0f32; BLOCK];
    let mut negative = [0.0f32; BLOCK];
    let mut negative_count = [0.0f32; BLOCK];
    for (input, &threshold) in inputs.iter().zip(thresholds) {
        for ((((&x, &b), p), pn), (n, nn)) in input[range.clone()]
            .iter()
            .zip(base)
            .zip(&mut positive[..len])
            .zip(&mut positive_count[..len])
            .zip(negative[..len].iter_mut().zip(&mut negative_count[..len]))
        {
            let d = x - b;
            let kept = if d.abs() >= threshold { d } else { 0.0 };
            *p += kept.max(0.0);
            *pn += f32::from(u8::from(kept > 0.0));
            *n += kept.min(0.0);
            *nn += f32::from(u8::from(kept < 0.0));
        }
    }
    for ((((o, &b), &p), &pn), (&n, &nn)) in out
        .iter_mut()
        .zip(base)
        .zip(&positive[..len])
        .zip(&positive_count[..len])
        .zip(negative[..len].iter().zip(&negative_count[..len]))
    {
        let elected = p + n;
        let mean = if elected > 0.0 {
            p / pn
        } else if elected < 0.0 {
            n / nn
        } else {
            0.0
        };
        *o = b + scale * mean;
    }
}

/// The `keep`-th largest |model − base| (1 ≤ keep ≤ n), by two 16-bit radix passes over
/// the magnitudes' bit patterns (which order like the magnitudes): exact, two streaming
/// reads, and no copy of the deltas to sort.
fn kth_largest_delta(model: &[f32], base: &[f32], keep: usize, threads: usize) -> f32 {
    let high = delta_histogram(model, base, threads, &|bits| Some((bits >> 16) as usize));
    let (high_bucket, rank) = descend(&high, keep as u64);
    let low = delta_histogram(model, base, threads, &|bits| {
        (bits >> 16 == high_bucket).then_some((bits & 0xffff) as usize)
    });
    let (low_bucket, _) = descend(&low, rank);
    f32::from_bits(high_bucket << 16 | low_bucket)
}

fn delta_histogram(
    model: &[f32],
    base: &[f32],
    threads: usize,
    bucket: &(impl Fn(u32) -> Option<usize> + Sync),
) -> Vec<u64> {
    let parts = map_parts(model.len(), threads, &|range| {
        // Four counters per bucket, one per lane: deltas cluster, so neighbours often
        // share a bucket, and one counter would make each increment wait on the last.
        let mut counts = vec![[0u64; 4]; 1 << 16];
        let (model, base) = (&model[range.clone()], &base[range]);
        let (model_chunks, base_chunks) = (model.chunks_exact(4), base.chunks_exact(4));
        let tail = model_chunks.remainder().iter().zip(base_chunks.remainder());
        for (x, b) in model_chunks.zip(base_chunks) {
            for lane in 0..4 {
                if let Some(k) = bucket((x[lane] - b[lane]).abs().to_bits()) {
                    counts[k][lane] += 1;
                }
            }
        }
        for (&x, &b) in tail {
            if let Some(k) = bucket((x - b).abs().to_bits()) {
                counts[k][0] += 1;
            }
        }
        counts
            .iter()
            .map(|lanes| lanes.iter().sum())
            .collect::<Vec<u64>>()
    });
    parts
        .into_iter()
        .reduce(|mut total, part| {
            total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
            total
        })
        .unwrap_or_default()
}

/// Walks `counts` from the largest bucket down to the one holding the `rank`-th largest
/// value; returns that bucket and the value's rank within it.
fn descend(counts: &[u64], rank: u64) -> (u32, u64) {
    let mut remaining = rank;
    for (k, &count) in counts.iter().enumerate().rev() {
        if count >= remaining {
            return (k as u32, remaining);
        }
        remaining -= count;
    }
    (0, remaining)
}

/// `[a·a, b·b, a·b]`, accumulated in eight f64 lanes so the loop vectorises and a
/// tensor of millions of values loses no precision.
fn dot_products(a: &[f32], b: &[f32]) -> [f64; 3] {
    let mut lanes = [[0.0f64; 8]; 3];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a_chunks.remainder().iter().zip(b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for k in 0..8 {
            let (x, y) = (f64::from(x[k]), f64::from(y[k]));
            lanes[0][k] += x * x;
            lanes[1][k] += y * y;
            lanes[2][k] += x * y;
        }
    }
    for (k, (&x, &y)) in tail.enumerate() {
        let (x, y) = (f64::from(x), f64::from(y));
        lanes[0][k] += x * x;
        lanes[1][k] += y * y;
        lanes[2][k] += x * y;
    }
    lanes.map(|lane| lane.iter().sum())
}

/// `(s0, s1)` with `slerp = s0·a + s1·b`. At t = 0 and t = 1 they are exactly (1, 0)
/// and (0, 1), so the endpoints come back bit for bit.
fn slerp_coefficients(aa: f64, bb: f64, ab: f64, t: f64) -> (f32, f32) {
    let linear = ((1.0 - t) as f32, t as f32);
    if aa == 0.0 || bb == 0.0 {
        return linear;
    }
    let cos = (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0);
    if cos.abs() > COLINEAR {
        return linear;
    }
    let theta = cos.acos();
    let sin = theta.sin();
    (
        (((1.0 - t) * theta).sin() / sin) as f32,
        ((t * theta).sin() / sin) as f32,
    )
}

/// Splits `0..n` into at most `threads` block-aligned ranges, fewer when there is too
/// little work to share.
fn parts(n: usize, threads: usize) -> Vec<Range<usize>> {
    let count = threads.clamp(1, n.div_ceil(MIN_PER_THREAD).max(1));
    let per = n.div_ceil(count).div_ceil(BLOCK) * BLOCK;
    (0..count)
        .map(|k| (k * per).min(n)..((k + 1) * per).min(n))
        .filter(|range| !range.is_empty())
        .collect()
}

/// Runs `job` on each of [`parts`]`(n, threads)`, the first on the calling thread;
/// results in range order.
fn map_parts<R: Send>(
    n: usize,
    threads: usize,
    job: &(dyn Fn(Range<usize>) -> R + Sync),
) -> Vec<R> {
    let mut ranges = parts(n, threads).into_iter();
    let first = ranges.next();
    thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .map(|range| scope.spawn(move || job(range)))
            .collect();
        let mut results: Vec<R> = first.map(job).into_iter().collect();
        for handle in handles {
            results.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        results
    })
}

/// Computes `out` block by block with `kernel(start, block)` over [`parts`], and checks
/// each block while it is still in cache: returns the first non-finite position.
fn fill(
    out: &mut [f32],
    threads: usize,
    kernel: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Option<usize> {
    let mut pieces = Vec::new();
    let mut rest = out;
    for range in parts(rest.len(), threads) {
        let (piece, tail) = rest.split_at_mut(range.len());
        pieces.push((range.start, piece));
        rest = tail;
    }
    let mut pieces = pieces.into_iter();
    let first = pieces.next();
    thread::scope(|scope| {
        let handles: Vec<_> = pieces
            .map(|(start, piece)| scope.spawn(move || fill_piece(start, piece, kernel)))
            .collect();
        let mut first_bad = first.and_then(|(start, piece)| fill_piece(start, piece, kernel));
        for handle in handles {
            let bad = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            first_bad = first_bad.or(bad);
        }
        first_bad
    })
}

fn fill_piece(
    start: usize,
    piece: &mut [f32],
    kernel: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Option<usize> {
    for (k, block) in piece.chunks_mut(BLOCK).enumerate() {
        let at = start + k * BLOCK;
        kernel(at, block);
        // A fold without early exit vectorises; the slow search runs only on failure.
        if block.iter().fold(false, |bad, v| bad | !v.is_finite()) {
            return block.iter().position(|v| !v.is_finite()).map(|j| at + j);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::fixtures::{assert_close, family, one, weights, with_values};
    use proptest::prelude::*;

    #[test]
    fn weighted_average_by_hand() {
        let a = weights(&[("b", &[2], &[1.0, 2.0]), ("a", &[1], &[8.0])]);
        let b = weights(&[("a", &[1], &[0.0]), ("b", &[2], &[5.0, -2.0])]);
        let method = MergeMethod::WeightedAverage {
            weights: vec![1.0, 3.0],
        };
        let merged = merge(&method, None, &[&a, &b]).unwrap();
        // Tensors are laid out in name order: a, then b.
        assert_close(merged.values(), &[2.0, 4.0, -1.0], 1e-7);
        assert_eq!(merged.tensor("b").unwrap().0, &[2]);
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let base = one(&[1.0, 1.0]);
        let method = MergeMethod::TaskArithmetic { scale: 0.5 };
        let merged = merge(
            &method,
            Some(&base),
            &[&one(&[2.0, 0.0]), &one(&[3.0, 1.0])],
        )
        .unwrap();
        // Deltas (1, -1) and (2, 0) sum to (3, -1); half of that on the base.
        assert_close(merged.values(), &[2.5, 0.5], 1e-7);
    }

    /// Deltas, one row per model, over two tensors (x = first two, y = last two):
    ///   model 0: 0.5, -1.0 | 0.1, 2.0  → keeps -1.0, 2.0
    ///   model 1: 1.5,  1.2 | -0.3, 1.0 → keeps 1.5, 1.2 (trimming is over the whole
    ///                                     model: per tensor it would keep 1.0 in y)
    ///   model 2: -0.4, -0.6 | 0.05, 3.0 → keeps -0.6, 3.0
    /// Kept sums: 1.5, -0.4, 0, 5 → signs +, -, none, +. Means of the agreeing kept
    /// values: 1.5, (-1.0 - 0.6) / 2 = -0.8 (1.2 disagrees), 0, (2 + 3) / 2 = 2.5.
    /// Base 1 everywhere, scale 0.5: 1.75, 0.6, 1.0, 2.25.
    #[test]
    fn ties_by_hand() {
        let model = |x: [f32; 2], y: [f32; 2]| weights(&[("x", &[2], &x), ("y", &[2, 1], &y)]);
        let base = model([1.0, 1.0], [1.0, 1.0]);
        let models = [
            model([1.5, 0.0], [1.1, 3.0]),
            model([2.5, 2.2], [0.7, 2.0]),
            model([0.6, 0.4], [1.05, 4.0]),
        ];
        let refs: Vec<&Weights> = models.iter().collect();
        let method = MergeMethod::Ties {
            density: 0.5,
            scale: 0.5,
        };
        let merged = merge(&method, Some(&base), &refs).unwrap();
        assert_close(merged.values(), &[1.75, 0.6, 1.0, 2.25], 1e-6);
    }

    #[test]
    fn ties_threshold_is_the_kth_largest_magnitude_exactly() {
        let base = [0.5f32, -2.0, 0.0, 3.0, 1.0, 0.25, -7.0];
        let model = [0.5f32, -1.0, -4.0, 3.5, 1.0, -0.75, 1.0];
        // |model - base| = 0, 1, 4, 0.5, 0, 1, 8 → sorted down: 8, 4, 1, 1, 0.5, 0, 0.
        for (keep, expected) in [(1, 8.0), (2, 4.0), (3, 1.0), (4, 1.0), (5, 0.5), (6, 0.0)] {
            assert_eq!(
                kth_largest_delta(&model, &base, keep, 2),
                expected,
                "keep {keep}"
            );
        }
    }

    #[test]
    fn dare_drops_and_rescales_each_delta_on_its_own() {
        let n = 20_000;
        let base = one(&vec![1.0; n]);
        let model = one(&vec![2.0; n]);
        let method = |seed| MergeMethod::Dare {
            drop_rate: 0.25,
            seed,
            scale: 1.0,
        };
        let merged = merge(&method(7), Some(&base), &[&model]).unwrap();
        // Each delta of 1 is dropped (base 1 stays) or kept as 1 / 0.75 (1 + 4/3).
        let dropped = merged.values().iter().filter(|&&v| v == 1.0).count();
        let kept = merged
            .values()
            .iter()
            .filter(|&&v| (v - (1.0 + 4.0 / 3.0)).abs() < 1e-6)
            .count();
        assert_eq!(dropped + kept, n);
        // Binomial(20000, 0.25): standard deviation 61, so ±500 is eight of them.
        assert!((4_500..=5_500).contains(&dropped), "{dropped} dropped");
        let mean_delta = merged
            .values()
            .iter()
            .map(|v| f64::from(v - 1.0))
            .sum::<f64>()
            / n as f64;
        assert!((mean_delta - 1.0).abs() < 0.03, "mean delta {mean_delta}");
        assert_eq!(merge(&method(7), Some(&base), &[&model]).unwrap(), merged);
        assert_ne!(merge(&method(8), Some(&base), &[&model]).unwrap(), merged);
        // Two models drop independently: some elements keep one delta, some both.
        let twice = merge(&method(7), Some(&base), &[&model, &model]).unwrap();
        let levels = |v: f32| [1.0, 1.0 + 4.0 / 3.0, 1.0 + 8.0 / 3.0].map(|l| (v - l).abs() < 1e-6);
        assert!(twice
            .values()
            .iter()
            .all(|&v| levels(v).iter().any(|&hit| hit)));
        assert!(twice.values().iter().any(|&v| levels(v)[1]));
        assert!(twice.values().iter().any(|&v| levels(v)[2]));
    }

    #[test]
    fn slerp_by_hand() {
        let orthogonal = [one(&[2.0, 0.0]), one(&[0.0, 2.0])];
        let merged = merge(
            &MergeMethod::Slerp { t: 1.0 / 3.0 },
            None,
            &[&orthogonal[0], &orthogonal[1]],
        )
        .unwrap();
        // θ = π/2: s0 = sin(π/3) = 0.8660254, s1 = sin(π/6) = 0.5.
        assert_close(merged.values(), &[1.732_050_8, 1.0], 1e-6);
        // Colinear tensors are interpolated linearly.
        let merged = merge(
            &MergeMethod::Slerp { t: 0.25 },
            None,
            &[&one(&[1.0, 2.0]), &one(&[2.0, 4.0])],
        )
        .unwrap();
        assert_close(merged.values(), &[1.25, 2.5], 1e-7);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let n = 3 * MIN_PER_THREAD + 123;
        let mut rng = SplitMix64::new(5);
        let mut model = |_| {
            let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            weights(&[
                ("big", &[n - 10], &values[..n - 10]),
                ("small", &[10], &values[n - 10..]),
            ])
        };
        let models: Vec<Weights> = (0..4).map(&mut model).collect();
        let refs: Vec<&Weights> = models[1..].iter().collect();
        for method in [
            MergeMethod::WeightedAverage {
                weights: vec![1.0, 2.0, 3.0],
            },
            MergeMethod::TaskArithmetic { scale: 0.7 },
            MergeMethod::Ties {
                density: 0.3,
                scale: 1.0,
            },
            MergeMethod::Dare {
                drop_rate: 0.5,
                seed: 3,
                scale: 1.0,
            },
            MergeMethod::Slerp { t: 0.3 },
        ] {
            let (base, refs) = match &method {
                MergeMethod::Slerp { .. } => (None, &refs[..2]),
                m if m.needs_base() => (Some(&models[0]), &refs[..]),
                _ => (None, &refs[..]),
            };
            let one_thread = merge_with_threads(&method, base, refs, 1).unwrap();
            assert_eq!(
                merge_with_threads(&method, base, refs, 3).unwrap(),
                one_thread,
                "{method:?}"
            );
        }
    }

    #[test]
    fn overflowing_results_are_refused_naming_tensor_and_index() {
        let base = weights(&[("a", &[1], &[0.0]), ("b", &[3], &[0.0, 0.0, 0.0])]);
        let model = weights(&[("a", &[1], &[1.0]), ("b", &[3], &[1.0, 3e38, 3e38])]);
        let method = MergeMethod::TaskArithmetic { scale: 2.0 };
        let err = merge(&method, Some(&base), &[&model])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor b at index 1"), "{err}");
    }

    #[test]
    fn merging_into_a_used_buffer_gives_the_fresh_result_and_errors_leave_it_empty() {
        let (a, b) = (one(&[1.0, 2.0]), one(&[3.0, 7.0]));
        let average = MergeMethod::WeightedAverage {
            weights: vec![1.0, 1.0],
        };
        let mut out = merge(&average, None, &[&a, &b]).unwrap();
        assert_eq!(out.values(), &[2.0, 4.5]);
        let task = MergeMethod::TaskArithmetic { scale: 2.0 };
        merge_into(&task, Some(&a), &[&b], 1, &mut out).unwrap();
        assert_eq!(out, one(&[5.0, 12.0]));
        let err = merge_into(&average, None, &[&a, &one(&[1.0])], 1, &mut out).unwrap_err();
        assert!(matches!(err, MergeError::ShapeMismatch { .. }), "{err}");
        assert_eq!((out.parameters(), out.tensors().count()), (0, 0));
    }

    proptest! {
        #[test]
        fn averaging_identical_models_returns_the_model(
            model in family(1),
            weights in prop::collection::vec(0.1f64..10.0, 1..10),
        ) {
            let refs = vec![&model[0]; weights.len()];
            let merged = merge(&MergeMethod::WeightedAverage { weights }, None, &refs).unwrap();
            assert_close(merged.values(), model[0].values(), 1e-6);
        }

        #[test]
        fn one_non_zero_weight_returns_that_model(
            models in family(4),
            chosen in 0usize..4,
            weight in 0.01f64..100.0,
        ) {
            let mut weights = vec![0.0; 4];
            weights[chosen] = weight;
            let refs: Vec<&Weights> = models.iter().collect();
            let merged = merge(&MergeMethod::WeightedAverage { weights }, None, &refs).unwrap();
            prop_assert_eq!(&merged, &models[chosen]);
        }

        #[test]
        fn the_average_does_not_depend_on_model_order(
            models in family(6),
            weights in prop::collection::vec(0.0f64..10.0, 6),
            order in Just((0usize..6).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            prop_assume!(weights.iter().sum::<f64>() > 0.1);
            let refs: Vec<&Weights> = models.iter().collect();
            let merged = merge(
                &MergeMethod::WeightedAverage { weights: weights.clone() }, None, &refs,
            ).unwrap();
            let shuffled: Vec<&Weights> = order.iter().map(|&i| &models[i]).collect();
            let shuffled_weights = order.iter().map(|&i| weights[i]).collect();
            let permuted = merge(
                &MergeMethod::WeightedAverage { weights: shuffled_weights }, None, &shuffled,
            ).unwrap();
            assert_close(permuted.values(), merged.values(), 1e-5);
        }

        #[test]
        fn task_arithmetic_scale_zero_is_the_base_and_scale_one_the_model(
            models in family(3),
        ) {
            let base = &models[0];
            let zero = merge(
                &MergeMethod::TaskArithmetic { scale: 0.0 }, Some(base), &[&models[1], &models[2]],
            ).unwrap();
            prop_assert_eq!(&zero, base);
            let unit = merge(
                &MergeMethod::TaskArithmetic { scale: 1.0 }, Some(base), &[&models[1]],
            ).unwrap();
            // base + (model - base) rounds at the scale of the larger of the two.
            for ((&u, &m), &b) in unit.values().iter().zip(models[1].values()).zip(base.values()) {
                prop_assert!((u - m).abs() <= 1e-6 * (m.abs() + b.abs()), "{} != {}", u, m);
            }
        }

        #[test]
        fn task_arithmetic_adds_the_scaled_sum_of_deltas(
            models in (2usize..10).prop_flat_map(family),
            scale in -2.0f64..2.0,
        ) {
            let (base, models) = models.split_first().unwrap();
            let refs: Vec<&Weights> = models.iter().collect();
            let merged = merge(&MergeMethod::TaskArithmetic { scale }, Some(base), &refs).unwrap();
            for (j, &b) in base.values().iter().enumerate() {
                let deltas: f64 = models.iter().map(|m| f64::from(m.values()[j] - b)).sum();
                let expected = (f64::from(b) + scale * deltas) as f32;
                prop_assert!(
                    (merged.values()[j] - expected).abs() <= 1e-5 * expected.abs().max(10.0),
                    "index {}: {} != {}", j, merged.values()[j], expected
                );
            }
        }

        #[test]
        fn ties_at_full_density_with_agreeing_signs_adds_the_mean_delta(
            base in family(1),
            magnitudes in prop::collection::vec(prop::collection::vec(0.01f32..5.0, 48), 1..5),
            signs in prop::collection::vec(any::<bool>(), 48),
            scale in 0.0f64..2.0,
        ) {
            let base = &base[0];
            let n = base.parameters();
            let models: Vec<Weights> = magnitudes.iter().map(|row| {
                let values = base.values().iter().zip(row).zip(&signs)
                    .map(|((&b, &m), &positive)| if positive { b + m } else { b - m })
                    .collect();
                with_values(base, values)
            }).collect();
            let refs: Vec<&Weights> = models.iter().collect();
            let merged = merge(
                &MergeMethod::Ties { density: 1.0, scale }, Some(base), &refs,
            ).unwrap();
            for j in 0..n {
                let b = f64::from(base.values()[j]);
                let mean = models.iter().map(|m| f64::from(m.values()[j]) - b).sum::<f64>()
                    / models.len() as f64;
                let expected = (b + scale * mean) as f32;
                prop_assert!(
                    (merged.values()[j] - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                    "index {}: {} != {}", j, merged.values()[j], expected
                );
            }
        }

        #[test]
        fn dare_without_drops_is_task_arithmetic(
            models in family(4),
            seed in any::<u64>(),
            scale in -2.0f64..2.0,
        ) {
            let refs: Vec<&Weights> = models[1..].iter().collect();
            let dare = merge(
                &MergeMethod::Dare { drop_rate: 0.0, seed, scale }, Some(&models[0]), &refs,
            ).unwrap();
            let task = merge(
                &MergeMethod::TaskArithmetic { scale }, Some(&models[0]), &refs,
            ).unwrap();
            prop_assert_eq!(dare, task);
        }

        #[test]
        fn slerp_returns_the_endpoints_and_a_norm_between_theirs(
            models in family(2),
            t in 0.0f64..=1.0,
        ) {
            let a = &models[0];
            // The common SLERP overshoots for obtuse angles between tensors of unequal
            // norms; merged replicas point the same way, so the property is checked on
            // tensors at most 90° apart.
            let mut b_values = Vec::new();
            for ((_, _, x), (_, _, y)) in a.tensors().zip(models[1].tensors()) {
                let dot: f32 = x.iter().zip(y).map(|(x, y)| x * y).sum();
                let sign = if dot < 0.0 { -1.0 } else { 1.0 };
                b_values.extend(y.iter().map(|v| sign * v));
            }
            let b = with_values(a, b_values);
            let at = |t| merge(&MergeMethod::Slerp { t }, None, &[a, &b]).unwrap();
            prop_assert_eq!(&at(0.0), a);
            prop_assert_eq!(&at(1.0), &b);
            let merged = at(t);
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            for (((name, _, m), (_, _, x)), (_, _, y)) in
                merged.tensors().zip(a.tensors()).zip(b.tensors())
            {
                let (low, high) = (norm(x).min(norm(y)), norm(x).max(norm(y)));
                // The linear fallback may dip below by (1 − 0.9995) / 4 of the norm.
                prop_assert!(
                    norm(m) >= low * (1.0 - 2e-4) - 1e-6 && norm(m) <= high * (1.0 + 1e-5) + 1e-6,
                    "{}: {} outside [{}, {}]", name, norm(m), low, high
                );
            }
        }
    }
}
