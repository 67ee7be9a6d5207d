//! The worker's gRPC service: a thin adapter from tonic to the shard slot, the
//! compute thread and the event hub. Errors are [`WorkerError`]s, turned into
//! statuses only at the edge.

use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use strata_model::WeightStore;
use strata_platform::local_socket::LocalStream;
use strata_proto::v1::worker_server::Worker;
use strata_proto::v1::{
    self, stage_message, worker_event, ErrorCode, StageMessage, WireDtype, WorkerState,
};
use strata_proto::{NodeId, PipelineId, WorkerError, PROTOCOL_VERSION};
use strata_trust::{Allow, Caller};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{IntervalStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::compute::{self, ComputeHandle, ComputeSpec, Gauges, Outputs};
use crate::config::WorkerConfig;
use crate::drain::Drain;
use crate::events::{lock, unix_nanos, EventHub, Stats};
use crate::forwarder::{self, Forwarders, Peer};
use crate::inbox::{Admission, Inbound};
use crate::links::Links;
use crate::local_lane::{self, Lane, LaneInbox};
use crate::profile::Profile;
use crate::route::Route;
use crate::weights::{self, LocalModels, Pulls};

mod kv_move;

/// How often Events subscribers get a heartbeat (the coordinator's loss timeout
/// is set against it).
pub use strata_proto::timing::HEARTBEAT_INTERVAL;

/// A cheap handle on the worker's shared state.
#[derive(Clone)]
pub struct WorkerService {
    shared: Arc<Shared>,
}

struct Shared {
    config: WorkerConfig,
    /// What the worker found and measured at start: what it offers.
    profile: Arc<Profile>,
    address: String,
    node_id: NodeId,
    hub: Arc<EventHub>,
    stats: Arc<Stats>,
    local_models: LocalModels,
    /// Shards being pulled from the coordinator, for heartbeats.
    pulls: Pulls,
    /// Weights by model, device and part, shared by the shards: a re-plan's new
    /// shard loads only the layers the old one lacks.
    weights: Arc<WeightStore>,
    slot: Mutex<Slot>,
    /// Serializes LoadShard and UnloadShard.
    load_lock: tokio::sync::Mutex<()>,
    /// The worker is shutting down.
    stop: watch::Receiver<bool>,
    /// Asked to leave the cluster (SetDraining), by the coordinator or at this machine,
    /// or yielding to the machine's own use.
    drain: Drain,
    /// Workers this one pulled KV caches from.
    peers: kv_move::Peers,
    /// Its links to the workers it streams to.
    links: Links,
}

/// The shards a worker holds: usually one, two while a re-plan switches pipelines.
#[derive(Default)]
struct Slot {
    loading: bool,
    /// By pipeline id, in load order (the last is the newest).
    shards: Vec<(u64, Loaded)>,
}

struct Loaded {
    spec: v1::ShardSpec,
    compute: ComputeHandle,
    gauges: Arc<Gauges>,
    forwarders: Forwarders,
}

/// What the heartbeats report of the worker's memory and work.
struct Usage {
    /// Weights held, a layer shared by several shards counted once.
    weights_bytes: u64,
    kv_cache_bytes: u64,
    sequences: u32,
    /// Pipelines whose shards it holds.
    pipelines: Vec<u64>,
}

impl Slot {
    fn newest(&self) -> Option<&Loaded> {
        self.shards.last().map(|(_, l)| l)
    }

    /// Drops the shards whose compute thread stopped computing after a panic (see
    /// [`crate::compute::start`]), so the worker no longer claims them.
    fn drop_stopped(&mut self) {
        self.shards.retain(|(pipeline, l)| {
            let running = l.compute.is_running();
            if !running {
                let stage = l.spec.stage_index;
                tracing::error!(pipeline, stage, "the stage's compute thread stopped; its shard is dropped");
            }
            running
        });
    }
}

/// A worker's state from what it holds: draining while it stops or is drained;
/// else, asked about a `pipeline`, serving only while it holds a shard of that one
/// (a worker in the middle of a switch whose shard of the pipeline in use failed
/// must not pass for healthy because it holds or loads the next one's); else
/// loading, serving (any shard) or idle.
fn state_of(stopping: bool, loading: bool, held: &[u64], pipeline: Option<PipelineId>) -> WorkerState {
    match pipeline {
        _ if stopping => WorkerState::Draining,
        Some(pipeline) if held.contains(&pipeline.get()) => WorkerState::Serving,
        Some(_) => WorkerState::Idle,
        None if loading => WorkerState::Loading,
        None if !held.is_empty() => WorkerState::Serving,
        None => WorkerState::Idle,
    }
}

impl Shared {
    /// Where frames for `pipeline` (the newest shard when unnamed) go: its compute
    /// thread's channel, if that shard is loaded. A worker's frames are refused when
    /// it was revoked or the shard's spec does not name it as a sender (with no such
    /// shard, not loaded yet or dropped, they go nowhere, as anyone's). One lookup a
    /// message: this runs for every frame of the hot path.
    fn frame_destination(
        &self,
        pipeline: Option<u64>,
        caller: &Caller,
    ) -> Result<Option<mpsc::Sender<Inbound>>, Status> {
        let sender = match caller {
            Caller::Worker(node) if strata_trust::transport().is_revoked(node) => {
                return Err(Status::permission_denied(format!("Forward: node {node} was revoked")));
            }
            Caller::Worker(node) => Some(node),
            _ => None,
        };
        let slot = lock(&self.slot);
        let loaded = match pipeline {
            Some(id) => slot.shards.iter().find(|(p, _)| *p == id).map(|(_, l)| l),
            None => slot.newest(),
        };
        match (loaded, sender) {
            (Some(l), Some(node)) if !l.spec.frame_sender_node_ids.iter().any(|n| n == node.as_str()) => {
                Err(Status::permission_denied(format!(
                    "Forward: worker {node} is not the stage before this one in pipeline {}",
                    l.spec.pipeline_id
                )))
            }
            (loaded, _) => Ok(loaded.map(|l| l.compute.tx.clone())),
        }
    }

    /// What every way in does with a stage message before it is queued: where it
    /// goes (see [`Shared::frame_destination`]), counting the frame's hop; and the
    /// sequence it belongs to, to fail if it cannot be delivered.
    fn admit(
        &self,
        pipeline: Option<u64>,
        caller: &Caller,
        message: &StageMessage,
    ) -> Result<(Option<mpsc::Sender<Inbound>>, Option<u64>), Status> {
        let destination = self.frame_destination(pipeline, caller)?;
        let seq = match &message.kind {
            Some(stage_message::Kind::Frame(f)) => {
                self.stats.record_hop(f.sent_unix_nanos);
                Some(f.seq_id)
            }
            Some(stage_message::Kind::Open(o)) => Some(o.seq_id),
            _ => None,
        };
        Ok((destination, seq))
    }

    /// A message of `seq` found no loaded shard.
    fn undeliverable(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.hub.sequence_error(seq, ErrorCode::NoShard, WorkerError::NoShard.to_string(), 0);
        }
    }

    /// [`Shared::admit`] for a message of `sender`'s lane, its refusal as text (the
    /// lane closes with it).
    fn admit_from_lane(
        &self,
        pipeline: u64,
        sender: &NodeId,
        message: &StageMessage,
    ) -> Result<(Option<mpsc::Sender<Inbound>>, Option<u64>), String> {
        self.admit(Some(pipeline), &lane_caller(sender), message).map_err(|s| s.message().to_string())
    }
}

