//! Forwarder tasks: drain a stage's output queue into a Forward stream to another
//! worker (the next stage, or stage 0 for direct-return tokens).
//!
//! The queue is unbounded so the compute thread never blocks on the network. If the
//! stream breaks, the forwarder reconnects for the messages that follow; sequences
//! whose messages cannot be delivered get a NEXT_STAGE_UNREACHABLE error, so the
//! coordinator hears about it instead of waiting.
//!
//! A shard's forwarders stop when the shard is unloaded ([`Forwarders`]): what they
//! still hold belongs to a retired pipeline, and a stream to a peer cut off from
//! the network would otherwise sit on it until the connection fails, and deliver it
//! late if the peer comes back.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use prost::Message as _;
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{stage_message, ErrorCode, StageMessage};
use strata_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, watch, Mutex};
use strata_trust::Dial;
use tonic::transport::Channel;

use crate::events::EventHub;
use crate::links::LinkGauge;

/// Connects to a peer (`dial` says whom it must be), retrying briefly: the peer
/// may be starting up.
pub async fn connect(address: String, dial: Dial) -> Result<Channel, String> {
    let address = address.as_str();
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0;
    loop {
        match strata_trust::transport().connect(address, dial.clone()).await {
            Ok(channel) => return Ok(channel),
            Err(e) if attempts >= 5 => return Err(format!("cannot connect to {address}: {e}")),
            Err(_) => {
                attempts += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// The worker a forwarder streams to: its address, a connection, and the gauge
/// that counts what goes over the link.
pub struct Peer {
    pub address: String,
    pub channel: Channel,
    pub link: Arc<LinkGauge>,
}

/// The forwarder tasks of one shard; dropping it stops them.
#[derive(Default)]
pub struct Forwarders(Vec<tokio::task::AbortHandle>);

impl Forwarders {
    /// Spawns a forwarder to `peer`, and a task measuring the link's round trip;
    /// returns the queue to feed the forwarder.
    pub fn spawn(
        &mut self,
        peer: Peer,
        pipeline_id: u64,
        stage_index: u32,
        hub: Arc<EventHub>,
        shutdown: watch::Receiver<bool>,
    ) -> mpsc::UnboundedSender<StageMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ping = tokio::spawn(crate::links::ping(peer.channel.clone(), peer.link.clone(), shutdown.clone()));
        self.0.push(ping.abort_handle());
        let queue = Arc::new(Mutex::new(rx));
        let task = tokio::spawn(run(peer, queue, pipeline_id, stage_index, hub, shutdown));
        self.0.push(task.abort_handle());
        tx
    }
}

impl Drop for Forwarders {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn run(
    mut peer: Peer,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<StageMessage>>>,
    pipeline_id: u64,
    stage_index: u32,
    hub: Arc<EventHub>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut client = WorkerClient::new(peer.channel.clone())
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        // The stream borrows the queue through the mutex, so after a failed call
        // the next stream picks up where the old one stopped.
        let counted = peer.link.clone();
        let stream = futures::stream::unfold(rx.clone(), next_message)
            .inspect(move |message| counted.sent(message.encoded_len()));
        let result = tokio::select! {
            r = client.forward(strata_proto::with_pipeline(stream, pipeline_id)) => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match result {
            // The queue closed: the stage was unloaded.
            Ok(_) => return,
            Err(status) => {
                tracing::warn!(address = %peer.address, code = ?status.code(), message = status.message(), "forward stream broke; reconnecting");
            }
        }
        peer.channel = loop {
            match connect(peer.address.clone(), Dial::Worker).await {
                Ok(channel) => break channel,
                Err(e) => {
                    // Fail what is queued now rather than let it wait forever.
                    let mut queue = rx.lock().await;
                    let mut failed = std::collections::HashSet::new();
                    loop {
                        match queue.try_recv() {
                            Ok(message) => {
                                if let Some(seq) = frame_seq(&message) {
                                    if failed.insert(seq) {
                                        hub.sequence_error(
                                            seq,
                                            ErrorCode::NextStageUnreachable,
                                            e.clone(),
                                            stage_index,
                                        );
                                    }
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => return,
                        }
                    }
                    drop(queue);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        };
    }
}

async fn next_message(
    rx: Arc<Mutex<mpsc::UnboundedReceiver<StageMessage>>>,
) -> Option<(StageMessage, Arc<Mutex<mpsc::UnboundedReceiver<StageMessage>>>)> {
    let message = rx.lock().await.recv().await?;
    Some((message, rx))
}

fn frame_seq(message: &StageMessage) -> Option<u64> {
    match message.kind.as_ref()? {
        stage_message::Kind::Frame(f) => Some(f.seq_id),
        stage_message::Kind::Open(o) => Some(o.seq_id),
        stage_message::Kind::Release(_) => None,
    }
}
