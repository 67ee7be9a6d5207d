//! Property tests: whatever a peer puts in a frame's hidden states or in the KV
//! chunks of a transfer — any dtype, shape, count, position or byte length — the
//! decoders answer with a value or an error, never a panic, and never hold more
//! than the plan allows (issue 13: hostile input, bounded). `fuzz/` runs the same
//! decoders under cargo-fuzz.

use proptest::prelude::*;

use crate::kv_wire::KvAssembler;
use crate::tensor_wire::decode_hidden;
use crate::v1;

/// Sizes a peer might send: small ones that pass the first checks, and the edges.
fn size() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..6, Just(u32::MAX), Just(u32::MAX / 2), any::<u32>()]
}

fn tensor() -> impl Strategy<Value = v1::Tensor> {
    (any::<i32>(), prop::collection::vec(size(), 0..4), prop::collection::vec(any::<u8>(), 0..200)).prop_map(
        |(dtype, shape, data)| v1::Tensor { dtype: dtype.rem_euclid(4), shape, data },
    )
}

fn chunk() -> impl Strategy<Value = v1::KvChunk> {
    (
        (size(), size(), size(), size()),
        (size(), any::<i32>()),
        prop::collection::vec(any::<u8>(), 0..160),
        prop::collection::vec(any::<u8>(), 0..160),
    )
        .prop_map(|((layer, position, count, kv_heads), (head_dim, dtype), k, v)| v1::KvChunk {
            layer,
            position,
            count,
            kv_heads,
            head_dim,
            dtype: dtype.rem_euclid(3),
            k,
            v,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hidden_states_decode_or_are_refused(t in tensor(), tokens in 0usize..6, hidden in 0usize..6) {
        if let Ok(values) = decode_hidden(Some(&t), tokens, hidden) {
            prop_assert_eq!(values.len(), tokens * hidden);
        }
    }

    #[test]
    fn kv_chunks_assemble_or_are_refused(
        chunks in prop::collection::vec(chunk(), 0..12),
        (start, layers, positions, kv_heads, head_dim) in (0usize..4, 0usize..3, 0usize..6, 1usize..3, 1usize..5),
    ) {
        let mut assembler = KvAssembler::new(start, start + layers, positions, kv_heads, head_dim);
        for c in &chunks {
            let _ = assembler.add(c);
        }
        // Whatever arrived, no layer holds more than the positions asked for.
        if let Ok(done) = assembler.finish() {
            for layer in done {
                prop_assert!(layer.k.len() <= kv_heads * positions * head_dim);
                prop_assert_eq!(layer.k.len(), layer.v.len());
            }
        }
    }
}
