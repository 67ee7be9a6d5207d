//! What differs between the operating systems strata runs on, one module per
//! concern, so the rest of the code has no `cfg` of its own:
//!
//! * [`stop`]: the ways a process is asked to stop (Ctrl-C, SIGTERM on Unix; the
//!   console closing, log-off and system shutdown on Windows);
//! * [`process`]: ending another process, gracefully where the system has a way.

pub mod process;
pub mod stop;
