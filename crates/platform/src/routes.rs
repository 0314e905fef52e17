//! HTTP routes: parsing what users write, and matching requests by host and
//! longest path prefix.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// A parsed route: an optional host and a path prefix.
///
/// `/api` serves `/api`, `/api/` and everything below `/api/`, but not
/// `/apis`. `example.com/api` does the same only for requests to that host,
/// and wins over a host-less route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Lower-case host name, or `None` for any host.
    pub host: Option<String>,
    /// Path prefix: `/` or `/segment[/segment…]` without a trailing slash.
    pub prefix: String,
}

impl Route {
    /// Parses `/prefix`, `/prefix/*`, `/prefix/...`, `host/prefix` or `host`.
    /// A host may carry a port (`localhost:8080/api`), which is dropped: the
    /// gateway routes by host name whatever port the request came in on.
    ///
    /// Which hosts a deploy may name is checked before, in
    /// `validate::validate_routes`; this parser also reads routes stored by
    /// older nodes, so it stays as lenient as they were.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let hint = "write a route as /prefix or host.example.com/prefix";
        if text.is_empty() {
            return Err(format!("a route is empty: {hint}"));
        }
        let (host, path) = match text.find('/') {
            Some(0) => (None, text),
            Some(i) => (Some(&text[..i]), &text[i..]),
            None => (Some(text), "/"),
        };
        let host = host
            .map(|host| {
                let host = strip_port(host)
                    .map_err(|e| format!("route `{text}` has {e}: {hint}"))?
                    .to_ascii_lowercase();
                let valid = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    && !host.starts_with(['.', '-']);
                if valid {
                    Ok(host)
                } else {
                    Err(format!("route `{text}` has an invalid host name: {hint}"))
                }
            })
            .transpose()?;

        let path = path
            .strip_suffix("/*")
            .or_else(|| path.strip_suffix("/..."))
            .unwrap_or(path);
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"?#*".contains(&b))
        {
            return Err(format!(
                "route `{text}` may not contain spaces, `?`, `#` or a `*` other than a trailing `/*`"
            ));
        }
        // Requests are matched on their normalised path, so a route is
        // normalised the same way: `%41` is `A`, and a `.` or `..` segment
        // (also spelt `%2e`) could never match anything.
        let path =
            decode_unreserved(path).map_err(|e| format!("route `{text}` has {e}: {hint}"))?;
        if path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(format!(
                "route `{text}` may not contain `.` or `..` segments"
            ));
        }
        let trimmed = path.trim_end_matches('/');
        let prefix = if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        };
        if prefix.contains("//") {
            return Err(format!("route `{text}` has an empty path segment"));
        }
        Ok(Self { host, prefix })
    }
}

/// A route's host without its port (`localhost:8080` is `localhost`); a
/// port must be a number from 1 to 65535.
pub(crate) fn strip_port(host: &str) -> Result<&str, String> {
    let Some((name, port)) = host.rsplit_once(':') else {
        return Ok(host);
    };
    let valid = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p));
    if valid {
        Ok(name)
    } else {
        Err(format!("an invalid port `{port}` (give 1 to 65535)"))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host}{}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
}

/// Normalises a request's host name (from the Host header or the URI's
/// authority, without port) for routing: lower case, and without the one
/// trailing dot of a fully qualified name (`Example.COM.` is
/// `example.com`), as browsers and DNS treat them as the same name.
/// Allocates only when something changes.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Normalises a request path (without query) before routing, as RFC 3986
/// §6.2.2 describes: percent-escapes of unreserved characters are decoded
/// (`%41` is `A`, `%2e` is `.`), the hex digits of the other escapes are
/// upper-cased, and `.` and `..` segments are resolved (§5.2.4), so
/// `/a/../b` and `/a/%2e%2e/b` are `/b`. Nothing else changes (`//`
/// stays). A `..` that would climb above the root, or a malformed escape,
/// is an error saying so: such a request is answered 400. Allocates only
/// when the path changes, so the usual path costs one scan.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, String> {
    let has_dots = path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    if !has_dots && !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let resolved = remove_dot_segments(&decoded)?;
    Ok(match resolved {
        Some(resolved) => Cow::Owned(resolved),
        None if decoded == path => Cow::Borrowed(path),
        None => Cow::Owned(decoded.into_owned()),
    })
}