/// A lane's sender as it would be known over gRPC: by its certificate's node,
/// which the greeting names; on an --insecure cluster, not at all.
fn lane_caller(sender: &NodeId) -> Caller {
    if strata_trust::transport().secure() {
        Caller::Worker(sender.clone())
    } else {
        Caller::Insecure
    }
}

/// Messages over local lanes get what those of a Forward call get.
impl LaneInbox for Shared {
    fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String> {
        let (destination, seq) = self.admit_from_lane(pipeline, sender, &message)?;
        // On a lane's own thread, outside the runtime: a full queue holds the lane
        // as it would hold a Forward stream.
        if destination.is_none_or(|tx| tx.blocking_send(message.into()).is_err()) {
            self.undeliverable(seq);
        }
        Ok(())
    }

    fn reader_for(&self, pipeline: u64, sender: &NodeId) -> Option<mpsc::Sender<Inbound>> {
        self.frame_destination(Some(pipeline), &lane_caller(sender)).ok().flatten()
    }

    fn take_or_deliver(
        &self,
        pipeline: u64,
        sender: &NodeId,
        message: StageMessage,
        own: &mpsc::WeakSender<Inbound>,
    ) -> Result<Admission, String> {
        let (destination, seq) = self.admit_from_lane(pipeline, sender, &message)?;
        match destination {
            Some(tx) if own.upgrade().is_some_and(|own| own.same_channel(&tx)) => Ok(Admission::Take(message)),
            // Another stage of the pipeline took over (a reload): this thread must
            // not wait on its queue, so a full one fails the sequence.
            destination => {
                if destination.is_none_or(|tx| tx.try_send(message.into()).is_err()) {
                    self.undeliverable(seq);
                }
                Ok(Admission::Done)
            }
        }
    }

