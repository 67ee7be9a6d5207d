//! Rates from cumulative counters: samples over a sliding window, so `strata
//! status` shows what the cluster and each node did over the last few seconds
//! rather than since they started.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples of `N` cumulative counters, at most `span` old.
#[derive(Debug, Clone)]
pub struct CounterWindow<const N: usize> {
    span: Duration,
    samples: VecDeque<(Instant, [f64; N])>,
}

impl<const N: usize> CounterWindow<N> {
    pub fn new(span: Duration) -> Self {
        Self { span, samples: VecDeque::new() }
    }

    pub fn push(&mut self, now: Instant, counters: [f64; N]) {
        // A counter going back means its source restarted: the old samples say
        // nothing about the new run.
        if self.samples.back().is_some_and(|(_, last)| counters.iter().zip(last).any(|(c, l)| c < l)) {
            self.samples.clear();
        }
        self.samples.push_back((now, counters));
        while self.samples.front().is_some_and(|(t, _)| now - *t > self.span) {
            self.samples.pop_front();
        }
    }

    /// How much counter `i` grew over the window, and the seconds that took.
    pub fn delta(&self, i: usize) -> Option<(f64, f64)> {
        let ((t0, first), (t1, last)) = (self.samples.front()?, self.samples.back()?);
        let seconds = (*t1 - *t0).as_secs_f64();
        (seconds > 0.0).then(|| (last[i] - first[i], seconds))
    }

    /// Counter `i`'s growth per second over the window; 0 before two samples.
    pub fn per_second(&self, i: usize) -> f64 {
        self.delta(i).map_or(0.0, |(d, s)| d / s)
    }

    /// Growth of counter `a` per unit of growth of counter `b` over the window.
    pub fn ratio(&self, a: usize, b: usize) -> Option<f64> {
        let (da, _) = self.delta(a)?;
        let (db, _) = self.delta(b)?;
        (db > 0.0).then(|| da / db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_only_the_window_and_restart_with_their_source() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut w = CounterWindow::<2>::new(Duration::from_secs(5));
        assert_eq!(w.per_second(0), 0.0);
        w.push(at(0), [0.0, 0.0]);
        w.push(at(1), [100.0, 10.0]);
        w.push(at(2), [300.0, 20.0]);
        assert_eq!(w.per_second(0), 150.0);
        assert_eq!(w.ratio(0, 1), Some(15.0));
        w.push(at(10), [400.0, 30.0]);
        assert_eq!(w.per_second(0), 0.0, "only one sample is recent");
        w.push(at(11), [10.0, 1.0]);
        w.push(at(12), [30.0, 1.0]);
        assert_eq!(w.per_second(0), 20.0, "the restart dropped the older samples");
        assert_eq!(w.ratio(0, 1), None, "no batches in the window");
    }
}
