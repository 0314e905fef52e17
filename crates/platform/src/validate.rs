//! One home for the node's limits and the checks of what users name and
//! configure: function, alias, bucket, queue, key and secret names, request
//! ids, routes, function limits and scaling, triggers and their retries,
//! and the largest bodies each kind of write accepts. Every check answers
//! with a message that says what to give instead.

use mayfly_store::{FunctionLimits, FunctionScaling, RetryPolicy, TriggerSource, TriggerSpec};

use crate::error::PlatformError;
use crate::routes::Route;
use crate::schedule::Schedule;

// ---- body and value limits ----

/// Largest object: 64 MiB (streamed to and from disk, never held whole).
pub const MAX_OBJECT_BYTES: usize = 64 << 20;
/// Largest KV value: 1 MiB, as NATS KV allows by default.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest queue message: 256 KiB, as SQS allows.
pub const MAX_MESSAGE_BYTES: usize = 256 << 10;
/// Largest asynchronous invocation payload: 6 MiB, stored whole.
pub const MAX_ASYNC_BYTES: usize = 6 << 20;
/// Largest secret value: 64 KiB (certificates fit, files do not).
pub const MAX_SECRET_BYTES: usize = 64 << 10;
/// Longest secret name.
pub const MAX_NAME_CHARS: usize = 128;
/// Largest batch a single `send` may carry.
pub const MAX_BATCH: usize = 10_000;
/// Longest bucket or queue name.
const MAX_NAME: usize = 63;
/// Longest key, in bytes.
const MAX_KEY: usize = 1024;

// ---- names and ids ----

/// Function names appear in URLs, routes and file names: keep them simple.
pub(crate) fn validate_name(name: &str) -> Result<(), PlatformError> {
    let valid = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(format!(
            "invalid function name `{name}`: use 1 to 63 lower-case letters, digits, `-` or `_`, \
             starting with a letter or digit"
        )))
    }
}

/// Alias names: 1 to 32 lower-case letters, digits, `-` or `_`.
pub(crate) fn validate_alias(alias: &str) -> Result<(), PlatformError> {
    let valid = (1..=32).contains(&alias.len())
        && alias
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(format!(
            "invalid alias name `{alias}`: use 1 to 32 lower-case letters, digits, `-` or `_`"
        )))
    }
}

/// Whether a request id a client sent is one to keep: 1 to 64 of
/// `[A-Za-z0-9._-]` (safe in headers, logs and the ledger).
pub(crate) fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The prefix of functions' default KV stores, `fn.<function>`.
pub const DEFAULT_BUCKET_PREFIX: &str = "fn.";

/// The KV bucket `function` opens with wasi:keyvalue `open("")`: its own
/// store, which no other function can be granted.
pub fn default_bucket(function: &str) -> String {
    format!("{DEFAULT_BUCKET_PREFIX}{function}")
}

/// The function whose default store `bucket` is, if it is one.
pub fn default_bucket_owner(bucket: &str) -> Option<&str> {
    bucket
        .strip_prefix(DEFAULT_BUCKET_PREFIX)
        .filter(|function| validate_name(function).is_ok())
}

/// Checks a queue name: a name as [`check_name`] has it, or
/// `<name>@<site>` for a queue placed at leaf site `<site>` (its server's
/// JetStream domain: letters, digits, `-` and `_`), stored in that
/// site's own event store (docs/edge-design.md §4).
pub fn check_queue_name(queue: &str) -> Result<(), PlatformError> {
    let Some((name, site)) = queue.rsplit_once('@') else {
        return check_name("queue", queue);
    };
    check_name("queue", name)?;
    let valid = (1..=MAX_NAME).contains(&site.len())
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(format!(
            "invalid site `{}` in queue name `{}`: after `@` comes the site's JetStream domain, \
             1 to {MAX_NAME} letters, digits, `-` or `_` (see `mayfly status --fleet`)",
            site.escape_debug(),
            queue.escape_debug()
        )))
    }
}

/// A live node as the co-location check sees it: its name, its leaf
/// site (`None` at the hub) and its labels.
pub(crate) struct PlacedNode<'a> {
    pub(crate) name: &'a str,
    pub(crate) site: Option<&'a str>,
    pub(crate) labels: &'a std::collections::BTreeMap<String, String>,
}

