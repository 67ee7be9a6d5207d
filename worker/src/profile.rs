//! What this worker computes on and what it offers the planner: its `--device`,
//! the memory it lets a stage fill, and the weight bandwidth its self-benchmark
//! measured.
//!
//! Memory offered = min(`--max-memory`, basis − reserve), where
//!
//! * on a GPU the basis is its total memory and the default reserve 1 GiB when it
//!   drives a display (the desktop keeps using it) and 512 MiB otherwise (the CUDA
//!   context and cuBLAS workspace live outside the planner's sums);
//! * on the CPU the basis is the RAM available at start (`MemAvailable`: what other
//!   programs already hold is not ours to offer), and the default reserve 10% of
//!   the total RAM, at least 512 MiB and at most 4 GiB, for the page cache and the
//!   process's own allocations.
//!
//! A reserve that leaves nothing, or a `--max-memory` of zero, is refused at start.

use candle_core::quantized::GgmlDType;
use serde::Serialize;
use strata_model::ModelFile;
use strata_proto::units::{format_bytes, MemoryLimits};
use strata_proto::v1;

use crate::compute::ComputeLock;
use crate::config::WorkerConfig;
use crate::devices::{self, CpuInfo, FreeMemory, GpuInfo, Inventory};
use crate::self_bench::{self, BenchCache, BenchKey, BenchMode, BenchSize, BenchSource};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("--device {device}: no such CUDA device ({why})")]
    NoSuchGpu { device: String, why: String },
    #[error("--device {0}: this build has no CUDA support (rebuild with `--features cuda`)")]
    NoCudaSupport(String),
    #[error("cannot read how much memory this machine has; pass --max-memory")]
    UnknownMemory,
    #[error(
        "a reserve of {} leaves nothing of the {} {basis} of {device}; pass a smaller --reserve",
        format_bytes(*reserve),
        format_bytes(*basis_bytes)
    )]
    ReserveTooLarge {
        device: String,
        reserve: u64,
        basis: &'static str,
        basis_bytes: u64,
    },
    #[error("{device} offers no memory (--max-memory is 0)")]
    NothingOffered { device: String },
    #[error("cannot open the compute lock {path}: {source}")]
    ComputeLock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the device probe did not finish: {0}")]
    Task(String),
}

/// The memory a device offers, and how that was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offer {
    /// What the offer starts from: a GPU's total memory, or the RAM available at start.
    pub basis_bytes: u64,
    pub reserve_bytes: u64,
    pub max_memory_bytes: Option<u64>,
    pub offered_bytes: u64,
}

impl Offer {
    /// Applies `limits` to a device with `basis_bytes`; `device` names it in errors.
    pub fn new(
        device: &str,
        basis: &'static str,
        basis_bytes: u64,
        default_reserve: u64,
        limits: MemoryLimits,
    ) -> Result<Self, ProfileError> {
        let reserve = limits.reserve.unwrap_or(default_reserve);
        if limits.max_memory == Some(0) {
            return Err(ProfileError::NothingOffered {
                device: device.into(),
            });
        }
        if reserve >= basis_bytes {
            return Err(ProfileError::ReserveTooLarge {
                device: device.into(),
                reserve,
                basis,
                basis_bytes,
            });
        }
        Ok(Self {
            basis_bytes,
            reserve_bytes: reserve,
            max_memory_bytes: limits.max_memory,
            offered_bytes: limits.offered(basis_bytes, default_reserve),
        })
    }
}

/// The default reserve of a GPU (see the module docs).
pub fn gpu_reserve(gpu: &GpuInfo) -> u64 {
    if gpu.drives_display {
        GIB
    } else {
        512 * MIB
    }
}

/// The default reserve of the CPU's RAM (see the module docs).
pub fn cpu_reserve(total_bytes: u64) -> u64 {
    (total_bytes / 10).clamp(512 * MIB, 4 * GIB)
}

/// The worker's compute device as detected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub name: String,
    pub total_memory_bytes: u64,
    pub free_memory_bytes: u64,
    /// Vector extensions for a CPU, compute capability for a GPU.
    pub capability: String,
}

