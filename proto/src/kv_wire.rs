//! A sequence's KV cache to and from [`v1::KvChunk`]s (little-endian f32).
//!
//! One layer's K and V, `[kv_heads, n, head_dim]` each for its positions
//! `[first, first + n)`, travel as chunks of consecutive positions, small enough for
//! any message limit. `first` is 0, or later for a sliding-window layer, which sends
//! only what its window still reaches. The receiver checks
//! every chunk against what it asked for (layer, positions, dtype, shape, byte
//! length, order) before it copies a byte, so a bad peer gets an error, not a panic
//! or a silently wrong cache.

use crate::v1::{self, WireDtype};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvWireError {
    #[error("chunk for layer {layer}, which is outside the layers {start}..{end} asked for")]
    Layer { layer: u32, start: usize, end: usize },
    #[error("layer {layer}: chunk at positions {position}..{end}, expected the next at {expected} (of {positions})")]
    Order { layer: u32, position: u32, end: u64, expected: usize, positions: usize },
    #[error("unsupported KV dtype {0} (KV caches move as f32, exactly)")]
    DType(i32),
    #[error("layer {layer}: shape [{kv_heads}, _, {head_dim}], expected [{want_heads}, _, {want_dim}]")]
    Shape { layer: u32, kv_heads: u32, head_dim: u32, want_heads: usize, want_dim: usize },
    #[error("layer {layer}: {got} bytes of {what}, the chunk's shape needs {expected}")]
    Length { layer: u32, what: &'static str, got: usize, expected: usize },
    #[error("layer {layer}: positions up to {got} of {positions} arrived")]
    Incomplete { layer: usize, got: usize, positions: usize },
}

/// Cuts one layer's K and V (`[kv_heads, n, head_dim]`, row-major, the positions
/// `[first, first + n)`) into chunks of whole positions, each carrying at most about
/// `max_bytes` of K and V.
pub fn encode_kv_layer(
    layer: usize,
    first: usize,
    k: &[f32],
    v: &[f32],
    kv_heads: usize,
    head_dim: usize,
    max_bytes: usize,
) -> Vec<v1::KvChunk> {
    let row = kv_heads * head_dim;
    let positions = k.len().checked_div(row).unwrap_or(0);
    let per_position = 2 * row * std::mem::size_of::<f32>();
    let step = (max_bytes / per_position.max(1)).max(1);
    let mut chunks = Vec::with_capacity(positions.div_ceil(step));
    let mut position = 0;
    while position < positions {
        let count = step.min(positions - position);
        let take = |t: &[f32]| -> Vec<u8> {
            let run = count * head_dim;
            let mut bytes = vec![0u8; kv_heads * run * 4];
            for (h, out) in bytes.chunks_exact_mut(run * 4).enumerate() {
                let from = (h * positions + position) * head_dim;
                // Fixed-size copies into a sized buffer: this compiles to plain moves.
                for (b, x) in out.chunks_exact_mut(4).zip(&t[from..from + run]) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
            }
            bytes
        };
        chunks.push(v1::KvChunk {
            layer: layer as u32,
            position: (first + position) as u32,
            count: count as u32,
            dtype: WireDtype::F32 as i32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            k: take(k),
            v: take(v),
        });
        position += count;
    }
    chunks
}

/// One layer as it arrives: K and V, `[kv_heads, positions - first, head_dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayerData {
    pub layer: usize,
    /// The first position: where the layer's first chunk started.
    pub first: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Rebuilds the layers `layers` of positions up to `positions` from chunks. Each
/// layer starts where its first chunk does; whether that start is early enough for
/// the layer is the receiving stage's to check.
#[derive(Debug)]
pub struct KvAssembler {
    start: usize,
    end: usize,
    positions: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<Arriving>,
}

/// One layer's buffers, and the positions `[first, end)` that arrived.
#[derive(Debug, Default)]
struct Arriving {
    k: Vec<f32>,
    v: Vec<f32>,
    first: Option<usize>,
    end: usize,
}

impl KvAssembler {
    /// Expects the layers `start..end` with `kv_heads` x `head_dim` per position; the
    /// buffers are allocated as chunks arrive.
    pub fn new(start: usize, end: usize, positions: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            start,
            end,
            positions,
            kv_heads,
            head_dim,
            layers: (start..end).map(|_| Arriving::default()).collect(),
        }
    }

    /// Checks `chunk` and copies it into place.
    pub fn add(&mut self, chunk: &v1::KvChunk) -> Result<(), KvWireError> {
        let layer = chunk.layer;
        let index = (layer as usize).checked_sub(self.start).filter(|_| (layer as usize) < self.end).ok_or(
            KvWireError::Layer { layer, start: self.start, end: self.end },
        )?;
        if WireDtype::try_from(chunk.dtype) != Ok(WireDtype::F32) {
            return Err(KvWireError::DType(chunk.dtype));
        }
        if chunk.kv_heads as usize != self.kv_heads || chunk.head_dim as usize != self.head_dim {
            return Err(KvWireError::Shape {
                layer,
                kv_heads: chunk.kv_heads,
                head_dim: chunk.head_dim,
                want_heads: self.kv_heads,
                want_dim: self.head_dim,
            });
        }
        let (positions, kv_heads, head_dim) = (self.positions, self.kv_heads, self.head_dim);
        let arriving = &mut self.layers[index];
        let (position, count) = (chunk.position as usize, chunk.count as usize);
        let expected_at = arriving.first.map_or(position, |_| arriving.end);
        if position != expected_at || count == 0 || position + count > positions {
            return Err(KvWireError::Order {
                layer,
                position: chunk.position,
                end: chunk.position as u64 + chunk.count as u64,
                expected: expected_at,
                positions,
            });
        }
        let expected = kv_heads * count * head_dim * std::mem::size_of::<f32>();
        for (what, bytes) in [("K", &chunk.k), ("V", &chunk.v)] {
            if bytes.len() != expected {
                return Err(KvWireError::Length { layer, what, got: bytes.len(), expected });
            }
        }
        let first = *arriving.first.get_or_insert(position);
        let held = positions - first;
        if arriving.k.is_empty() {
            arriving.k = vec![0.0; kv_heads * held * head_dim];
            arriving.v = vec![0.0; kv_heads * held * head_dim];
        }
        for (dst, bytes) in [(&mut arriving.k, &chunk.k), (&mut arriving.v, &chunk.v)] {
            for h in 0..kv_heads {
                let src = &bytes[h * count * head_dim * 4..(h + 1) * count * head_dim * 4];
                let at = (h * held + position - first) * head_dim;
                for (x, b) in dst[at..at + count * head_dim].iter_mut().zip(src.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        arriving.end = position + count;
        Ok(())
    }

    /// The layers, once every layer arrived up to the last position.
    pub fn finish(self) -> Result<Vec<KvLayerData>, KvWireError> {
        let positions = self.positions;
        self.layers
            .into_iter()
            .zip(self.start..)
            .map(|(a, layer)| match a.first {
                Some(first) if a.end == positions => Ok(KvLayerData { layer, first, k: a.k, v: a.v }),
                _ => Err(KvWireError::Incomplete { layer, got: a.end, positions }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(kv_heads: usize, positions: usize, head_dim: usize, salt: f32) -> Vec<f32> {
        (0..kv_heads * positions * head_dim).map(|i| i as f32 * 0.25 + salt).collect()
    }

    #[test]
    fn layers_round_trip_exactly_through_small_chunks() {
        let (heads, positions, dim) = (3, 7, 4);
        let mut assembler = KvAssembler::new(2, 4, positions, heads, dim);
        for l in 2..4 {
            let (k, v) = (layer(heads, positions, dim, l as f32), layer(heads, positions, dim, -(l as f32)));
            // Two positions a chunk: 2 * 3 * 4 * 4 bytes of K and V per position.
            let chunks = encode_kv_layer(l, 0, &k, &v, heads, dim, 2 * 2 * heads * dim * 4);
            assert_eq!(chunks.len(), 4);
            for c in &chunks {
                assembler.add(c).unwrap();
            }
        }
        let layers = assembler.finish().unwrap();
        let (k, v) = (layer(heads, positions, dim, 3.0), layer(heads, positions, dim, -3.0));
        let third = KvLayerData { layer: 3, first: 0, k, v };
        assert_eq!(layers[1], third);
    }

    #[test]
    fn bad_chunks_are_named() {
        let (heads, positions, dim) = (2, 4, 2);
        let data = layer(heads, positions, dim, 0.0);
        let chunks = encode_kv_layer(0, 0, &data, &data, heads, dim, 1);
        assert_eq!(chunks.len(), 4);
        let fresh = || KvAssembler::new(0, 1, positions, heads, dim);
        let mut a = fresh();
        assert!(matches!(a.add(&v1::KvChunk { layer: 1, ..chunks[0].clone() }), Err(KvWireError::Layer { .. })));
        assert!(matches!(a.add(&v1::KvChunk { dtype: 2, ..chunks[0].clone() }), Err(KvWireError::DType(2))));
        assert!(matches!(a.add(&v1::KvChunk { kv_heads: 3, ..chunks[0].clone() }), Err(KvWireError::Shape { .. })));
        let short = v1::KvChunk { v: vec![0; 3], ..chunks[0].clone() };
        assert!(matches!(a.add(&short), Err(KvWireError::Length { what: "V", .. })));
        let beyond = v1::KvChunk { count: 9, ..chunks[0].clone() };
        assert!(matches!(a.add(&beyond), Err(KvWireError::Order { .. })));
        a.add(&chunks[0]).unwrap();
        assert_eq!(a.finish(), Err(KvWireError::Incomplete { layer: 0, got: 1, positions: 4 }));
    }

    #[test]
    fn a_sliding_layer_arrives_from_its_first_position() {
        let (heads, dim) = (1, 2);
        let window = layer(heads, 3, dim, 0.5);
        let full = layer(heads, 7, dim, 1.5);
        let mut assembler = KvAssembler::new(0, 2, 7, heads, dim);
        for c in encode_kv_layer(0, 4, &window, &window, heads, dim, 1).iter().chain(&encode_kv_layer(1, 0, &full, &full, heads, dim, 1)) {
            assembler.add(c).unwrap();
        }
        let layers = assembler.finish().unwrap();
        assert_eq!((layers[0].first, &layers[0].k), (4, &window));
        assert_eq!((layers[1].first, &layers[1].k), (0, &full));
        // Once started, a layer goes on in order; a gap is an error.
        let chunks = encode_kv_layer(0, 4, &window, &window, heads, dim, 1);
        let mut gap = KvAssembler::new(0, 1, 7, heads, dim);
        gap.add(&chunks[0]).unwrap();
        assert!(matches!(gap.add(&chunks[2]), Err(KvWireError::Order { expected: 5, .. })));
        // Nothing, or not up to the last position, is incomplete.
        assert!(matches!(KvAssembler::new(0, 1, 7, heads, dim).finish(), Err(KvWireError::Incomplete { got: 0, .. })));
    }
}
