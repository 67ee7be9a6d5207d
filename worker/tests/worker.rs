//! In-process workers on 127.0.0.1:0 with a synthetic model: bad input gets a clear
//! status or SequenceError while other sequences go on, weights are pulled from a
//! (fake) coordinator and cached, a two-stage pipeline reproduces the
//! single-process tokens, and two pipelines on one worker share their common layers.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{Stream, StreamExt};
use strata_model::stage::StageOptions;
use strata_model::synthetic::SyntheticModel;
use strata_model::{Device, Generator, ModelFile, SamplingParams, Tokenizer};
use strata_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{
    self, stage_message, weight_chunk, worker_event, ErrorCode, StageMessage, WireDtype,
    WorkerEvent,
};
use strata_proto::{encode_hidden, MAX_MESSAGE_BYTES};
use strata_worker::weights::sha256_file;
use strata_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const DEADLINE: Duration = Duration::from_secs(20);

struct Model {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    hash: String,
    layers: u32,
}

fn synthetic() -> Model {
    synthetic_with(SyntheticModel::tiny().layers)
}

fn synthetic_with(layers: usize) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = SyntheticModel { layers, ..SyntheticModel::tiny() }.write_to(dir.path()).unwrap();
    let hash = sha256_file(&path).unwrap();
    Model {
        _dir: dir,
        path,
        hash,
        layers: layers as u32,
    }
}

/// A worker running in this process; stops when dropped.
struct TestWorker {
    address: String,
    stop: Option<oneshot::Sender<()>>,
    _cache: tempfile::TempDir,
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start_worker(models: Vec<std::path::PathBuf>) -> TestWorker {
    let cache = tempfile::tempdir().unwrap();
    start_worker_with_cache(models, cache).await
}

async fn start_worker_with_cache(
    models: Vec<std::path::PathBuf>,
    cache: tempfile::TempDir,
) -> TestWorker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let config = WorkerConfig {
        models,
        ..WorkerConfig::local(cache.path().to_path_buf())
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = strata_worker::run(listener, config, None, async {
            let _ = stopped.await;
        })
        .await;
    });
    TestWorker {
        address,
        stop: Some(stop),
        _cache: cache,
    }
}

