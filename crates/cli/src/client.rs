//! A small blocking client of the admin API, and the encoding of its URL
//! paths and query strings.

use std::path::Path;

use sha2::Digest as _;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use ureq::http::Response;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::profiles::{Target, login_advice};

/// Largest JSON answer read from the admin API.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// One part of a multipart/form-data upload ([`AdminClient::post_multipart`]).
pub struct FormPart<'a> {
    /// The form field name the node reads the part by.
    pub name: &'a str,
    /// The part's Content-Type.
    pub content_type: &'a str,
    /// What the part holds.
    pub body: PartBody<'a>,
}

/// Reads an in-memory body and reports each read's progress: bytes read
/// so far and the body's length.
struct CountingReader<'a> {
    rest: &'a [u8],
    read: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl std::io::Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut self.rest, buf)?;
        if n > 0 {
            self.read += n as u64;
            (self.progress)(self.read, self.total);
        }
        Ok(n)
    }
}

/// The body of a [`FormPart`].
pub enum PartBody<'a> {
    /// Bytes in memory (a small JSON document).
    Bytes(&'a [u8]),
    /// A file, read when the request is built.
    File(&'a Path),
}

/// A client of one node's admin API.
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    /// `Bearer <token>`, sent with every request when known.
    authorization: Option<String>,
    /// What to run when the admin API refuses the token (401).
    login_advice: Option<String>,
    /// The CLI profile the URL came from, named when it cannot be reached.
    url_profile: Option<String>,
}

