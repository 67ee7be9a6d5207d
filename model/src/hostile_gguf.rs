//! Property tests: a GGUF file damaged anywhere — bytes changed in its header,
//! metadata or tensor table, or cut short — opens or is refused with an error,
//! never a panic or an allocation the file cannot back (issue 13: hostile input,
//! bounded; a pulled shard file is such input). `fuzz/` runs the same under
//! cargo-fuzz.

use std::sync::OnceLock;

use proptest::prelude::*;

use crate::synthetic::SyntheticModel;
use crate::ModelFile;

/// A valid small model file's bytes, written once.
fn valid() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = SyntheticModel { layers: 2, ..SyntheticModel::tiny() }.write_to(dir.path()).expect("writing");
        std::fs::read(path).expect("reading it back")
    })
}

/// The header ends where the tensor data starts; damage there is what parsing sees.
const HEADER_BYTES: usize = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_header_is_refused_or_read(
        edits in prop::collection::vec((0usize..HEADER_BYTES, any::<u8>()), 1..8),
        cut in prop::option::of(0usize..HEADER_BYTES),
    ) {
        let mut bytes = valid().to_vec();
        for (at, value) in edits {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.min(bytes.len()));
        }
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("damaged.gguf");
        std::fs::write(&path, &bytes).expect("writing");
        let _ = ModelFile::open(&path);
    }
}
