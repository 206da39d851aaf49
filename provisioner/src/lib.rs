//! Shale provisioner crate; see ARCHITECTURE.md for what it owns.