/// Decodes the percent-escapes of unreserved characters (RFC 3986 §2.3) and
/// upper-cases the hex digits of the others. Written by hand because the
/// `percent-encoding` crate decodes every escape, and decoding `%2F` (a `/`
/// inside a segment) or `%00` would change what the path means.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, String> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy up to the next escape in one piece (keeps UTF-8 whole).
            let next = path[i..].find('%').map_or(path.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = |b: u8| char::from(b).to_digit(16);
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            let end = path.len().min(i + 3);
            return Err(format!(
                "a malformed percent-escape `{}`: `%` must be followed by two hex digits",
                path.get(i..end).unwrap_or("%").escape_debug()
            ));
        };
        // Both digits are below 16, so the byte fits.
        let byte = (high * 16 + low) as u8;
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
            out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

/// Resolves `.` and `..` segments of an absolute path (RFC 3986 §5.2.4);
/// `None` when it has none. Unlike §5.2.4, which drops a `..` at the root,
/// climbing above the root is an error: no client of ours means it, and
/// quietly serving `/` instead would hide a probe.
fn remove_dot_segments(path: &str) -> Result<Option<String>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(None);
    };
    if !rest
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Ok(None);
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        trailing_slash = false;
        match segment {
            "." => trailing_slash = true,
            ".." => {
                if kept.pop().is_none() {
                    return Err(
                        "a `..` segment that climbs above the root: send the path without it"
                            .to_string(),
                    );
                }
                trailing_slash = true;
            }
            segment => kept.push(segment),
        }
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in &kept {
        resolved.push('/');
        resolved.push_str(segment);
    }
    if trailing_slash || resolved.is_empty() {
        resolved.push('/');
    }
    Ok(Some(resolved))
}

/// Routes to targets, matched per request without scanning every route: a
/// lookup costs one hash probe per path segment.
#[derive(Debug)]
pub struct RouteTable<T> {
    by_host: HashMap<String, HashMap<String, T>>,
    any_host: HashMap<String, T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            by_host: HashMap::new(),
            any_host: HashMap::new(),
        }
    }
}

impl<T: Clone> RouteTable<T> {
    /// Adds `route` for `target`, replacing any previous target.
    pub fn insert(&mut self, route: &Route, target: T) {
        let prefixes = match &route.host {
            Some(host) => self.by_host.entry(host.clone()).or_default(),
            None => &mut self.any_host,
        };
        prefixes.insert(route.prefix.clone(), target);
    }

    /// The target of exactly `route`, if any.
    pub fn get_exact(&self, route: &Route) -> Option<&T> {
        match &route.host {
            Some(host) => self.by_host.get(host)?.get(&route.prefix),
            None => self.any_host.get(&route.prefix),
        }
    }

    /// The target for a request to `host` (without port, any case) and
    /// `path` (without query): the longest matching prefix for that host,
    /// else the longest host-less one.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let host_match = host.and_then(|host| {
            let prefixes = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&host.to_ascii_lowercase())
            } else {
                self.by_host.get(host)
            };
            prefixes.and_then(|prefixes| longest_prefix(prefixes, path))
        });
        host_match.or_else(|| longest_prefix(&self.any_host, path))
    }
}