async fn client(address: &str) -> WorkerClient<Channel> {
    let channel = strata_proto::transport::endpoint(address)
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn shard(model: &Model, layers: std::ops::Range<u32>, stage_index: u32) -> v1::ShardSpec {
    v1::ShardSpec {
        model: Some(v1::ModelRef {
            model_id: "synthetic".into(),
            content_hash: model.hash.clone(),
        }),
        layer_start: layers.start,
        layer_end: layers.end,
        total_layers: model.layers,
        wire_dtype: WireDtype::F32 as i32,
        stage_index,
        ..Default::default()
    }
}

async fn load(
    client: &mut WorkerClient<Channel>,
    spec: v1::ShardSpec,
) -> Result<v1::LoadShardResponse, Status> {
    client
        .load_shard(v1::LoadShardRequest {
            shard: Some(spec),
            keep_other_pipelines: false,
        })
        .await
        .map(Response::into_inner)
}

/// Events of one worker, read with a deadline.
struct Events(tonic::Streaming<WorkerEvent>);

impl Events {
    async fn subscribe(client: &mut WorkerClient<Channel>) -> Self {
        Self(
            client
                .events(v1::EventsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        )
    }

    /// The next token or error event (heartbeats and progress are skipped).
    async fn next(&mut self) -> anyhow::Result<worker_event::Kind> {
        loop {
            let event = tokio::time::timeout(DEADLINE, self.0.message())
                .await
                .context("no event in time")??;
            match event.and_then(|e| e.kind) {
                Some(worker_event::Kind::Heartbeat(_))
                | Some(worker_event::Kind::LoadProgress(_)) => continue,
                Some(kind) => return Ok(kind),
                None => bail!("the event stream ended"),
            }
        }
    }
}

/// An open Forward stream into a worker.
struct Sender(mpsc::UnboundedSender<StageMessage>);

impl Sender {
    fn open(
        client: &WorkerClient<Channel>,
    ) -> (
        Self,
        tokio::task::JoinHandle<Result<Response<v1::ForwardSummary>, Status>>,
    ) {
        Self::open_on(client, None)
    }

    /// A stream into the shard of `pipeline`; without one, into the newest shard.
    fn open_on(
        client: &WorkerClient<Channel>,
        pipeline: Option<u64>,
    ) -> (
        Self,
        tokio::task::JoinHandle<Result<Response<v1::ForwardSummary>, Status>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            let frames = UnboundedReceiverStream::new(rx);
            match pipeline {
                Some(id) => client.forward(strata_proto::with_pipeline(frames, id)).await,
                None => client.forward(frames).await,
            }
        });
        (Self(tx), call)
    }

    fn send(&self, kind: stage_message::Kind) {
        self.0.send(StageMessage { kind: Some(kind) }).unwrap();
    }

    fn open_seq(&self, seq_id: u64) {
        self.send(stage_message::Kind::Open(v1::OpenSequence {
            seq_id,
            sampling: Some(v1::SamplingParams {
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        }));
    }

    fn frame(
        &self,
        seq_id: u64,
        position: u32,
        tokens: Vec<u32>,
        hidden: Option<v1::Tensor>,
        sample: bool,
    ) {
        self.send(stage_message::Kind::Frame(v1::ActivationFrame {
            seq_id,
            position,
            tokens,
            hidden,
            sample,
            sent_unix_nanos: 0,
            ..Default::default()
        }));
    }
}

fn hidden_rows(rows: usize, width: usize) -> v1::Tensor {
    let values: Vec<f32> = (0..rows * width)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
        .collect();
    encode_hidden(&values, rows, width, WireDtype::F32)
}

fn expect_error(kind: worker_event::Kind, seq: u64, code: ErrorCode, words: &str) {
    match kind {
        worker_event::Kind::Error(e) => {
            assert_eq!(e.seq_id, seq, "{e:?}");
            assert_eq!(e.code, code as i32, "{e:?}");
            assert!(
                e.message.contains(words),
                "{:?} should mention {words:?}",
                e.message
            );
        }
        other => panic!("expected an error for sequence {seq}, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_fail_their_sequence_and_the_worker_goes_on() -> anyhow::Result<()> {
    let model = synthetic();
    let worker = start_worker(vec![model.path.clone()]).await;
    let mut c = client(&worker.address).await;
    // The last stage: it takes hidden states, so every kind of bad tensor applies.
    let r = load(&mut c, shard(&model, 2..4, 1)).await?;
    assert!(r.weights_were_local);
    let mut events = Events::subscribe(&mut c).await;
    let (tx, _call) = Sender::open(&c);
    let width = 64;

    tx.open_seq(1);
    tx.frame(1, 0, vec![1, 2], Some(hidden_rows(2, width - 1)), true);
    expect_error(events.next().await?, 1, ErrorCode::BadFrame, "shape");

    tx.open_seq(2);
    tx.frame(
        2,
        0,
        vec![1, 2],
        Some(v1::Tensor {
            dtype: 99,
            ..hidden_rows(2, width)
        }),
        true,
    );
    expect_error(events.next().await?, 2, ErrorCode::BadFrame, "dtype");

    tx.open_seq(3);
    let mut short = hidden_rows(2, width);
    short.data.truncate(short.data.len() - 3);
    tx.frame(3, 0, vec![1, 2], Some(short), true);
    expect_error(events.next().await?, 3, ErrorCode::BadFrame, "bytes");

    tx.frame(4, 0, vec![1], Some(hidden_rows(1, width)), true);
    expect_error(
        events.next().await?,
        4,
        ErrorCode::UnknownSequence,
        "never opened",
    );

    tx.open_seq(5);
    tx.frame(5, 0, vec![1, 2], Some(hidden_rows(2, width)), true);
    assert!(
        matches!(events.next().await?, worker_event::Kind::Token(t) if t.seq_id == 5 && t.position == 2)
    );
    tx.frame(5, 7, vec![3], Some(hidden_rows(1, width)), true);
    expect_error(
        events.next().await?,
        5,
        ErrorCode::PositionMismatch,
        "expected position 2, got 7",
    );

    // A grammar that does not compile fails its sequence when it opens; one that
    // does constrains the first token the last stage samples.
    let constrained = |seq_id, grammar: &str| {
        stage_message::Kind::Open(v1::OpenSequence {
            seq_id,
            sampling: Some(v1::SamplingParams { repetition_penalty: 1.0, ..Default::default() }),
            constraint: Some(v1::OutputConstraint { grammar: grammar.into(), prompt_tokens: 2 }),
            ..Default::default()
        })
    };
    tx.send(constrained(7, "{"));
    expect_error(events.next().await?, 7, ErrorCode::BadFrame, "grammar");
    tx.send(constrained(8, strata_grammar::Grammar::json_object().as_wire()));
    tx.frame(8, 0, vec![1, 2], Some(hidden_rows(2, width)), true);
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model.path)?.metadata())?;
    match events.next().await? {
        worker_event::Kind::Token(t) => assert!(tokenizer.decode(&[t.token])?.starts_with('{'), "{t:?}"),
        other => panic!("expected a token, got {other:?}"),
    }

    // A good sequence, sent after all that, is served; so is sequence 5 at the right position.
    tx.open_seq(6);
    tx.frame(6, 0, vec![9, 8, 7], Some(hidden_rows(3, width)), true);
    match events.next().await? {
        worker_event::Kind::Token(t) => assert_eq!((t.seq_id, t.position), (6, 3)),
        other => panic!("expected a token, got {other:?}"),
    }
    tx.frame(5, 2, vec![3], Some(hidden_rows(1, width)), true);
    match events.next().await? {
        worker_event::Kind::Token(t) => assert_eq!((t.seq_id, t.position), (5, 3)),
        other => panic!("expected a token, got {other:?}"),
    }

    // Sequences opened with a copy of another's start: one whose source is unknown, or
    // holds fewer positions, fails; one sent right behind its source's frame copies
    // what that frame computed and goes on from there.
    let forked = |seq_id, from, positions| {
        stage_message::Kind::Open(v1::OpenSequence {
            seq_id,
            sampling: Some(v1::SamplingParams { repetition_penalty: 1.0, ..Default::default() }),
            prefix: Some(v1::SequencePrefix { seq_id: from, positions }),
            ..Default::default()
        })
    };
    tx.send(forked(9, 42, 1));
    expect_error(events.next().await?, 9, ErrorCode::PrefixUnavailable, "sequence 42 is not open");
    tx.send(forked(10, 6, 9));
    expect_error(events.next().await?, 10, ErrorCode::PrefixUnavailable, "9 positions of sequence 6 asked, 3 held");
    tx.open_seq(11);
    tx.frame(11, 0, vec![4, 5, 6], Some(hidden_rows(3, width)), false);
    tx.send(forked(12, 11, 2));
    tx.frame(12, 2, vec![6], Some(hidden_rows(1, width)), true);
    match events.next().await? {
        worker_event::Kind::Token(t) => assert_eq!((t.seq_id, t.position), (12, 3)),
        other => panic!("expected a token, got {other:?}"),
    }
    let health = c.health(v1::HealthRequest::default()).await?.into_inner();
    assert_eq!(health.state, v1::WorkerState::Serving as i32);
    Ok(())
}

#[tokio::test]
async fn bad_shards_get_a_status_that_names_the_problem() -> anyhow::Result<()> {
    let model = synthetic();
    let worker = start_worker(vec![model.path.clone()]).await;
    let mut c = client(&worker.address).await;

    let beyond = v1::ShardSpec {
        layer_end: 9,
        ..shard(&model, 2..4, 1)
    };
    let s = load(&mut c, beyond).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("2..9") && s.message().contains("4 layers"),
        "{}",
        s.message()
    );

    // The spec claims more layers than the model has: the worker finds out from the file.
    let claims_more = v1::ShardSpec {
        layer_end: 9,
        total_layers: 9,
        ..shard(&model, 2..4, 1)
    };
    let s = load(&mut c, claims_more).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("outside the model's 4 layers"),
        "{}",
        s.message()
    );

    let other_model = v1::ShardSpec {
        model: Some(v1::ModelRef {
            model_id: "other".into(),
            content_hash: "ab".repeat(32),
        }),
        ..shard(&model, 2..4, 1)
    };
    let s = load(&mut c, other_model).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("hash mismatch") && s.message().contains(&"ab".repeat(32)),
        "{}",
        s.message()
    );

    let not_hex = v1::ShardSpec {
        model: Some(v1::ModelRef {
            model_id: "x".into(),
            content_hash: "../../etc".into(),
        }),
        ..shard(&model, 2..4, 1)
    };
    assert_eq!(
        load(&mut c, not_hex).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let no_next = shard(&model, 0..2, 0);
    let s = load(&mut c, no_next).await.unwrap_err();
    assert!(
        s.message().contains("no next stage address"),
        "{}",
        s.message()
    );

    // After all that the worker loads a good shard.
    load(&mut c, shard(&model, 2..4, 1)).await?;
    Ok(())
}

#[tokio::test]
async fn an_oversized_message_gets_the_transport_limit_status() -> anyhow::Result<()> {
    let model = synthetic();
    let worker = start_worker(vec![model.path.clone()]).await;
    let mut c = client(&worker.address).await;
    load(&mut c, shard(&model, 2..4, 1)).await?;
    // This client would send anything; the server's limit must refuse it.
    let unlimited = c.clone().max_encoding_message_size(usize::MAX);
    let (tx, call) = Sender::open(&unlimited);
    tx.open_seq(1);
    let huge = v1::Tensor {
        dtype: WireDtype::F32 as i32,
        shape: vec![1, 64],
        data: vec![0; MAX_MESSAGE_BYTES + 1],
    };
    tx.frame(1, 0, vec![1], Some(huge), true);
    let status = tokio::time::timeout(DEADLINE, call).await??.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    // The worker still serves a new stream.
    let mut events = Events::subscribe(&mut c).await;
    let (tx, _call) = Sender::open(&c);
    tx.open_seq(2);
    tx.frame(2, 0, vec![1], Some(hidden_rows(1, 64)), true);
    assert!(matches!(events.next().await?, worker_event::Kind::Token(t) if t.seq_id == 2));
    Ok(())
}

/// A coordinator that serves only FetchWeights, cutting shards from `model`.
struct FakeCoordinator {
    model: std::path::PathBuf,
    hash: String,
    fetches: Arc<Fetches>,
    corrupt: bool,
}

/// What a fake coordinator was asked for and sent, and how it misbehaves (tests
/// change that between pulls).
#[derive(Default)]
struct Fetches {
    ranges: std::sync::Mutex<Vec<std::ops::Range<usize>>>,
    offsets: std::sync::Mutex<Vec<u64>>,
    /// Data bytes sent, over every fetch.
    served: AtomicU64,
    /// Fail the stream after this many data chunks, as a link that goes down; 0
    /// never does.
    cut_after: AtomicUsize,
    /// A pause before each data chunk, in milliseconds.
    chunk_delay_ms: AtomicU64,
}

