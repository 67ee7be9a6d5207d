//! Whether the worker is draining, and who wants it to: the service owns the
//! [`Drain`], hands a clone to whatever may drain it (the yield watcher), and reads
//! it when it describes itself.
//!
//! A drain has causes rather than one flag so that the end of a yield never undoes
//! a drain someone asked for.

use std::sync::{Arc, Mutex};

use crate::events::lock;

/// Who wants the worker drained; it drains while anyone does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainCauses {
    /// Someone asked (SetDraining: `strata drain NODE`, `strata-worker drain`).
    pub asked: bool,
    /// What the worker yields to, while it does.
    pub yielding: Option<String>,
}

impl DrainCauses {
    pub fn draining(&self) -> bool {
        self.asked || self.yielding.is_some()
    }

    /// A drain or undrain someone asked for. An undrain ends a yield too: the person
    /// at the machine wants the worker back even while their game runs.
    pub fn ask(&mut self, draining: bool) {
        self.asked = draining;
        if !draining {
            self.yielding = None;
        }
    }

    /// What `strata status` shows next to `draining`; empty unless yielding.
    pub fn reason(&self) -> String {
        self.yielding.as_ref().map(|r| format!("yielding to {r}")).unwrap_or_default()
    }
}

/// A shared handle on the worker's drain causes.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    causes: Arc<Mutex<DrainCauses>>,
}

impl Drain {
    /// Marks the worker draining or back in service, as someone asked; true when that
    /// changed anything. An undrain also ends a yield; a drain while yielding changes
    /// no state but makes the drain outlast the yield.
    pub fn ask(&self, draining: bool) -> bool {
        self.change(|c| c.ask(draining))
    }

    /// Changes why the worker drains; true when the causes changed.
    pub fn change(&self, change: impl FnOnce(&mut DrainCauses)) -> bool {
        let mut causes = lock(&self.causes);
        let before = causes.clone();
        change(&mut causes);
        if before.draining() != causes.draining() {
            tracing::info!(draining = causes.draining(), reason = %causes.reason(), "drain state changed");
        }
        before != *causes
    }

    pub fn causes(&self) -> DrainCauses {
        lock(&self.causes).clone()
    }

    pub fn is_draining(&self) -> bool {
        lock(&self.causes).draining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undrain_ends_a_yield_and_a_drain_outlasts_one() {
        let drain = Drain::default();
        assert!(drain.change(|c| c.yielding = Some("game.exe (pid 4)".into())));
        assert!(drain.is_draining());
        assert_eq!(drain.causes().reason(), "yielding to game.exe (pid 4)");
        assert!(drain.ask(false), "the undrain ended the yield");
        assert!(!drain.is_draining());
        assert!(!drain.ask(false), "nothing left to change");
        assert!(drain.ask(true));
        drain.change(|c| c.yielding = Some("game.exe (pid 4)".into()));
        drain.change(|c| c.yielding = None);
        assert!(drain.is_draining(), "the asked-for drain outlasts the yield");
        assert_eq!(drain.causes().reason(), "");
    }
}