fn longest_prefix<'a, T>(prefixes: &'a HashMap<String, T>, path: &str) -> Option<&'a T> {
    if prefixes.is_empty() {
        return None;
    }
    let mut candidate = path.trim_end_matches('/');
    loop {
        let key = if candidate.is_empty() { "/" } else { candidate };
        if let Some(target) = prefixes.get(key) {
            return Some(target);
        }
        if candidate.is_empty() {
            return None;
        }
        candidate = candidate.rfind('/').map_or("", |i| &candidate[..i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> String {
        Route::parse(text).unwrap().to_string()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(parse("/hello"), "/hello");
        assert_eq!(parse("/hello/"), "/hello");
        assert_eq!(parse("/hello/*"), "/hello");
        assert_eq!(parse("/hello/..."), "/hello");
        assert_eq!(parse("/"), "/");
        assert_eq!(parse("/*"), "/");
        assert_eq!(parse("Example.COM/api"), "example.com/api");
        assert_eq!(parse("example.com"), "example.com/");
        assert_eq!(parse("/%41pi/%2f"), "/Api/%2F");
        // The port is dropped: requests are routed by host name.
        assert_eq!(parse("localhost:8080/api"), "localhost/api");
        assert_eq!(parse("Shop.Test:443"), "shop.test/");
        for bad in [
            "",
            "/a b",
            "/a?x",
            "/a/*/b",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2E/b",
            "/a/%zz",
            "bad host/x",
            "/a//b",
            ".x.com/a",
            "localhost:/a",
            "localhost:0/a",
            "localhost:65536/a",
            "localhost:80:80/a",
            "localhost:http/a",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let mut table = RouteTable::default();
        for (route, target) in [("/", 0), ("/api", 1), ("/api/v2", 2), ("shop.test/api", 3)] {
            table.insert(&Route::parse(route).unwrap(), target);
        }
        let at = |host, path| table.lookup(host, path).copied();
        assert_eq!(at(None, "/api"), Some(1));
        assert_eq!(at(None, "/api/"), Some(1));
        assert_eq!(at(None, "/api/v1/x"), Some(1));
        assert_eq!(at(None, "/api/v2/x"), Some(2));
        assert_eq!(at(None, "/apis"), Some(0));
        assert_eq!(at(None, "/"), Some(0));
        assert_eq!(at(Some("shop.test"), "/api/v2"), Some(3));
        assert_eq!(at(Some("SHOP.test"), "/api"), Some(3));
        assert_eq!(at(Some("shop.test"), "/other"), Some(0));
        assert_eq!(at(Some("other.test"), "/api/v2"), Some(2));
    }

    #[test]
    fn no_route_no_match() {
        let mut table = RouteTable::default();
        table.insert(&Route::parse("/hello").unwrap(), ());
        assert!(table.lookup(None, "/").is_none());
        assert!(table.lookup(None, "/hellothere").is_none());
    }

    #[test]
    fn paths_are_normalised_before_routing() {
        let norm = |path| normalize_path(path).map(Cow::into_owned);
        for (raw, want) in [
            ("/", "/"),
            ("/api/x", "/api/x"),
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2e/b", "/b"),
            ("/%2e/a", "/a"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/%41pi", "/Api"),
            ("/%7e%2d%5F", "/~-_"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%00", "/a%00"),
            ("/a//b", "/a//b"),
            ("/a//../b", "/a/b"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw:?}");
        }
        // Unchanged paths are not copied.
        assert!(matches!(normalize_path("/api/v1/x"), Ok(Cow::Borrowed(_))));
        assert!(matches!(
            normalize_path("/.well-known"),
            Ok(Cow::Borrowed(_))
        ));
        for bad in [
            "/..",
            "/a/../..",
            "/%2e%2e",
            "/a/%2E%2E/%2e%2e/x",
            "/%",
            "/%4",
            "/%zz",
            "/%4g",
        ] {
            let error = normalize_path(bad).unwrap_err();
            assert!(
                error.contains("..") || error.contains("percent"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn hosts_are_normalised_before_routing() {
        assert_eq!(normalize_host("shop.test"), "shop.test");
        assert!(matches!(normalize_host("shop.test"), Cow::Borrowed(_)));
        assert_eq!(normalize_host("shop.test."), "shop.test");
        assert_eq!(normalize_host("SHOP.Test."), "shop.test");
        let mut table = RouteTable::default();
        table.insert(&Route::parse("shop.test/api").unwrap(), 1);
        table.insert(&Route::parse("/").unwrap(), 0);
        let at = |host: &str, path: &str| {
            let path = normalize_path(path).unwrap();
            table.lookup(Some(&normalize_host(host)), &path).copied()
        };
        assert_eq!(at("shop.test.", "/api"), Some(1));
        assert_eq!(at("SHOP.TEST.", "/x/../api/y"), Some(1));
        assert_eq!(at("shop.test", "/%61pi"), Some(1));
        assert_eq!(at("shop.test", "/api/../x"), Some(0));
    }
}
