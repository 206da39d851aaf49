//! The SSH username (`ssh ORDER@sp`) and the subsystem name (`ssh -s NAME`): the first strings a
//! client chooses, read before any chain call or container.
//!
//! Invariants: an accepted username names a non-zero order that each canonical spelling
//! (`42`, `order-42`, `0x2a`) names too; a refusal's message is bounded and has no control
//! characters, whatever the name; a served subsystem's name is exactly the one asked for.

use shale_gateway::login::{parse_login, OrderId};
use shale_gateway::policy::Subsystem;

/// The message's fixed text is under 160 bytes; the shown name is at most 40 chars of 4 bytes.
const MESSAGE_MAX: usize = 160 + 40 * 4;

/// Runs the target on one input; panics where an invariant breaks.
pub fn run(data: &[u8]) {
    // russh hands the handler a `&str`: a name that is not UTF-8 never reaches the parser.
    let Ok(user) = std::str::from_utf8(data) else {
        return;
    };
    match parse_login(user) {
        Ok(OrderId(id)) => {
            assert_ne!(id, 0, "{user:?} names order 0");
            for spelling in [id.to_string(), format!("order-{id}"), format!("{id:#x}")] {
                assert_eq!(parse_login(&spelling), Ok(OrderId(id)), "{spelling:?}");
            }
            assert!(
                user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{user:?} accepted with a byte no order id has"
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() <= MESSAGE_MAX, "{} bytes", message.len());
            assert!(
                !message.chars().any(char::is_control),
                "control character echoed: {message:?}"
            );
        }
    }
    if let Some(sub) = Subsystem::named(user) {
        assert_eq!(sub.name(), user);
    }
}
