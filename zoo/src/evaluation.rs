//! Detection scoring in the terms process engineers use for the Tennessee Eastman
//! benchmark: fault detection rate (recall on windows after a fault's onset), false
//! alarm rate (alarms on windows of normal operation), and F1 over both.

use serde::Serialize;

/// Counts of window verdicts against the truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub true_positive: u64,
    pub false_positive: u64,
    pub true_negative: u64,
    pub false_negative: u64,
}

impl Confusion {
    pub fn record(&mut self, faulty: bool, alarmed: bool) {
        match (faulty, alarmed) {
            (true, true) => self.true_positive += 1,
            (true, false) => self.false_negative += 1,
            (false, true) => self.false_positive += 1,
            (false, false) => self.true_negative += 1,
        }
    }

    pub fn merge(&mut self, other: &Confusion) {
        self.true_positive += other.true_positive;
        self.false_positive += other.false_positive;
        self.true_negative += other.true_negative;
        self.false_negative += other.false_negative;
    }

    /// Fault detection rate: faulty windows alarmed / faulty windows.
    pub fn detection_rate(&self) -> Option<f64> {
        ratio(self.true_positive, self.true_positive + self.false_negative)
    }

    /// False alarm rate: normal windows alarmed / normal windows.
    pub fn false_alarm_rate(&self) -> Option<f64> {
        ratio(
            self.false_positive,
            self.false_positive + self.true_negative,
        )
    }

    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_positive, self.true_positive + self.false_positive)
    }

    pub fn f1(&self) -> Option<f64> {
        let precision = self.precision()?;
        let recall = self.detection_rate()?;
        (precision + recall > 0.0).then(|| 2.0 * precision * recall / (precision + recall))
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_their_definitions() {
        let mut c = Confusion::default();
        for (faulty, alarmed, n) in [
            (true, true, 8),
            (true, false, 2),
            (false, true, 1),
            (false, false, 9),
        ] {
            for _ in 0..n {
                c.record(faulty, alarmed);
            }
        }
        assert_eq!(c.detection_rate(), Some(0.8));
        assert_eq!(c.false_alarm_rate(), Some(0.1));
        assert_eq!(c.precision(), Some(8.0 / 9.0));
        let f1 = c.f1().unwrap();
        assert!((f1 - 2.0 * (8.0 / 9.0) * 0.8 / (8.0 / 9.0 + 0.8)).abs() < 1e-12);
    }

    #[test]
    fn empty_classes_have_no_rate() {
        let mut c = Confusion::default();
        c.record(false, false);
        assert_eq!(c.detection_rate(), None);
        assert_eq!(c.f1(), None);
        assert_eq!(c.false_alarm_rate(), Some(0.0));
    }
}
