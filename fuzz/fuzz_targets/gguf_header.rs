//! A GGUF file (a pulled shard is one) opened as strata opens it: header, metadata,
//! tensor table, sizes.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if file.write_all(data).is_err() {
        return;
    }
    let _ = strata_model::ModelFile::open(file.path());
});
