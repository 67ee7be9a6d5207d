//! Sending a cut shard file to a pulling worker from the byte it asks for (a resumed
//! pull asks for the rest only), and the pace tests may set on it.

use std::path::PathBuf;
use std::time::Duration;

use strata_proto::units::parse_bytes;
use strata_proto::v1::{weight_chunk, WeightChunk};
use strata_proto::WEIGHT_CHUNK_BYTES;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

/// For tests only: caps how fast FetchWeights sends, in bytes per second (`2000000`,
/// or a size such as `2MB`). A test sets it on a coordinator process it starts to
/// make a pull last long enough to watch it or cut it, without shaping the traffic
/// with `tc`. Unset or empty: as fast as the network takes it.
pub const PULL_PACE_ENV: &str = "STRATA_TEST_PULL_BYTES_PER_SECOND";

/// [`PULL_PACE_ENV`] holds something that is not a rate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{PULL_PACE_ENV}={value:?} is not a positive number of bytes per second: {reason}")]
pub struct PaceError {
    value: String,
    reason: String,
}

/// The pace (bytes per second) that `env` sets, if it sets one.
pub fn pace_from(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<u64>, PaceError> {
    let Some(value) = env(PULL_PACE_ENV).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    match parse_bytes(&value) {
        Ok(0) => Err(PaceError { value, reason: "it must be above zero".into() }),
        Ok(rate) => Ok(Some(rate)),
        Err(e) => Err(PaceError { value, reason: e.reason.into() }),
    }
}

/// Bytes per data chunk: [`WEIGHT_CHUNK_BYTES`], or at a pace about a tenth of a
/// second's worth, so a slow pull still moves (and reports progress) ten times a
/// second rather than once every few seconds.
fn chunk_bytes(pace: Option<u64>) -> usize {
    match pace {
        None => WEIGHT_CHUNK_BYTES,
        Some(rate) => (rate / 10).clamp(4096, WEIGHT_CHUNK_BYTES as u64) as usize,
    }
}

/// Sends the file at `path` from byte `offset` on into `tx` as data chunks, at most
/// `pace` bytes per second. Reads go through tokio's file, which does them on the
/// blocking pool, and the pace is kept with a timer: nothing here blocks the
/// runtime. Stops when the receiver goes away (the worker was cut off or gave up).
pub async fn send_file(
    path: PathBuf,
    offset: u64,
    pace: Option<u64>,
    tx: mpsc::Sender<Result<WeightChunk, Status>>,
    on_sent: impl Fn(u64),
) {
    let mut file = match open_at(&path, offset).await {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(Status::internal(format!("opening the shard at byte {offset}: {e}")))).await;
            return;
        }
    };
    let chunk = chunk_bytes(pace);
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; chunk];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(format!("reading the shard: {e}")))).await;
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        sent += filled as u64;
        if let Some(rate) = pace {
            // A chunk leaves once its bytes would have crossed a link of this rate.
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / rate as f64)).await;
        }
        if tx.send(Ok(WeightChunk { kind: Some(weight_chunk::Kind::Data(buf)) })).await.is_err() {
            return;
        }
        on_sent(filled as u64);
    }
}

async fn open_at(path: &PathBuf, offset: u64) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_pace_is_read_from_the_environment() {
        assert_eq!(pace_from(&env(&[])), Ok(None));
        assert_eq!(pace_from(&env(&[(PULL_PACE_ENV, "")])), Ok(None));
        assert_eq!(pace_from(&env(&[(PULL_PACE_ENV, "300000")])), Ok(Some(300_000)));
        assert_eq!(pace_from(&env(&[(PULL_PACE_ENV, "2MB")])), Ok(Some(2_000_000)));
        let e = pace_from(&env(&[(PULL_PACE_ENV, "0")])).unwrap_err();
        assert!(e.to_string().contains("above zero"), "{e}");
        assert!(pace_from(&env(&[(PULL_PACE_ENV, "fast")])).is_err());
    }

    #[test]
    fn a_slow_pace_sends_small_chunks() {
        assert_eq!(chunk_bytes(None), WEIGHT_CHUNK_BYTES);
        assert_eq!(chunk_bytes(Some(1_000_000)), 100_000);
        assert_eq!(chunk_bytes(Some(100)), 4096);
        assert_eq!(chunk_bytes(Some(1 << 40)), WEIGHT_CHUNK_BYTES);
    }

    async fn received(path: PathBuf, offset: u64, pace: Option<u64>) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(send_file(path, offset, pace, tx, |_| {}));
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            match chunk.unwrap().kind {
                Some(weight_chunk::Kind::Data(d)) => out.extend(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn the_file_is_sent_from_the_offset_at_the_pace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(received(path.clone(), 0, None).await, bytes);
        assert_eq!(received(path.clone(), 99_000, None).await, bytes[99_000..]);
        assert!(received(path.clone(), 100_000, None).await.is_empty());
        // 40 000 bytes at 100 000 bytes/s: 0.4 s, in ten chunks.
        let started = Instant::now();
        assert_eq!(received(path, 60_000, Some(100_000)).await, bytes[60_000..]);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "{took:?}");
    }
}
