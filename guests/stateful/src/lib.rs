//! A function with an expensive initialisation, for the hot-tier tests: the
//! first request an instance serves builds its state (it logs `init` and
//! touches `INIT_MB` of memory, as loading a model or a dictionary would);
//! later requests on the same instance reuse it. Each answer says which
//! instance served it and how many requests that instance has served, so a
//! test can tell instance reuse (`reuse = true`) from a fresh instance per
//! request.
//!
//! `?ms=N` holds the request for N ms, so concurrent requests need more
//! instances.

use std::cell::RefCell;
use std::hint::black_box;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Memory the initialisation touches and keeps, in MiB.
const INIT_MB: usize = 16;

struct State {
    instance: u64,
    served: u64,
    data: Vec<u8>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Stateful;

impl wasip2::exports::http::incoming_handler::Guest for Stateful {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request
            .path_with_query()
            .and_then(|p| p.split_once('?').map(|(_, q)| q.to_string()))
            .unwrap_or_default();
        let (instance, served) = STATE.with_borrow_mut(|state| {
            let state = state.get_or_insert_with(|| {
                println!("init");
                State {
                    instance: wasip2::random::random::get_random_u64(),
                    served: 0,
                    data: vec![1u8; INIT_MB << 20],
                }
            });
            state.served += 1;
            black_box(&state.data);
            (state.instance, state.served)
        });
        let ms = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("ms="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if ms > 0 {
            wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        }
        let response = OutgoingResponse::new(Fields::new());
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(response_out, Ok(response));
        let Ok(stream) = body.write() else { return };
        let text = format!("instance={instance:016x} served={served}\n");
        let _ = stream.blocking_write_and_flush(text.as_bytes());
        drop(stream);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasip2::http::proxy::export!(Stateful);
