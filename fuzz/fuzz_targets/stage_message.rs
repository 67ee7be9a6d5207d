//! A Forward stream's message as a peer may send it: decoded, and its hidden
//! states checked as a stage checks them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::v1::{stage_message, StageMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = StageMessage::decode(data) else { return };
    if let Some(stage_message::Kind::Frame(frame)) = message.kind {
        for hidden in [1, 8, 576] {
            let _ = strata_proto::decode_hidden(frame.hidden.as_ref(), frame.tokens.len(), hidden);
        }
    }
});
