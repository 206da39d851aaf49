//! Shale's benchmarks: whole-system runs that compare the gateway with OpenSSH's own `sshd` in
//! the same run, and report ratios.

pub mod reference;
pub mod stats;
