//! A small deterministic random number generator (SplitMix64) for weight initialisation
//! and data shuffling.
//!
//! libtorch's generator is process-global: expert threads seeding it at the same time
//! would race, and a "seeded" model would depend on thread scheduling. SplitMix64 has no
//! shared state and yields the same stream on every platform and libtorch version, so a
//! seed alone fixes a model's initial weights and its batch order. The benchmarks draw
//! their synthetic windows from it for the same reason.

/// SplitMix64 (Steele, Lea and Flood 2014): one 64-bit state, full period, good enough
/// statistics for initialisation and shuffling.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits so every value is an exact f64.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub(crate) fn uniform(&mut self, low: f64, high: f64) -> f32 {
        (low + (high - low) * self.next_f64()) as f32
    }

    /// Uniform in 0..n (n > 0), by Lemire's multiply-shift, whose bias is far below
    /// anything a shuffle of in-memory data could notice.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// Standard normal by Box-Muller, for synthetic data (tests, benchmark workloads).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn same_seed_same_stream_and_shuffle_is_a_permutation() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));

        let mut items: Vec<usize> = (0..1000).collect();
        SplitMix64::new(1).shuffle(&mut items);
        assert_ne!(items, (0..1000).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn uniform_and_below_stay_in_range() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..10_000 {
            let u = rng.uniform(-0.5, 0.25);
            assert!((-0.5..=0.25).contains(&u));
            assert!(rng.below(7) < 7);
        }
    }
}
