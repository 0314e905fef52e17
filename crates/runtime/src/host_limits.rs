//! Host memory a guest makes the node hold, counted against its memory limit.
//!
//! A guest's linear memory is bounded by its limit, but host calls allocate
//! on the node's heap: every wasi:http `fields` handle keeps a header map on
//! the host, and a resource handle of any kind keeps a table entry. Without
//! a bound a 16 MiB function held 20,000 `fields` of ~120 KiB each (2.4 GiB
//! of node memory). So:
//!
//! - each store's resource table holds at most [`MAX_TABLE_ENTRIES`] handles;
//! - the bytes of every `fields` the guest creates or fills are charged to
//!   the invocation's [`MemoryMeter`], beside its linear memory: past the
//!   limit the guest ends with outcome `oom`, and its peak includes them.
//!
//! This module counts; [`limiter`](crate::limiter) charges the counts to
//! an invocation.

use http::{HeaderName, HeaderValue};
use wasmtime::component::ResourceTable;
use wasmtime_wasi_http::FieldMap;
use wasmtime_wasi_http::p2::types::{HostOutgoingRequest, HostOutgoingResponse};

use crate::meter::MemoryMeter;

/// Resource handles one store may hold at once (wasmtime's default is
/// ~1 billion). Generous for real guests, which hold a few dozen (streams,
/// pollables, bodies, fields); each entry costs the host memory of its own.
pub(crate) const MAX_TABLE_ENTRIES: usize = 10_000;

/// What one `fields` costs beyond its entries: the map, its handle and table
/// entry (an estimate; `HeaderMap` allocates its index lazily).
pub(crate) const FIELDS_OVERHEAD: usize = 256;

/// The host bytes of one header entry, the way wasmtime-wasi-http sizes them
/// for its per-`fields` limit: the bytes plus the in-memory structures.
pub(crate) fn entry_bytes(name_len: usize, value_len: usize) -> usize {
    name_len
        .saturating_add(size_of::<HeaderName>())
        .saturating_add(value_len)
        .saturating_add(size_of::<HeaderValue>())
}

/// The host bytes of a header map.
pub(crate) fn map_bytes(map: &http::HeaderMap) -> usize {
    let names: usize = map
        .keys()
        .map(|name| name.as_str().len() + size_of::<HeaderName>())
        .sum();
    let values: usize = map
        .values()
        .map(|value| value.len() + size_of::<HeaderValue>())
        .sum();
    FIELDS_OVERHEAD + names + values
}

/// The host bytes of every header map the guest holds in `table`: its
/// `fields`, and those moved into outgoing requests and responses not yet
/// sent. Maps shared by a clone are counted once per handle (an upper bound).
fn held_fields_bytes(table: &mut ResourceTable) -> usize {
    table
        .iter_mut()
        .map(|entry| {
            if let Some(fields) = entry.downcast_ref::<FieldMap>() {
                map_bytes(fields)
            } else if let Some(request) = entry.downcast_ref::<HostOutgoingRequest>() {
                map_bytes(&request.headers)
            } else if let Some(response) = entry.downcast_ref::<HostOutgoingResponse>() {
                map_bytes(&response.headers)
            } else {
                0
            }
        })
        .sum()
}

/// Recounts the host bytes held for the guest. Charges only add up (a
/// dropped `fields` is not credited: its handle may have been an uncharged
/// one, such as a request's headers), so this runs when the sum would break
/// the limit, and when a kept instance starts a new invocation with handles
/// left from the last one.
pub(crate) fn recount(meter: &mut MemoryMeter, table: &mut ResourceTable) {
    meter.set_host(held_fields_bytes(table));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_costs_its_bytes_and_structures() {
        let mut map = http::HeaderMap::new();
        assert_eq!(map_bytes(&map), FIELDS_OVERHEAD);
        map.append("x-a", HeaderValue::from_static("12345"));
        map.append("x-a", HeaderValue::from_static("6"));
        assert_eq!(
            map_bytes(&map),
            FIELDS_OVERHEAD + entry_bytes(3, 5) + size_of::<HeaderValue>() + 1
        );
    }
}
