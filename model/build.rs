//! The model crate reads `CUDA_COMPUTE_CAP` at compile time (which cards candle's
//! machine-code kernels run on, see `device::QuantizedProducts`): rebuild when it
//! changes.
fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
}
