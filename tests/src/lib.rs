//! Shared helpers for the end-to-end tests: the `strata` and `strata-worker`
//! binaries, a [`TestCluster`] of real processes on loopback ports they pick, and
//! the single-process reference the cluster must reproduce.
//!
//! Children are found by the lines they print (no sleeps) and always stopped: by
//! [`TestCluster::stop`], or by the guard's drop on a failed test. [`netns`] builds
//! hosts out of network namespaces for the tests that need a network (mDNS, a cut
//! link); [`streams`] keeps requests in flight while a test disturbs a cluster,
//! [`admin`] reads what the coordinator says about it, and [`intruder`] plays the
//! stranger on the network.

pub mod admin;
pub mod clients;
pub mod in_process;
pub mod intruder;
pub mod netns;
pub mod streams;
pub mod wine;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};
use strata_coordinator::cli::children::{Children, LocalTrust, Process};
use strata_model::stage::StageOptions;
use strata_proto::v1::worker_client::WorkerClient;
use strata_trust::{Dial, Transport};
use strata_model::tokenizer::DecodeStream;
use strata_model::{Device, Generator, ModelFile, SamplingParams, Tokenizer};

/// `python3`, seeing the packages `.ci/run` installs into the cache folder
/// (`strata/python`: OpenAI's client; `strata/python-otlp`: an OTLP receiver's).
pub fn python() -> Command {
    let mut command = Command::new("python3");
    command.env("PYTHONPATH", python_path());
    command
}

/// The `PYTHONPATH` of [`python`].
pub fn python_path() -> String {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    let mut paths: Vec<PathBuf> =
        cache.iter().flat_map(|c| [c.join("strata/python"), c.join("strata/python-otlp")]).collect();
    paths.extend(std::env::var_os("PYTHONPATH").iter().flat_map(std::env::split_paths));
    std::env::join_paths(paths).unwrap_or_default().to_string_lossy().into_owned()
}

/// How long a child may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The folder holding the test executable's binaries (`target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/debug/deps/<test> -> target/debug
    let deps = exe.parent().expect("the test executable sits in a folder");
    deps.parent().unwrap_or(deps).to_path_buf()
}

/// Path of a workspace binary, built once per test run so it is never stale.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        // The workspace with its tests, as `cargo test --workspace` (scripts/test)
        // builds it: the same features, so the binaries it built are reused. Two
        // packages alone would resolve other features and compile most crates again.
        command.args(["build", "--workspace", "--bins", "--tests"]);
        // What `cargo test` tells the test program about its own package, not build
        // settings: build scripts that read it (ring's reads the package name,
        // version and manifest folder) rerun when it differs from the outer build's
        // unset values, and with them everything above them (6 minutes on 2 cores).
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "OUT_DIR"
                || ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
            {
                command.env_remove(&*name);
            }
        }
        if bin_dir().ends_with("release") {
            command.arg("--release");
        }
        match command.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build of the binaries exited with {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let path = bin_dir().join(name);
    anyhow::ensure!(path.is_file(), "{} is missing", path.display());
    Ok(path)
}

/// Greedy tokens of the whole model in one process: what a cluster must produce.
pub fn reference_tokens(
    model: &Path,
    prompt: &[u32],
    max_tokens: usize,
) -> anyhow::Result<Vec<u32>> {
    let file = ModelFile::open(model)?;
    let mut generator = Generator::load(&file, &Device::Cpu, StageOptions::default())?;
    Ok(generator
        .generate(prompt, max_tokens, &SamplingParams::greedy(), |_, _| true)?
        .tokens)
}

/// What a greedy completion of `prompt` through the API must say: its text (decoded
/// the way the API streams it, piece by piece, chat markers left out) and its
/// completion token count.
pub fn reference_completion(model: &Path, prompt: &[u32], max_tokens: usize) -> anyhow::Result<(String, u64)> {
    reference_completion_sampled(model, prompt, max_tokens, &SamplingParams::greedy())
}