impl Fetches {
    fn count(&self) -> usize {
        self.ranges.lock().unwrap().len()
    }

    fn offsets(&self) -> Vec<u64> {
        self.offsets.lock().unwrap().clone()
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

/// Bytes per data chunk of the fake coordinator: small, so a transfer takes several.
const FAKE_CHUNK_BYTES: usize = 8 * 1024;

/// The shard file of `layers` of the model at `path`, as a coordinator cuts it.
fn shard_bytes(path: &std::path::Path, hash: &str, layers: std::ops::Range<usize>) -> (Vec<u8>, Vec<String>) {
    let file = ModelFile::open(path).unwrap();
    let mut bytes = std::io::Cursor::new(Vec::new());
    let names = strata_model::shard_file::write_shard(&file, layers, hash, &mut bytes).unwrap();
    (bytes.into_inner(), names)
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn join(
        &self,
        _: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(
        &self,
        request: Request<v1::FetchWeightsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        self.fetches.ranges.lock().unwrap().push(r.layer_start as usize..r.layer_end as usize);
        self.fetches.offsets.lock().unwrap().push(r.offset);
        assert_eq!(r.model.unwrap().content_hash, self.hash);
        let (bytes, names) = shard_bytes(&self.model, &self.hash, r.layer_start as usize..r.layer_end as usize);
        // As the real coordinator does.
        if r.offset > bytes.len() as u64 {
            return Err(Status::invalid_argument("offset past the end of the shard file"));
        }
        let sha = if self.corrupt {
            "00".repeat(32)
        } else {
            sha256_hex(&bytes)
        };
        let manifest = Ok(v1::WeightChunk {
            kind: Some(weight_chunk::Kind::Manifest(v1::WeightManifest {
                total_bytes: bytes.len() as u64,
                sha256: sha,
                tensor_names: names,
                offset: r.offset,
            })),
        });
        let mut data: Vec<Option<Vec<u8>>> =
            bytes[r.offset as usize..].chunks(FAKE_CHUNK_BYTES).map(|c| Some(c.to_vec())).collect();
        let cut_after = self.fetches.cut_after.load(Ordering::SeqCst);
        if cut_after > 0 && cut_after < data.len() {
            // `None`: the link goes down here.
            data.truncate(cut_after);
            data.push(None);
        }
        let delay = Duration::from_millis(self.fetches.chunk_delay_ms.load(Ordering::SeqCst));
        let fetches = self.fetches.clone();
        let data = futures::stream::iter(data).then(move |chunk| {
            let fetches = fetches.clone();
            async move {
                tokio::time::sleep(delay).await;
                let chunk = chunk.ok_or_else(|| Status::unavailable("the link went down"))?;
                fetches.served.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                Ok(v1::WeightChunk { kind: Some(weight_chunk::Kind::Data(chunk)) })
            }
        });
        Ok(Response::new(Box::pin(futures::stream::once(async { manifest }).chain(data))))
    }

    async fn health(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse {
            state: v1::WorkerState::Serving as i32,
        }))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    strata_worker::weights::hex(&sha2::Sha256::digest(bytes))
}

async fn start_fake_coordinator(
    model: &Model,
    corrupt: bool,
) -> (String, Arc<Fetches>, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let fetches = Arc::new(Fetches::default());
    let service = FakeCoordinator {
        model: model.path.clone(),
        hash: model.hash.clone(),
        fetches: fetches.clone(),
        corrupt,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        strata_proto::transport::server()
            .add_service(CoordinatorServer::new(service))
            .serve_with_incoming_shutdown(strata_proto::transport::incoming(listener), async {
                let _ = stopped.await;
            }),
    );
    (address, fetches, stop)
}

/// Greedy tokens of the whole model in one process.
fn reference_tokens(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let file = ModelFile::open(&model.path).unwrap();
    let mut generator = Generator::load(&file, &Device::Cpu, StageOptions::default()).unwrap();
    generator
        .generate(prompt, n, &SamplingParams::greedy(), |_, _| true)
        .unwrap()
        .tokens
}

/// Drives one greedy sequence through a pipeline whose stage 0 is `first`, feeding
/// tokens back by hand (the coordinator's job) unless the sequence is direct-return.
async fn generate(
    first: &WorkerClient<Channel>,
    events: &mut Events,
    seq: u64,
    prompt: &[u32],
    n: usize,
    direct: bool,
) -> anyhow::Result<Vec<u32>> {
    generate_on(first, None, events, seq, prompt, n, direct).await
}

/// As [`generate`], into stage 0's shard of `pipeline` (the newest without one).
async fn generate_on(
    first: &WorkerClient<Channel>,
    pipeline: Option<u64>,
    events: &mut Events,
    seq: u64,
    prompt: &[u32],
    n: usize,
    direct: bool,
) -> anyhow::Result<Vec<u32>> {
    let (tx, _call) = Sender::open_on(first, pipeline);
    tx.send(stage_message::Kind::Open(v1::OpenSequence {
        seq_id: seq,
        sampling: Some(v1::SamplingParams {
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        direct_return: direct,
        end_position: (prompt.len() + n) as u32,
        stop_tokens: vec![],
        traceparent: String::new(),
        logprobs_top: None,
        constraint: None,
        prefix: None,
    }));
    tx.frame(seq, 0, prompt.to_vec(), None, true);
    let mut out = Vec::new();
    while out.len() < n {
        match events.next().await? {
            worker_event::Kind::Token(t) if t.seq_id == seq => {
                assert_eq!(t.position as usize, prompt.len() + out.len());
                out.push(t.token);
                if !direct && out.len() < n {
                    tx.frame(seq, t.position, vec![t.token], None, true);
                }
            }
            worker_event::Kind::Token(_) => {}
            other => bail!("unexpected event {other:?}"),
        }
    }
    tx.send(stage_message::Kind::Release(v1::ReleaseSequence {
        seq_id: seq,
    }));
    Ok(out)
}

#[tokio::test]
async fn weights_are_pulled_checked_and_cached() -> anyhow::Result<()> {
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    // No --model: everything comes from the coordinator.
    let cache = tempfile::tempdir()?;
    let cache_path = cache.path().to_path_buf();
    let worker = start_worker_with_cache(vec![], cache).await;
    let mut c = client(&worker.address).await;
    let spec = v1::ShardSpec {
        weights_source: source.clone(),
        ..shard(&model, 0..4, 0)
    };
    let mut events = Events::subscribe(&mut c).await;
    let r = load(&mut c, spec.clone()).await?;
    assert!(!r.weights_were_local);
    assert_eq!(fetches.count(), 1);
    let cached = strata_worker::weights::cache_path(&cache_path, &model.hash, &(0..4));
    assert!(cached.is_file(), "{} should exist", cached.display());
    // Progress was reported while pulling.
    let mut progress = None;
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_millis(200), events.0.message()).await
    {
        if let Some(worker_event::Kind::LoadProgress(p)) = event.kind {
            progress = Some(p);
            if p.bytes_done == p.bytes_total {
                break;
            }
        }
    }
    let progress = progress.context("no LoadProgress events")?;
    assert_eq!(progress.bytes_done, progress.bytes_total);

    // The pulled shard computes what the whole model computes.
    let prompt = [5, 80, 120, 33];
    let mut events = Events::subscribe(&mut c).await;
    assert_eq!(
        generate(&c, &mut events, 1, &prompt, 6, false).await?,
        reference_tokens(&model, &prompt, 6)
    );

    // Loading again takes the cached file: no second fetch.
    c.unload_shard(v1::UnloadShardRequest { pipeline_id: 0 })
        .await?;
    load(&mut c, spec).await?;
    assert_eq!(fetches.count(), 1);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_pull_is_refused_and_not_cached() -> anyhow::Result<()> {
    let model = synthetic();
    let (source, _fetches, _stop) = start_fake_coordinator(&model, true).await;
    let cache = tempfile::tempdir()?;
    let cache_path = cache.path().to_path_buf();
    let worker = start_worker_with_cache(vec![], cache).await;
    let mut c = client(&worker.address).await;
    let spec = v1::ShardSpec {
        weights_source: source,
        ..shard(&model, 0..4, 0)
    };
    let s = load(&mut c, spec).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("pulled shard"), "{}", s.message());
    let dir = cache_path.join(&model.hash);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing may stay in the cache: {left:?}");
    Ok(())
}

fn model_ref(model: &Model) -> v1::ModelRef {
    v1::ModelRef { model_id: "synthetic".into(), content_hash: model.hash.clone() }
}

/// Issue 9: a pull cut mid-way keeps what it received, and the next pull of the
/// shard asks the coordinator only for the rest.
#[tokio::test]
async fn issue_9_a_cut_pull_resumes_from_the_bytes_it_kept() -> anyhow::Result<()> {
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    let (whole, _) = shard_bytes(&model.path, &model.hash, 0..4);
    let total = whole.len() as u64;
    let kept = 3 * FAKE_CHUNK_BYTES as u64;
    assert!(kept < total / 2, "the test needs a shard of more chunks ({total} bytes)");
    fetches.cut_after.store(3, Ordering::SeqCst);
    let cache = tempfile::tempdir()?;
    let dest = strata_worker::weights::cache_path(cache.path(), &model.hash, &(0..4));
    let partial = strata_worker::weights::partial_path(&dest);
    let worker = start_worker_with_cache(vec![], cache).await;
    let mut c = client(&worker.address).await;
    let spec = v1::ShardSpec { weights_source: source, ..shard(&model, 0..4, 0) };
    let s = load(&mut c, spec.clone()).await.unwrap_err();
    assert!(s.message().contains("the link went down"), "{s:?}");
    assert!(!dest.exists());
    assert_eq!(std::fs::read(&partial)?, whole[..kept as usize], "the bytes received stay");

    // The link is back.
    fetches.cut_after.store(0, Ordering::SeqCst);
    load(&mut c, spec).await?;
    assert_eq!(fetches.offsets(), [0, kept]);
    assert_eq!(fetches.served(), total, "{kept} bytes the first time, only the rest the second");
    assert_eq!(sha256_file(&dest)?, sha256_hex(&whole));
    assert!(!partial.exists());
    Ok(())
}

/// Issue 9: kept bytes that are wrong fail the whole file's hash; they are dropped
/// and the pull starts over from byte 0 at once, so the load still succeeds.
#[tokio::test]
async fn issue_9_a_corrupt_partial_is_dropped_and_the_pull_starts_over() -> anyhow::Result<()> {
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    let (whole, _) = shard_bytes(&model.path, &model.hash, 0..4);
    let total = whole.len() as u64;
    let cache = tempfile::tempdir()?;
    let dest = strata_worker::weights::cache_path(cache.path(), &model.hash, &(0..4));
    let partial = strata_worker::weights::partial_path(&dest);
    std::fs::create_dir_all(dest.parent().context("no folder")?)?;
    let mut bad = whole[..20_000].to_vec();
    bad[1_000] ^= 0xff;
    std::fs::write(&partial, &bad)?;
    let worker = start_worker_with_cache(vec![], cache).await;
    let mut c = client(&worker.address).await;
    load(&mut c, v1::ShardSpec { weights_source: source, ..shard(&model, 0..4, 0) }).await?;
    assert_eq!(fetches.offsets(), [20_000, 0]);
    assert_eq!(fetches.served(), total - 20_000 + total);
    assert_eq!(sha256_file(&dest)?, sha256_hex(&whole));
    assert!(!partial.exists());
    Ok(())
}

/// Issue 9: a partial file written by hand with the first bytes of the shard is
/// resumed from; one longer than the shard gets its offset refused by the
/// coordinator, and is dropped.
#[tokio::test]
async fn issue_9_a_pull_resumes_a_partial_file_and_drops_one_too_long() -> anyhow::Result<()> {
    use strata_worker::weights::{partial_path, pull, Pulled, Pulls};
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    let (whole, _) = shard_bytes(&model.path, &model.hash, 0..4);
    let total = whole.len() as u64;
    let cache = tempfile::tempdir()?;
    let dest = strata_worker::weights::cache_path(cache.path(), &model.hash, &(0..4));
    std::fs::create_dir_all(dest.parent().context("no folder")?)?;
    let pulls = Pulls::new(Arc::default());

    std::fs::write(partial_path(&dest), &whole[..50_000])?;
    let pulled = pull(&source, &model_ref(&model), &(0..4), &dest, &pulls).await?;
    assert_eq!(pulled, Pulled { fetched_bytes: total - 50_000, resumed_bytes: 50_000 });
    assert_eq!(fetches.served(), total - 50_000);
    assert_eq!(sha256_file(&dest)?, sha256_hex(&whole));

    std::fs::remove_file(&dest)?;
    std::fs::write(partial_path(&dest), vec![1u8; total as usize + 100])?;
    let pulled = pull(&source, &model_ref(&model), &(0..4), &dest, &pulls).await?;
    assert_eq!(pulled, Pulled { fetched_bytes: total, resumed_bytes: 0 });
    assert_eq!(fetches.offsets(), [50_000, total + 100, 0]);
    assert_eq!(sha256_file(&dest)?, sha256_hex(&whole));
    assert!(!partial_path(&dest).exists());
    Ok(())
}

/// Issue 9: two pulls of one shard at once in one worker never write its partial
/// file together: the second waits for the first, then takes the cached file.
#[tokio::test]
async fn issue_9_two_pulls_of_one_shard_at_once_make_one_transfer() -> anyhow::Result<()> {
    use strata_worker::weights::{pull, Pulls};
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    fetches.chunk_delay_ms.store(5, Ordering::SeqCst);
    let (whole, _) = shard_bytes(&model.path, &model.hash, 0..4);
    let cache = tempfile::tempdir()?;
    let dest = strata_worker::weights::cache_path(cache.path(), &model.hash, &(0..4));
    let pulls = Pulls::new(Arc::default());
    let model = model_ref(&model);
    let (a, b) = tokio::join!(pull(&source, &model, &(0..4), &dest, &pulls), pull(&source, &model, &(0..4), &dest, &pulls));
    let mut fetched = [a?.fetched_bytes, b?.fetched_bytes];
    fetched.sort();
    assert_eq!(fetched, [0, whole.len() as u64]);
    assert_eq!(fetches.count(), 1);
    assert_eq!(sha256_file(&dest)?, sha256_hex(&whole));
    Ok(())
}

/// Issue 9: while it pulls, a worker's heartbeats say how far the pull is and how
/// fast it goes; once done, they show no pull.
#[tokio::test]
async fn issue_9_heartbeats_carry_the_pull_progress() -> anyhow::Result<()> {
    let model = synthetic();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    let total = shard_bytes(&model.path, &model.hash, 0..4).0.len() as u64;
    // About two seconds for the whole shard: several heartbeats see it.
    fetches.chunk_delay_ms.store(2000 * FAKE_CHUNK_BYTES as u64 / total, Ordering::SeqCst);
    let worker = start_worker(vec![]).await;
    let mut c = client(&worker.address).await;
    let mut events = Events::subscribe(&mut c).await;
    let spec = v1::ShardSpec { weights_source: source, ..shard(&model, 0..4, 0) };
    let mut loader = c.clone();
    let loading = tokio::spawn(async move { load(&mut loader, spec).await });
    let seen = loop {
        let h = heartbeat(&mut events).await?;
        if let Some(p) = h.pulls.first().filter(|p| p.bytes_done > 0) {
            break *p;
        }
    };
    assert_eq!((seen.layer_start, seen.layer_end, seen.bytes_total), (0, 4, total));
    assert!(seen.bytes_done < total, "{seen:?}");
    assert!(seen.bytes_per_second > 0.0, "{seen:?}");
    loading.await??;
    // Heartbeats sent while the test waited for the load are still queued: skip to
    // one sent after it.
    let loaded_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let after = loop {
        let h = heartbeat(&mut events).await?;
        if h.unix_millis > loaded_at {
            break h;
        }
    };
    assert!(after.pulls.is_empty(), "the pull is over, yet heartbeats show it: {:?}", after.pulls);
    Ok(())
}

/// Two workers, a pipeline of the synthetic model over them: layer 0 on the first,
/// the rest on the second; its clients, first stage first.
struct TwoStages {
    _workers: [TestWorker; 2],
    first: WorkerClient<Channel>,
    last: WorkerClient<Channel>,
}

async fn two_stages(model: &Model) -> anyhow::Result<TwoStages> {
    let a = start_worker(vec![model.path.clone()]).await;
    let b = start_worker(vec![model.path.clone()]).await;
    let (mut first, mut last) = (client(&a.address).await, client(&b.address).await);
    load(&mut last, v1::ShardSpec { first_stage_address: a.address.clone(), ..shard(model, 1..4, 1) }).await?;
    load(&mut first, v1::ShardSpec { next_stage_address: b.address.clone(), ..shard(model, 0..1, 0) }).await?;
    Ok(TwoStages { _workers: [a, b], first, last })
}

#[tokio::test]
async fn a_two_stage_pipeline_matches_one_process_both_ways_back() -> anyhow::Result<()> {
    let model = synthetic();
    let TwoStages { _workers, first: ca, last: mut cb } = two_stages(&model).await?;
    let mut events = Events::subscribe(&mut cb).await;
    for (seq, prompt) in [[3u32, 1, 4, 1], [2, 7, 1, 8]].iter().enumerate() {
        let expected = reference_tokens(&model, prompt, 8);
        assert_eq!(
            generate(&ca, &mut events, seq as u64 * 2, prompt, 8, false).await?,
            expected
        );
        assert_eq!(
            generate(&ca, &mut events, seq as u64 * 2 + 1, prompt, 8, true).await?,
            expected
        );
    }
    // Hop latencies were recorded on the receiving side.
    let stats = cb
        .stats(v1::StatsRequest { reset: true })
        .await?
        .into_inner();
    assert!(!stats.hop_micros.is_empty() && stats.frames > 0);
    let _ = std::io::stderr().flush();
    Ok(())
}

/// On the direct path the last stage reports tokens a few at a time
/// (`strata_worker::held_tokens`): every token still comes, in order, the first
/// while the sequence is still being generated, none much later than its hold
/// after it was sampled. (That the first is never held is the unit tests' of
/// `HeldTokens::report`: timed here, it would depend on this machine's load.)
#[tokio::test]
async fn direct_return_reports_every_token_in_order_the_first_at_once() -> anyhow::Result<()> {
    let model = synthetic();
    let TwoStages { _workers, first: ca, last: mut cb } = two_stages(&model).await?;
    let mut events = Events::subscribe(&mut cb).await;
    let (prompt, n) = ([3u32, 1, 4, 1], 240);
    let expected = reference_tokens(&model, &prompt, n);
    let (tx, _call) = Sender::open_on(&ca, None);
    tx.send(stage_message::Kind::Open(v1::OpenSequence {
        seq_id: 1,
        sampling: Some(v1::SamplingParams { repetition_penalty: 1.0, ..Default::default() }),
        direct_return: true,
        end_position: (prompt.len() + n) as u32,
        ..Default::default()
    }));
    tx.frame(1, 0, prompt.to_vec(), None, true);
    // (token, when sampled, when it arrived), by this machine's clock.
    let mut reports = Vec::new();
    while reports.len() < n {
        match events.next().await? {
            worker_event::Kind::Token(t) => {
                assert_eq!(t.position as usize, prompt.len() + reports.len(), "tokens come in order");
                reports.push((t.token, t.sent_unix_nanos, strata_worker::events::unix_nanos()));
            }
            other => bail!("unexpected event {other:?}"),
        }
    }
    let tokens: Vec<u32> = reports.iter().map(|r| r.0).collect();
    assert_eq!(tokens, expected);
    let last_sampled = reports[n - 1].1;
    assert!(reports[0].2 < last_sampled, "the first token was held until the last was sampled");
    let hold = strata_worker::held_tokens::TOKEN_HOLD.as_nanos() as u64;
    let slack = Duration::from_secs(5).as_nanos() as u64;
    for (i, &(_, sampled, arrived)) in reports.iter().enumerate() {
        let late = arrived.saturating_sub(sampled);
        assert!(late < hold + slack, "token {i} came {} ms after it was sampled", late / 1_000_000);
    }
    tx.send(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: 1 }));
    Ok(())
}

/// The binary as an operator starts it: `--max-memory` caps what Describe offers
/// (`--no-bench` keeps the start quick), `devices --json` says the same before
/// anything is started, and a reserve that leaves nothing stops the start.
#[tokio::test]
async fn the_binary_offers_what_max_memory_allows() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    const OFFER: u64 = 64 << 20;
    let binary = env!("CARGO_BIN_EXE_strata-worker");
    let cache = tempfile::tempdir()?;
    let cache_dir = cache.path().display().to_string();

