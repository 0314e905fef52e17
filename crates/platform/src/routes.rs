//! HTTP routes: parsing what users write, and matching requests by host and
//! longest path prefix.

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
                let host = host.to_ascii_lowercase();
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
        if path.split('/').any(|segment| segment == "..") {
            return Err(format!("route `{text}` may not contain `..`"));
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

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host}{}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
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
        for bad in [
            "",
            "/a b",
            "/a?x",
            "/a/*/b",
            "/a/../b",
            "bad host/x",
            "/a//b",
            ".x.com/a",
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
}
