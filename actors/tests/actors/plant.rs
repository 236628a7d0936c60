//! The synthetic plant the learner and merger tests share: three channels in regime A
//! (what version 1 learned) or the shifted regime B (another level and frequency).

use fogmesh_models::SplitMix64;

/// Channels of every row.
pub const CHANNELS: usize = 3;

/// One plant row at time `t`: regime A, or regime B when `shifted`; a little noise.
pub fn row(t: u64, shifted: bool, rng: &mut SplitMix64) -> Vec<f32> {
    (0..CHANNELS)
        .map(|c| {
            let (t, c) = (t as f64, c as f64);
            let clean = if shifted {
                1.0 + 0.6 * (0.9 * t + 2.0 * c).sin()
            } else {
                (0.4 * t + c).sin()
            };
            (clean + 0.05 * rng.normal()) as f32
        })
        .collect()
}
