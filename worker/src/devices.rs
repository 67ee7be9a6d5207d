//! What this machine has: its CPU (cores, memory, vector extensions) and its CUDA
//! GPUs (name, memory, compute capability).
//!
//! GPUs are found through the CUDA driver API, loaded at run time by cudarc: a
//! machine without a driver has no GPU, never a failed start. cudarc panics when the
//! library or one of its symbols is missing, so we look for the library first and
//! run every driver call inside `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::Serialize;

/// The CPU and the memory of the machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuInfo {
    /// The model name (`/proc/cpuinfo`), or `cpu` where unknown.
    pub name: String,
    pub physical_cores: usize,
    /// Hardware threads this process may run on (affinity and cgroups counted).
    pub logical_cores: usize,
    pub total_memory_bytes: u64,
    /// What the kernel estimates can be allocated without swapping (`MemAvailable`).
    pub available_memory_bytes: u64,
    /// Vector extensions the kernels care about: `avx2`, `fma`, `f16c`, `avx512f`,
    /// `avx512_vnni`; `neon` on aarch64.
    pub features: Vec<&'static str>,
}

/// One CUDA GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub ordinal: u32,
    pub name: String,
    pub total_memory_bytes: u64,
    /// Free memory when detected; `None` when it was not asked for (reading it
    /// creates a context on the GPU) or could not be read.
    pub free_memory_bytes: Option<u64>,
    /// Compute capability, `(8, 6)` for an RTX 3090.
    pub compute_capability: (u32, u32),
    /// The memory's peak bandwidth by its clock and bus width as the driver gives
    /// them (double data rate); `None` where the driver does not say.
    pub memory_bandwidth_bytes_per_second: Option<u64>,
    /// The kernel run-time limit is on, which the driver does for a GPU that drives
    /// a display: a desktop shares its memory.
    pub drives_display: bool,
}

