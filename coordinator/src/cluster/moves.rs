//! How a request in flight gets onto a new pipeline: replayed, or moved with its KV
//! cache.
//!
//! A replay (see [`super::scheduler`]) runs the prompt and every generated token
//! again on the new stages; it works whatever happened to the old pipeline. A KV
//! transfer works only while the old stages are alive (a drain, an undrain, a
//! worker joining: make before break): every new stage pulls the KV of its layers
//! for the positions `[0, n)`, `n = prompt + generated - 1`, straight from the old
//! stages that hold them (ImportSequence, see the proto file), and the request goes
//! on with one frame at position `n`. KV never passes through the coordinator.
//!
//! Which is faster depends on the request: a replay costs a pipeline pass per
//! generated token (the prompt goes in chunks, far cheaper per token), a transfer
//! costs a round trip plus the KV bytes over the link. [`MoveCost`] estimates both
//! per request from constants measured by `strata bench --switch`, refined while
//! the cluster runs (the decode step time from the tokens it sees, the transfer
//! speed from the transfers it makes), and [`MovePolicy::Auto`] takes the cheaper.
//! A transfer that fails (an old holder died mid-way) falls back to a replay.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use strata_proto::{v1, PipelineId, SeqId};

use super::WorkerClient;

// How long the coordinator waits for one stage's import: a little longer than the
// worker's own limit on its pulls, so the worker's clearer error usually wins.
use strata_proto::timing::KV_IMPORT_DEADLINE as IMPORT_DEADLINE;

/// How requests move when the pipeline changes while the old one still works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MovePolicy {
    /// Replay every request on the new stages.
    Replay,
    /// Move every request that has generated a token with its KV cache.
    Transfer,
    /// Per request, whichever the cost model says is faster.
    #[default]
    Auto,
}

/// One stage of a loaded pipeline, as moves need it.
#[derive(Debug, Clone)]
pub struct LinkStage {
    pub address: String,
    pub layers: Range<usize>,
    pub client: WorkerClient,
}

/// The estimates behind the choice, in seconds. The defaults were measured with
/// `strata bench --switch` (SmolLM2-135M Q4_1, 3 workers on one 2-core machine,
/// loopback); a running cluster refines the step time and the transfer speed.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveCost {
    /// One decode step of the pipeline, as one request sees it under the current load
    /// (the interval between its tokens).
    pub step_seconds: f64,
    /// What a prompt token adds to a replay, as a fraction of a decode step (prompts
    /// run in chunks of many tokens a pass).
    pub prompt_token_steps: f64,
    /// A transfer's fixed cost: the import calls, the pulls' round trips, the
    /// compute threads' turns.
    pub transfer_fixed_seconds: f64,
    /// KV bytes a transfer moves per second.
    pub transfer_bytes_per_second: f64,
}

impl Default for MoveCost {
    /// `strata bench --switch` on 2026-11-25: a step of 19.2 ms (4 requests at length
    /// 64), a prompt token 0.138 steps, a transfer 31 ms + 212 MB/s per request (4 at
    /// once); rounded, as the machine (2 cores) was shared. An earlier run on a
    /// busier moment gave 16 ms, 0.137, 114 ms + 192 MB/s: the fixed cost is mostly
    /// waiting for the compute threads' turns.
    fn default() -> Self {
        Self {
            step_seconds: 0.019,
            prompt_token_steps: 0.14,
            transfer_fixed_seconds: 0.03,
            transfer_bytes_per_second: 210e6,
        }
    }
}

/// Weight of a new sample in the running averages.
const SMOOTHING: f64 = 0.1;

/// What the cost model said about one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub replay_seconds: f64,
    pub transfer_seconds: f64,
}

impl Estimate {
    pub fn transfer_is_faster(&self) -> bool {
        self.transfer_seconds < self.replay_seconds
    }
}

