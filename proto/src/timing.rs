//! Timings and sizes that the coordinator and the workers must agree on. Each
//! lives here once: a worker that beat every 300 ms and a coordinator that waited
//! 200 ms for a beat would declare every worker dead.

use std::time::Duration;

/// How often a worker sends a heartbeat on its Events stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(300);

/// A worker that sends nothing on its Events stream for this long is considered
/// gone: five missed beats, so one slow beat on a busy link is not a loss.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a worker's `ImportSequence` may wait for the K and V it pulls from the
/// old stages.
pub const KV_IMPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the coordinator waits for an `ImportSequence` answer: the worker's own
/// limit plus a margin for the answer to travel, so the worker's reason (not a bare
/// deadline) is what the coordinator sees.
pub const KV_IMPORT_DEADLINE: Duration = Duration::from_secs(KV_IMPORT_TIMEOUT.as_secs() + 5);

/// Most prompt tokens in one activation frame (fewer when [`crate::FRAME_TARGET_BYTES`]
/// is reached first): the coordinator cuts prompts at it, the planner sizes each
/// stage's attention scratch with it.
pub const PREFILL_CHUNK_TOKENS: usize = 512;

const _: () = assert!(HEARTBEAT_TIMEOUT.as_millis() >= 3 * HEARTBEAT_INTERVAL.as_millis());