/// The self-benchmark's figure and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub dtype: String,
    pub threads: usize,
    /// 0 when unknown.
    pub bytes_per_second: f64,
    pub source: BenchSource,
}

/// What this worker has and offers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub device: DeviceReport,
    pub offer: Offer,
    pub bench: BenchReport,
    /// Everything detected on the machine, the worker's own device included.
    pub inventory: Inventory,
    /// The type the benchmark runs in (`bench.dtype` names it).
    #[serde(skip)]
    dtype: GgmlDType,
}

impl Profile {
    /// Detection and the offer, without the benchmark (reported as skipped). The
    /// free memory of the worker's own GPU is read, and of every GPU when `all_free`
    /// (each read creates a context on that GPU, which a serving worker leaves to
    /// the workers of the other GPUs).
    pub fn detect(config: &WorkerConfig, all_free: bool) -> Result<Self, ProfileError> {
        let ordinal = devices::cuda_ordinal(&config.device);
        let free = match (all_free, ordinal) {
            (true, _) => FreeMemory::All,
            (false, Some(n)) => FreeMemory::Of(n),
            (false, None) => FreeMemory::None,
        };
        let inventory = devices::detect(free);
        let (device, offer) = match ordinal {
            None => cpu_offer(&inventory.cpu, config.memory)?,
            Some(n) => gpu_offer(&inventory, n, &config.device, config.memory)?,
        };
        let dtype = bench_dtype(config);
        let bench = BenchReport {
            dtype: format!("{dtype:?}"),
            threads: config.threads,
            bytes_per_second: 0.0,
            source: BenchSource::Skipped,
        };
        Ok(Self {
            device,
            offer,
            bench,
            inventory,
            dtype,
        })
    }

    /// Everything a serving worker needs at start: detection, the offer, and the
    /// benchmark by `config.bench`, taken under the compute lock if there is one.
    /// Blocking: call it before the runtime serves or on a blocking thread.
    pub fn probe(config: &WorkerConfig) -> Result<Self, ProfileError> {
        let mut profile = Self::detect(config, false)?;
        if profile.device.device != "cpu" && !cfg!(feature = "cuda") {
            return Err(ProfileError::NoCudaSupport(config.device.clone()));
        }
        profile.bench(config, config.bench)?;
        Ok(profile)
    }