impl MoveCost {
    /// Both costs for a request of `prompt` tokens that has generated `generated`
    /// (at least one), with `kv_bytes_per_position` of KV over all layers.
    pub fn estimate(&self, prompt: usize, generated: usize, kv_bytes_per_position: u64) -> Estimate {
        let positions = (prompt + generated).saturating_sub(1);
        let replay_seconds = self.step_seconds * (self.prompt_token_steps * prompt as f64 + generated as f64);
        // Then the frame at position n: one step, as the replay's last frame is.
        let transfer_seconds = self.transfer_fixed_seconds
            + (positions as u64 * kv_bytes_per_position) as f64 / self.transfer_bytes_per_second.max(1.0)
            + self.step_seconds;
        Estimate { replay_seconds, transfer_seconds }
    }

    /// A request's interval between two tokens, while it was not being moved.
    pub fn observe_step(&mut self, interval: Duration) {
        let s = interval.as_secs_f64();
        // A stall (a re-plan elsewhere, a slow client) says nothing about the step.
        if s > 0.0 && s < 1.0 {
            self.step_seconds += SMOOTHING * (s - self.step_seconds);
        }
    }

    /// A finished transfer of `bytes` that took `seconds`, the resume frame excluded.
    pub fn observe_transfer(&mut self, bytes: u64, seconds: f64) {
        let moving = seconds - self.transfer_fixed_seconds;
        // Transfers too small to tell the link's speed from the fixed cost teach nothing.
        if bytes > 0 && moving > self.transfer_fixed_seconds {
            let speed = bytes as f64 / moving;
            self.transfer_bytes_per_second += SMOOTHING * (speed - self.transfer_bytes_per_second);
        }
    }
}

/// For a new stage holding `layers`: where each part of them is held on the old
/// pipeline, for the old sequence `seq`.
pub fn sources(old: &[LinkStage], old_pipeline: PipelineId, seq: SeqId, layers: &Range<usize>) -> Vec<v1::KvSource> {
    old.iter()
        .filter_map(|s| {
            let (start, end) = (layers.start.max(s.layers.start), layers.end.min(s.layers.end));
            (start < end).then(|| v1::KvSource {
                address: s.address.clone(),
                pipeline_id: old_pipeline.get(),
                seq_id: seq.get(),
                layer_start: start as u32,
                layer_end: end as u32,
                grant: Vec::new(),
            })
        })
        .collect()
}

/// Signs each source's grant for the node at `importer` (with mutual TLS: the old
/// stages export only to the node the coordinator names). A source whose grant
/// cannot be made is left without one: its stage refuses the pull, and the
/// request is replayed instead.
fn grant(sources: &mut [v1::KvSource], importer: &str) {
    let transport = strata_trust::transport();
    let (Some(authority), Some(node)) = (transport.authority(), transport.node_at(importer)) else { return };
    for s in sources {
        let grant = strata_trust::KvGrant {
            importer: &node,
            pipeline_id: s.pipeline_id,
            seq_id: s.seq_id,
            layer_start: s.layer_start,
            layer_end: s.layer_end,
        };
        match authority.sign_kv_grant(&grant) {
            Ok(signature) => s.grant = signature,
            Err(e) => tracing::warn!(%importer, error = %e, "no KV grant"),
        }
    }
}

/// What one finished transfer moved.
#[derive(Debug, Clone, Copy)]
pub struct Transferred {
    /// KV bytes over all new stages, pulled from other workers or copied locally.
    pub bytes: u64,
    pub seconds: f64,
}

/// Everything a transfer task needs: the old and new stages, and the sequence.
pub struct TransferSpec {
    pub old: Arc<Vec<LinkStage>>,
    pub old_pipeline: PipelineId,
    pub old_seq: SeqId,
    pub new: Arc<Vec<LinkStage>>,
    pub new_pipeline: PipelineId,
    pub open: v1::OpenSequence,
    /// Token ids at positions `[0, n)`.
    pub tokens: Vec<u32>,
}

