//! Outbound HTTP for functions: an allow-list per function, checked on every
//! request, with protection against server-side request forgery (SSRF).
//!
//! Least privilege: a function reaches no host unless it was granted one. A
//! refused request fails with wasi:http's own `HTTP-request-denied` error and
//! the function's author is told what to grant.
//!
//! # Allow-list entries
//!
//! Each entry is `scheme://host[:port]`:
//!
//! - `scheme` is `http` or `https`;
//! - `host` is one of
//!   - a DNS name: `api.example.com` (compared case-insensitively, a trailing
//!     dot ignored),
//!   - `*.example.com`: any subdomain of `example.com`, at any depth, but not
//!     `example.com` itself,
//!   - an IP literal: `203.0.113.7`, `[2001:db8::1]` (IPv6 in brackets),
//!   - a CIDR block: `10.0.0.0/8`, `[fd00::]/8`;
//! - `port` defaults to the scheme's (80 or 443); `:*` allows any port.
//!
//! Examples: `https://api.example.com`, `https://*.example.com:8443`,
//! `http://10.0.0.0/8:*`, `http://[fd00::]/8:8080`.
//!
//! Paths, queries, fragments and user info are refused (a grant names a
//! host; the function may call any path on it), and so are wildcards that
//! would grant everything (`https://*`, `http://0.0.0.0/0`).
//!
//! # SSRF
//!
//! A granted name may still point inside the node's network, by accident or
//! by a hostile DNS record. So the host resolves names itself, and if any
//! address a name resolves to is not public (loopback, private, link-local,
//! CGNAT, multicast, documentation ranges, their IPv4-mapped IPv6 forms, ...)
//! the request is refused, unless an IP-literal or CIDR entry grants that
//! address for the same scheme and port. The connection then goes to a vetted
//! address, never to a fresh resolution of the name (DNS rebinding).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use slots::{HeldBody, Slots};

mod slots;

/// What a valid entry looks like, appended to every parse error.
const ENTRY_SYNTAX: &str = "expected scheme://host[:port], e.g. https://api.example.com, \
     https://*.example.com, http://10.0.0.0/8:8080 or http://[fd00::1]:*";

/// Timeouts when the guest sets none. The invocation's own timeout bounds
/// them all anyway; these keep a dead peer from holding a request that long.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest-set timeouts are capped here, so deadline arithmetic cannot overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Outbound requests one invocation may have in flight (connecting or
/// connected) at once; further ones wait for a slot, as Workers' six
/// simultaneous connections do. Without a bound one invocation opened 1,000
/// connections and took every file descriptor of the node.
pub const MAX_OUTBOUND_IN_FLIGHT: usize = 16;

/// A function version's outbound HTTP: its allow-list, and the pool of
/// connections its invocations share (made on the first request).
#[derive(Default)]
pub struct OutboundPolicy {
    rules: Arc<Rules>,
    pool: std::sync::OnceLock<Pool>,
}

impl OutboundPolicy {
    /// Allows nothing.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Parses allow-list entries; the error names the bad entry and says what
    /// a valid one looks like.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let entries = entries
            .iter()
            .map(|entry| {
                parse_entry(entry).map_err(|problem| {
                    format!("invalid outbound grant `{entry}`: {problem}; {ENTRY_SYNTAX}")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            rules: Arc::new(Rules { entries }),
            pool: std::sync::OnceLock::new(),
        })
    }
}

/// Policies are equal when their allow-lists are (the pool is state, not
/// policy).
impl PartialEq for OutboundPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

impl Eq for OutboundPolicy {}

impl fmt::Debug for OutboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundPolicy")
            .field("entries", &self.rules.entries)
            .finish_non_exhaustive()
    }
}

/// The allow-list's entries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Rules {
    entries: Vec<Entry>,
}

impl Rules {
    /// Whether some entry grants `target`.
    fn allows(&self, target: &Target) -> bool {
        self.entries.iter().any(|entry| entry.matches(target))
    }