/// [`reference_completion`] with `sampling` (a seeded sampler draws the same tokens
/// wherever it runs).
pub fn reference_completion_sampled(
    model: &Path,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &SamplingParams,
) -> anyhow::Result<(String, u64)> {
    let file = ModelFile::open(model)?;
    let mut generator = Generator::load(&file, &Device::Cpu, StageOptions::default())?;
    let tokens = generator.generate(prompt, max_tokens, sampling, |_, _| true)?.tokens;
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(model)?.metadata())?;
    let mut stream = DecodeStream::new();
    let mut text = String::new();
    for &t in tokens.iter().filter(|&&t| !tokenizer.is_control(t)) {
        text.push_str(&tokenizer.decode_next(&mut stream, t)?.unwrap_or_default());
    }
    text.push_str(&stream.flush().unwrap_or_default());
    Ok((text, tokens.len() as u64))
}

/// One greedy completion of `prompt` through the HTTP API at `addr`: its text and
/// completion token count.
pub async fn complete(addr: &str, prompt: &[u32], max_tokens: usize) -> anyhow::Result<(String, u64)> {
    let body = serde_json::json!({"model": "test-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let reply = strata_coordinator::cli::http::request(addr, "POST", "/v1/completions", Some(&body)).await?;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    let v = reply.json()?;
    let text = v["choices"][0]["text"].as_str().context("no text")?.to_string();
    Ok((text, v["usage"]["completion_tokens"].as_u64().context("no usage")?))
}

/// Three workers and a coordinator that moves requests to a new pipeline as `how`
/// says (`--move-sequences auto|transfer|replay`), each request waiting up to a minute.
pub async fn start_moving(model: &Path, how: &str) -> anyhow::Result<TestCluster> {
    let serve_args = ["--queue-timeout", "60", "--move-sequences", how].map(String::from).to_vec();
    let options = ClusterOptions { serve_args, ..ClusterOptions::default() };
    let cluster = TestCluster::start(model, &options).await?;
    anyhow::ensure!(cluster.stage_lines.len() == 3, "{:?}", cluster.stage_lines);
    Ok(cluster)
}

/// Options of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub workers: usize,
    /// Give workers the model file; otherwise they pull their shards.
    pub workers_have_model: bool,
    pub threads_per_worker: usize,
    /// `strata serve --sequences`: requests run at once, the rest wait in line (a
    /// flag given twice is refused, so it is not among `serve_args`).
    pub sequences: usize,
    /// Extra flags for `strata serve`.
    pub serve_args: Vec<String>,
    /// Extra flags for each worker, by index (a worker past the end gets none).
    pub worker_args: Vec<Vec<String>>,
    /// How each worker is started, by index: the Linux `strata-worker` where none
    /// (the Windows one under Wine, for instance).
    pub worker_launchers: Vec<Option<wine::Launcher>>,
    /// Plain TCP (`--insecure` on every node) instead of mutual TLS under a CA made
    /// for the cluster.
    pub insecure: bool,
    /// Environment variables for every child, coordinator and workers.
    pub env: Vec<(&'static str, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            workers: 3,
            workers_have_model: true,
            threads_per_worker: 1,
            // The tests keep eight requests in flight at once (`streams`).
            sequences: 8,
            serve_args: Vec::new(),
            worker_args: Vec::new(),
            worker_launchers: Vec::new(),
            insecure: false,
            env: Vec::new(),
        }
    }
}

/// Worker processes, and optionally a coordinator process, on loopback.
pub struct TestCluster {
    pub workers: Vec<String>,
    /// The coordinator's addresses, when one was started.
    pub http: Option<String>,
    pub grpc: Option<String>,
    /// The `stage N ...` lines the coordinator printed.
    pub stage_lines: Vec<String>,
    children: Children,
    /// The test's way into the workers, with the coordinator's rights.
    transport: Transport,
    _cache: tempfile::TempDir,
}

impl TestCluster {
    /// Starts the workers only.
    pub async fn workers(model: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        Self::workers_joining(model, options, None, children_for(options)?).await
    }

    /// `--state-dir` of the cluster's CA for a `strata serve` over these workers
    /// (nothing for an insecure cluster, whose serve must get `--insecure`).
    pub fn trust_args(&self) -> Vec<String> {
        trust_args(&self.children)
    }

