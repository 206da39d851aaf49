//! Shale's benchmarks: whole-system runs that compare the gateway with OpenSSH's own `sshd` in
//! the same run, and report ratios.

#[cfg(feature = "system")]
pub mod container_sshd;
#[cfg(feature = "system")]
pub mod load;
pub mod machine;
pub mod reference;
#[cfg(feature = "system")]
pub mod side_by_side;
pub mod stats;