impl AdminClient {
    /// `ca_cert`: a PEM file of certificates to trust for `https://`
    /// besides Mozilla's roots (a private CA, or the node's self-signed
    /// certificate).
    pub fn new(base: &str, token: Option<String>, ca_cert: Option<&Path>) -> anyhow::Result<Self> {
        let mut config = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(path) = ca_cert {
            let roots = roots_with(path)?;
            config = config.tls_config(TlsConfig::builder().root_certs(roots).build());
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            agent: config.build().new_agent(),
            authorization: token.map(|token| format!("Bearer {}", token.trim())),
            login_advice: None,
            url_profile: None,
        })
    }

    /// A client for a verb's [`Target`]: its URL, token and CA, and, when the
    /// node refuses the token, advice naming the `mayfly login` to run.
    pub fn for_target(target: &Target) -> anyhow::Result<Self> {
        let mut client = Self::new(
            &target.admin_url,
            target.token.clone(),
            target.ca_cert.as_deref(),
        )?
        .with_login_advice(login_advice(target));
        client.url_profile.clone_from(&target.url_profile);
        Ok(client)
    }

    /// The same client, saying `advice` when the admin API refuses its token.
    pub fn with_login_advice(mut self, advice: String) -> Self {
        self.login_advice = Some(advice);
        self
    }

    /// Turns the admin API's own 401 into advice on logging in; the API's
    /// message would only say the token is missing or unknown. An invoked
    /// function's 401 carries a request id and passes through.
    fn refused(&self, response: Response<ureq::Body>) -> anyhow::Result<Response<ureq::Body>> {
        if response.status() != 401 || response.headers().contains_key("x-mayfly-request-id") {
            return Ok(response);
        }
        let advice = self.login_advice.clone().unwrap_or_else(|| {
            format!(
                "the admin API at {} refused the request: run `mayfly login --admin-url {} \
                 --token TOKEN` (the node printed its token file at start)",
                self.base, self.base
            )
        });
        Err(Unauthorized(advice).into())
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, error: ureq::Error) -> anyhow::Error {
        // rustls's errors reach here wrapped in io::Error.
        if self.base.starts_with("https://") && error.to_string().contains("certificate") {
            return anyhow!(
                "TLS to the admin API at {} failed: {error} (is its certificate from a \
                 private CA or self-signed? pass --ca-cert <PEM> or set MAYFLY_CA_CERT)",
                self.base
            );
        }
        let from = self
            .url_profile
            .as_ref()
            .map(|name| format!(" (the URL of profile `{name}`)"))
            .unwrap_or_default();
        anyhow!(
            "cannot reach the admin API at {}{from}: {error} (is `mayfly serve` running? set \
             --admin-url, MAYFLY_ADMIN_URL or --profile to point elsewhere; `mayfly profile \
             list` shows your profiles)",
            self.base
        )
    }

    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .auth(self.agent.get(self.url(path)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        read_json(self.refused(response)?)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        let response = self
            .auth(self.agent.delete(self.url(path)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        check(self.refused(response)?).map(drop)
    }

    /// Posts a multipart/form-data body (RFC 7578) and reads the 2xx answer
    /// as JSON, calling `progress` (if any) with the bytes handed to the
    /// connection so far and the body's length (a deploy's upload bar).
    ///
    /// Written here rather than with ureq's multipart encoder: ureq can
    /// give a Content-Length only to parts it reads itself, and a counted
    /// part makes it send chunked. A chunked upload the node refuses early
    /// (a bad token, a missing scope, over the size limit) then ends in a
    /// broken pipe on the client instead of the node's answer (seen in CI);
    /// with its length declared, the node answers before reading the body.
    /// The format is a few lines for a couple of named parts; the body is
    /// built in memory (a component is at most the node's upload limit).
    pub fn post_multipart<T: DeserializeOwned>(
        &self,
        path: &str,
        parts: Vec<FormPart<'_>>,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> anyhow::Result<T> {
        let mut contents = Vec::with_capacity(parts.len());
        for part in &parts {
            contents.push(match part.body {
                PartBody::Bytes(bytes) => std::borrow::Cow::Borrowed(bytes),
                PartBody::File(file) => std::borrow::Cow::Owned(
                    std::fs::read(file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                ),
            });
        }
        // A boundary must not occur in any part: one drawn from a digest
        // of the parts practically cannot.
        let mut digest = sha2::Sha256::new();
        for content in &contents {
            digest.update(content);
        }
        let boundary = format!("mayfly-{}", hex::encode(&digest.finalize()[..16]));
        let mut body = Vec::new();
        for (part, content) in parts.iter().zip(&contents) {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{0}\"; \
                     filename=\"{0}\"\r\nContent-Type: {1}\r\n\r\n",
                    part.name, part.content_type
                )
                .as_bytes(),
            );
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let total = body.len() as u64;
        let mut ignore = |_: u64, _: u64| {};
        let mut reader = CountingReader {
            rest: &body,
            read: 0,
            total,
            progress: progress.unwrap_or(&mut ignore),
        };
        let response = self
            .auth(self.agent.post(self.url(path)))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            // A reader's length is unknown to ureq: without this it would
            // send the body chunked.
            .header("content-length", total)
            .send(ureq::SendBody::from_reader(&mut reader))
            .map_err(|e| self.unreachable(e))?;
        read_json(self.refused(response)?)
    }

    /// Sends a request and returns the raw response, whatever its status.
    pub fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response<ureq::Body>> {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        if let Some(value) = &self.authorization {
            request = request.header("authorization", value);
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(body.unwrap_or_default().to_vec())
            .context("invalid request")?;
        let response = self.agent.run(request).map_err(|e| self.unreachable(e))?;
        self.refused(response)
    }

    /// Sends a request and fails unless the answer is 2xx.
    pub fn send_checked(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response<ureq::Body>> {
        check(self.send_raw(method, path, headers, body)?)
    }

    /// Sends a request and reads its 2xx answer as JSON.
    pub fn send_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<T> {
        read_json(self.send_raw(method, path, headers, body)?)
    }

    /// Posts `value` as a JSON body and reads the 2xx answer as JSON.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, value: &Value) -> anyhow::Result<T> {
        let body = serde_json::to_vec(value)?;
        let headers = [("content-type".to_string(), "application/json".to_string())];
        self.send_json("POST", path, &headers, Some(&body))
    }
}

/// The admin API refused the token (HTTP 401); the text says how to log in.
#[derive(Debug)]
pub struct Unauthorized(String);

impl Unauthorized {
    /// What to do about it, without the status.
    pub fn advice(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Unauthorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP 401)", self.0)
    }
}

impl std::error::Error for Unauthorized {}

/// An answer of the admin API that is not 2xx: its HTTP status, and the
/// `code` and `message` of its `{"error": {"code", "message"}}` body.
/// Kept apart from other errors so that `--json` can report the status
/// and code as fields.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The API's machine-readable code (`not_found`, `conflict`, …), when
    /// its body had one.
    pub code: Option<String>,
    /// The API's message (or the CLI's own words for it); empty when the
    /// body said nothing.
    pub message: String,
}

impl ApiError {
    /// Reads a non-2xx answer's body into an error.
    pub fn from_response(mut response: Response<ureq::Body>) -> Self {
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_JSON_BYTES)
            .read_to_string()
            .unwrap_or_default();
        let body = serde_json::from_str::<Value>(&text).ok();
        let field = |name: &str| {
            body.as_ref()
                .and_then(|body| body["error"][name].as_str())
                .map(str::to_string)
        };
        Self {
            status,
            code: field("code"),
            message: field("message").unwrap_or(text).trim().to_string(),
        }
    }

    /// The same error, told in the CLI's words (status and code kept).
    pub fn saying(self, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..self
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `404 Not Found`: the status with its reason phrase.
        let status = ureq::http::StatusCode::from_u16(self.status)
            .map_or_else(|_| self.status.to_string(), |status| status.to_string());
        if self.message.is_empty() {
            write!(f, "the admin API answered HTTP {status}")
        } else {
            write!(f, "{} (HTTP {status})", self.message)
        }
    }
}