    let mut child = tokio::process::Command::new(binary)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--max-memory",
            "64MiB",
            "--no-bench",
            "--threads",
            "1",
            // mDNS must never run in the machine's own network namespace.
            "--no-mdns",
            // Described by a plain client below, with no coordinator to enrol it.
            "--insecure",
        ])
        .args(["--cache-dir", &cache_dir])
        .env("STRATA_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .context("no listening line in time")??;
    let line = line.context("the worker exited before listening")?;
    let address = line
        .split_once("grpc=")
        .context("no grpc= in the line")?
        .1
        .trim()
        .to_string();
    let description = client(&address)
        .await
        .describe(v1::DescribeRequest {})
        .await?
        .into_inner();
    child.kill().await?;
    assert_eq!(description.memory_offered_bytes, OFFER);
    let [device] = description.devices.as_slice() else {
        bail!("one device expected: {:?}", description.devices)
    };
    assert_eq!(device.kind, v1::DeviceKind::Cpu as i32);
    assert_eq!(
        device.memory_bandwidth_bytes_per_second, 0.0,
        "not benchmarked: unknown"
    );
    assert!(
        device.total_memory_bytes >= OFFER && !device.name.is_empty(),
        "{device:?}"
    );

    let out = tokio::process::Command::new(binary)
        .args([
            "devices",
            "--json",
            "--max-memory",
            "64MiB",
            "--cache-dir",
            &cache_dir,
        ])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["offer"]["offered_bytes"], OFFER, "{json}");
    assert_eq!(json["device"]["device"], "cpu", "{json}");

    let out = tokio::process::Command::new(binary)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--reserve",
            "1000TiB",
            "--no-bench",
            "--no-mdns",
            "--cache-dir",
            &cache_dir,
        ])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pass a smaller --reserve"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it must not start listening");
    Ok(())
}