    fn send_events(&self, lane: LocalStream) {
        tracing::info!("events go to the coordinator over a local lane");
        self.hub.subscribe_lane(lane);
    }
}

impl WorkerService {
    pub fn new(config: WorkerConfig, profile: Arc<Profile>, address: String, stop: watch::Receiver<bool>) -> Self {
        // Stable for a given name and address, so a restarted worker is recognised.
        let digest = Sha256::digest(format!("{}@{address}", config.name).as_bytes());
        let node_id = NodeId::from_digest(&std::array::from_fn(|i| digest[i]));
        let local_models = LocalModels::new(config.models.clone());
        let hub = Arc::new(EventHub::default());
        Self {
            shared: Arc::new(Shared {
                config,
                profile,
                address,
                node_id,
                pulls: Pulls::new(hub.clone()),
                links: Links::default(),
                hub,
                stats: Arc::default(),
                local_models,
                weights: Arc::default(),
                slot: Mutex::default(),
                load_lock: tokio::sync::Mutex::new(()),
                stop,
                drain: Drain::default(),
                peers: kv_move::Peers::default(),
            }),
        }
    }

    fn state(&self) -> WorkerState {
        self.state_for(None)
    }

    /// The state, as far as `pipeline` is concerned where one is named.
    fn state_for(&self, pipeline: Option<PipelineId>) -> WorkerState {
        let mut slot = lock(&self.shared.slot);
        slot.drop_stopped();
        let stopping = *self.shared.stop.borrow() || self.shared.drain.is_draining();
        let held: Vec<u64> = slot.shards.iter().map(|(id, _)| *id).collect();
        state_of(stopping, slot.loading, &held, pipeline)
    }