    /// A transport with the coordinator's rights in this cluster (plain TCP when it
    /// is insecure), for calling the workers.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// A connection to the worker at `address`, as the coordinator.
    pub async fn worker_client(&self, address: &str) -> anyhow::Result<WorkerClient<tonic::transport::Channel>> {
        Ok(WorkerClient::new(self.transport.connect(address, Dial::Worker).await?))
    }

    /// Worker `index`'s cache folder (its identity is kept below it).
    pub fn worker_cache(&self, index: usize) -> PathBuf {
        self._cache.path().join(format!("worker-{index}"))
    }

    /// The cluster's CA (none: insecure).
    pub fn trust(&self) -> Option<&LocalTrust> {
        self.children.trust.as_ref()
    }

    /// The join token of the cluster (none: insecure).
    pub fn token(&self) -> Option<String> {
        self.children.trust.as_ref().map(|t| t.token())
    }

    async fn workers_joining(
        model: &Path,
        options: &ClusterOptions,
        join: Option<&str>,
        children: Children,
    ) -> anyhow::Result<Self> {
        let cache = tempfile::tempdir()?;
        let mut cluster = Self {
            workers: Vec::new(),
            http: None,
            grpc: None,
            stage_lines: Vec::new(),
            transport: transport_for(&children)?,
            children,
            _cache: cache,
        };
        let worker_bin = binary("strata-worker")?;
        for i in 0..options.workers {
            let mut args: Vec<String> = vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--threads".into(),
                options.threads_per_worker.to_string(),
                "--name".into(),
                format!("worker-{i}"),
                "--cache-dir".into(),
                cluster.worker_cache(i).display().to_string(),
                // Each worker has a fresh cache folder: the self-benchmark would run
                // every time, and the tests need no bandwidth figure.
                "--no-bench".into(),
                // mDNS must never run in the machine's own network namespace.
                "--no-mdns".into(),
            ];
            if options.workers_have_model {
                args.extend(["--model".into(), model.display().to_string()]);
            }
            if let Some(join) = join {
                args.extend(["--join".into(), join.to_string()]);
            }
            args.extend(options.worker_args.get(i).into_iter().flatten().cloned());
            let mut env = vec![("STRATA_LOG", "warn".to_string())];
            env.extend(options.env.iter().cloned());
            match &cluster.children.trust {
                Some(trust) => env.push(("STRATA_TOKEN", trust.token())),
                None => args.push("--insecure".into()),
            }
            let program = match options.worker_launchers.get(i).cloned().flatten() {
                Some(launcher) => {
                    args.splice(0..0, launcher.leading_args);
                    env.extend(launcher.env);
                    launcher.program
                }
                None => worker_bin.clone(),
            };
            let mut p = Process::spawn(&format!("worker-{i}"), &program, &args, &env)?;
            let line = p
                .wait_for_line("worker listening", READY_TIMEOUT, |_| {})
                .await?;
            cluster
                .workers
                .push(Process::field(&line, "grpc").context("no grpc= in the worker's line")?);
            p.drain_output();
            cluster.children.processes.push(p);
        }
        Ok(cluster)
    }

    /// Starts the workers and a `strata serve` coordinator over them; returns once
    /// the coordinator serves HTTP.
    pub async fn start(model: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        let mut cluster = Self::workers(model, options).await?;
        let mut args = serve_args(model, options);
        args.extend(cluster.trust_args());
        for w in &cluster.workers {
            args.extend(["--worker".into(), w.clone()]);
        }
        args.extend(options.serve_args.iter().cloned());
        let mut env = vec![("STRATA_LOG", "warn".to_string())];
        env.extend(options.env.iter().cloned());
        let mut p = Process::spawn("coordinator", &binary("strata")?, &args, &env)?;
        let (line, stages) = until_serving(&mut p).await?;
        p.drain_output();
        cluster.children.processes.push(p);
        cluster.stage_lines = stages;
        cluster.http = Process::field(&line, "http");
        cluster.grpc = Process::field(&line, "grpc");
        Ok(cluster)
    }

    /// Starts a coordinator first, then workers that `--join` it (and pull their
    /// shards from it unless `workers_have_model`).
    pub async fn start_joined(model: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        let children = children_for(options)?;
        let mut args = serve_args(model, options);
        args.extend(trust_args(&children));
        args.extend(["--min-workers".into(), options.workers.to_string()]);
        args.extend(options.serve_args.iter().cloned());
        let mut coordinator = Process::spawn(
            "coordinator",
            &binary("strata")?,
            &args,
            &[("STRATA_LOG", "warn".into())],
        )?;
        let line = coordinator
            .wait_for_line("coordinator grpc=", READY_TIMEOUT, |_| {})
            .await?;
        let grpc = Process::field(&line, "grpc").context("no grpc= in the coordinator's line")?;
        let mut cluster = Self::workers_joining(model, options, Some(&grpc), children).await;
        let mut cluster = match cluster.as_mut() {
            Ok(_) => cluster?,
            Err(_) => {
                coordinator.stop(Duration::from_secs(5)).await;
                return cluster;
            }
        };
        let ready = until_serving(&mut coordinator).await;
        coordinator.drain_output();
        cluster.children.processes.push(coordinator);
        let (line, stages) = ready?;
        cluster.stage_lines = stages;
        cluster.http = Process::field(&line, "http");
        cluster.grpc = Some(grpc);
        Ok(cluster)
    }

    pub fn http(&self) -> &str {
        self.http
            .as_deref()
            .expect("this cluster has a coordinator")
    }

    /// SIGKILLs worker `index` (as a crash would end it).
    pub async fn kill_worker(&mut self, index: usize) -> anyhow::Result<()> {
        self.worker_process(index)?.kill().await;
        Ok(())
    }

    /// Sends worker `index` SIGTERM (a clean stop, as `systemctl stop`), without
    /// waiting for it to exit.
    pub fn terminate_worker(&mut self, index: usize) -> anyhow::Result<()> {
        self.worker_process(index)?.terminate();
        Ok(())
    }

    fn worker_process(&mut self, index: usize) -> anyhow::Result<&mut Process> {
        let name = format!("worker-{index}");
        self.children.processes.iter_mut().find(|p| p.name == name).context("no such worker")
    }

    /// The name and process id of every child still running (`worker-0`, ...,
    /// `coordinator`), for reading their memory from `/proc`.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children.processes.iter().filter_map(|p| Some((p.name.clone(), p.id()?))).collect()
    }

    /// Stops every child cleanly (SIGTERM, waiting for each to exit).
    pub async fn stop(mut self) {
        self.children.stop_all().await;
    }
}

