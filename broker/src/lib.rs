//! Shale's privilege broker.
//!
//! The gateway's SSH process parses untrusted input, so it runs as an unprivileged user with no
//! capabilities. Everything that needs root (containerd's socket, entering an order's network
//! namespace to dial a forward, the orders' network) is done by the broker, a small root
//! process that owns the [`shale_provisioner::Provisioner`] and answers a narrow, typed,
//! versioned [`protocol`] on a local socket. [`BrokerClient`] is the SSH process's side: it
//! implements [`shale_provisioner::Machines`], so the gateway does not know which side of the
//! socket it runs on. Process stdio and dialled sockets come back as file descriptors, so no
//! session byte passes through the broker. The broker believes nothing the SSH process says about
//! an order: it checks each against the chain through an [`Admission`].

mod admission;
mod client;
pub mod frame;
pub mod protocol;
mod server;

pub use admission::{Admission, AdmissionError, Standing};
pub use client::BrokerClient;
pub use server::Broker;