/// Refuses a trigger of `function` (placed at `placement`) on queue
/// `queue` placed at leaf site `site` unless every live node the
/// placement matches is at that site, and one is: a site's queue is
/// delivered from the site's own store, so only its nodes may run the
/// function (docs/edge-design.md §4.2, "triggers follow their source").
pub(crate) fn check_queue_site(
    function: &str,
    placement: &std::collections::BTreeMap<String, String>,
    queue: &str,
    site: &str,
    nodes: &[PlacedNode<'_>],
) -> Result<(), PlatformError> {
    let refuse = |why: String| {
        PlatformError::BadRequest(format!(
            "queue `{queue}` lives at site `{site}`, but function `{function}` {why}: a site's \
             queue is delivered only by that site's nodes; deploy the function with --place \
             labels that only nodes at `{site}` have (see `mayfly status --fleet`), or use a \
             queue at the hub (without `@{site}`)"
        ))
    };
    if placement.is_empty() {
        return Err(refuse(
            "has no placement (it may run on any node, at any site)".into(),
        ));
    }
    let placed = mayfly_store::labels_text(placement);
    let matching: Vec<&PlacedNode<'_>> = nodes
        .iter()
        .filter(|node| mayfly_store::placement_matches(node.labels, placement))
        .collect();
    if let Some(other) = matching.iter().find(|node| node.site != Some(site)) {
        let at = match other.site {
            Some(other_site) => format!("site `{other_site}`"),
            None => "the hub".to_string(),
        };
        return Err(refuse(format!(
            "is placed at `{placed}`, which node `{}` at {at} matches",
            other.name
        )));
    }
    if matching.is_empty() {
        return Err(refuse(format!(
            "is placed at `{placed}`, which no live node at site `{site}` matches"
        )));
    }
    Ok(())
}

/// Checks a bucket or queue name: 1 to 63 of `a-z 0-9 - _ .`, but not `.`
/// or `..`: those are path segments that clients and proxies resolve
/// (`/v1/kv/../x` is `/v1/x`), so such a bucket could be written but never
/// reached again by its URL.
pub fn check_name(what: &str, name: &str) -> Result<(), PlatformError> {
    // A function's default store: its name may be longer than 63.
    if default_bucket_owner(name).is_some() {
        return Ok(());
    }
    if name == "." || name == ".." {
        return Err(PlatformError::BadRequest(format!(
            "invalid {what} name `{name}`: `.` and `..` are path segments, not names; use \
             lower-case letters, digits, `-`, `_` or `.`"
        )));
    }
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(format!(
            "invalid {what} name `{}`: use 1 to {MAX_NAME} lower-case letters, digits, `-`, `_` \
             or `.`",
            name.escape_debug()
        )))
    }
}

/// Checks a KV or object key: 1 to 1024 bytes of UTF-8 with no control
/// characters.
pub fn check_key(key: &str) -> Result<(), PlatformError> {
    if key.is_empty() || key.len() > MAX_KEY || key.chars().any(char::is_control) {
        return Err(PlatformError::BadRequest(format!(
            "invalid key `{}`: use 1 to {MAX_KEY} bytes of UTF-8 without control characters",
            key.escape_debug()
        )));
    }
    Ok(())
}

/// Checks a prefix or suffix filter (may be empty).
fn check_filter(what: &str, text: &str) -> Result<(), PlatformError> {
    if text.len() > MAX_KEY || text.chars().any(char::is_control) {
        return Err(PlatformError::BadRequest(format!(
            "invalid {what} `{}`: at most {MAX_KEY} bytes, no control characters",
            text.escape_debug()
        )));
    }
    Ok(())
}

