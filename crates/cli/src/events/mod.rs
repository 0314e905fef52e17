//! The event verbs, one module per resource: the object, KV and queue
//! stores, event triggers, dead-letter queues and asynchronous invocation;
//! and the compact `--trigger` specs of `mayfly deploy`.

mod buckets;
pub mod dlq;
pub mod invoke_async;
pub mod kv;
pub mod objects;
pub mod queues;
pub mod triggers;
