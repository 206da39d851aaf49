//! One module per command.

pub mod gateway;