    /// This worker's node id: its name in its certificate.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id.clone()
    }

    /// `request`'s caller, if `allowed` covers it (every caller with --insecure).
    fn authorize<T>(&self, request: &Request<T>, allowed: &[Allow<'_>], what: &str) -> Result<Caller, Status> {
        let r = strata_trust::authorize(strata_trust::transport(), request, allowed, what);
        if let Err(e) = &r {
            tracing::warn!(peer = ?strata_trust::remote_addr(request), "refused: {}", e.message());
        }
        r
    }

    pub fn description(&self) -> v1::WorkerDescription {
        let shard = {
            let mut slot = lock(&self.shared.slot);
            slot.drop_stopped();
            slot.newest().map(|l| l.spec.clone())
        };
        let config = &self.shared.config;
        let profile = &self.shared.profile;
        v1::WorkerDescription {
            node_id: self.shared.node_id.to_string(),
            name: config.name.clone(),
            protocol_version: PROTOCOL_VERSION,
            grpc_address: self.shared.address.clone(),
            devices: vec![profile.device_proto()],
            memory_offered_bytes: profile.offer.offered_bytes,
            state: self.state() as i32,
            compute_threads: config.threads as u32,
            shard,
        }
    }

    /// Drops the shard of `pipeline` (every shard for `None`) and waits for the
    /// compute threads to exit, so the memory is free when this returns.
    pub async fn unload(&self, pipeline: Option<u64>) -> u64 {
        let _guard = self.shared.load_lock.lock().await;
        self.take_shards(|id| pipeline.is_none_or(|p| p == id))
            .await
    }

    /// Stops the shards `which` picks; the bytes that frees: their KV caches, and the
    /// weights no remaining shard shares. The caller holds `load_lock`, so no load
    /// takes a part meanwhile and the store's difference is this unload's alone.
    async fn take_shards(&self, which: impl Fn(u64) -> bool) -> u64 {
        let taken: Vec<Loaded> = {
            let mut slot = lock(&self.shared.slot);
            let (taken, kept) = std::mem::take(&mut slot.shards)
                .into_iter()
                .partition(|(id, _)| which(*id));
            slot.shards = kept;
            taken.into_iter().map(|(_, l)| l).collect()
        };
        if taken.is_empty() {
            return 0;
        }
        let weights_before = self.shared.weights.resident_bytes();
        let mut caches = 0;
        for loaded in taken {
            caches += loaded.gauges.cache_bytes.load(Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || loaded.compute.stop()).await;
            // After the thread: whatever it still queued belongs to this shard's
            // retired pipeline and is dropped with its forwarders.
            drop(loaded.forwarders);
        }
        let _ = tokio::task::spawn_blocking(strata_platform::memory::release_freed_memory).await;
        let weights_after = self.shared.weights.resident_bytes();
        self.shared.stats.note_weights(weights_after);
        caches + weights_before.saturating_sub(weights_after)
    }

    /// The worker's drain state, for whatever may drain it.
    pub fn drain(&self) -> &Drain {
        &self.shared.drain
    }

    /// Memory the loaded shards use (shared weights counted once), and how many
    /// sequences they hold.
    fn usage(&self) -> Usage {
        let mut slot = lock(&self.shared.slot);
        slot.drop_stopped();
        let mut usage = Usage {
            weights_bytes: self.shared.weights.resident_bytes(),
            kv_cache_bytes: 0,
            sequences: 0,
            pipelines: slot.shards.iter().map(|(id, _)| *id).collect(),
        };
        for (_, l) in &slot.shards {
            usage.kv_cache_bytes += l.gauges.cache_bytes.load(Ordering::Relaxed);
            usage.sequences += l.gauges.sequences.load(Ordering::Relaxed);
        }
        usage
    }

    async fn load_shard(
        &self,
        spec: v1::ShardSpec,
        keep_others: bool,
    ) -> Result<v1::LoadShardResponse, WorkerError> {
        let started = Instant::now();
        let model = spec
            .model
            .clone()
            .ok_or_else(|| WorkerError::InvalidShard("the shard names no model".into()))?;
        let layers = checked_range(&spec)?;
        let wire_dtype = match WireDtype::try_from(spec.wire_dtype) {
            Ok(WireDtype::F16) => WireDtype::F16,
            Ok(_) => WireDtype::F32,
            Err(_) => {
                return Err(WorkerError::InvalidShard(format!(
                    "unknown wire dtype {}",
                    spec.wire_dtype
                )))
            }
        };
        let is_last = layers.end == spec.total_layers as usize;
        if !is_last && spec.next_stage_address.is_empty() {
            return Err(WorkerError::InvalidShard(format!(
                "stage {} (layers {}..{}) is not the last but has no next stage address",
                spec.stage_index, layers.start, layers.end
            )));
        }
        if *self.shared.stop.borrow() || self.shared.drain.is_draining() {
            return Err(WorkerError::Draining);
        }
        let _guard = self.shared.load_lock.lock().await;
        let pipeline = spec.pipeline_id;
        self.take_shards(|id| !keep_others || id == pipeline).await;
        lock(&self.shared.slot).loading = true;
        let gauges = Arc::new(Gauges::default());
        let result = self
            .load_locked(&spec, &model, layers, wire_dtype, is_last, gauges.clone())
            .await;
        lock(&self.shared.slot).loading = false;
        let (compute, local, forwarders) = result?;
        let loaded_bytes = compute.loaded_bytes;
        let shared_bytes = compute.weight_bytes.saturating_sub(loaded_bytes);
        // Weights only grow while a shard loads: now is their peak.
        self.shared.stats.record_load(loaded_bytes);
        self.shared
            .stats
            .note_weights(self.shared.weights.resident_bytes());
        tracing::info!(
            layers = ?compute.layers,
            stage = spec.stage_index,
            pipeline,
            weights_were_local = local,
            loaded_bytes,
            shared_bytes,
            "shard loaded in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        lock(&self.shared.slot).shards.push((
            pipeline,
            Loaded {
                spec,
                compute,
                gauges,
                forwarders,
            },
        ));
        Ok(v1::LoadShardResponse {
            weight_bytes: loaded_bytes,
            weights_were_local: local,
            load_seconds: started.elapsed().as_secs_f64(),
            shared_weight_bytes: shared_bytes,
        })
    }

    /// The way to `peer` (the worker `node`) for a shard of `spec`: a forwarder,
    /// and a local lane beside it when the peer serves one on this machine.
    async fn route(&self, forwarders: &mut Forwarders, peer: Peer, node: &str, spec: &v1::ShardSpec) -> Route {
        let shared = &self.shared;
        // Under mutual TLS the peer must answer as the node the coordinator named;
        // an --insecure cluster names none.
        let expected = NodeId::new(node);
        let lane = if shared.config.local_lanes && (expected.is_some() || !strata_trust::transport().secure()) {
            let (address, sender, pipeline) = (peer.address.clone(), shared.node_id.clone(), spec.pipeline_id);
            tokio::task::spawn_blocking(move || Lane::open(&address, expected.as_ref(), &sender, pipeline))
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let link = peer.link.clone();
        let forwarder =
            forwarders.spawn(peer, spec.pipeline_id, spec.stage_index, shared.hub.clone(), shared.stop.clone());
        Route::new(forwarder, lane, link)
    }

    /// Serves this worker's local lane, while the value lives (`None` when turned
    /// off or not possible here).
    pub fn serve_local_lanes(&self) -> Option<local_lane::Listener> {
        if !self.shared.config.local_lanes {
            return None;
        }
        let inbox = Arc::downgrade(&self.shared) as std::sync::Weak<dyn LaneInbox>;
        local_lane::Listener::open(&self.shared.address, self.shared.node_id.clone(), inbox)
    }

    async fn load_locked(
        &self,
        spec: &v1::ShardSpec,
        model: &v1::ModelRef,
        layers: Range<usize>,
        wire_dtype: WireDtype,
        is_last: bool,
        gauges: Arc<Gauges>,
    ) -> Result<(ComputeHandle, bool, Forwarders), WorkerError> {
        let shared = &self.shared;
        let device = strata_model::parse_device(&shared.config.device)
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        // Shards are loaded one at a time (`load_lock`), so what the store holds now
        // is what the load will find there.
        let missing = shared.weights.ranges_to_fetch(&model.content_hash, &device, layers.clone());
        let located = weights::locate(
            &shared.local_models,
            &shared.config.cache_dir,
            model,
            &layers,
            &missing,
            &spec.weights_source,
            &shared.pulls,
        )
        .await?;
        // Connect before loading, so a wrong address fails the load, not the first frame.
        let mut outputs = Outputs::default();
        let mut forwarders = Forwarders::default();
        // Dialled as the nodes the coordinator names, whatever answers at the address.
        let transport = strata_trust::transport();
        for (address, node) in
            [(&spec.next_stage_address, &spec.next_stage_node_id), (&spec.first_stage_address, &spec.first_stage_node_id)]
        {
            if let (false, Some(node)) = (address.is_empty(), NodeId::new(node)) {
                transport.learn(address, &node);
            }
        }
        if !is_last {
            let channel = forwarder::connect(spec.next_stage_address.clone(), strata_trust::Dial::Worker)
                .await
                .map_err(WorkerError::Internal)?;
            let peer = Peer {
                address: spec.next_stage_address.clone(),
                channel,
                link: shared.links.to(&spec.next_stage_address),
            };
            outputs.next = Some(self.route(&mut forwarders, peer, &spec.next_stage_node_id, spec).await);
        } else if !spec.first_stage_address.is_empty() && layers.start != 0 {
            let channel = forwarder::connect(spec.first_stage_address.clone(), strata_trust::Dial::Worker)
                .await
                .map_err(WorkerError::Internal)?;
            let peer = Peer {
                address: spec.first_stage_address.clone(),
                channel,
                link: shared.links.to(&spec.first_stage_address),
            };
            outputs.first = Some(self.route(&mut forwarders, peer, &spec.first_stage_node_id, spec).await);
        }
        let compute_spec = ComputeSpec {
            files: located.files,
            weights: shared.weights.clone(),
            model_hash: model.content_hash.clone(),
            layers: layers.clone(),
            total_layers: spec.total_layers as usize,
            stage_index: spec.stage_index,
            wire_dtype,
            device,
            compute_lock: shared.config.compute_lock.clone(),
        };
        let compute = compute::start(
            compute_spec,
            outputs,
            shared.hub.clone(),
            shared.stats.clone(),
            gauges,
        )
        .await?;
        Ok((compute, located.local, forwarders))
    }

    fn heartbeat(&self) -> v1::WorkerEvent {
        let usage = self.usage();
        let counters = self.shared.stats.lifetime();
        v1::WorkerEvent {
            kind: Some(worker_event::Kind::Heartbeat(v1::Heartbeat {
                unix_millis: unix_nanos() / 1_000_000,
                state: self.state() as i32,
                sequences: usage.sequences,
                memory_used_bytes: usage.weights_bytes + usage.kv_cache_bytes,
                kv_cache_bytes: usage.kv_cache_bytes,
                pipelines: usage.pipelines,
                tokens_computed: counters.tokens,
                batches: counters.batches,
                busy_seconds: counters.busy_seconds,
                frames: counters.frames,
                queue_seconds: counters.queue_seconds,
                drain_reason: self.shared.drain.causes().reason(),
                pulls: self.shared.pulls.snapshot(Instant::now()),
                links: self.shared.links.snapshot(),
            })),
        }
    }
}

