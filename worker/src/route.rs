//! Where a stage's messages for one peer go: over a local lane when the peer is on
//! this machine and one opened ([`crate::local_lane`]), else into the queue of the
//! forwarder that streams them over gRPC. A lane that breaks is given up for the
//! forwarder, which the peer then refuses or accepts as it would have at first.

use std::sync::Arc;

use strata_proto::v1::StageMessage;
use tokio::sync::mpsc;

use crate::links::LinkGauge;
use crate::local_lane::Lane;

pub struct Route {
    forwarder: mpsc::UnboundedSender<StageMessage>,
    lane: Option<Lane>,
    /// Counts what goes over the lane (the forwarder counts its own).
    link: Arc<LinkGauge>,
}

impl Route {
    pub fn new(forwarder: mpsc::UnboundedSender<StageMessage>, lane: Option<Lane>, link: Arc<LinkGauge>) -> Self {
        link.set_local_lane(lane.is_some());
        Self { forwarder, lane, link }
    }

    /// Only the forwarder.
    #[cfg(test)]
    pub fn forwarder(forwarder: mpsc::UnboundedSender<StageMessage>) -> Self {
        Self::new(forwarder, None, Arc::default())
    }

    /// Sends `message`; false when the forwarder has stopped (the shard is being
    /// unloaded).
    pub fn send(&mut self, message: StageMessage) -> bool {
        if let Some(lane) = &mut self.lane {
            match lane.send(&message) {
                Ok(bytes) => {
                    self.link.sent(bytes);
                    return true;
                }
                Err(e) => {
                    // A message cut off mid-way is dropped by the reader; whole, it
                    // was delivered or refused. Either way the rest go over gRPC.
                    tracing::warn!(error = %e, "a local lane broke; sending over gRPC");
                    self.lane = None;
                    self.link.set_local_lane(false);
                }
            }
        }
        self.forwarder.send(message).is_ok()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant};

    use strata_proto::v1::{stage_message, ReleaseSequence};
    use strata_platform::local_socket::LocalStream;
    use strata_proto::NodeId;

    use super::*;
    use crate::local_lane::{LaneInbox, Listener};

    /// Refuses everything, as a receiver does a revoked sender's frames.
    struct Refusing;

    impl LaneInbox for Refusing {
        fn deliver(&self, _: u64, _: &NodeId, _: StageMessage) -> Result<(), String> {
            Err("refused".into())
        }

        fn send_events(&self, _: LocalStream) {}
    }

    fn release(seq_id: u64) -> StageMessage {
        StageMessage { kind: Some(stage_message::Kind::Release(ReleaseSequence { seq_id })) }
    }

    #[test]
    fn a_broken_lane_is_given_up_for_the_forwarder() {
        let address = format!("127.0.0.1:route-test-{}", std::process::id());
        let inbox: Arc<dyn LaneInbox> = Arc::new(Refusing);
        let node = NodeId::new("receiver").unwrap();
        let _listener = Listener::open(&address, node.clone(), Arc::downgrade(&inbox) as Weak<dyn LaneInbox>).unwrap();
        let lane = Lane::open(&address, Some(&node), &NodeId::new("sender").unwrap(), 1).expect("a lane opens");
        let (forwarder, mut forwarded) = mpsc::unbounded_channel();
        let link = Arc::new(LinkGauge::default());
        let mut route = Route::new(forwarder, Some(lane), link.clone());
        assert!(link.is_local_lane());
        // The receiver closes the lane at the first message; writes fail from then on.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seq = 0;
        while forwarded.try_recv().is_err() {
            assert!(Instant::now() < deadline, "the route never turned to the forwarder");
            assert!(route.send(release(seq)));
            seq += 1;
        }
        assert!(!link.is_local_lane(), "the link no longer says local lane");
        assert!(route.send(release(seq)));
        assert!(forwarded.try_recv().is_ok(), "later messages go to the forwarder");
    }
}