    /// Why connecting to `addrs` for `target` is refused, if it is: some
    /// address is not public and no IP or CIDR entry grants it.
    fn refusal(&self, target: &Target, addrs: &[SocketAddr]) -> Option<String> {
        addrs.iter().find_map(|addr| {
            let ip = addr.ip().to_canonical();
            if reaches_the_node(ip) {
                // Never granted (see `parse_entry`), whatever a name says.
                let what = match &target.host {
                    Host::Name(name) => format!("{name} resolves to {ip}"),
                    Host::Ip(_) => format!("{ip} is the address"),
                };
                return Some(format!(
                    "{what}, the unspecified address, which reaches the node itself; \
                     it cannot be granted"
                ));
            }
            let kind = non_public(ip)?;
            let as_ip = Target {
                scheme: target.scheme,
                host: Host::Ip(ip),
                port: target.port,
            };
            if self.allows(&as_ip) {
                return None;
            }
            let what = match &target.host {
                Host::Name(name) => format!("{name} resolves to a private address {ip} ({kind})"),
                Host::Ip(_) => format!("{ip} is a private address ({kind})"),
            };
            Some(format!(
                "{what}; if the function is meant to reach it, grant the address \
                 itself with --outbound {}",
                as_ip.grant()
            ))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    scheme: Scheme,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Lowercase, without a trailing dot.
    Name(String),
    /// `*.suffix`: any name strictly under `suffix` (lowercase).
    Subdomains(String),
    /// Canonical: IPv4-mapped IPv6 addresses are stored as IPv4.
    Ip(IpAddr),
    Cidr(Cidr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Exact(u16),
    Any,
}

/// An address block; `network` has no bits set past `prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` (canonical) is in the block; an IPv6 block also holds the
    /// IPv4-mapped forms of IPv4 addresses.
    fn contains(self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            (IpAddr::V6(_), IpAddr::V4(ip)) => self.contains(IpAddr::V6(ip.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

impl Entry {
    fn matches(&self, target: &Target) -> bool {
        let port = match self.port {
            PortPattern::Exact(port) => port == target.port,
            PortPattern::Any => true,
        };
        let host = match (&self.host, &target.host) {
            (HostPattern::Name(name), Host::Name(host)) => name == host,
            (HostPattern::Subdomains(suffix), Host::Name(host)) => is_subdomain(host, suffix),
            (HostPattern::Ip(ip), Host::Ip(host)) => ip == host,
            (HostPattern::Cidr(cidr), Host::Ip(host)) => cidr.contains(*host),
            _ => false,
        };
        self.scheme == target.scheme && port && host
    }
}

/// Whether `host` is strictly under `suffix` (`a.example.com` under
/// `example.com`, but not `example.com` nor `badexample.com`).
fn is_subdomain(host: &str, suffix: &str) -> bool {
    host.strip_suffix(suffix)
        .and_then(|prefix| prefix.strip_suffix('.'))
        .is_some_and(|labels| !labels.is_empty() && !labels.split('.').any(str::is_empty))
}

/// Parses one entry; the error says what is wrong with it.
fn parse_entry(raw: &str) -> Result<Entry, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("it has no scheme: start it with http:// or https://".into());
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => {
            return Err(format!(
                "scheme `{scheme}` is not supported: use http or https"
            ));
        }
    };
    if rest.contains('@') {
        return Err("user info (`user@`) is not allowed: a grant names a host".into());
    }
    if rest.contains('?') {
        return Err("a query is not allowed: a grant names a host, not a URL".into());
    }
    if rest.contains('#') {
        return Err("a fragment is not allowed: a grant names a host, not a URL".into());
    }
    // A lone trailing slash names the same host.
    let rest = rest.strip_suffix('/').unwrap_or(rest);

    // Split host, optional `/prefix` and optional `:port`.
    let (host, bracketed, after) = if let Some(inner) = rest.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return Err("`[` opens an IPv6 address that is not closed with `]`".into());
        };
        (&inner[..end], true, &inner[end + 1..])
    } else {
        let end = rest.find([':', '/']).unwrap_or(rest.len());
        (&rest[..end], false, &rest[end..])
    };
    let (prefix, after) = match after.strip_prefix('/') {
        Some(tail) => {
            let end = tail.find(':').unwrap_or(tail.len());
            (Some(&tail[..end]), &tail[end..])
        }
        None => (None, after),
    };
    let port = match after.strip_prefix(':') {
        None if after.is_empty() => PortPattern::Exact(scheme.default_port()),
        None => return Err(format!("unexpected `{after}` after the host")),
        Some(_) if !bracketed && after[1..].contains(':') => {
            return Err("an IPv6 address must be in brackets, as in http://[fd00::1]".into());
        }
        Some("*") => PortPattern::Any,
        Some(port) => match digits(port).and_then(|port| port.parse::<u16>().ok()) {
            Some(port) if port != 0 => PortPattern::Exact(port),
            _ => {
                return Err(format!(
                    "port `{port}` is not a number from 1 to 65535 (or `*` for any port)"
                ));
            }
        },
    };

    let host = if bracketed {
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| format!("`[{host}]` is not an IPv6 address"))?;
        IpAddr::V6(ip).into()
    } else if host.is_empty() {
        return Err("the host is missing".into());
    } else if host == "*" {
        return Err(
            "a bare `*` would allow every host: list the hosts the function needs \
             (least privilege), e.g. https://*.example.com"
                .into(),
        );
    } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
        IpAddr::V4(ip).into()
    } else if let Some(suffix) = host.strip_prefix("*.") {
        if suffix.contains('*') {
            return Err("only one wildcard, as the whole first label: *.example.com".into());
        }
        let suffix = host_name(suffix)?;
        if !suffix.contains('.') {
            return Err(format!(
                "`{host}` would allow a whole top-level domain: name a domain under it, \
                 e.g. *.example.{suffix}"
            ));
        }
        HostPattern::Subdomains(suffix)
    } else if host.contains('*') {
        return Err("a wildcard must be the whole first label, as in *.example.com".into());
    } else {
        HostPattern::Name(host_name(host)?)
    };

    let host = match (prefix, host) {
        (None, HostPattern::Ip(ip)) if reaches_the_node(ip) => {
            return Err(unspecified_refusal(ip));
        }
        (None, HostPattern::Ip(ip)) => HostPattern::Ip(ip.to_canonical()),
        (None, host) => host,
        (Some(prefix), HostPattern::Ip(network)) => {
            let block = cidr(network, prefix)?;
            let unspecified = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            if reaches_the_node(network) || block.contains(unspecified) {
                return Err(unspecified_refusal(network));
            }
            HostPattern::Cidr(block)
        }
        (Some(path), _) => {
            return Err(format!(
                "a path (`/{path}`) is not allowed: a grant names a host, and the function \
                 may call any path on it"
            ));
        }
    };
    Ok(Entry { scheme, host, port })
}

/// Whether connecting to `ip` reaches the node itself whatever it looks
/// like: the unspecified address (`0.0.0.0`, `::`) and the rest of "this
/// network" (`0.0.0.0/8`) are taken as the local host by Linux, so a grant
/// of `http://0.0.0.0:P` would reach the node's loopback services.
fn reaches_the_node(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(ip) => ip.octets()[0] == 0,
        IpAddr::V6(ip) => ip.is_unspecified(),
    }
}