impl GpuInfo {
    /// `8.6`.
    pub fn capability(&self) -> String {
        format!(
            "{}.{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Everything found on the machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub cpu: CpuInfo,
    pub gpus: Vec<GpuInfo>,
    /// Why there are no GPUs, when the driver could not be used (no library, no
    /// device, a failed call); `None` when the driver answered.
    pub cuda_unavailable: Option<String>,
}

/// Which GPUs to read free memory of (each read creates a context on that GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeMemory {
    None,
    Of(u32),
    All,
}

/// Detects the CPU and, through the driver if there is one, the GPUs.
pub fn detect(free: FreeMemory) -> Inventory {
    let (gpus, cuda_unavailable) = match cuda::devices(free) {
        Ok(gpus) => (gpus, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    Inventory {
        cpu: cpu_info(),
        gpus,
        cuda_unavailable,
    }
}

pub fn cpu_info() -> CpuInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (total, available) = memory_info();
    CpuInfo {
        name: cpu_name(&cpuinfo).unwrap_or_else(|| "cpu".into()),
        // Never more than we may run on: a container sees the host's cores there.
        physical_cores: physical_cores(&cpuinfo).map_or(logical, |p| p.min(logical)),
        logical_cores: logical,
        total_memory_bytes: total,
        available_memory_bytes: available,
        features: cpu_features(),
    }
}

/// Total and available memory from /proc/meminfo (zeros where unknown).
pub fn memory_info() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn cpu_name(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .or_else(|| l.strip_prefix("Hardware"))
        })
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// Distinct (package, core) pairs; `None` where /proc/cpuinfo does not say (arm64).
fn physical_cores(cpuinfo: &str) -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    for block in cpuinfo.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim())
        };
        if let (Some(package), Some(core)) = (field("physical id"), field("core id")) {
            cores.insert((package.to_string(), core.to_string()));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512_vnni", has!("avx512vnni")),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect()
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            vec!["neon"]
        } else {
            Vec::new()
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

/// The CUDA ordinal of a `--device` (`cuda` is `cuda:0`); `None` for the CPU.
pub fn cuda_ordinal(device: &str) -> Option<u32> {
    strata_model::device::cuda_ordinal(device).and_then(|n| u32::try_from(n).ok())
}

/// The UUID of CUDA device `ordinal` as NVML writes it (`GPU-8f6c...`), to find the
/// same GPU there: NVML numbers GPUs in PCI order, CUDA fastest first and after
/// `CUDA_VISIBLE_DEVICES`. `None` without a driver or such a device.
pub fn cuda_uuid(ordinal: u32) -> Option<String> {
    cuda::uuid(ordinal)
}

mod cuda {
    use super::*;
    use cudarc::driver::result::{self, DriverError};
    use cudarc::driver::sys::CUdevice_attribute;

    /// Names the driver library goes by (cudarc tries these among others).
    const LIBRARIES: &[&str] = strata_platform::nvidia::CUDA_DRIVER;

    /// The GPUs the driver sees (after `CUDA_VISIBLE_DEVICES`), or why there are none.
    pub fn devices(free: FreeMemory) -> Result<Vec<GpuInfo>, String> {
        if !driver_present() {
            return Err(format!(
                "no CUDA driver ({} not found)",
                LIBRARIES.join(", ")
            ));
        }
        match catch_unwind(AssertUnwindSafe(|| query(free))) {
            Ok(Ok(gpus)) if gpus.is_empty() => Err("the CUDA driver sees no device".into()),
            Ok(Ok(gpus)) => Ok(gpus),
            Ok(Err(e)) => Err(format!("the CUDA driver failed: {e}")),
            Err(_) => Err("the CUDA driver could not be used (see the panic above)".into()),
        }
    }

    pub fn uuid(ordinal: u32) -> Option<String> {
        if !driver_present() {
            return None;
        }
        let query = || -> Result<[u8; 16], DriverError> {
            result::init()?;
            let device = result::device::get(ordinal as i32)?;
            Ok(result::device::get_uuid(device)?.bytes.map(|b| b as u8))
        };
        let bytes = catch_unwind(AssertUnwindSafe(query)).ok()?.ok()?;
        let hex = |range: std::ops::Range<usize>| strata_proto::content_hash::hex(&bytes[range]);
        Some(format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16)))
    }

    fn driver_present() -> bool {
        LIBRARIES.iter().any(|name| {
            // SAFETY: loading the NVIDIA driver library runs only its own initialisers,
            // which have no preconditions; the handle is closed again at once.
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    }

    fn query(free: FreeMemory) -> Result<Vec<GpuInfo>, DriverError> {
        result::init()?;
        let count = result::device::get_count()?;
        let mut gpus = Vec::new();
        for ordinal in 0..count.max(0) {
            let device = result::device::get(ordinal)?;
            // SAFETY: `device` came from `device::get`, as these calls require.
            let (total, major, minor, timeout) = unsafe {
                (
                    result::device::total_mem(device)?,
                    result::device::get_attribute(
                        device,
                        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    )?,
                    result::device::get_attribute(
                        device,
                        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    )?,
                    result::device::get_attribute(
                        device,
                        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT,
                    )?,
                )
            };
            let ordinal = ordinal as u32;
            // SAFETY: as above. Either attribute may be missing on a newer driver.
            let bandwidth = unsafe {
                let clock_khz = result::device::get_attribute(device, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
                let bus_bits =
                    result::device::get_attribute(device, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
                match (clock_khz, bus_bits) {
                    (Ok(k), Ok(b)) if k > 0 && b > 0 => Some(2 * k as u64 * 1000 * b as u64 / 8),
                    _ => None,
                }
            };
            let wanted = matches!(free, FreeMemory::All) || free == FreeMemory::Of(ordinal);
            gpus.push(GpuInfo {
                ordinal,
                name: result::device::get_name(device)?,
                total_memory_bytes: total as u64,
                free_memory_bytes: if wanted { free_memory(device) } else { None },
                compute_capability: (major as u32, minor as u32),
                memory_bandwidth_bytes_per_second: bandwidth,
                drives_display: timeout != 0,
            });
        }
        Ok(gpus)
    }

    /// Free memory through the device's primary context (the one candle uses too),
    /// retained only for the call; `None` if that fails.
    fn free_memory(device: cudarc::driver::sys::CUdevice) -> Option<u64> {
        // SAFETY: `device` came from `device::get`; the context is made current on
        // this thread only for `mem_get_info`, then unset and released.
        unsafe {
            let context = result::primary_ctx::retain(device).ok()?;
            let free = result::ctx::set_current(context).and_then(|()| result::mem_get_info());
            let _ = result::ctx::set_current(std::ptr::null_mut());
            let _ = result::primary_ctx::release(device);
            free.ok().map(|(free, _total)| free as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                           processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                           processor\t: 2\nmodel name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: 1\n";

    #[test]
    fn cpuinfo_gives_the_name_and_the_physical_cores() {
        assert_eq!(
            cpu_name(CPUINFO).as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
        assert_eq!(
            physical_cores(CPUINFO),
            Some(2),
            "two hardware threads share core 0"
        );
        assert_eq!(physical_cores("processor\t: 0\nBogoMIPS\t: 50.00\n"), None);
        assert_eq!(cpu_name("processor\t: 0\n"), None);
    }

    #[test]
    fn this_machine_has_a_cpu_with_memory() {
        let cpu = cpu_info();
        assert!(
            cpu.logical_cores >= 1
                && cpu.physical_cores >= 1
                && cpu.physical_cores <= cpu.logical_cores
        );
        assert!(
            cpu.total_memory_bytes > 0 && cpu.available_memory_bytes <= cpu.total_memory_bytes,
            "{cpu:?}"
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            cpu.features.contains(&"avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
    }

    /// Where there is no driver (CI, this build machine), detection reports no GPU and
    /// says why, without panicking; where there is one, it finds a sane GPU.
    #[test]
    fn detection_never_panics_and_explains_a_missing_gpu() {
        let found = detect(FreeMemory::All);
        match &found.cuda_unavailable {
            Some(why) => {
                assert!(found.gpus.is_empty());
                assert!(why.contains("CUDA"), "{why}");
            }
            None => {
                assert!(!found.gpus.is_empty());
                for gpu in &found.gpus {
                    assert!(
                        gpu.total_memory_bytes > 0 && gpu.compute_capability.0 >= 3,
                        "{gpu:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn cuda_ordinals() {
        assert_eq!(cuda_ordinal("cpu"), None);
        assert_eq!(cuda_ordinal("cuda"), Some(0));
        assert_eq!(cuda_ordinal("cuda:3"), Some(3));
        assert_eq!(cuda_ordinal("cuda:x"), None);
    }
}