/// Has every new stage import the sequence; the error names the first stage that
/// failed and why.
pub async fn transfer(spec: TransferSpec) -> Result<Transferred, String> {
    let started = Instant::now();
    let positions = spec.tokens.len() as u32;
    let calls = spec.new.iter().enumerate().map(|(i, stage)| {
        let mut sources = sources(&spec.old, spec.old_pipeline, spec.old_seq, &stage.layers);
        grant(&mut sources, &stage.address);
        let request = v1::ImportSequenceRequest {
            pipeline_id: spec.new_pipeline.get(),
            open: Some(spec.open.clone()),
            tokens: spec.tokens.clone(),
            positions,
            sources,
        };
        let mut client = stage.client.clone();
        async move {
            let reply = tokio::time::timeout(IMPORT_DEADLINE, client.import_sequence(request)).await;
            match reply {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    Ok(r.bytes_pulled + r.bytes_local)
                }
                Ok(Err(s)) => Err(format!("stage {i} ({}): {:?}: {}", stage.address, s.code(), s.message())),
                Err(_) => Err(format!("stage {i} ({}): no answer in {IMPORT_DEADLINE:?}", stage.address)),
            }
        }
    });
    let mut bytes = 0;
    for result in join_all(calls).await {
        bytes += result?;
    }
    Ok(Transferred { bytes, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_wins_short_requests_and_transfer_long_generations() {
        let cost = MoveCost {
            step_seconds: 0.01,
            prompt_token_steps: 0.1,
            transfer_fixed_seconds: 0.02,
            transfer_bytes_per_second: 100e6,
        };
        // 46 KiB of KV a position (SmolLM2-135M).
        let kv = 46_080;
        assert!(!cost.estimate(8, 1, kv).transfer_is_faster());
        assert!(cost.estimate(16, 64, kv).transfer_is_faster());
        let e = cost.estimate(1000, 1, kv);
        assert!((e.replay_seconds - 1.01).abs() < 1e-9, "{e:?}");
        assert!(e.transfer_is_faster());
        // A link slow enough makes a replay of a long prompt the better move.
        let slow = MoveCost { transfer_bytes_per_second: 1e6, ..cost };
        assert!(!slow.estimate(1000, 1, kv).transfer_is_faster());
    }

    #[test]
    fn the_model_follows_what_it_sees() {
        let mut cost = MoveCost::default();
        for _ in 0..200 {
            cost.observe_step(Duration::from_millis(30));
            cost.observe_transfer(50_000_000, cost.transfer_fixed_seconds + 1.0);
        }
        assert!((cost.step_seconds - 0.03).abs() < 1e-4, "{cost:?}");
        assert!((cost.transfer_bytes_per_second - 50e6).abs() < 1e5, "{cost:?}");
        let before = cost.clone();
        cost.observe_step(Duration::from_secs(5));
        cost.observe_transfer(10, 0.001);
        assert_eq!(cost, before, "outliers are ignored");
    }

    // A lazy channel still wants a runtime to be made in.
    #[tokio::test]
    async fn each_new_stage_gets_its_layers_from_every_old_stage_that_has_some() {
        let stage = |layers: Range<usize>, address: &str| LinkStage {
            address: address.into(),
            layers,
            client: WorkerClient::new(tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy()),
        };
        let old = [stage(0..10, "a"), stage(10..20, "b"), stage(20..30, "c")];
        let pipeline = |id| PipelineId::new(id).expect("not 0");
        let got: Vec<(String, u32, u32)> =
            sources(&old, pipeline(7), SeqId::new(3), &(5..25)).into_iter().map(|s| (s.address, s.layer_start, s.layer_end)).collect();
        assert_eq!(got, [("a".into(), 5, 10), ("b".into(), 10, 20), ("c".into(), 20, 25)]);
        assert!(sources(&old, pipeline(7), SeqId::new(3), &(10..20)).iter().all(|s| s.address == "b" && s.pipeline_id == 7 && s.seq_id == 3));
    }
}