/// Why a grant of `ip` (or a block starting there) is refused.
fn unspecified_refusal(ip: IpAddr) -> String {
    let shown = match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!(
        "{shown} is the unspecified address (\"this host\"): connecting to it reaches the \
         node's own loopback services, so it cannot be granted; grant the address of the \
         service the function needs instead"
    )
}

impl From<IpAddr> for HostPattern {
    fn from(ip: IpAddr) -> Self {
        Self::Ip(ip)
    }
}

/// `text` if it is all ASCII digits (Rust's integer parsing also takes `+`).
fn digits(text: &str) -> Option<&str> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then_some(text)
}

/// Validates a DNS name and returns it lowercase without its trailing dot.
fn host_name(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
    let invalid = || {
        format!(
            "`{name}` is not a valid host name (letters, digits and `-` in dot-separated \
             labels; international names in their xn-- form)"
        )
    };
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(invalid());
    }
    for label in trimmed.split('.') {
        let chars_ok = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty()
            || label.len() > 63
            || !chars_ok
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(invalid());
        }
    }
    // A numeric last label makes it an (invalid) IPv4 address, not a name.
    if trimmed
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("`{name}` is not a valid IPv4 address"));
    }
    Ok(trimmed.to_string())
}

fn cidr(network: IpAddr, prefix: &str) -> Result<Cidr, String> {
    let bits = if network.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = digits(prefix)
        .and_then(|p| p.parse().ok())
        .filter(|p| *p <= bits)
        .ok_or_else(|| format!("`/{prefix}` is not a prefix length from 1 to {bits}"))?;
    if prefix == 0 {
        return Err(format!(
            "`{network}/0` would allow every address: list the networks the function needs \
             (least privilege)"
        ));
    }
    let cidr = Cidr { network, prefix };
    let masked = match network {
        IpAddr::V4(ip) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask))
        }
    };
    if masked != network {
        let shown = match masked {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        return Err(format!(
            "`/{prefix}` leaves host bits set: did you mean {shown}/{prefix}?"
        ));
    }
    // Blocks wider than the widest private range (10/8, fc00::/7) grant
    // much of the Internet's private space at once; and an IPv6 block over
    // the IPv4-mapped range (::ffff:0:0/96) would grant IPv4 addresses
    // through their mapped form.
    let widest = if network.is_ipv4() { 8 } else { 7 };
    let maps_ipv4 = cidr.contains(IpAddr::V6(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()));
    if prefix < widest || (network.is_ipv6() && maps_ipv4) {
        return Err(format!(
            "`{network}/{prefix}` is too wide a block (IPv4 at most /8, IPv6 at most /7 and not \
             over ::ffff:0:0/96): list the networks the function needs (least privilege)"
        ));
    }
    Ok(cidr)
}

/// Why `ip` is not a public unicast address, or `None` if it is.
fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(ip) => non_public_v4(ip),
        IpAddr::V6(ip) => non_public_v6(ip),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        (0, ..) => "\"this network\"",
        (10, ..) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (100, 64..=127, _) => "shared address space (CGNAT)",
        (127, ..) => "loopback",
        (169, 254, _) => "link-local",
        (192, 0, 0) => "IETF protocol assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay anycast",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    let embedded_low = || Ipv4Addr::from(((u32::from(s[6])) << 16) | u32::from(s[7]));
    Some(match s {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // NAT64 (64:ff9b::/96): the translator reaches the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => return non_public_v4(embedded_low()),
        // 6to4 (2002::/16): the relay reaches the IPv4 address in bits 16..48.
        [0x2002, hi, lo, ..] => {
            return non_public_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
        }
        [0, 0, 0, 0, 0, 0, _, _] => "IPv4-compatible (deprecated)",
        [0x64, 0xff9b, 1, ..] => "local-use NAT64",
        [0x100, 0, 0, 0, ..] => "discard-only",
        [0x2001, 0xdb8, ..] => "documentation",
        [0x2001, b, ..] if b < 0x200 => "IETF protocol assignment (Teredo, benchmarking)",
        [0x3fff, b, ..] if b < 0x1000 => "documentation",
        [0x5f00, ..] => "segment routing (SRv6)",
        [a, ..] if a & 0xfe00 == 0xfc00 => "unique local",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local",
        [a, ..] if a & 0xffc0 == 0xfec0 => "site-local",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast",
        // Only 2000::/3 is allocated as global unicast.
        [a, ..] if a & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    })
}

/// The host of an outgoing request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Lowercase, without a trailing dot.
    Name(String),
    /// Canonical (IPv4-mapped IPv6 as IPv4).
    Ip(IpAddr),
}

/// Where an outgoing request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    scheme: Scheme,
    host: Host,
    port: u16,
}

impl Target {
    /// The target of `uri`, which must be absolute.
    fn of(uri: &Uri) -> Result<Self, Error> {
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        let scheme = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(_) => return Err(Error::HttpProtocolError),
            None => return Err(Error::HttpRequestUriInvalid),
        };
        let raw_host = authority.host();
        let host = if let Some(inner) = raw_host.strip_prefix('[') {
            let ip = inner
                .strip_suffix(']')
                .and_then(|ip| ip.parse::<Ipv6Addr>().ok())
                .ok_or(Error::HttpRequestUriInvalid)?;
            Host::Ip(IpAddr::V6(ip).to_canonical())
        } else if let Ok(ip) = raw_host.parse::<Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else {
            let name = raw_host.to_ascii_lowercase();
            let name = name.strip_suffix('.').unwrap_or(&name);
            if name.is_empty() {
                return Err(Error::HttpRequestUriInvalid);
            }
            Host::Name(name.to_string())
        };
        // What follows the host: nothing, `:` (the default port) or `:port`.
        let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
        let port = match host_port.get(raw_host.len()..) {
            Some("" | ":") => scheme.default_port(),
            Some(port) => port
                .strip_prefix(':')
                .and_then(digits)
                .and_then(|port| port.parse::<u16>().ok())
                .filter(|port| *port != 0)
                .ok_or(Error::HttpRequestUriInvalid)?,
            None => return Err(Error::HttpRequestUriInvalid),
        };
        Ok(Self { scheme, host, port })
    }

    /// The allow-list entry that would grant this target.
    fn grant(&self) -> String {
        let host = self.host_text();
        let scheme = self.scheme.as_str();
        if self.port == self.scheme.default_port() {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{}", self.port)
        }
    }

    fn host_text(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.as_str();
        write!(f, "{scheme}://{}:{}", self.host_text(), self.port)
    }
}

