//! Shale gateway crate; see ARCHITECTURE.md for what it owns.