/// Checks a trigger spec of `function` before it is stored.
pub fn check_trigger(function: &str, spec: &TriggerSpec) -> Result<(), PlatformError> {
    let bucket = match &spec.source {
        TriggerSource::Object { bucket, .. } | TriggerSource::Kv { bucket, .. } => Some(bucket),
        _ => None,
    };
    // Another function's default store would be read through the events.
    if let Some(owner) = bucket.and_then(|bucket| default_bucket_owner(bucket))
        && owner != function
    {
        return Err(PlatformError::BadRequest(format!(
            "`{}` is function `{owner}`'s default KV store: only `{owner}` may have triggers on it",
            default_bucket(owner)
        )));
    }
    match &spec.source {
        TriggerSource::Schedule { schedule } => {
            Schedule::parse(schedule).map_err(|e| PlatformError::BadRequest(e.to_string()))?;
        }
        TriggerSource::Object {
            bucket,
            prefix,
            suffix,
            events,
        } => {
            check_name("bucket", bucket)?;
            check_filter("prefix", prefix)?;
            check_filter("suffix", suffix)?;
            if events.is_empty() {
                return Err(PlatformError::BadRequest(
                    "`events` is empty: list `created`, `deleted` or both".into(),
                ));
            }
        }
        TriggerSource::Kv { bucket, prefix } => {
            check_name("bucket", bucket)?;
            check_filter("prefix", prefix)?;
        }
        TriggerSource::Queue {
            queue,
            batch_size,
            max_concurrency,
        } => {
            check_queue_name(queue)?;
            if !(1..=1000).contains(batch_size) || !(1..=1000).contains(max_concurrency) {
                return Err(PlatformError::BadRequest(format!(
                    "`batch_size` is {batch_size} and `max_concurrency` {max_concurrency}: \
                     each must be 1 to 1000"
                )));
            }
        }
    }
    if let Some(alias) = &spec.alias {
        validate_alias(alias)?;
    }
    check_retry(&spec.retry)
}

/// Checks a retry policy.
pub fn check_retry(retry: &RetryPolicy) -> Result<(), PlatformError> {
    if !(1..=RetryPolicy::MAX_ATTEMPTS).contains(&retry.max_attempts)
        || retry.backoff_ms > RetryPolicy::MAX_BACKOFF_MS
    {
        return Err(PlatformError::BadRequest(format!(
            "retry: `max_attempts` is {} and `backoff_ms` {}: attempts must be 1 to {}, the \
             backoff at most {} ms",
            retry.max_attempts,
            retry.backoff_ms,
            RetryPolicy::MAX_ATTEMPTS,
            RetryPolicy::MAX_BACKOFF_MS
        )));
    }
    Ok(())
}

/// Checks a secret's name: 1–128 characters of `[A-Za-z0-9_.-]`, but not
/// `.` or `..` (path segments that clients resolve, so `/v1/secrets/..`
/// would never reach the secret).
pub fn check_secret_name(name: &str) -> Result<(), PlatformError> {
    if name == "." || name == ".." {
        return Err(PlatformError::BadRequest(format!(
            "invalid secret name `{name}`: `.` and `..` are path segments, not names; use \
             letters, digits, `_`, `.` or `-`"
        )));
    }
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        return Ok(());
    }
    let shown = if name.chars().count() <= MAX_NAME_CHARS {
        format!(" `{name}`")
    } else {
        String::new()
    };
    Err(PlatformError::BadRequest(format!(
        "invalid secret name{shown}: use 1–{MAX_NAME_CHARS} letters, digits, `_`, `.` or `-`"
    )))
}

// ---- routes, limits and scaling ----

/// Most routes one function may have. A function serves a handful of
/// prefixes (and everything below each); thousands would make every deploy
/// and catalog rebuild slow and are a mistake or an attack. Lambda allows
/// one function URL, Workers 1,000 routes per zone for all scripts.
pub const MAX_ROUTES: usize = 64;
/// Longest route as written, in bytes: a host name (at most 253) and a path
/// prefix with room to spare.
pub const MAX_ROUTE_BYTES: usize = 1024;

/// Checks the number and length of a deploy's routes before they are
/// parsed (parsing many routes costs time and memory of its own).
pub(crate) fn validate_routes(routes: &[String]) -> Result<(), String> {
    if routes.len() > MAX_ROUTES {
        return Err(format!(
            "the function has {} routes: give at most {MAX_ROUTES} (one route serves its \
             prefix and everything below it, so a common prefix can replace many)",
            routes.len()
        ));
    }
    if let Some(long) = routes.iter().find(|route| route.len() > MAX_ROUTE_BYTES) {
        let start: String = long.chars().take(40).collect();
        return Err(format!(
            "the route starting `{}` is {} bytes long: give at most {MAX_ROUTE_BYTES} bytes",
            start.escape_debug(),
            long.len()
        ));
    }
    for route in routes {
        check_route_form(route)?;
        if let Some(reserved) = crate::health::reserved_route(route) {
            return Err(reserved);
        }
    }
    Ok(())
}