/// Explains a refused request to the function's author.
type DeniedSink = Arc<dyn Fn(String) + Send + Sync>;

/// The wasi:http hooks of one invocation: every outgoing request is checked
/// against the policy.
pub(crate) struct OutboundHooks {
    policy: Arc<OutboundPolicy>,
    on_denied: DeniedSink,
    /// [`MAX_OUTBOUND_IN_FLIGHT`] slots, one held per request from before it
    /// connects until its response body is dropped (hooks are made per
    /// invocation). Made on the first request: most invocations make none,
    /// and the hooks are built on the request path.
    slots: Option<Arc<Slots>>,
}

impl OutboundHooks {
    /// Hooks checking against `policy`; `on_denied` receives a message for
    /// the function's author each time a request is refused.
    pub(crate) fn new(
        policy: Arc<OutboundPolicy>,
        on_denied: Box<dyn Fn(String) + Send + Sync>,
    ) -> Self {
        Self {
            policy,
            on_denied: Arc::from(on_denied),
            slots: None,
        }
    }
}

impl fmt::Debug for OutboundHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundHooks")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A future that reports the outcome of the connection's I/O.
type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

type ResponseFuture =
    Box<dyn Future<Output = Result<(Response<WasiBody>, IoFuture), Error>> + Send>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
        _io: IoFuture,
    ) -> ResponseFuture {
        let policy = Arc::clone(&self.policy);
        let on_denied = Arc::clone(&self.on_denied);
        let slots = Arc::clone(self.slots.get_or_insert_with(Slots::new));
        Box::new(async move {
            // Waits while the invocation has its maximum in flight (the
            // invocation's timeout bounds the wait).
            let sending = slots.take().await?;
            let timeouts = Timeouts::from(options);
            let idle = timeouts.between_bytes;
            let response = send(&policy, &*on_denied, request, timeouts).await?;
            // The pool drives the connection; the body holds the slot until
            // it is dropped (or closed to free the slot, see `slots`).
            let response = response.map(|incoming| {
                TimedBody {
                    body: sending.received(incoming),
                    idle,
                    timer: Box::pin(tokio::time::sleep(idle)),
                }
                .boxed_unsync()
            });
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// Timeouts of one request: the guest's request options or our defaults.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    first_byte: Duration,
    between_bytes: Duration,
}

impl From<Option<RequestOptions>> for Timeouts {
    fn from(options: Option<RequestOptions>) -> Self {
        let options = options.unwrap_or_default();
        let pick = |set: Option<Duration>, default| set.unwrap_or(default).min(MAX_TIMEOUT);
        Self {
            connect: pick(options.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
            first_byte: pick(options.first_byte_timeout, DEFAULT_FIRST_BYTE_TIMEOUT),
            between_bytes: pick(options.between_bytes_timeout, DEFAULT_BETWEEN_BYTES_TIMEOUT),
        }
    }
}

/// How long an unused pooled connection stays open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per host and function version.
const POOL_MAX_IDLE_PER_HOST: usize = 32;

/// The connections of one function version, reused by its invocations:
/// hyper-util's pooled client over [`VettedConnector`], HTTP/1.1 or HTTP/2
/// (ALPN). One pool per version, never shared between functions, so no
/// function sends on a connection vetted against another's grants.
type Pool = hyper_util::client::legacy::Client<VettedConnector, WasiBody>;

fn new_pool(rules: Arc<Rules>) -> Pool {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(VettedConnector { rules })
}

tokio::task_local! {
    /// The connect deadline of the request being sent: the pool's connector
    /// is shared, and this is how a guest's own connect timeout reaches it.
    static CONNECT_DEADLINE: Instant;
}

/// Checks `request` against `policy`, then sends it through the function's
/// pool, which connects only to vetted addresses.
///
/// The stock `wasmtime_wasi_http::default_send_request` resolves and
/// connects by itself, so it cannot pin a connection to the addresses we
/// vetted: a DNS answer that changes between our check and its connect (DNS
/// rebinding) would reach a private address. Here the connector resolves,
/// vets and connects in one step, and a pooled connection stays bound to the
/// address it was vetted for.
async fn send(
    policy: &OutboundPolicy,
    on_denied: &(dyn Fn(String) + Send + Sync),
    request: Request<WasiBody>,
    timeouts: Timeouts,
) -> Result<Response<hyper::body::Incoming>, Error> {
    let target = Target::of(request.uri())?;
    let deny = |reason: String| {
        let message = format!("outbound request to {target} denied: {reason}");
        tracing::warn!("{message}");
        on_denied(message);
        Error::HttpRequestDenied
    };
    if !policy.rules.allows(&target) {
        return Err(deny(format!(
            "not on this function's allow-list (grant it with --outbound {})",
            target.grant()
        )));
    }
    let pool = policy
        .pool
        .get_or_init(|| new_pool(Arc::clone(&policy.rules)));
    let deadline = Instant::now() + timeouts.connect;
    // The first-byte timeout counts from the connect deadline: the pool
    // does not tell when its connection was ready, so a slow connect never
    // eats into the guest's first-byte allowance.
    let response = CONNECT_DEADLINE.scope(
        deadline,
        tokio::time::timeout_at(deadline + timeouts.first_byte, pool.request(request)),
    );
    match response.await {
        Err(_elapsed) => Err(Error::ConnectionReadTimeout),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(err)) => Err(match connect_failure(&err) {
            Some(ConnectFailure::Denied(reason)) => deny(reason.clone()),
            Some(ConnectFailure::Failed(inner)) => copy_error(inner),
            None => client_error(&err),
        }),
    }
}

/// Why the connector gave no connection.
#[derive(Debug)]
enum ConnectFailure {
    /// The target's addresses are refused by the policy (the reason).
    Denied(String),
    /// Resolving, connecting or the TLS handshake failed.
    Failed(Error),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Denied(reason) => write!(f, "denied: {reason}"),
            ConnectFailure::Failed(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for ConnectFailure {}

/// The connector's own failure inside a pool error, if that is what it is.
fn connect_failure(err: &hyper_util::client::legacy::Error) -> Option<&ConnectFailure> {
    std::error::Error::source(err).and_then(|source| source.downcast_ref::<ConnectFailure>())
}

/// The wasi:http code of a connector failure. The pool keeps the error it
/// got, so this rebuilds an equal one rather than moving it out.
fn copy_error(err: &Error) -> Error {
    match err {
        Error::DnsTimeout => Error::DnsTimeout,
        Error::DnsError { rcode, info_code } => Error::DnsError {
            rcode: rcode.clone(),
            info_code: *info_code,
        },
        Error::ConnectionRefused => Error::ConnectionRefused,
        Error::ConnectionTimeout => Error::ConnectionTimeout,
        Error::DestinationIpUnroutable => Error::DestinationIpUnroutable,
        Error::ConnectionTerminated => Error::ConnectionTerminated,
        Error::TlsCertificateError => Error::TlsCertificateError,
        Error::TlsProtocolError => Error::TlsProtocolError,
        Error::TlsAlertReceived {
            alert_id,
            alert_message,
        } => Error::TlsAlertReceived {
            alert_id: *alert_id,
            alert_message: alert_message.clone(),
        },
        Error::HttpRequestUriInvalid => Error::HttpRequestUriInvalid,
        other => Error::InternalError(Some(format!("outbound connection: {other}"))),
    }
}

/// Maps the pool's other errors (the exchange itself) to wasi:http codes.
fn client_error(err: &hyper_util::client::legacy::Error) -> Error {
    match std::error::Error::source(err).and_then(|source| source.downcast_ref::<hyper::Error>()) {
        Some(inner) if inner.is_timeout() => Error::HttpResponseTimeout,
        Some(inner) if inner.is_incomplete_message() => Error::HttpResponseIncomplete,
        Some(inner) if inner.is_closed() || inner.is_canceled() => Error::ConnectionTerminated,
        Some(_) => Error::HttpProtocolError,
        None if err.is_connect() => Error::ConnectionTerminated,
        None => Error::InternalError(Some(format!("outbound request: {err}"))),
    }
}

/// The pool's connector: resolves the target, refuses addresses the policy
/// does not allow, and connects (TLS for https) to a vetted address only.
#[derive(Clone)]
struct VettedConnector {
    rules: Arc<Rules>,
}

impl tower_service::Service<Uri> for VettedConnector {
    type Response = hyper_util::rt::TokioIo<Vetted>;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectFailure>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectFailure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let rules = Arc::clone(&self.rules);
        // Outside a request's scope (never, in practice) the default holds.
        let deadline = CONNECT_DEADLINE
            .try_with(|deadline| *deadline)
            .unwrap_or_else(|_| Instant::now() + DEFAULT_CONNECT_TIMEOUT);
        Box::pin(async move {
            let target = Target::of(&uri).map_err(ConnectFailure::Failed)?;
            let addrs = resolve(&target, deadline)
                .await
                .map_err(ConnectFailure::Failed)?;
            if let Some(reason) = rules.refusal(&target, &addrs) {
                return Err(ConnectFailure::Denied(reason));
            }
            let stream = connect(&target, &addrs, deadline)
                .await
                .map_err(ConnectFailure::Failed)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// The addresses of `target`, deduplicated; an IP literal is its own.
async fn resolve(target: &Target, deadline: Instant) -> Result<Vec<SocketAddr>, Error> {
    let name = match &target.host {
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => name,
    };
    let found = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((name.as_str(), target.port)),
    )
    .await
    .map_err(|_| Error::DnsTimeout)?
    .map_err(|err| Error::DnsError {
        rcode: Some(err.to_string()),
        info_code: None,
    })?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in found {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(Error::DnsError {
            rcode: Some(format!("{name} has no addresses")),
            info_code: None,
        });
    }
    Ok(addrs)
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection to a vetted address, and whether TLS chose HTTP/2.
struct Vetted {
    stream: Box<dyn Stream>,
    h2: bool,
}

impl hyper_util::client::legacy::connect::Connection for Vetted {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = hyper_util::client::legacy::connect::Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

// The pool reads and writes through these; they only forward.
impl AsyncRead for Vetted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Vetted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connects to the first of `addrs` that answers, then does TLS for https.
async fn connect(
    target: &Target,
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<Vetted, Error> {
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(addrs))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(connect_error)?;
    // Best effort: requests are small writes, and only latency is lost.
    let _ = tcp.set_nodelay(true);
    if target.scheme == Scheme::Http {
        return Ok(Vetted {
            stream: Box::new(tcp),
            h2: false,
        });
    }
    let config = TLS_CONFIG
        .as_ref()
        .map_err(|err| Error::InternalError(Some(format!("TLS configuration: {err}"))))?;
    let server_name = match &target.host {
        Host::Name(name) => rustls::pki_types::ServerName::try_from(name.clone())?,
        Host::Ip(ip) => rustls::pki_types::ServerName::from(*ip),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let tls = tokio::time::timeout_at(deadline, connector.connect(server_name, tcp))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(tls_error)?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    Ok(Vetted {
        stream: Box::new(tls),
        h2,
    })
}

/// The client TLS configuration, built once: Mozilla's roots (webpki-roots,
/// as the stock sender uses) and the ring provider named explicitly, so no
/// process-wide default provider is needed.
static TLS_CONFIG: LazyLock<Result<Arc<rustls::ClientConfig>, rustls::Error>> =
    LazyLock::new(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // HTTP/2 where the server offers it (many requests on one
        // connection), else HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    });

fn connect_error(err: io::Error) -> Error {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        io::ErrorKind::TimedOut => Error::ConnectionTimeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            Error::DestinationIpUnroutable
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            Error::ConnectionTerminated
        }
        // wasi:http's stock mapping (via the hooks) handles the rest.
        _ => Error::Connect(err),
    }
}

fn tls_error(err: io::Error) -> Error {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => Error::TlsCertificateError,
        Some(rustls::Error::AlertReceived(alert)) => Error::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        Some(_) => Error::TlsProtocolError,
        None => Error::Tls(err),
    }
}

fn hyper_error(err: hyper::Error) -> Error {
    if err.is_timeout() {
        Error::HttpResponseTimeout
    } else if err.is_incomplete_message() {
        Error::HttpResponseIncomplete
    } else {
        Error::Hyper(err)
    }
}

/// A response body that fails if the peer goes quiet for longer than `idle`
/// between frames (wasi:http's between-bytes timeout). It holds the
/// invocation's outbound slot until dropped.
struct TimedBody {
    body: HeldBody,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn policy(entries: &[&str]) -> OutboundPolicy {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        match OutboundPolicy::parse(&entries) {
            Ok(policy) => policy,
            Err(err) => panic!("{err}"),
        }
    }

    fn entry(raw: &str) -> Entry {
        match parse_entry(raw) {
            Ok(entry) => entry,
            Err(err) => panic!("`{raw}`: {err}"),
        }
    }

    fn target(uri: &str) -> Target {
        let uri: Uri = uri.parse().unwrap();
        Target::of(&uri).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn outbound_parse_valid_entries() {
        let name = |n: &str| HostPattern::Name(n.to_string());
        let cases = [
            (
                "https://api.example.com",
                Scheme::Https,
                name("api.example.com"),
                PortPattern::Exact(443),
            ),
            (
                "HTTP://API.Example.COM.:8080",
                Scheme::Http,
                name("api.example.com"),
                PortPattern::Exact(8080),
            ),
            (
                "https://example.com/",
                Scheme::Https,
                name("example.com"),
                PortPattern::Exact(443),
            ),
            (
                "https://*.example.com",
                Scheme::Https,
                HostPattern::Subdomains("example.com".into()),
                PortPattern::Exact(443),
            ),
            (
                "http://*.Example.com:*",
                Scheme::Http,
                HostPattern::Subdomains("example.com".into()),
                PortPattern::Any,
            ),
            (
                "http://127.0.0.1:*",
                Scheme::Http,
                HostPattern::Ip(ip("127.0.0.1")),
                PortPattern::Any,
            ),
            (
                "https://[2001:db8::1]:8443",
                Scheme::Https,
                HostPattern::Ip(ip("2001:db8::1")),
                PortPattern::Exact(8443),
            ),
            (
                "http://[::ffff:10.1.2.3]",
                Scheme::Http,
                HostPattern::Ip(ip("10.1.2.3")),
                PortPattern::Exact(80),
            ),
            (
                "http://10.0.0.0/8",
                Scheme::Http,
                HostPattern::Cidr(Cidr {
                    network: ip("10.0.0.0"),
                    prefix: 8,
                }),
                PortPattern::Exact(80),
            ),
            (
                "http://10.0.0.0/8:8080",
                Scheme::Http,
                HostPattern::Cidr(Cidr {
                    network: ip("10.0.0.0"),
                    prefix: 8,
                }),
                PortPattern::Exact(8080),
            ),
            (
                "http://[fd00::]/8:*",
                Scheme::Http,
                HostPattern::Cidr(Cidr {
                    network: ip("fd00::"),
                    prefix: 8,
                }),
                PortPattern::Any,
            ),
            (
                "  https://localhost  ",
                Scheme::Https,
                name("localhost"),
                PortPattern::Exact(443),
            ),
        ];
        for (raw, scheme, host, port) in cases {
            assert_eq!(entry(raw), Entry { scheme, host, port }, "{raw}");
        }
        assert_eq!(OutboundPolicy::parse(&[]), Ok(OutboundPolicy::deny_all()));
    }

    #[test]
    fn outbound_parse_invalid_entries_explain() {
        let cases = [
            ("", "empty"),
            ("example.com", "no scheme"),
            ("ftp://example.com", "use http or https"),
            ("https://", "host is missing"),
            ("https://*", "every host"),
            ("http://*:8080", "every host"),
            ("https://*.com", "top-level domain"),
            ("https://foo.*.com", "whole first label"),
            ("https://*example.com", "whole first label"),
            ("https://*.*.example.com", "only one wildcard"),
            ("https://example.com/api", "path"),
            ("https://example.com/8", "path"),
            ("https://example.com?x=1", "query"),
            ("https://example.com#top", "fragment"),
            ("https://user:pw@example.com", "user info"),
            ("https://example.com:0", "port `0`"),
            ("https://example.com:70000", "port `70000`"),
            ("https://example.com:http", "port `http`"),
            ("https://example.com:+80", "port `+80`"),
            ("http://::1", "brackets"),
            ("http://fd00::1:80", "brackets"),
            ("http://[::1", "not closed"),
            ("http://[zz::1]", "not an IPv6 address"),
            ("http://[::1]x", "unexpected `x`"),
            ("http://10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("http://[fd00::1]/8", "did you mean [fd00::]/8"),
            ("http://10.0.0.0/33", "prefix length"),
            ("http://0.0.0.0/0", "every address"),
            ("http://[::]/0", "every address"),
            ("http://0.0.0.0/1", "too wide"),
            ("http://[::]/1", "too wide"),
            ("http://[::]/7", "too wide"),
            ("http://[::ffff:0:0]/96", "too wide"),
            ("https://exa mple.com", "not a valid host name"),
            ("https://-bad.example.com", "not a valid host name"),
            ("https://a..example.com", "not a valid host name"),
            ("http://999.1.1.1", "not a valid IPv4 address"),
            // The unspecified address reaches the node's own loopback services.
            ("http://0.0.0.0:8080", "unspecified address"),
            ("http://0.0.0.0", "unspecified address"),
            ("http://0.1.2.3:*", "unspecified address"),
            ("http://0.0.0.0/8", "unspecified address"),
            ("http://0.0.0.0/8:*", "unspecified address"),
            ("http://0.5.0.0/16", "unspecified address"),
            ("http://[::]:8080", "unspecified address"),
            ("http://[::ffff:0.0.0.0]:8080", "unspecified address"),
            ("http://[::]/96", "unspecified address"),
        ];
        for (raw, needle) in cases {
            let err =
                OutboundPolicy::parse(&["https://ok.example.com".to_string(), raw.to_string()])
                    .expect_err(raw);
            assert!(err.contains(&format!("`{raw}`")), "{raw}: {err}");
            assert!(err.contains(needle), "{raw}: {err}");
            assert!(err.contains("scheme://host[:port]"), "{raw}: {err}");
        }
    }

    #[test]
    fn outbound_unspecified_targets_are_refused_even_when_resolved() {
        // Grants that would otherwise cover a name's answer.
        let p = policy(&["http://svc.example.org:8080", "http://127.0.0.0/8:8080"]);
        let named = target("http://svc.example.org:8080/");
        for ip in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
            let reason = p.rules.refusal(&named, &[addr]).expect(ip);
            assert!(reason.contains("unspecified address"), "{ip}: {reason}");
        }
        let loopback = SocketAddr::new(ip("127.0.0.1"), 8080);
        assert_eq!(p.rules.refusal(&named, &[loopback]), None);
    }

    #[test]
    fn outbound_matching() {
        let p = policy(&[
            "https://api.example.com",
            "https://*.cdn.example.net",
            "http://svc.example.org:8080",
            "http://any.example.org:*",
            "http://10.0.0.0/8",
            "https://[2001:db8::1]",
        ]);
        let allowed = [
            "https://api.example.com/v1",
            "https://API.Example.com./v1",
            "https://api.example.com:443/",
            "https://a.cdn.example.net",
            "https://a.b.cdn.example.net",
            "http://svc.example.org:8080/x",
            "http://any.example.org:1",
            "http://any.example.org",
            "http://10.20.30.40",
            "http://[::ffff:10.1.1.1]/",
            "https://[2001:db8::1]/",
        ];
        let denied = [
            "http://api.example.com",       // scheme mismatch
            "https://api.example.com:8443", // port mismatch
            "https://example.com",          // parent of a name
            "https://evilapi.example.com",  // not a subdomain
            "https://cdn.example.net",      // wildcard excludes the apex
            "https://xcdn.example.net",     // suffix but not a subdomain
            "http://svc.example.org",       // default port is not 8080
            "https://any.example.org",      // scheme mismatch under any port
            "http://11.0.0.1",              // outside the CIDR
            "http://10.0.0.1:8080",         // CIDR at the default port only
            "https://[2001:db8::2]/",       // other address
        ];
        for uri in allowed {
            assert!(p.rules.allows(&target(uri)), "{uri} should be allowed");
        }
        for uri in denied {
            assert!(!p.rules.allows(&target(uri)), "{uri} should be denied");
        }
        assert!(
            !OutboundPolicy::deny_all()
                .rules
                .allows(&target("https://api.example.com"))
        );
    }

    #[test]
    fn outbound_target_of_uri() {
        assert_eq!(
            target("HTTPS://Example.COM.:8443/x"),
            Target {
                scheme: Scheme::Https,
                host: Host::Name("example.com".into()),
                port: 8443
            }
        );
        assert_eq!(target("http://[::1]/").host, Host::Ip(ip("::1")));
        assert_eq!(target("http://[::1]/").port, 80);
        assert_eq!(target("http://example.com:/").port, 80);
        let relative: Uri = "/path".parse().unwrap();
        assert!(matches!(
            Target::of(&relative),
            Err(Error::HttpRequestUriInvalid)
        ));
        let ftp: Uri = "ftp://example.com/".parse().unwrap();
        assert!(matches!(Target::of(&ftp), Err(Error::HttpProtocolError)));
        assert_eq!(
            target("https://evil.example").to_string(),
            "https://evil.example:443"
        );
        assert_eq!(
            target("https://evil.example").grant(),
            "https://evil.example"
        );
        assert_eq!(target("http://[::1]:81").grant(), "http://[::1]:81");
    }

    #[test]
    fn outbound_address_classification() {
        let private = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:2::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "4000::1",
        ];
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2a00:1450::1",
        ];
        for addr in private {
            assert!(non_public(ip(addr)).is_some(), "{addr} should be private");
        }
        for addr in public {
            assert_eq!(non_public(ip(addr)), None, "{addr} should be public");
        }
        assert_eq!(non_public(ip("::ffff:127.0.0.1")), Some("loopback"));
    }

    #[test]
    fn outbound_cidr_contains() {
        let v4 = Cidr {
            network: ip("10.0.0.0"),
            prefix: 8,
        };
        assert!(v4.contains(ip("10.255.0.1")));
        assert!(!v4.contains(ip("11.0.0.1")));
        assert!(!v4.contains(ip("::1")));
        let v6 = Cidr {
            network: ip("fd00::"),
            prefix: 8,
        };
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        let mapped = Cidr {
            network: ip("::ffff:0:0"),
            prefix: 96,
        };
        assert!(mapped.contains(ip("127.0.0.1")));
    }

    /// A loopback HTTP/1.1 server answering every request with `hello`.
    async fn server(respond: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !respond {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let head = String::from_utf8_lossy(&seen).to_string();
                    assert!(head.starts_with("GET /hi?x=1 HTTP/1.1\r\n"), "{head}");
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                        )
                        .await;
                });
            }
        });
        port
    }

    type Denials = Arc<Mutex<Vec<String>>>;

    async fn get(
        policy: OutboundPolicy,
        uri: &str,
        options: Option<RequestOptions>,
    ) -> (Result<Bytes, Error>, Vec<String>) {
        let denials: Denials = Arc::default();
        let sink = Arc::clone(&denials);
        let mut hooks = OutboundHooks::new(
            Arc::new(policy),
            Box::new(move |message| sink.lock().unwrap().push(message)),
        );
        let body = Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let request = Request::get(uri).body(body).unwrap();
        let result = async {
            let future = hooks.send_request(request, options, Box::new(async { Ok(()) }));
            let (response, io) = Pin::from(future).await?;
            tokio::spawn(Pin::from(io));
            assert_eq!(response.status(), 200);
            Ok(response.into_body().collect().await?.to_bytes())
        }
        .await;
        let denials = denials.lock().unwrap().clone();
        (result, denials)
    }

    #[tokio::test]
    async fn outbound_end_to_end_over_loopback() {
        let port = server(true).await;
        let uri = format!("http://127.0.0.1:{port}/hi?x=1");

        // Granted by IP: the request goes through.
        let (result, denials) =
            get(policy(&[&format!("http://127.0.0.1:{port}")]), &uri, None).await;
        assert_eq!(result.unwrap(), Bytes::from_static(b"hello"));
        assert!(denials.is_empty());

        // A name granted, but it resolves to loopback: refused (SSRF).
        let by_name = format!("http://localhost:{port}/hi?x=1");
        let (result, denials) = get(
            policy(&[&format!("http://localhost:{port}")]),
            &by_name,
            None,
        )
        .await;
        assert!(
            matches!(result, Err(Error::HttpRequestDenied)),
            "{result:?}"
        );
        assert_eq!(denials.len(), 1);
        assert!(
            denials[0].contains("localhost resolves to a private address"),
            "{}",
            denials[0]
        );

        // The same name with its loopback addresses granted explicitly.
        let (result, denials) = get(
            policy(&[
                &format!("http://localhost:{port}"),
                &format!("http://127.0.0.0/8:{port}"),
                &format!("http://[::1]:{port}"),
            ]),
            &by_name,
            None,
        )
        .await;
        assert_eq!(result.unwrap(), Bytes::from_static(b"hello"), "{denials:?}");

        // Nothing granted.
        let (result, denials) = get(OutboundPolicy::deny_all(), &uri, None).await;
        assert!(
            matches!(result, Err(Error::HttpRequestDenied)),
            "{result:?}"
        );
        assert_eq!(
            denials,
            [format!(
                "outbound request to http://127.0.0.1:{port} denied: not on this function's \
                 allow-list (grant it with --outbound http://127.0.0.1:{port})"
            )]
        );
    }

    #[tokio::test]
    async fn outbound_errors_map_to_wasi_codes() {
        // No authority.
        let (result, denials) = get(policy(&["http://127.0.0.1:*"]), "/relative", None).await;
        assert!(
            matches!(result, Err(Error::HttpRequestUriInvalid)),
            "{result:?}"
        );
        assert!(denials.is_empty());

        // Nobody listening.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let uri = format!("http://127.0.0.1:{port}/");
        let (result, _) = get(policy(&["http://127.0.0.1:*"]), &uri, None).await;
        assert!(
            matches!(result, Err(Error::ConnectionRefused)),
            "{result:?}"
        );

        // A server that never answers, with a short first-byte timeout.
        let port = server(false).await;
        let uri = format!("http://127.0.0.1:{port}/hi?x=1");
        let options = RequestOptions {
            first_byte_timeout: Some(Duration::from_millis(50)),
            ..RequestOptions::default()
        };
        let (result, _) = get(policy(&["http://127.0.0.1:*"]), &uri, Some(options)).await;
        assert!(
            matches!(result, Err(Error::ConnectionReadTimeout)),
            "{result:?}"
        );

        // A name that cannot resolve (.invalid is reserved, RFC 6761).
        let (result, _) = get(
            policy(&["http://nothing.invalid"]),
            "http://nothing.invalid/",
            None,
        )
        .await;
        assert!(
            matches!(result, Err(Error::DnsError { .. } | Error::DnsTimeout)),
            "{result:?}"
        );
    }
}
