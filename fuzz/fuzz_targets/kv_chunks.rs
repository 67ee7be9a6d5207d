//! A KV transfer as a peer may send it: length-delimited chunks assembled as an
//! importing stage assembles them (4 layers, 16 positions, 2 KV heads of 8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::kv_wire::KvAssembler;
use strata_proto::v1::KvChunk;

fuzz_target!(|data: &[u8]| {
    let mut assembler = KvAssembler::new(2, 6, 16, 2, 8);
    let mut rest = data;
    while let Ok(chunk) = KvChunk::decode_length_delimited(&mut rest) {
        let _ = assembler.add(&chunk);
    }
    let _ = assembler.finish();
});