/// A route is a path (`/greet`) or an explicit host route: a host name with
/// a dot, or `localhost`, optionally with a port, then an optional path
/// (`greet.example.com/`, `localhost:8080/greet`). Anything else, such as
/// `greet`, is most likely a path missing its slash: taken as a host, it
/// would serve only requests to a host nobody calls, and `/greet` would
/// answer 404. Checked at deploy only; routes stored before keep working.
fn check_route_form(route: &str) -> Result<(), String> {
    let text = route.trim();
    if text.is_empty() || text.starts_with('/') {
        // An empty route is refused by the parser, with its own message.
        return Ok(());
    }
    let (host, path) = text.split_at(text.find('/').unwrap_or(text.len()));
    // A bad port is the parser's to report; judge the name alone here.
    let name = crate::routes::strip_port(host).unwrap_or(host);
    if name.contains('.') || name.eq_ignore_ascii_case("localhost") {
        return Ok(());
    }
    let path = if path.is_empty() { "/" } else { path };
    Err(format!(
        "route `{}` is neither a path nor a host route: write `/{}` (a path prefix, served on \
         any host) or a host route like `{name}.example.com{path}` (a host name with a dot, or \
         `localhost`, optionally with a port, then an optional path)",
        route.escape_debug(),
        text.trim_end_matches('/').escape_debug()
    ))
}

/// Checks an environment variable's name: letters, digits and `_`, not
/// starting with a digit, at most 128 bytes (what shells export and every
/// language's environment API reads the same way). Shared with clients, so
/// they refuse a bad name before uploading anything.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let portable = name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if portable {
        Ok(())
    } else {
        Err(format!(
            "environment variable name `{}` must be 1 to 128 letters, digits and `_`, \
             not starting with a digit",
            name.escape_debug()
        ))
    }
}

/// Checks one route as a user writes it (`/path` or `host/path`), with
/// the message that shows both forms: for clients that check a route
/// before they upload anything.
pub fn check_route(text: &str) -> Result<(), String> {
    check_route_form(text)?;
    if let Some(reserved) = crate::health::reserved_route(text) {
        return Err(reserved);
    }
    Route::parse(text).map(drop)
}

/// Parses routes as written, dropping repeats.
pub(crate) fn parse_routes(routes: &[String]) -> Result<Vec<Route>, String> {
    let mut parsed: Vec<Route> = Vec::with_capacity(routes.len());
    for text in routes {
        let route = Route::parse(text)?;
        if !parsed.contains(&route) {
            parsed.push(route);
        }
    }
    Ok(parsed)
}

/// Largest body limit a function may set (`max_request_bytes`,
/// `max_response_bytes`).
pub const MAX_BODY_LIMIT: u64 = 1 << 30;
/// Largest log allowance a function may set per stream and invocation
/// (`max_log_bytes`).
pub const MAX_LOG_LIMIT: u64 = 64 << 20;

/// Checks a function's limits against this node's largest instance.
pub(crate) fn validate_limits(
    limits: &FunctionLimits,
    node_max_memory: usize,
) -> Result<(), String> {
    let max_memory_mb = (node_max_memory >> 20) as u64;
    if limits.memory_mb == 0 || u64::from(limits.memory_mb) > max_memory_mb {
        return Err(format!(
            "`memory_mb` is {}: give 1 to {max_memory_mb} (this node's largest instance)",
            limits.memory_mb
        ));
    }
    if limits.timeout_ms == 0 || limits.timeout_ms > FunctionLimits::MAX_TIMEOUT_MS {
        return Err(format!(
            "`timeout_ms` is {}: give 1 to {} (15 minutes)",
            limits.timeout_ms,
            FunctionLimits::MAX_TIMEOUT_MS
        ));
    }
    for (name, value, max) in [
        (
            "max_request_bytes",
            limits.max_request_bytes,
            MAX_BODY_LIMIT,
        ),
        (
            "max_response_bytes",
            limits.max_response_bytes,
            MAX_BODY_LIMIT,
        ),
        ("max_log_bytes", limits.max_log_bytes, MAX_LOG_LIMIT),
    ] {
        if value > max {
            return Err(format!("`{name}` is {value}: give at most {max}"));
        }
    }
    Ok(())
}

