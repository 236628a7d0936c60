//! The rate a producer outside the node may feed one sensor stream: a token bucket
//! that refills at `max_rate` samples per second and holds at most one second of them,
//! so a producer may burst a second's worth (a reconnecting gateway's backlog arrives
//! at up to that rate) and no more. Time is tokio's, so tests drive it with paused
//! time instead of sleeping.

use tokio::time::Instant;

/// A token bucket of samples.
#[derive(Debug)]
pub struct SampleBudget {
    rate_per_s: f64,
    tokens: f64,
    last: Instant,
}

impl SampleBudget {
    /// A full bucket refilling at `rate_per_s` (finite and positive: the spec checks).
    pub fn new(rate_per_s: f64, now: Instant) -> SampleBudget {
        SampleBudget {
            rate_per_s,
            tokens: rate_per_s,
            last: now,
        }
    }

    /// Takes `samples` from the bucket, or leaves it as it was and returns how many
    /// samples it holds now.
    pub fn take(&mut self, samples: u64, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.rate_per_s);
        let wanted = samples as f64;
        if wanted <= self.tokens {
            self.tokens -= wanted;
            Ok(())
        } else {
            Err(self.tokens as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn a_second_of_samples_passes_then_the_rate_refills_it() {
        let start = Instant::now();
        let mut budget = SampleBudget::new(1000.0, start);
        assert_eq!(budget.take(1000, start), Ok(()));
        assert_eq!(budget.take(1, start), Err(0));
        let later = start + Duration::from_millis(100);
        assert_eq!(budget.take(101, later), Err(100));
        assert_eq!(budget.take(100, later), Ok(()));
        // An idle hour still holds one second's worth, no more.
        let idle = later + Duration::from_secs(3600);
        assert_eq!(budget.take(1001, idle), Err(1000));
    }

    proptest! {
        /// Over any sequence of takes, what passes never exceeds one second's worth
        /// plus the rate times the time elapsed.
        #[test]
        fn what_passes_is_bounded_by_rate_and_burst(
            rate in 1.0f64..1e6,
            steps in proptest::collection::vec((0u64..2_000_000, 0u64..200_000), 1..50),
        ) {
            let start = Instant::now();
            let mut budget = SampleBudget::new(rate, start);
            let (mut now, mut passed) = (start, 0f64);
            for (micros, samples) in steps {
                now += Duration::from_micros(micros);
                if budget.take(samples, now).is_ok() {
                    passed += samples as f64;
                }
            }
            let elapsed = now.duration_since(start).as_secs_f64();
            prop_assert!(passed <= rate + rate * elapsed + 1e-6 * rate);
        }
    }
}
