//! The names NVIDIA's driver libraries go by, which strata loads at run time (so a
//! machine without the driver just has no GPU).

/// The CUDA driver API.
#[cfg(windows)]
pub const CUDA_DRIVER: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
pub const CUDA_DRIVER: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The management library (GPU memory, utilization, processes).
#[cfg(windows)]
pub const NVML: &[&str] = &["nvml.dll"];
#[cfg(not(windows))]
pub const NVML: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];
