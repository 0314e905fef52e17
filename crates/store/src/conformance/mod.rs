//! The back-end conformance suite.