    /// Runs (or looks up) the benchmark by `mode`.
    pub fn bench(&mut self, config: &WorkerConfig, mode: BenchMode) -> Result<(), ProfileError> {
        let (dtype, threads) = (self.dtype, config.threads);
        let key_threads = if self.device.device == "cpu" {
            threads
        } else {
            0
        };
        let key = BenchKey::new(
            format!("{} {}", self.device.device, self.device.name),
            dtype,
            key_threads,
        );
        let lock = match &config.compute_lock {
            Some(path) => {
                Some(
                    ComputeLock::open(path).map_err(|source| ProfileError::ComputeLock {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let (bytes_per_second, source) =
            self_bench::bandwidth(mode, &BenchCache::in_dir(&config.cache_dir), &key, || {
                let device = strata_model::parse_device(&config.device)?;
                // Workers sharing the machine would otherwise measure each other.
                let _turn = lock.as_ref().map(ComputeLock::acquire);
                self_bench::measure(&device, dtype, BenchSize::for_device(&device))
            });
        if let BenchSource::Failed(why) = &source {
            tracing::warn!(device = %config.device, error = %why, "self-benchmark failed; bandwidth unknown");
        }
        self.bench = BenchReport {
            dtype: format!("{dtype:?}"),
            threads,
            bytes_per_second,
            source,
        };
        Ok(())
    }

    /// The device as the wire describes it; a CPU's free memory is read now.
    pub fn device_proto(&self) -> v1::Device {
        let d = &self.device;
        let ordinal = devices::cuda_ordinal(&d.device);
        let free = match ordinal {
            None => devices::memory_info().1,
            Some(_) => d.free_memory_bytes,
        };
        v1::Device {
            kind: if ordinal.is_some() {
                v1::DeviceKind::Cuda
            } else {
                v1::DeviceKind::Cpu
            } as i32,
            ordinal: ordinal.unwrap_or(0),
            name: d.name.clone(),
            total_memory_bytes: d.total_memory_bytes,
            free_memory_bytes: free,
            capability: d.capability.clone(),
            memory_bandwidth_bytes_per_second: self.bench.bytes_per_second,
        }
    }

    /// Logs the one-line summary, and the other GPUs this worker does not use.
    pub fn log(&self) {
        let d = &self.device;
        tracing::info!(
            device = %d.device,
            name = %d.name,
            offered_bytes = self.offer.offered_bytes,
            bandwidth_bytes_per_second = self.bench.bytes_per_second,
            "{}: offers {} of {}, {}",
            d.device,
            format_bytes(self.offer.offered_bytes),
            format_bytes(d.total_memory_bytes),
            self.bench.describe()
        );
        for gpu in self
            .inventory
            .gpus
            .iter()
            .filter(|g| Some(g.ordinal) != devices::cuda_ordinal(&d.device))
        {
            tracing::info!(
                "also on this machine: cuda:{} {} ({}, compute {}); start another worker with --device cuda:{} to use it",
                gpu.ordinal,
                gpu.name,
                format_bytes(gpu.total_memory_bytes),
                gpu.capability(),
                gpu.ordinal
            );
        }
    }

    /// What `strata-worker devices` prints; `benched` says whether the benchmark ran.
    pub fn report(&self, benched: bool) -> String {
        let cpu = &self.inventory.cpu;
        let mut lines = vec![
            format!(
                "cpu      {}: {} physical / {} logical cores, {}",
                cpu.name,
                cpu.physical_cores,
                cpu.logical_cores,
                if cpu.features.is_empty() {
                    "no vector extensions we use".into()
                } else {
                    cpu.features.join(",")
                }
            ),
            format!(
                "memory   {}, {} available",
                format_bytes(cpu.total_memory_bytes),
                format_bytes(cpu.available_memory_bytes)
            ),
        ];
        for gpu in &self.inventory.gpus {
            let free = gpu
                .free_memory_bytes
                .map(|f| format!(", {} free", format_bytes(f)))
                .unwrap_or_default();
            let display = if gpu.drives_display {
                ", drives a display"
            } else {
                ""
            };
            lines.push(format!(
                "cuda:{:<3} {}: compute {}, {}{free}{display}",
                gpu.ordinal,
                gpu.name,
                gpu.capability(),
                format_bytes(gpu.total_memory_bytes)
            ));
        }
        if let Some(why) = &self.inventory.cuda_unavailable {
            lines.push(format!("gpus     none: {why}"));
        }
        let o = &self.offer;
        let cap = o
            .max_memory_bytes
            .map(|m| format!(", at most {}", format_bytes(m)))
            .unwrap_or_default();
        lines.push(format!(
            "offers   {} of {} ({}): {} less a {} reserve{cap}",
            format_bytes(o.offered_bytes),
            self.device.device,
            self.device.name,
            format_bytes(o.basis_bytes),
            format_bytes(o.reserve_bytes)
        ));
        lines.push(if benched {
            format!("bench    {}", self.bench.describe())
        } else {
            "bench    not run (add --bench)".into()
        });
        lines.join("\n") + "\n"
    }
}

impl BenchReport {
    /// `reads Q4_0 weights at 12.3 GB/s (2 threads, cached)`.
    pub fn describe(&self) -> String {
        let how = match &self.source {
            BenchSource::Cached => "cached".to_string(),
            BenchSource::Measured => "measured now".to_string(),
            BenchSource::Skipped => return "bandwidth unknown (not benchmarked)".into(),
            BenchSource::Failed(why) => {
                return format!("bandwidth unknown (the benchmark failed: {why})")
            }
        };
        format!(
            "reads {} weights at {:.1} GB/s ({} threads, {how})",
            self.dtype,
            self.bytes_per_second / 1e9,
            self.threads
        )
    }
}

/// The type the benchmark runs in: that of the first model's layers, else the default.
fn bench_dtype(config: &WorkerConfig) -> GgmlDType {
    let dtype = config.models.first().and_then(|path| match ModelFile::open(path) {
        Ok(model) => self_bench::model_dtype(&model),
        Err(e) => {
            tracing::warn!(model = %path.display(), error = %e, "cannot read the model's tensor types");
            None
        }
    });
    dtype.unwrap_or(self_bench::DEFAULT_DTYPE)
}

fn cpu_offer(cpu: &CpuInfo, limits: MemoryLimits) -> Result<(DeviceReport, Offer), ProfileError> {
    let device = DeviceReport {
        device: "cpu".into(),
        name: cpu.name.clone(),
        total_memory_bytes: cpu.total_memory_bytes,
        free_memory_bytes: cpu.available_memory_bytes,
        capability: cpu.features.join(","),
    };
    let offer = if cpu.total_memory_bytes == 0 {
        // No /proc/meminfo (not Linux): only an explicit maximum says what to offer.
        let max = limits.max_memory.ok_or(ProfileError::UnknownMemory)?;
        Offer::new(
            "cpu",
            "memory",
            max,
            0,
            MemoryLimits {
                reserve: Some(0),
                ..limits
            },
        )?
    } else {
        let reserve = cpu_reserve(cpu.total_memory_bytes);
        Offer::new(
            "cpu",
            "available memory",
            cpu.available_memory_bytes,
            reserve,
            limits,
        )?
    };
    Ok((device, offer))
}

fn gpu_offer(
    inventory: &Inventory,
    ordinal: u32,
    spec: &str,
    limits: MemoryLimits,
) -> Result<(DeviceReport, Offer), ProfileError> {
    let Some(gpu) = inventory.gpus.iter().find(|g| g.ordinal == ordinal) else {
        let why = match &inventory.cuda_unavailable {
            Some(why) => why.clone(),
            None => format!("found {}", inventory.gpus.len()),
        };
        return Err(ProfileError::NoSuchGpu {
            device: spec.into(),
            why,
        });
    };
    let device = DeviceReport {
        device: format!("cuda:{ordinal}"),
        name: gpu.name.clone(),
        total_memory_bytes: gpu.total_memory_bytes,
        free_memory_bytes: gpu.free_memory_bytes.unwrap_or(0),
        capability: gpu.capability(),
    };
    let offer = Offer::new(
        &device.device,
        "total memory",
        gpu.total_memory_bytes,
        gpu_reserve(gpu),
        limits,
    )?;
    Ok((device, offer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(total: u64, available: u64) -> CpuInfo {
        CpuInfo {
            name: "test cpu".into(),
            physical_cores: 2,
            logical_cores: 4,
            total_memory_bytes: total,
            available_memory_bytes: available,
            features: vec!["avx2", "fma"],
        }
    }

    fn gpu(total: u64, drives_display: bool) -> Inventory {
        Inventory {
            cpu: cpu(32 * GIB, 30 * GIB),
            gpus: vec![GpuInfo {
                ordinal: 0,
                name: "test gpu".into(),
                total_memory_bytes: total,
                free_memory_bytes: Some(total - GIB),
                compute_capability: (8, 6),
                memory_bandwidth_bytes_per_second: Some(936_000_000_000),
                drives_display,
            }],
            cuda_unavailable: None,
        }
    }

    fn limits(max: Option<u64>, reserve: Option<u64>) -> MemoryLimits {
        MemoryLimits {
            max_memory: max,
            reserve,
        }
    }

    #[test]
    fn a_gpu_offers_its_total_less_the_reserve_capped_by_the_maximum() {
        let offered = |inv: &Inventory, l| gpu_offer(inv, 0, "cuda:0", l).unwrap().1.offered_bytes;
        assert_eq!(
            offered(&gpu(24 * GIB, false), limits(None, None)),
            24 * GIB - 512 * MIB
        );
        assert_eq!(
            offered(&gpu(24 * GIB, true), limits(None, None)),
            23 * GIB,
            "a desktop keeps 1 GiB"
        );
        assert_eq!(
            offered(&gpu(24 * GIB, true), limits(Some(20 * GIB), Some(4 * GIB))),
            20 * GIB
        );
        assert_eq!(
            offered(&gpu(24 * GIB, true), limits(Some(22 * GIB), Some(4 * GIB))),
            20 * GIB
        );
        let (device, _) = gpu_offer(&gpu(24 * GIB, false), 0, "cuda", limits(None, None)).unwrap();
        assert_eq!(
            (device.device.as_str(), device.capability.as_str()),
            ("cuda:0", "8.6")
        );
    }

    #[test]
    fn the_cpu_offers_available_ram_less_the_reserve() {
        let offered = |c: &CpuInfo, l| cpu_offer(c, l).unwrap().1.offered_bytes;
        assert_eq!(
            offered(&cpu(32 * GIB, 20 * GIB), limits(None, None)),
            20 * GIB - 32 * GIB / 10
        );
        assert_eq!(
            offered(&cpu(2 * GIB, 2 * GIB), limits(None, None)),
            2 * GIB - 512 * MIB,
            "at least 512 MiB kept"
        );
        assert_eq!(
            offered(&cpu(256 * GIB, 200 * GIB), limits(None, None)),
            196 * GIB,
            "at most 4 GiB kept"
        );
        assert_eq!(
            offered(&cpu(32 * GIB, 20 * GIB), limits(Some(64 * MIB), None)),
            64 * MIB
        );
        assert_eq!(
            offered(&cpu(32 * GIB, 20 * GIB), limits(None, Some(0))),
            20 * GIB
        );
        assert_eq!(
            offered(&cpu(0, 0), limits(Some(GIB), None)),
            GIB,
            "unknown RAM: the maximum is the offer"
        );
    }

    #[test]
    fn offers_of_nothing_are_refused_with_a_reason() {
        let err = cpu_offer(&cpu(32 * GIB, 20 * GIB), limits(None, Some(20 * GIB)))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "a reserve of 20.0 GiB leaves nothing of the 20.0 GiB available memory of cpu; pass a smaller --reserve");
        let err = gpu_offer(
            &gpu(8 * GIB, false),
            0,
            "cuda:0",
            limits(None, Some(9 * GIB)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("8.0 GiB total memory of cuda:0"), "{err}");
        let err = cpu_offer(&cpu(32 * GIB, 20 * GIB), limits(Some(0), None))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "cpu offers no memory (--max-memory is 0)");
        assert!(matches!(
            cpu_offer(&cpu(0, 0), limits(None, None)),
            Err(ProfileError::UnknownMemory)
        ));
        // A tiny machine whose default reserve is all it has.
        assert!(matches!(
            cpu_offer(&cpu(GIB, 400 * MIB), limits(None, None)),
            Err(ProfileError::ReserveTooLarge { .. })
        ));
    }

    #[test]
    fn a_missing_gpu_is_named_with_the_reason() {
        let none = Inventory {
            gpus: Vec::new(),
            cuda_unavailable: Some("no CUDA driver".into()),
            ..gpu(GIB, false)
        };
        let err = gpu_offer(&none, 0, "cuda:0", MemoryLimits::default())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--device cuda:0: no such CUDA device (no CUDA driver)");
        let err = gpu_offer(&gpu(GIB, false), 1, "cuda:1", MemoryLimits::default())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--device cuda:1: no such CUDA device (found 1)");
    }

    #[test]
    fn the_wire_description_carries_the_offer_and_the_bandwidth() {
        let dir = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            memory: limits(Some(64 * MIB), None),
            bench: BenchMode::Skip,
            ..WorkerConfig::local(dir.path().to_path_buf())
        };
        let mut profile = Profile::probe(&config).unwrap();
        assert_eq!(profile.offer.offered_bytes, 64 * MIB);
        assert_eq!(profile.bench.source, BenchSource::Skipped);
        profile.bench.bytes_per_second = 5e9;
        let device = profile.device_proto();
        assert_eq!(device.kind, v1::DeviceKind::Cpu as i32);
        assert_eq!(device.memory_bandwidth_bytes_per_second, 5e9);
        assert!(device.total_memory_bytes > 0 && device.free_memory_bytes > 0);
        assert_eq!(device.capability, profile.inventory.cpu.features.join(","));
    }
}