/// Largest queue a function may ask for (`max_queued`).
pub const MAX_QUEUED: u32 = 10_000;

/// Checks a function's concurrency and queue against the node's.
pub(crate) fn validate_scaling(scaling: &FunctionScaling, node_max: u32) -> Result<(), String> {
    if let Some(max) = scaling.max_concurrency
        && (max == 0 || max > node_max)
    {
        return Err(format!(
            "`max_concurrency` is {max}: give 1 to {node_max} (this node's concurrency)"
        ));
    }
    let max = scaling.max_concurrency.unwrap_or(node_max);
    if scaling.reserved_concurrency > max {
        return Err(format!(
            "`reserved_concurrency` is {}: give at most `max_concurrency` ({max})",
            scaling.reserved_concurrency
        ));
    }
    if scaling.max_queued > MAX_QUEUED {
        return Err(format!(
            "`max_queued` is {}: give 0 to {MAX_QUEUED}",
            scaling.max_queued
        ));
    }
    if scaling.queue_timeout_ms > FunctionScaling::MAX_QUEUE_TIMEOUT_MS {
        return Err(format!(
            "`queue_timeout_ms` is {}: give 0 to {} (one minute)",
            scaling.queue_timeout_ms,
            FunctionScaling::MAX_QUEUE_TIMEOUT_MS
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_functions_default_store_is_its_own() {
        assert_eq!(default_bucket("orders"), "fn.orders");
        assert_eq!(default_bucket_owner("fn.orders"), Some("orders"));
        for not_one in ["orders", "fn.", "fn.Orders", "fn..x"] {
            assert_eq!(default_bucket_owner(not_one), None, "{not_one}");
        }
        // Every function has one, however long its name.
        assert!(check_name("bucket", &default_bucket(&"f".repeat(63))).is_ok());

        let kv_trigger = |bucket: &str| TriggerSpec {
            source: TriggerSource::Kv {
                bucket: bucket.into(),
                prefix: String::new(),
            },
            retry: Default::default(),
            alias: None,
        };
        assert!(check_trigger("orders", &kv_trigger("fn.orders")).is_ok());
        let error = check_trigger("spy", &kv_trigger("fn.orders")).unwrap_err();
        assert!(error.to_string().contains("only `orders`"), "{error}");
        assert!(check_trigger("spy", &kv_trigger("orders")).is_ok());

        let mut config = mayfly_store::FunctionConfig::default();
        config.grants.kv = vec!["fn.orders".into()];
        let error = crate::capabilities::check_grants(&config).unwrap_err();
        assert!(error.to_string().contains("default KV store"), "{error}");
    }

    #[test]
    fn request_ids_and_alias_names_are_checked() {
        assert!(valid_request_id("retry-1.a_B"));
        assert!(valid_request_id(&"a".repeat(64)));
        assert!(!valid_request_id(&"a".repeat(65)));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id("é"));
        assert!(validate_alias("beta-2_x").is_ok());
        assert!(validate_alias(&"a".repeat(32)).is_ok());
        for bad in ["", "Beta", "a.b", "a/b", ".", "..", &"a".repeat(33)] {
            assert!(validate_alias(bad).is_err(), "{bad}");
        }
        for bad in [".", "..", "a.b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_bounded_in_number_and_length() {
        let routes = |n: usize| (0..n).map(|i| format!("/r{i}")).collect::<Vec<_>>();
        assert!(validate_routes(&routes(MAX_ROUTES)).is_ok());
        let error = validate_routes(&routes(MAX_ROUTES + 1)).unwrap_err();
        assert!(error.contains("at most 64"), "{error}");
        let long = format!("/{}", "a".repeat(MAX_ROUTE_BYTES));
        let error = validate_routes(&[long]).unwrap_err();
        assert!(error.contains("at most 1024 bytes"), "{error}");
        assert!(validate_routes(&[format!("/{}", "a".repeat(MAX_ROUTE_BYTES - 1))]).is_ok());
    }

    #[test]
    fn a_route_is_a_path_or_an_explicit_host_route() {
        for good in [
            "/greet",
            "/",
            "/greet/*",
            "example.com",
            "example.com/greet",
            "Shop.Example.COM/api/*",
            "localhost",
            "LOCALHOST/greet",
            "localhost:8080/greet",
            "127.0.0.1/x",
            "shop.test:8443",
        ] {
            assert!(validate_routes(&[good.to_string()]).is_ok(), "{good}");
            assert!(parse_routes(&[good.to_string()]).is_ok(), "{good}");
        }
        for (bad, path) in [
            ("greet", "`/greet`"),
            ("greet/", "`/greet`"),
            ("greet/hello", "`/greet/hello`"),
            ("api:8080/x", "`/api:8080/x`"),
            ("localhost-2/a", "`/localhost-2/a`"),
        ] {
            let error = validate_routes(&[bad.to_string()]).unwrap_err();
            assert!(
                error.contains(&format!("route `{bad}` is neither")),
                "{error}"
            );
            assert!(error.contains(&format!("write {path}")), "{bad}: {error}");
            assert!(error.contains(".example.com"), "{error}");
            assert!(error.contains("`localhost`"), "{error}");
        }
        // Every route is checked, not just the first.
        let error = validate_routes(&["/ok".into(), "greet".into()]).unwrap_err();
        assert!(error.contains("`greet`"), "{error}");
        // Stored routes are read by the parser alone, which keeps accepting
        // what older nodes took.
        assert!(parse_routes(&["greet".to_string()]).is_ok());
    }

    #[test]
    fn dot_segments_are_not_names() {
        for good in ["orders", "a.b", "...", "v1.2", "a_b-c"] {
            assert!(check_name("bucket", good).is_ok(), "{good}");
        }
        for bad in [".", "..", "", "A", "a/b", &"a".repeat(64)] {
            let error = check_name("queue", bad).unwrap_err();
            assert!(
                error.to_string().contains("invalid queue name"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn a_site_queues_trigger_needs_a_function_placed_within_its_site() {
        let labels = |site: &str| -> std::collections::BTreeMap<String, String> {
            [("site".to_string(), site.to_string())].into()
        };
        let (a, b) = (labels("a"), labels("b"));
        let nodes = [
            PlacedNode {
                name: "a1",
                site: Some("site-a"),
                labels: &a,
            },
            PlacedNode {
                name: "b1",
                site: Some("site-b"),
                labels: &b,
            },
            PlacedNode {
                name: "h1",
                site: None,
                labels: &a,
            },
        ];
        let check = |placement: &std::collections::BTreeMap<String, String>, nodes| {
            check_queue_site("f", placement, "q@site-a", "site-a", nodes).map_err(|e| e.to_string())
        };
        assert!(check(&a, &nodes[..1]).is_ok());
        let none = check(&Default::default(), &nodes[..1]).unwrap_err();
        assert!(none.contains("has no placement"), "{none}");
        // A hub node labelled like site a's.
        let hub = check(&a, &nodes).unwrap_err();
        assert!(
            hub.contains("queue `q@site-a` lives at site `site-a`")
                && hub.contains("placed at `site=a`, which node `h1` at the hub matches"),
            "{hub}"
        );
        let nowhere = check(&b, &nodes[..1]).unwrap_err();
        assert!(
            nowhere.contains("no live node at site `site-a`"),
            "{nowhere}"
        );
        let at_b = check(&b, &nodes[1..2]).unwrap_err();
        assert!(at_b.contains("node `b1` at site `site-b`"), "{at_b}");
    }

    #[test]
    fn a_queue_name_may_name_its_site() {
        for good in ["orders", "orders@site-a", "a.b@Site_1"] {
            assert!(check_queue_name(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("Orders@site-a", "invalid queue name"),
            ("@site-a", "invalid queue name"),
            ("orders@", "invalid site"),
            ("orders@a.b", "invalid site"),
            ("orders@a@b", "invalid queue name"),
        ] {
            let error = check_queue_name(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