fn checked_range(spec: &v1::ShardSpec) -> Result<Range<usize>, WorkerError> {
    let (start, end, layers) = (spec.layer_start, spec.layer_end, spec.total_layers);
    if start >= end {
        return Err(WorkerError::InvalidShard(format!(
            "layer range {start}..{end} is empty"
        )));
    }
    if end > layers {
        return Err(WorkerError::ShardOutOfRange { start, end, layers });
    }
    Ok(start as usize..end as usize)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn describe(
        &self,
        request: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::WorkerDescription>, Status> {
        self.authorize(&request, &[Allow::Coordinator, Allow::Workers], "Describe")?;
        Ok(Response::new(self.description()))
    }

    async fn load_shard(
        &self,
        request: Request<v1::LoadShardRequest>,
    ) -> Result<Response<v1::LoadShardResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "LoadShard")?;
        let request = request.into_inner();
        let spec = request
            .shard
            .ok_or_else(|| WorkerError::InvalidShard("no shard in the request".into()))?;
        match self.load_shard(spec, request.keep_other_pipelines).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "load refused");
                Err(e.into())
            }
        }
    }

    async fn unload_shard(
        &self,
        request: Request<v1::UnloadShardRequest>,
    ) -> Result<Response<v1::UnloadShardResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "UnloadShard")?;
        let pipeline = match request.into_inner().selection() {
            strata_proto::ids::ShardSelection::All => None,
            strata_proto::ids::ShardSelection::Pipeline(p) => Some(p.get()),
        };
        Ok(Response::new(v1::UnloadShardResponse {
            freed_bytes: self.unload(pipeline).await,
        }))
    }

    async fn set_draining(
        &self,
        request: Request<v1::SetDrainingRequest>,
    ) -> Result<Response<v1::SetDrainingResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator, Allow::Node(&self.shared.node_id)], "SetDraining")?;
        let changed = self.shared.drain.ask(request.into_inner().draining);
        Ok(Response::new(v1::SetDrainingResponse {
            state: self.state() as i32,
            changed,
        }))
    }

    async fn forward(
        &self,
        request: Request<Streaming<StageMessage>>,
    ) -> Result<Response<v1::ForwardSummary>, Status> {
        let caller = self.authorize(&request, &[Allow::Coordinator, Allow::Workers], "Forward")?;
        let pipeline = strata_proto::pipeline_of(&request);
        let peer = strata_trust::remote_addr(&request);
        let mut stream = request.into_inner();
        let mut stop = self.shared.stop.clone();
        let mut frames = 0;
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(message) = message else { break };
            // Checked per message: a stage opens its stream to the next while that one
            // is still loading the shard that names who may send, and a sender revoked
            // while its stream is open is cut off at its next message.
            let (destination, seq) = match self.shared.admit(pipeline, &caller, &message) {
                Ok(admitted) => admitted,
                Err(e) => {
                    tracing::warn!(?peer, "refused: {}", e.message());
                    return Err(e);
                }
            };
            if let Some(stage_message::Kind::Frame(_)) = &message.kind {
                frames += 1;
            }
            let delivered = match destination {
                Some(tx) => tx.send(message.into()).await.is_ok(),
                None => false,
            };
            if !delivered {
                self.shared.undeliverable(seq);
            }
        }
        Ok(Response::new(v1::ForwardSummary { frames }))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "Events")?;
        // Where the coordinator takes the other events over a local lane, this
        // stream has only heartbeats: an events channel closed from the start (the
        // select below goes on with the heartbeats alone).
        let events =
            if request.get_ref().heartbeats_only { mpsc::unbounded_channel().1 } else { self.shared.hub.subscribe() };
        let events = UnboundedReceiverStream::new(events).map(Ok);
        let me = self.clone();
        let beats = IntervalStream::new(tokio::time::interval(HEARTBEAT_INTERVAL))
            .map(move |_| Ok(me.heartbeat()));
        let mut stop = self.shared.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let stream = futures::stream::select(events, beats).take_until(stopped);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn health(
        &self,
        request: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator, Allow::Workers], "Health")?;
        let pipeline = PipelineId::new(request.get_ref().pipeline_id);
        Ok(Response::new(v1::HealthResponse { state: self.state_for(pipeline) as i32 }))
    }

    async fn stats(
        &self,
        request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "Stats")?;
        let reset = request.into_inner().reset;
        let stats = &self.shared.stats;
        let weights = self.shared.weights.resident_bytes();
        stats.note_weights(weights);
        let response = stats.snapshot(reset);
        if reset {
            // The next window's peak starts from what is held now.
            stats.note_weights(weights);
        }
        Ok(Response::new(response))
    }

    async fn import_sequence(
        &self,
        request: Request<v1::ImportSequenceRequest>,
    ) -> Result<Response<v1::ImportSequenceResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "ImportSequence")?;
        match self.import_kv_sequence(request.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "sequence import refused");
                Err(e.into())
            }
        }
    }

    type ExportKvStream = kv_move::KvStream;

    async fn export_kv(
        &self,
        request: Request<v1::ExportKvRequest>,
    ) -> Result<Response<Self::ExportKvStream>, Status> {
        let caller = self.authorize(&request, &[Allow::Coordinator, Allow::Workers], "ExportKv")?;
        let request = request.into_inner();
        if let Caller::Worker(node) = &caller {
            // A KV cache is a prompt: only the node the coordinator named may pull it.
            let grant = strata_trust::KvGrant {
                importer: node,
                pipeline_id: request.pipeline_id,
                seq_id: request.seq_id,
                layer_start: request.layer_start,
                layer_end: request.layer_end,
            };
            if let Err(e) = strata_trust::transport().check_kv_grant(&grant, &request.grant) {
                tracing::warn!(%node, seq = request.seq_id, error = %e, "refused: ExportKv");
                return Err(Status::permission_denied(format!("ExportKv for worker {node}: {e}")));
            }
        }
        match self.export_kv_chunks(request).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => {
                tracing::warn!(error = %e, "KV export refused");
                Err(e.into())
            }
        }
    }

    async fn enroll(&self, request: Request<v1::EnrollRequest>) -> Result<Response<v1::EnrollResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "Enroll")?;
        let transport = strata_trust::transport();
        let identity = transport
            .node_identity()
            .ok_or_else(|| Status::failed_precondition("this worker runs --insecure: there is nothing to enrol"))?;
        let r = request.into_inner();
        identity
            .install(&r.certificate_der, &r.ca_certificate_der)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        transport.revoke(r.revoked_node_ids.iter().filter_map(|n| NodeId::new(n)));
        tracing::info!(node = %identity.node(), "enrolled: the coordinator signed this worker's certificate");
        Ok(Response::new(v1::EnrollResponse {}))
    }

    async fn revoke(&self, request: Request<v1::RevokeRequest>) -> Result<Response<v1::RevokeResponse>, Status> {
        self.authorize(&request, &[Allow::Coordinator], "Revoke")?;
        let nodes: Vec<NodeId> = request.into_inner().node_ids.iter().filter_map(|n| NodeId::new(n)).collect();
        tracing::info!(?nodes, "revoked: their certificates are refused from now on");
        strata_trust::transport().revoke(nodes);
        Ok(Response::new(v1::RevokeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_about_a_pipeline_a_worker_serves_only_with_a_shard_of_it() {
        let first = PipelineId::new(1);
        let next = PipelineId::new(2);
        // Holding the pipeline's shard, loading or not.
        assert_eq!(state_of(false, false, &[1], first), WorkerState::Serving);
        assert_eq!(state_of(false, true, &[1, 2], first), WorkerState::Serving);
        // Mid-switch, the pipeline's shard gone (its compute thread stopped): the
        // next pipeline's shard, held or loading, does not count.
        assert_eq!(state_of(false, false, &[2], first), WorkerState::Idle);
        assert_eq!(state_of(false, true, &[2], first), WorkerState::Idle);
        assert_eq!(state_of(false, false, &[], next), WorkerState::Idle);
        // Stopping or drained says so whatever it holds.
        assert_eq!(state_of(true, false, &[1], first), WorkerState::Draining);
        // Unnamed, any shard counts, as before.
        assert_eq!(state_of(false, false, &[2], None), WorkerState::Serving);
        assert_eq!(state_of(false, true, &[2], None), WorkerState::Loading);
        assert_eq!(state_of(false, false, &[], None), WorkerState::Idle);
        assert_eq!(state_of(true, false, &[], None), WorkerState::Draining);
    }
}
