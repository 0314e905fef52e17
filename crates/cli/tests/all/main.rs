//! End-to-end tests: the real `mayfly` binary, real guest components, real
//! HTTP over loopback. One test binary with a module per topic, so the
//! workspace links once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod aliases;
mod common;
mod deploy;
mod dev;
mod events;
mod isolation_ids;
mod limits;
mod manifest;
mod new;
mod scaling;
mod security;
mod serve;
mod usage;
