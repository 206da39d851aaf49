//! One module per command.

pub mod ack;
pub mod demo;
pub mod deploy;
pub mod dev;
pub mod gateway;
pub mod market;
pub mod order;
pub mod piece;
pub mod receipts;
pub mod sp;
pub mod tunnel;
pub mod watch;