/// The next heartbeat.
async fn heartbeat(events: &mut Events) -> anyhow::Result<v1::Heartbeat> {
    loop {
        let event = tokio::time::timeout(DEADLINE, events.0.message()).await.context("no heartbeat in time")??;
        match event.and_then(|e| e.kind) {
            Some(worker_event::Kind::Heartbeat(h)) => return Ok(h),
            Some(_) => continue,
            None => bail!("the event stream ended"),
        }
    }
}

/// Waits for a heartbeat with no sequence left (so no KV cache either).
async fn wait_idle(events: &mut Events) -> anyhow::Result<v1::Heartbeat> {
    loop {
        let h = heartbeat(events).await?;
        if h.sequences == 0 {
            return Ok(h);
        }
    }
}

/// The pipelines the next heartbeat lists.
async fn heartbeat_pipelines(events: &mut Events) -> anyhow::Result<Vec<u64>> {
    loop {
        let event = tokio::time::timeout(DEADLINE, events.0.message()).await.context("no heartbeat in time")??;
        match event.and_then(|e| e.kind) {
            Some(worker_event::Kind::Heartbeat(h)) => return Ok(h.pipelines),
            Some(_) => continue,
            None => bail!("the event stream ended"),
        }
    }
}

/// A worker holding the whole model for pipelines 7 and 9, its client, and its events.
async fn two_whole_pipelines(model: &Model) -> anyhow::Result<(TestWorker, WorkerClient<Channel>, Events)> {
    let worker = start_worker(vec![model.path.clone()]).await;
    let mut c = client(&worker.address).await;
    let whole = |pipeline_id| v1::ShardSpec { pipeline_id, ..shard(model, 0..model.layers, 0) };
    load(&mut c, whole(7)).await?;
    c.load_shard(v1::LoadShardRequest { shard: Some(whole(9)), keep_other_pipelines: true }).await?;
    let events = Events::subscribe(&mut c).await;
    Ok((worker, c, events))
}

