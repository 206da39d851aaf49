//! The `shale-ack` subsystem's input: the lines a client's tunnel sends the gateway (its request,
//! then its answer to the offer, whose signature is decoded and recovered), read by the
//! gateway's own functions from `shale_gateway::ack_channel`; and the lines the gateway sends
//! the tunnel ([`AckLine`]), which the tunnel parses with the same types.
//!
//! Invariants: no input panics; what parses re-serializes to something that parses to the same
//! value; a decoded signature is 65 bytes.

use shale_contracts::ack::Acknowledgment;
use shale_contracts::{Address, B256};
use shale_gateway::ack_channel::{read_answer, read_request, signature_bytes};
use shale_meter::ack::{AckAnswer, AckLine};
use std::sync::OnceLock;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn round_trips<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).expect("a parsed line serializes");
    let again: T = serde_json::from_str(&text).expect("a serialized line parses");
    assert_eq!(&again, value, "{text}");
}

/// Runs the target on one input; panics where an invariant breaks.
pub fn run(data: &[u8]) {
    runtime().block_on(async {
        let mut input = tokio::io::BufReader::new(data);
        if let Ok(request) = read_request(&mut input).await {
            round_trips(&request);
        }
        // The gateway reads the answer after the request's line, whether or not it parsed (the
        // real exchange stops at a bad request; reading on covers more of the reader).
        if let Ok(answer) = read_answer(&mut input).await {
            round_trips(&answer);
            if let AckAnswer::Signed { signature } = &answer {
                if let Ok(bytes) = signature_bytes(signature) {
                    assert_eq!(bytes.len(), 65);
                    let ack = Acknowledgment::new(7, B256::repeat_byte(7), 60, 1_000, 2_000);
                    let _ = ack.signer(&bytes, 31337, Address::repeat_byte(0x5f));
                }
            }
        }
    });
    // What the tunnel parses from the gateway, line by line.
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines().take(64) {
            if let Ok(parsed) = serde_json::from_str::<AckLine>(line) {
                round_trips(&parsed);
            }
        }
    }
}