impl std::error::Error for ApiError {}

/// Turns a non-2xx answer into an [`ApiError`] carrying the API's message.
pub fn check(response: Response<ureq::Body>) -> anyhow::Result<Response<ureq::Body>> {
    if response.status().is_success() {
        return Ok(response);
    }
    Err(ApiError::from_response(response).into())
}

/// Reads a 2xx answer as JSON, or turns another status into an error.
pub fn read_json<T: DeserializeOwned>(response: Response<ureq::Body>) -> anyhow::Result<T> {
    let mut response = check(response)?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_JSON_BYTES)
        .read_json()
        .context("the admin API answered with unexpected JSON")
}

/// Mozilla's roots (what ureq trusts by default) and the certificates in
/// the PEM file at `path`.
fn roots_with(path: &Path) -> anyhow::Result<RootCerts> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        let item = item.with_context(|| format!("bad PEM in {}", path.display()))?;
        if let PemItem::Certificate(cert) = item {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    certs.extend(
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|cert| Certificate::from_der(cert)),
    );
    Ok(RootCerts::from(certs))
}

/// Items asked for per page when listing objects, keys and dead letters.
pub(crate) const PAGE: usize = 1000;

/// What a URL path segment or query value keeps as it is: exactly the
/// RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`); every other byte,
/// and every byte of a non-ASCII character, is percent-encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// [`UNRESERVED`] and `/`: for a value that is itself a path (an invoke's
/// path, a key prefix), whose slashes a reader would rather see as they are.
const UNRESERVED_AND_SLASH: &AsciiSet = &UNRESERVED.remove(b'/');

/// `value` percent-encoded as one URL component: only the unreserved
/// characters pass through.
pub(crate) fn encode(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

/// `value` percent-encoded with its slashes kept.
pub(crate) fn encode_keeping_slashes(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED_AND_SLASH).to_string()
}

/// A function name as one URL path segment.
pub(crate) fn segment(name: &str) -> String {
    encode(name)
}

/// A key as URL path segments: `/` stays a separator, everything else that
/// is not unreserved is percent-encoded, and `.`/`..` segments are encoded
/// so that nothing on the way normalises them away.
pub(crate) fn key_path(key: &str) -> String {
    key.split('/')
        .map(|part| match part {
            "." => "%2E".to_string(),
            ".." => "%2E%2E".to_string(),
            part => encode(part),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A query string (`?a=1&b=2`) of the given parameters, or nothing.
pub(crate) fn query(params: &[(&str, Option<String>)]) -> String {
    let pairs: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref()?;
            Some(format!("{name}={}", encode_keeping_slashes(value)))
        })
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_slashes_and_encode_the_rest() {
        assert_eq!(key_path("a/b c/d.txt"), "a/b%20c/d.txt");
        assert_eq!(key_path("x?y#z%"), "x%3Fy%23z%25");
        assert_eq!(key_path("é/+&="), "%C3%A9/%2B%26%3D");
        assert_eq!(key_path("a/../b/./c"), "a/%2E%2E/b/%2E/c");
        assert_eq!(key_path("..."), "...");
    }

    #[test]
    fn components_keep_exactly_the_unreserved_characters() {
        let unreserved = "AZaz09-._~";
        assert_eq!(encode(unreserved), unreserved);
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(
            encode("!*'();:@&=+$,?#[]%"),
            "%21%2A%27%28%29%3B%3A%40%26%3D%2B%24%2C%3F%23%5B%5D%25"
        );
        assert_eq!(encode_keeping_slashes("/a b/ü"), "/a%20b/%C3%BC");
    }

    #[test]
    fn queries_skip_missing_values_and_encode_the_rest() {
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(
            query(&[
                ("prefix", Some("in/a b&".into())),
                ("after", None),
                ("limit", Some("10".into()))
            ]),
            "?prefix=in/a%20b%26&limit=10"
        );
    }
}
