//! The host-memory bounds of [`host_limits`](crate::host_limits) applied to
//! one invocation: its store's limiter, and the wasi:http `fields` calls
//! whose bytes are charged to it.
//!
//! wasmtime-wasi-http bounds each `fields` on its own (128 KiB) but not
//! their total, and has no hook around their creation; so the `fields`
//! constructors and mutators are wrapped here, in the linker, around the
//! stock implementations.

use wasmtime::component::{Linker, Resource};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi_http::p2::bindings::http::types::{self, HostFields};
use wasmtime_wasi_http::p2::{HeaderError, HeaderResult};
use wasmtime_wasi_http::{FieldMap, WasiHttpView};

use crate::host_limits::{FIELDS_OVERHEAD, entry_bytes, map_bytes, recount};
use crate::state::InvocationState;

/// The interface whose `fields` are wrapped: the version wasmtime-wasi-http
/// links (imports of earlier 0.2 versions resolve to it).
const HTTP_TYPES: &str = "wasi:http/types@0.2.12";

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
