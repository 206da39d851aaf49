//! Shale's privilege broker.
//!
//! The gateway's SSH process parses untrusted input, so it runs as an unprivileged user with no
//! capabilities. Everything that needs root (containerd's socket, entering an order's network
//! namespace to dial a forward, the orders' network) is done by the broker, a small root
//! process that owns the [`shale_provisioner::Provisioner`] and answers a narrow, typed,
//! versioned [`protocol`] on a local socket. [`BrokerClient`] is the SSH process's side: it
//! implements [`shale_provisioner::Machines`], so the gateway does not know which side of the
//! socket it runs on. Process stdio and dialled sockets come back as file descriptors, so no
//! session byte passes through the broker.

mod client;
pub mod frame;
pub mod protocol;
mod server;

pub use client::BrokerClient;
pub use server::Broker;