/// Waits until a `strata serve` child serves HTTP: its `listening http=...` line,
/// and the `stage N ...` lines it printed before.
pub async fn until_serving(coordinator: &mut Process) -> anyhow::Result<(String, Vec<String>)> {
    let mut stages = Vec::new();
    let line = coordinator
        .wait_for_line("listening http=", READY_TIMEOUT, |l| {
            if l.starts_with("stage ") {
                stages.push(l.to_string());
            }
        })
        .await?;
    Ok((line, stages))
}

pub use strata_model::synthetic::real_test_model as real_model;
pub use strata_model::synthetic::real_gemma_model;

/// The children of a cluster: with a CA of its own, unless `options.insecure`.
fn children_for(options: &ClusterOptions) -> anyhow::Result<Children> {
    Ok(if options.insecure { Children::default() } else { Children::secured()? })
}

fn transport_for(children: &Children) -> anyhow::Result<Transport> {
    match &children.trust {
        Some(trust) => trust.coordinator_transport(),
        None => Ok(Transport::Insecure),
    }
}

fn trust_args(children: &Children) -> Vec<String> {
    match &children.trust {
        Some(trust) => vec!["--state-dir".into(), trust.state_dir().display().to_string()],
        None => vec!["--insecure".into()],
    }
}

/// `strata serve` over `model` on loopback ports it picks, one compute thread,
/// `options.sequences`, mDNS off.
fn serve_args(model: &Path, options: &ClusterOptions) -> Vec<String> {
    vec![
        "--threads".into(),
        "1".into(),
        "serve".into(),
        "--model".into(),
        model.display().to_string(),
        "--model-id".into(),
        "test-model".into(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--placement".into(),
        "spread".into(),
        "--sequences".into(),
        options.sequences.to_string(),
        // mDNS must never run in the machine's own network namespace.
        "--no-mdns".into(),
    ]
}
