//! Shale meter crate; see ARCHITECTURE.md for what it owns.
