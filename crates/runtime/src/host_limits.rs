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
//! wasmtime-wasi-http bounds each `fields` on its own (128 KiB) but not
//! their total, and has no hook around their creation; so the `fields`
//! constructors and mutators are wrapped here, in the linker, around the
//! stock implementations.
//!

use http::{HeaderName, HeaderValue};
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi_http::p2::bindings::http::types::{self, HostFields};
use wasmtime_wasi_http::p2::types::{HostOutgoingRequest, HostOutgoingResponse};
use wasmtime_wasi_http::p2::{HeaderError, HeaderResult};
use wasmtime_wasi_http::{FieldMap, WasiHttpView};

use crate::invoke::InvocationState;
use crate::meter::MemoryMeter;

/// Resource handles one store may hold at once (wasmtime's default is
/// ~1 billion). Generous for real guests, which hold a few dozen (streams,
/// pollables, bodies, fields); each entry costs the host memory of its own.
pub(crate) const MAX_TABLE_ENTRIES: usize = 10_000;

/// The interface whose `fields` are wrapped: the version wasmtime-wasi-http
/// links (imports of earlier 0.2 versions resolve to it).
const HTTP_TYPES: &str = "wasi:http/types@0.2.12";

/// What one `fields` costs beyond its entries: the map, its handle and table
/// entry (an estimate; `HeaderMap` allocates its index lazily).
const FIELDS_OVERHEAD: usize = 256;

/// The host bytes of one header entry, the way wasmtime-wasi-http sizes them
/// for its per-`fields` limit: the bytes plus the in-memory structures.
fn entry_bytes(name_len: usize, value_len: usize) -> usize {
    name_len
        .saturating_add(size_of::<HeaderName>())
        .saturating_add(value_len)
        .saturating_add(size_of::<HeaderValue>())
}

/// The host bytes of a header map.
fn map_bytes(map: &http::HeaderMap) -> usize {
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

/// The store's limiter: the meter, recounting host bytes before it refuses
/// linear memory because of them.
impl ResourceLimiter for InvocationState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let (meter, table) = self.host_parts();
        if meter.host() > 0 && !meter.growth_fits(current, desired) {
            recount(meter, table);
        }
        meter.memory_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.host_parts().0.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.host_parts().0.table_growing(current, desired, maximum)
    }
}

/// Charges `bytes` of `fields` memory to the invocation, recounting first
/// if the running sum reaches the limit. Past the limit the guest traps and
/// its invocation ends `oom`.
fn charge(state: &mut InvocationState, bytes: usize) -> wasmtime::Result<()> {
    let (meter, table) = state.host_parts();
    if meter.charge_host(bytes) {
        return Ok(());
    }
    recount(meter, table);
    if meter.charge_host(bytes) {
        return Ok(());
    }
    meter.refuse();
    let message = format!(
        "wasi:http fields would take the function past its memory limit of {} MiB \
         ({} KiB already held in header fields on the host): drop fields it no longer needs",
        meter.limit() >> 20,
        meter.host() >> 10
    );
    state.explain(&message);
    Err(wasmtime::Error::msg(message))
}

/// A `fields` result as the guest sees it: a header error is its value, any
/// other failure traps.
fn guest_result<T>(result: HeaderResult<T>) -> wasmtime::Result<Result<T, types::HeaderError>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(error) => Ok(Err(HeaderError::downcast(error)?)),
    }
}

type Store<'a> = StoreContextMut<'a, InvocationState>;

/// Wraps the `fields` constructors and mutators in `linker`
/// (which already holds wasi:http) so that their bytes are charged.
pub(crate) fn add_to_linker(linker: &mut Linker<InvocationState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added = add_fields(linker);
    linker.allow_shadowing(false);
    added
}

fn add_fields(linker: &mut Linker<InvocationState>) -> wasmtime::Result<()> {
    let mut types = linker.instance(HTTP_TYPES)?;
    types.func_wrap("[constructor]fields", |mut store: Store<'_>, (): ()| {
        charge(store.data_mut(), FIELDS_OVERHEAD)?;
        let fields = HostFields::new(&mut store.data_mut().http())?;
        Ok((fields,))
    })?;
    types.func_wrap(
        "[static]fields.from-list",
        |mut store: Store<'_>, (entries,): (Vec<(String, Vec<u8>)>,)| {
            let bytes = entries
                .iter()
                .map(|(name, value)| entry_bytes(name.len(), value.len()))
                .fold(FIELDS_OVERHEAD, usize::saturating_add);
            charge(store.data_mut(), bytes)?;
            let result = HostFields::from_list(&mut store.data_mut().http(), entries);
            Ok((guest_result(result)?,))
        },
    )?;
    types.func_wrap(
        "[method]fields.set",
        |mut store: Store<'_>,
         (fields, name, values): (Resource<FieldMap>, String, Vec<Vec<u8>>)| {
            let bytes = values
                .iter()
                .map(|value| entry_bytes(name.len(), value.len()))
                .fold(0, usize::saturating_add);
            charge(store.data_mut(), bytes)?;
            let result = HostFields::set(&mut store.data_mut().http(), fields, name, values);
            Ok((guest_result(result)?,))
        },
    )?;
    types.func_wrap(
        "[method]fields.append",
        |mut store: Store<'_>, (fields, name, value): (Resource<FieldMap>, String, Vec<u8>)| {
            charge(store.data_mut(), entry_bytes(name.len(), value.len()))?;
            let result = HostFields::append(&mut store.data_mut().http(), fields, name, value);
            Ok((guest_result(result)?,))
        },
    )?;
    types.func_wrap(
        "[method]fields.clone",
        |mut store: Store<'_>, (fields,): (Resource<FieldMap>,)| {
            // A clone shares its map until either is changed, then copies it
            // whole: charged as the copy.
            let (_, table) = store.data_mut().host_parts();
            let bytes = map_bytes(table.get(&fields)?);
            charge(store.data_mut(), bytes)?;
            let clone = HostFields::clone(&mut store.data_mut().http(), fields)?;
            Ok((clone,))
        },
    )?;
    Ok(())
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