#[tokio::test]
async fn two_pipelines_live_side_by_side_and_unload_apart() -> anyhow::Result<()> {
    let model = synthetic();
    let (_worker, mut c, mut events) = two_whole_pipelines(&model).await?;
    assert_eq!(heartbeat_pipelines(&mut events).await?, [7, 9]);
    let prompt = [3u32, 1, 4, 1];
    let expected = reference_tokens(&model, &prompt, 6);
    // One stage that is first and last feeds its own tokens back.
    assert_eq!(generate(&c, &mut events, 1, &prompt, 6, true).await?, expected);
    // Pipeline 9's shard shares every weight with 7's: unloading it frees no weight.
    wait_idle(&mut events).await?;
    let freed = c.unload_shard(v1::UnloadShardRequest { pipeline_id: 9 }).await?.into_inner().freed_bytes;
    assert_eq!(freed, 0);
    assert_eq!(heartbeat_pipelines(&mut events).await?, [7]);
    // Asked about a pipeline, it serves only while it holds that one's shard.
    assert_eq!(health_of(&mut c, 7).await?, v1::WorkerState::Serving);
    assert_eq!(health_of(&mut c, 9).await?, v1::WorkerState::Idle);
    assert_eq!(generate(&c, &mut events, 2, &prompt, 6, false).await?, expected);
    // Loading without keeping others replaces them.
    load(&mut c, v1::ShardSpec { pipeline_id: 11, ..shard(&model, 0..model.layers, 0) }).await?;
    assert_eq!(heartbeat_pipelines(&mut events).await?, [11]);
    assert_eq!(health_of(&mut c, 7).await?, v1::WorkerState::Idle);
    assert_eq!(health_of(&mut c, 11).await?, v1::WorkerState::Serving);
    assert_eq!(health_of(&mut c, 0).await?, v1::WorkerState::Serving, "0 asks about any shard");
    Ok(())
}

/// The worker's state as far as pipeline `pipeline_id` is concerned.
async fn health_of(c: &mut WorkerClient<Channel>, pipeline_id: u64) -> anyhow::Result<v1::WorkerState> {
    let state = c.health(v1::HealthRequest { pipeline_id }).await?.into_inner().state;
    Ok(v1::WorkerState::try_from(state)?)
}

#[tokio::test]
async fn a_draining_worker_says_so_and_takes_no_shard() -> anyhow::Result<()> {
    let model = synthetic();
    let w = start_worker(vec![model.path.clone()]).await;
    let mut c = client(&w.address).await;
    let r = c.set_draining(v1::SetDrainingRequest { draining: true }).await?.into_inner();
    assert!(r.changed);
    assert_eq!(r.state, v1::WorkerState::Draining as i32);
    assert!(!c.set_draining(v1::SetDrainingRequest { draining: true }).await?.into_inner().changed);
    assert_eq!(c.health(v1::HealthRequest::default()).await?.into_inner().state, v1::WorkerState::Draining as i32);
    let refused = load(&mut c, shard(&model, 0..model.layers, 0)).await.expect_err("a draining worker loads nothing");
    assert!(refused.message().contains("draining"), "{}", refused.message());
    c.set_draining(v1::SetDrainingRequest { draining: false }).await?;
    load(&mut c, shard(&model, 0..model.layers, 0)).await?;
    assert_eq!(c.health(v1::HealthRequest::default()).await?.into_inner().state, v1::WorkerState::Serving as i32);
    Ok(())
}

