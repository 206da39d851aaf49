//! Shale contracts crate; see ARCHITECTURE.md for what it owns.
