//! A weight pull's messages as the coordinator's stream may carry them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::v1::WeightChunk;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(chunk) = WeightChunk::decode_length_delimited(&mut rest) {
        let _ = chunk.encoded_len();
    }
});