/// The first stage of two pipelines on one worker: a re-plan moves worker A from
/// 0..6 to 2..8 (and B from 6..8 to 0..2). A's new shard loads only layers 6..8 and
/// the head; both pipelines compute the single-process tokens; unloading the old
/// shard frees only what the new one does not share; memory is counted once.
#[tokio::test]
async fn a_new_pipeline_loads_only_the_layers_the_worker_lacks() -> anyhow::Result<()> {
    let model = synthetic_with(8);
    let sizes = ModelFile::open(&model.path)?.sizes().clone();
    let a = start_worker(vec![model.path.clone()]).await;
    let b = start_worker(vec![model.path.clone()]).await;
    let (mut ca, mut cb) = (client(&a.address).await, client(&b.address).await);
    let load_kept = |c: &mut WorkerClient<Channel>, spec: v1::ShardSpec| {
        let mut c = c.clone();
        async move {
            let request = v1::LoadShardRequest { shard: Some(spec), keep_other_pipelines: true };
            c.load_shard(request).await.map(Response::into_inner)
        }
    };
    let on = |layers: std::ops::Range<u32>, stage: u32, pipeline_id: u64| v1::ShardSpec {
        pipeline_id,
        ..shard(&model, layers, stage)
    };
    // Pipeline 1: A 0..6 -> B 6..8.
    load_kept(&mut cb, v1::ShardSpec { first_stage_address: a.address.clone(), ..on(6..8, 1, 1) }).await?;
    let r = load_kept(&mut ca, v1::ShardSpec { next_stage_address: b.address.clone(), ..on(0..6, 0, 1) }).await?;
    assert_eq!((r.weight_bytes, r.shared_weight_bytes), (sizes.stage_bytes(0..6), 0));
    let mut events_a = Events::subscribe(&mut ca).await;
    let old = sizes.stage_bytes(0..6);
    assert_eq!(heartbeat(&mut events_a).await?.memory_used_bytes, old);

    // Pipeline 2: B 0..2 -> A 2..8, loaded beside pipeline 1.
    let r = load_kept(&mut ca, v1::ShardSpec { first_stage_address: b.address.clone(), ..on(2..8, 1, 2) }).await?;
    let added = sizes.layers[6] + sizes.layers[7] + sizes.head;
    assert_eq!(r.weight_bytes, added, "only layers 6..8 and the head are loaded");
    assert_eq!(r.shared_weight_bytes, sizes.stage_bytes(2..8) - added);
    load_kept(&mut cb, v1::ShardSpec { next_stage_address: a.address.clone(), ..on(0..2, 0, 2) }).await?;
    let h = heartbeat(&mut events_a).await?;
    assert_eq!((h.memory_used_bytes, h.pipelines.as_slice()), (old + added, &[1, 2][..]));
    let stats = ca.stats(v1::StatsRequest { reset: true }).await?.into_inner();
    assert_eq!((stats.weight_loaded_bytes, stats.weight_peak_bytes), (old + added, old + added));

    // Both pipelines compute what one process computes.
    let prompt = [3u32, 1, 4, 1, 5];
    let expected = reference_tokens(&model, &prompt, 6);
    let mut events_b = Events::subscribe(&mut cb).await;
    assert_eq!(generate_on(&ca, Some(1), &mut events_b, 1, &prompt, 6, false).await?, expected);
    assert_eq!(generate_on(&cb, Some(2), &mut events_a, 2, &prompt, 6, true).await?, expected);

    // Unloading pipeline 1 frees what pipeline 2 does not use: the embedding and layers 0..2.
    wait_idle(&mut events_a).await?;
    let freed = ca.unload_shard(v1::UnloadShardRequest { pipeline_id: 1 }).await?.into_inner().freed_bytes;
    assert_eq!(freed, sizes.embedding + sizes.layers[0] + sizes.layers[1]);
    assert_eq!(heartbeat(&mut events_a).await?.memory_used_bytes, sizes.stage_bytes(2..8));
    assert_eq!(generate_on(&cb, Some(2), &mut events_a, 3, &prompt, 6, true).await?, expected);
    wait_idle(&mut events_a).await?;
    let freed = ca.unload_shard(v1::UnloadShardRequest { pipeline_id: 2 }).await?.into_inner().freed_bytes;
    assert_eq!(freed, sizes.stage_bytes(2..8));
    let h = heartbeat(&mut events_a).await?;
    assert_eq!((h.memory_used_bytes, h.pipelines.len()), (0, 0));
    let stats = ca.stats(v1::StatsRequest { reset: false }).await?.into_inner();
    assert_eq!((stats.weight_loaded_bytes, stats.weight_peak_bytes), (0, old + added));
    Ok(())
}

/// A worker without the model pulls, for a pipeline loaded beside another, only the
/// layer ranges it does not hold yet.
#[tokio::test]
async fn a_worker_that_pulls_fetches_only_the_layers_it_lacks() -> anyhow::Result<()> {
    let model = synthetic_with(8);
    let sizes = ModelFile::open(&model.path)?.sizes().clone();
    let (source, fetches, _stop) = start_fake_coordinator(&model, false).await;
    let worker = start_worker(vec![]).await;
    let mut c = client(&worker.address).await;
    let mut loaded = Vec::new();
    for (pipeline_id, layers) in [(1, 4..8), (2, 2..8), (3, 0..8)] {
        let spec = v1::ShardSpec { weights_source: source.clone(), pipeline_id, ..shard(&model, layers, 0) };
        let r = c.load_shard(v1::LoadShardRequest { shard: Some(spec), keep_other_pipelines: true }).await?;
        loaded.push(r.into_inner().weight_bytes);
    }
    assert_eq!(*fetches.ranges.lock().unwrap(), [4..8, 2..4, 0..2]);
    // The whole model, first and last, embeds through the head it shares with 4..8.
    assert_eq!(loaded, [sizes.stage_bytes(4..8), sizes.layers[2] + sizes.layers[3], sizes.layers[0] + sizes.layers[1]]);
    let prompt = [5u32, 80, 120, 33];
    let mut events = Events::subscribe(&mut c).await;
    assert_eq!(generate_on(&c, Some(3), &mut events, 1, &prompt, 6, true).await?, reference_tokens(&model, &prompt, 6));
    Ok(())
}

/// An open Forward stream into one pipeline's shard of a worker.
fn sender_to(client: &WorkerClient<Channel>, pipeline: u64) -> Sender {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = client.clone();
    tokio::spawn(async move {
        client.forward(strata_proto::with_pipeline(UnboundedReceiverStream::new(rx), pipeline)).await
    });
    Sender(tx)
}

/// Sampled, with a repetition penalty: the continuation after a move must see the
/// whole history, not only the last token.
fn sampled(seed: u64) -> (v1::SamplingParams, SamplingParams) {
    let wire = v1::SamplingParams {
        temperature: 0.9,
        top_k: Some(40),
        repetition_penalty: 1.5,
        repeat_last_n: 64,
        seed,
        ..Default::default()
    };
    let params = SamplingParams {
        temperature: 0.9,
        top_k: Some(40),
        repetition_penalty: 1.5,
        repeat_last_n: 64,
        seed,
        ..SamplingParams::greedy()
    };
    (wire, params)
}

/// The next token of `seq` (other sequences' tokens are skipped).
async fn next_token(events: &mut Events, seq: u64) -> anyhow::Result<v1::TokenSampled> {
    loop {
        match events.next().await? {
            worker_event::Kind::Token(t) if t.seq_id == seq => return Ok(t),
            worker_event::Kind::Token(_) => {}
            other => bail!("unexpected event {other:?}"),
        }
    }
}

fn source(address: &str, pipeline_id: u64, seq_id: u64, layers: std::ops::Range<u32>) -> v1::KvSource {
    v1::KvSource {
        address: address.to_string(),
        pipeline_id,
        seq_id,
        layer_start: layers.start,
        layer_end: layers.end,
        grant: Vec::new(),
    }
}

