//! End-to-end tests: the real `mayfly` binary, real guest components, real
//! HTTP over loopback. One test binary with a module per topic, so the
//! workspace links once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod aliases;
mod cli;
mod common;
mod completions;
mod connections;
mod dashboard;
mod deploy;
mod dev;
mod edge;
mod environment;
mod events;
mod fairness;
mod fleet;
mod fleet_faults;
mod fleet_link;
mod follow;
mod host_limits;
mod hygiene;
mod isolation_ids;
mod jobs;
mod limits;
mod login;
mod manifest;
mod new;
mod nn;
mod node_logs;
mod openapi;
mod p3;
mod pipelines;
mod placement;
mod quickstart;
mod retention;
mod s3;
mod scaling;
mod security;
mod serve;
mod storage_faults;
mod streaming;
mod usage;
