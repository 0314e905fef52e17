//! Misbehaviours that spend host memory or host connections rather than the
//! guest's own, for the host-limit tests:
//!
//! - `/fields?n=N&kib=K`: creates N wasi:http `fields`, each holding one
//!   header of K KiB, keeps them all alive and answers 200 (the guest's own
//!   memory holds one K KiB value, reused);
//! - `/fanout?n=N&authority=HOST:PORT[&order=reverse]`: starts N outbound
//!   GETs of `http://HOST:PORT/` at once, waits for each in turn (the last
//!   started first with `order=reverse`), dropping its response unread, and
//!   answers 200 with `ok=<n> failed=<n>`.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, OutgoingRequest, ResponseOutparam, Scheme};

use crate::{param, respond};

/// `/fields`: holds `n` header maps of `kib` KiB each on the host.
pub(crate) fn fields(query: &str, response_out: ResponseOutparam) {
    let n = param(query, "n", 1000);
    let kib = param(query, "kib", 120) as usize;
    let value = vec![b'h'; kib * 1024];
    let mut held = Vec::new();
    for i in 0..n {
        match Fields::from_list(&[("x-pad".into(), value.clone())]) {
            Ok(fields) => held.push(fields),
            Err(error) => {
                respond(response_out, &format!("fields {i} refused: {error:?}\n"));
                return;
            }
        }
    }
    respond(
        response_out,
        &format!("holding {} fields of {kib} KiB\n", held.len()),
    );
    drop(held);
}

/// `/fanout`: `n` outbound requests in flight at once.
pub(crate) fn fanout(query: &str, response_out: ResponseOutparam) {
    let n = param(query, "n", 100);
    let authority = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("authority="))
        .unwrap_or("127.0.0.1:80");
    let mut pending = Vec::new();
    let mut failed = 0u64;
    for _ in 0..n {
        let request = OutgoingRequest::new(Fields::new());
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some("/"));
        match outgoing_handler::handle(request, None) {
            Ok(future) => pending.push(future),
            Err(_) => failed += 1,
        }
    }
    if query.split('&').any(|pair| pair == "order=reverse") {
        pending.reverse();
    }
    let mut ok = 0u64;
    for future in pending {
        future.subscribe().block();
        // Each response is dropped once it arrives, closing its connection.
        match future.get() {
            Some(Ok(Ok(_response))) => ok += 1,
            _ => failed += 1,
        }
    }
    respond(response_out, &format!("ok={ok} failed={failed}\n"));
}