/// A sampled sequence runs on pipeline 7 (worker A layers 0..2, worker B 2..4), moves
/// by KV import onto pipeline 9 (A, all layers: half of its KV copied from A's own
/// other shard, half pulled from B) and continues with exactly the tokens one
/// uninterrupted process samples.
#[tokio::test]
async fn a_sequence_moved_by_kv_import_continues_exactly() -> anyhow::Result<()> {
    let model = synthetic();
    let a = start_worker(vec![model.path.clone()]).await;
    let b = start_worker(vec![model.path.clone()]).await;
    let (mut ca, mut cb) = (client(&a.address).await, client(&b.address).await);
    load(&mut cb, v1::ShardSpec { pipeline_id: 7, ..shard(&model, 2..4, 1) }).await?;
    let first = v1::ShardSpec { pipeline_id: 7, next_stage_address: b.address.clone(), ..shard(&model, 0..2, 0) };
    load(&mut ca, first).await?;
    let whole = v1::ShardSpec { pipeline_id: 9, ..shard(&model, 0..model.layers, 0) };
    ca.load_shard(v1::LoadShardRequest { shard: Some(whole), keep_other_pipelines: true }).await?;
    let (mut old_events, mut new_events) = (Events::subscribe(&mut cb).await, Events::subscribe(&mut ca).await);

    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let total = 14;
    let file = ModelFile::open(&model.path)?;
    let mut generator = Generator::load(&file, &Device::Cpu, StageOptions::default())?;
    // The first seed whose uninterrupted run is not cut short by an end token.
    let mut run = |seed| -> anyhow::Result<_> {
        let (wire, params) = sampled(seed);
        Ok((wire, generator.generate(&prompt, total, &params, |_, _| true)?.tokens))
    };
    let mut found = None;
    for seed in 1..100 {
        let (wire, tokens) = run(seed)?;
        if tokens.len() == total {
            found = Some((wire, tokens));
            break;
        }
    }
    let (wire, expected) = found.context("every seed's reference ended early")?;

    // Six tokens on the old pipeline; the old stages run one step further (the
    // sixth token), which the move leaves out: it carries positions 0..P+4.
    let old = sender_to(&ca, 7);
    let open = v1::OpenSequence { seq_id: 1, sampling: Some(wire), ..Default::default() };
    old.send(stage_message::Kind::Open(open.clone()));
    old.frame(1, 0, prompt.to_vec(), None, true);
    let mut got = Vec::new();
    while got.len() < 6 {
        let t = next_token(&mut old_events, 1).await?;
        got.push(t.token);
        if got.len() < 6 {
            old.frame(1, t.position, vec![t.token], None, true);
        }
    }
    assert_eq!(got, expected[..6]);
    let k = 5;
    let n = prompt.len() + k - 1;
    let mut history = prompt.to_vec();
    history.extend(&got[..k - 1]);
    let imported = ca
        .import_sequence(v1::ImportSequenceRequest {
            pipeline_id: 9,
            open: Some(v1::OpenSequence { seq_id: 2, ..open }),
            tokens: history,
            positions: n as u32,
            sources: vec![source(&b.address, 7, 1, 2..4), source(&a.address, 7, 1, 0..2)],
        })
        .await?
        .into_inner();
    assert!(imported.bytes_pulled > 0 && imported.bytes_pulled == imported.bytes_local, "{imported:?}");
    old.send(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: 1 }));

    let new = sender_to(&ca, 9);
    let mut moved = got[..k].to_vec();
    new.frame(2, n as u32, vec![got[k - 1]], None, true);
    while moved.len() < total {
        let t = next_token(&mut new_events, 2).await?;
        assert_eq!(t.position as usize, prompt.len() + moved.len());
        moved.push(t.token);
        new.frame(2, t.position, vec![t.token], None, true);
    }
    assert_eq!(moved, expected);
    Ok(())
}

#[tokio::test]
async fn bad_kv_moves_get_a_status_that_names_the_problem() -> anyhow::Result<()> {
    let model = synthetic();
    let (a, mut c, mut events) = two_whole_pipelines(&model).await?;
    let old = sender_to(&c, 7);
    old.open_seq(1);
    old.frame(1, 0, vec![1, 2, 3, 4], None, true);
    next_token(&mut events, 1).await?;

    let export = |pipeline_id, seq_id, layers: std::ops::Range<u32>, positions| v1::ExportKvRequest {
        pipeline_id,
        seq_id,
        layer_start: layers.start,
        layer_end: layers.end,
        positions,
        grant: Vec::new(),
    };
    let cases = [
        (export(5, 1, 0..4, 4), Code::NotFound, "no shard of pipeline 5"),
        (export(7, 99, 0..4, 4), Code::NotFound, "sequence 99"),
        (export(7, 1, 0..4, 5), Code::OutOfRange, "positions 0..5 asked, 4 cached"),
        (export(7, 1, 2..6, 4), Code::OutOfRange, "layers 2..6 are not all held"),
    ];
    for (request, code, words) in cases {
        let refused = c.export_kv(request).await.expect_err("a bad export is refused");
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(words), "{:?} should mention {words:?}", refused.message());
    }
    let mut chunks = c.export_kv(export(7, 1, 1..3, 3)).await?.into_inner();
    let mut layers = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        assert_eq!((chunk.kv_heads, chunk.head_dim, chunk.dtype), (2, 16, WireDtype::F32 as i32));
        layers.push((chunk.layer, chunk.position, chunk.count));
    }
    assert_eq!(layers, [(1, 0, 3), (2, 0, 3)]);

    let import = |pipeline_id, tokens: Vec<u32>, sources| v1::ImportSequenceRequest {
        pipeline_id,
        open: Some(v1::OpenSequence { seq_id: 2, ..Default::default() }),
        positions: 3,
        tokens,
        sources,
    };
    let here = a.address.as_str();
    let cases = [
        (import(5, vec![1, 2, 3], vec![source(here, 7, 1, 0..4)]), Code::NotFound, "no shard of pipeline 5"),
        (import(9, vec![1, 2], vec![source(here, 7, 1, 0..4)]), Code::InvalidArgument, "2 token ids for 3"),
        (
            import(9, vec![1, 2, 3], vec![source(here, 7, 1, 0..2)]),
            Code::InvalidArgument,
            "sources cover layers [0..2]",
        ),
        (
            import(9, vec![1, 2, 3], vec![source(here, 7, 1, 0..2), source(here, 7, 1, 1..4)]),
            Code::InvalidArgument,
            "sources cover layers [0..2, 1..4]",
        ),
        (import(9, vec![1, 2, 3], vec![source(here, 7, 42, 0..4)]), Code::NotFound, "sequence 42"),
        (import(9, vec![1, 2, 3], vec![source(here, 8, 1, 0..4)]), Code::NotFound, "pipeline 8"),
        (import(9, vec![1, 2, 3], vec![source("127.0.0.1:1", 7, 1, 0..4)]), Code::Unavailable, "127.0.0.1:1"),
        // Beyond the model's context (256): refused before anything is pulled.
        (
            v1::ImportSequenceRequest {
                positions: 257,
                tokens: vec![1; 257],
                ..import(9, vec![], vec![source(here, 7, 1, 0..4)])
            },
            Code::InvalidArgument,
            "beyond the model's context of 256",
        ),
    ];
    for (request, code, words) in cases {
        let refused = c.import_sequence(request).await.expect_err("a bad import is refused");
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(words), "{:?} should mention {words:?}", refused.message());
    }

    // A peer whose model has another KV shape: refused before anything is imported.
    let narrow_dir = tempfile::tempdir()?;
    let narrow = SyntheticModel { kv_heads: 1, ..SyntheticModel::tiny() }.write_to(narrow_dir.path())?;
    let narrow_model =
        Model { hash: sha256_file(&narrow)?, path: narrow.clone(), _dir: narrow_dir, layers: model.layers };
    let b = start_worker(vec![narrow]).await;
    let mut cb = client(&b.address).await;
    load(&mut cb, v1::ShardSpec { pipeline_id: 3, ..shard(&narrow_model, 0..model.layers, 0) }).await?;
    let mut b_events = Events::subscribe(&mut cb).await;
    let on_b = sender_to(&cb, 3);
    on_b.open_seq(1);
    on_b.frame(1, 0, vec![1, 2, 3, 4], None, true);
    next_token(&mut b_events, 1).await?;
    let refused = c
        .import_sequence(import(9, vec![1, 2, 3], vec![source(&b.address, 3, 1, 0..4)]))
        .await
        .expect_err("a KV of another shape is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("shape [1, _, 16], expected [2, _, 16]"), "{}", refused.message());

    // After all that, a good import works and the sequence goes on at position 3.
    c.import_sequence(import(9, vec![1, 2, 3], vec![source(here, 7, 1, 0..4)])).await?;
    let new = sender_to(&c, 9);
    new.frame(2, 3, vec![4], None, true);
    let t = next_token(&mut events, 2).await?;
    assert_eq!(t.position, 4);
    Ok(())
}
