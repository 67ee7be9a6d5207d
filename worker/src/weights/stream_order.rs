//! What a FetchWeights stream must look like, checked message by message before
//! anything it announces is acted on: one manifest first (whose offset is the one
//! asked for, or 0 from a coordinator that cannot resume, and within the file),
//! then data only, never past the file's announced size. Kept apart from the
//! pull's I/O so the rules are tested on any sequence of messages (proptest).

use strata_proto::v1::{weight_chunk, WeightChunk, WeightManifest};

/// A broken rule, and whether bytes kept from an earlier pull may be to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub why: String,
    /// The stream contradicts the partial file (its offset, its size): drop the
    /// file rather than resume it again.
    pub blames_kept_bytes: bool,
}

impl Broken {
    fn stream(why: impl Into<String>) -> Self {
        Self { why: why.into(), blames_kept_bytes: false }
    }

    fn kept(why: impl Into<String>) -> Self {
        Self { why: why.into(), blames_kept_bytes: true }
    }
}

/// The data of a stream whose manifest was accepted.
#[derive(Debug)]
pub struct WeightStream {
    total: u64,
    done: u64,
}

impl WeightStream {
    /// Checks the first message (`None`: the stream ended) of a stream asked from
    /// byte `kept`: the manifest, and the stream that follows it.
    pub fn start(first: Option<WeightChunk>, kept: u64) -> Result<(WeightManifest, Self), Broken> {
        let manifest = match first {
            Some(WeightChunk { kind: Some(weight_chunk::Kind::Manifest(m)) }) => m,
            Some(_) => return Err(Broken::stream("the stream did not start with a manifest")),
            None => return Err(Broken::stream("the stream ended before the manifest")),
        };
        let (start, total) = (manifest.offset, manifest.total_bytes);
        // A coordinator older than resuming ignores the offset and sends it all (and
        // says 0): the kept bytes go.
        if start > total || (start != kept && start != 0) {
            return Err(Broken::kept(format!(
                "the coordinator sends byte {start} on of {total}, asked for byte {kept} on"
            )));
        }
        Ok((manifest, Self { total, done: start }))
    }

    /// The bytes of the next message, to append; refused if it is not data or
    /// goes past the announced size.
    pub fn data(&mut self, chunk: WeightChunk) -> Result<Vec<u8>, Broken> {
        let Some(weight_chunk::Kind::Data(data)) = chunk.kind else {
            return Err(Broken::stream("a second manifest in the stream"));
        };
        let n = data.len() as u64;
        if n > self.total - self.done {
            return Err(Broken::kept(format!("more than the {} bytes the manifest announced", self.total)));
        }
        self.done += n;
        Ok(data)
    }

    /// Bytes of the file covered so far (the offset included).
    pub fn done(&self) -> u64 {
        self.done
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn manifest(offset: u64, total: u64) -> WeightChunk {
        let m = WeightManifest { total_bytes: total, offset, ..Default::default() };
        WeightChunk { kind: Some(weight_chunk::Kind::Manifest(m)) }
    }

    fn data(n: usize) -> WeightChunk {
        WeightChunk { kind: Some(weight_chunk::Kind::Data(vec![7; n])) }
    }

    /// Any message a peer may send: a manifest with any figures, data of any
    /// length (kept small: the rule is about sums), or an empty message.
    fn message() -> impl Strategy<Value = WeightChunk> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(o, t)| manifest(o % 4096, t % 8192)),
            (any::<u64>(), any::<u64>()).prop_map(|(o, t)| manifest(o, t)),
            (0usize..3000).prop_map(data),
            Just(WeightChunk { kind: None }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever arrives: no panic, never a byte past the announced size, and
        /// the bytes handed on are exactly what the stream counts as done.
        #[test]
        fn any_stream_is_taken_within_its_manifest_or_refused(
            kept in 0u64..4096,
            messages in proptest::collection::vec(message(), 0..12),
        ) {
            let mut messages = messages.into_iter();
            let Ok((manifest, mut stream)) = WeightStream::start(messages.next(), kept) else { return Ok(()) };
            prop_assert!(manifest.offset <= manifest.total_bytes);
            prop_assert!(manifest.offset == kept || manifest.offset == 0);
            let mut handed = manifest.offset;
            for m in messages {
                match stream.data(m) {
                    Ok(bytes) => handed += bytes.len() as u64,
                    Err(_) => break,
                }
                prop_assert!(stream.done() <= stream.total());
            }
            prop_assert_eq!(handed, stream.done());
        }
    }

    #[test]
    fn the_rules_by_example() {
        assert!(WeightStream::start(None, 0).unwrap_err().why.contains("ended before the manifest"));
        assert!(WeightStream::start(Some(data(3)), 0).unwrap_err().why.contains("did not start with a manifest"));
        let resumed_elsewhere = WeightStream::start(Some(manifest(5, 10)), 4).unwrap_err();
        assert!(resumed_elsewhere.blames_kept_bytes, "{resumed_elsewhere:?}");
        // An old coordinator starts at 0 whatever was asked.
        let (_, mut stream) = WeightStream::start(Some(manifest(0, 10)), 4).unwrap();
        assert_eq!(stream.data(data(6)).unwrap().len(), 6);
        assert!(stream.data(manifest(0, 10)).unwrap_err().why.contains("second manifest"));
        assert!(stream.data(data(5)).unwrap_err().why.contains("more than the 10 bytes"));
        assert_eq!(stream.data(data(4)).unwrap().len(), 4);
        assert_eq!(stream.done(), 10);
    }
}
