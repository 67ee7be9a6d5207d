//! A worker whose stage failed to load while it still answered is left out of
//! plans for a while, then tried again; `strata status` says why meanwhile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::membership::NodeKey;

/// The workers whose loads failed, by worker.
pub type LoadFailures = HashMap<NodeKey, LoadBackoff>;

/// A worker whose stage failed to load while it still answered: it is left out of
/// plans until `until`, for twice as long after each failure in a row (up to
/// [`MAX_BACKOFF`]), then tried again. `strata status` shows the reason.
#[derive(Debug, Clone)]
pub struct LoadBackoff {
    pub failures: u32,
    pub until: Instant,
    pub reason: String,
    /// The controller has already re-planned since `until` passed.
    pub retried: bool,
}

impl LoadBackoff {
    pub fn after(previous: Option<&LoadBackoff>, reason: String, now: Instant) -> Self {
        let failures = previous.map_or(0, |b| b.failures) + 1;
        let wait = (FIRST_BACKOFF * 2u32.saturating_pow(failures - 1)).min(MAX_BACKOFF);
        Self { failures, until: now + wait, reason, retried: false }
    }

    pub fn excludes(&self, now: Instant) -> bool {
        self.until > now
    }

    /// What `strata status` says of the worker.
    pub fn describe(&self, now: Instant) -> String {
        let times = if self.failures == 1 { "once".to_string() } else { format!("{} times", self.failures) };
        if self.excludes(now) {
            let wait = self.until.saturating_duration_since(now).as_secs_f64().ceil();
            format!("loading failed {times}, left out of the plan; trying again in {wait:.0}s: {}", self.reason)
        } else {
            format!("loading failed {times}; trying again: {}", self.reason)
        }
    }
}

/// How long a worker whose load failed is first left out of plans.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);

/// The longest a worker whose loads keep failing is left out at a time.
pub const MAX_BACKOFF: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_in_a_row_doubles_the_wait_up_to_the_cap() {
        let now = Instant::now();
        let mut b = LoadBackoff::after(None, "pull failed".into(), now);
        assert_eq!((b.failures, b.until - now), (1, FIRST_BACKOFF));
        assert!(b.excludes(now) && !b.excludes(b.until));
        for _ in 0..20 {
            b = LoadBackoff::after(Some(&b), "pull failed".into(), now);
        }
        assert_eq!(b.until - now, MAX_BACKOFF);
        assert!(b.describe(now).contains("21 times") && b.describe(now).contains("pull failed"), "{}", b.describe(now));
        assert!(b.describe(b.until).contains("trying again:"));
    }
}
