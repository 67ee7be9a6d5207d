//! The strata model runtime: everything needed to hold a contiguous slice of a
//! Llama-family GGUF model and run it, with no networking in sight.
//!
//! A [`ModelFile`] reads a GGUF header (architecture, shapes, tensor sizes) without
//! loading weights, so planners can size stages cheaply. A [`Stage`] loads only the
//! tensors of its layer range and runs batched forwards over many sequences, each
//! with its own KV cache; stages of one process share the layers they both hold
//! through a [`WeightStore`]. [`Tokenizer`], [`ChatTemplate`] and [`Sampler`] complete
//! what a single-process generator or a pipeline's ends need.

pub mod chat_template;
pub mod core_pinning;
pub mod device;
pub mod device_check;
pub mod error;
pub mod generate;
pub mod gguf;
mod activation;
mod attention;
pub mod compute_pool;
mod cpu_buffer;
mod exp;
#[cfg(test)]
mod hostile_gguf;
mod kv_cache;
mod layer;
pub mod linear;
pub mod logits_file;
mod moe;
mod norm;
mod parallel;
mod residual;
pub mod perplexity;
pub mod pool_rest;
mod rope;
pub mod sampling;
pub mod shard_file;
pub mod stage;
pub mod synthetic;
pub mod tokenizer;
pub mod weight_store;

pub use candle_core::{DType, Device, Tensor};
pub use chat_template::{ChatMessage, ChatTemplate};
pub use cpu_buffer::with_f32_values;
pub use device::parse_device;
pub use error::{Error, Result};
pub use generate::Generator;
pub use kv_cache::held_positions;
pub use gguf::{Activation, Architecture, Gating, ModelFile, ModelInfo, MoeConfig, SlidingWindow, TensorSizes};
pub use sampling::{Sampler, SamplingParams};
pub use stage::{LogitRows, SeqId, Stage, StageInput, StageOutput, StageStep};
pub use tokenizer::Tokenizer;
pub use weight_store::WeightStore;
