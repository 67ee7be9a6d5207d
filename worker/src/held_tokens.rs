//! The last stage's token reports on the direct return path, sent to the
//! coordinator a few at a time.
//!
//! On the direct path the last stage feeds each sampled token to stage 0 itself;
//! its event to the coordinator is only the report, for the client's stream. Each
//! report wakes the coordinator's reading thread and its runtime, work that comes
//! out of the next stage's step wherever the stages share the cores: a scheduler
//! trace of three workers on a 2-core VM showed it ~60 µs a token, delaying the next
//! stage's threads by 30–70 µs. Held for 20 ms, one stream ran 2% faster
//! (`strata bench --workers 3`, pipeline / one process 0.921 → 0.937, medians of four
//! alternating rounds, ahead in all four, 2026-12-06).
//!
//! A token is held about [`TOKEN_HOLD`] at most (the stage looks at the end of each
//! round and while it waits; a round that waits for the rest of its batch can add up
//! to its own limit), so a client sees its stream in small groups (a reader takes in a
//! few words a second). Not held: a sequence's first token (the time to the first
//! token), its last (the request's end), tokens on the coordinator return path (the
//! coordinator sends them on), and nothing is held past an error the stage reports
//! (the tokens go first).

use std::time::{Duration, Instant};

use strata_proto::v1::worker_event;

/// The longest a token's report waits for others to go with it.
pub const TOKEN_HOLD: Duration = Duration::from_millis(20);

/// Token reports waiting to go, in the order they were sampled.
#[derive(Default)]
pub struct HeldTokens {
    events: Vec<worker_event::Kind>,
    /// When the oldest of them was held.
    since: Option<Instant>,
}

impl HeldTokens {
    /// A token's report, sampled at `now`: held where `may_wait`, else what must go
    /// now, oldest first: whatever was held, then it.
    pub fn report(&mut self, event: worker_event::Kind, may_wait: bool, now: Instant) -> Vec<worker_event::Kind> {
        if may_wait {
            self.since.get_or_insert(now);
            self.events.push(event);
            return Vec::new();
        }
        let mut go = self.take();
        go.push(event);
        go
    }

    /// How long until the oldest is due; `None` while nothing is held.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        self.since.map(|since| (since + TOKEN_HOLD).saturating_duration_since(now))
    }

    /// Whether the oldest has waited its time.
    pub fn due(&self, now: Instant) -> bool {
        self.left(now).is_some_and(|left| left.is_zero())
    }

    /// Everything held, oldest first; nothing is held afterwards.
    pub fn take(&mut self) -> Vec<worker_event::Kind> {
        self.since = None;
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use strata_proto::v1::TokenSampled;

    use super::*;

    fn token(position: u32) -> worker_event::Kind {
        worker_event::Kind::Token(TokenSampled { seq_id: 1, position, token: 7, sent_unix_nanos: 0, score: None })
    }

    fn position(event: &worker_event::Kind) -> Option<u32> {
        match event {
            worker_event::Kind::Token(t) => Some(t.position),
            _ => None,
        }
    }

    fn positions(events: &[worker_event::Kind]) -> Vec<Option<u32>> {
        events.iter().map(position).collect()
    }

    #[test]
    fn held_reports_are_due_once_the_oldest_has_waited_and_go_in_order() {
        let start = Instant::now();
        let mut held = HeldTokens::default();
        assert_eq!(held.left(start), None);
        assert!(!held.due(start));
        assert!(held.report(token(10), true, start).is_empty());
        assert!(held.report(token(11), true, start + TOKEN_HOLD / 2).is_empty());
        // The oldest sets the time.
        assert_eq!(held.left(start + TOKEN_HOLD / 2), Some(TOKEN_HOLD / 2));
        assert!(!held.due(start + TOKEN_HOLD / 2));
        assert!(held.due(start + TOKEN_HOLD));
        assert_eq!(positions(&held.take()), [Some(10), Some(11)]);
        assert_eq!(held.left(start + TOKEN_HOLD), None);
        // A report held later starts a new wait.
        held.report(token(12), true, start + TOKEN_HOLD * 3);
        assert_eq!(held.left(start + TOKEN_HOLD * 3), Some(TOKEN_HOLD));
    }

    #[test]
    fn a_report_that_may_not_wait_goes_at_once_after_those_held() {
        let start = Instant::now();
        let mut held = HeldTokens::default();
        // Nothing held: it goes alone.
        assert_eq!(positions(&held.report(token(4), false, start)), [Some(4)]);
        held.report(token(5), true, start);
        held.report(token(6), true, start);
        assert_eq!(positions(&held.report(token(7), false, start)), [Some(5), Some(6), Some(7)]);
        assert_eq!(held.left(start), None, "nothing is held after");
    }
}
