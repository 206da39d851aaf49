//! Shale circuits crate; see ARCHITECTURE.md for what it owns.
