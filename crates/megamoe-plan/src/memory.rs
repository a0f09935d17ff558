//! Memory model.
