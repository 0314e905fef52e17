//! Mayfly under test: a node on its own data directory and the few admin
//! API calls the scenarios make.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use super::process::{Process, command};

/// A running `mayfly serve`.
pub struct Node {
    /// The server process (stopped when the node is dropped).
    pub process: Process,
    /// Base URL of the public gateway, such as `http://127.0.0.1:41234`.
    pub gateway: String,
    /// Base URL of the admin API.
    pub admin: String,
    /// The node's admin token, from its data directory.
    pub token: String,
}

/// How to start a node.
pub struct NodeOptions<'a> {
    /// Gateway port; 0 lets the node pick one (it prints it).
    pub port: u16,
    /// Extra `mayfly serve` flags.
    pub flags: &'a [&'a str],
}

impl Node {
    /// Starts `mayfly serve` on `data_dir` and waits until it prints both
    /// listening addresses (which it does once both ports are bound).
    pub fn start(
        binary: &Path,
        data_dir: &Path,
        log_dir: &Path,
        options: &NodeOptions<'_>,
    ) -> anyhow::Result<Self> {
        let mut process = Process::spawn(
            "mayfly",
            command(binary)
                .arg("serve")
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--listen", &format!("127.0.0.1:{}", options.port)])
                .args(["--admin-listen", "127.0.0.1:0"])
                .args(options.flags)
                // Request logging off, as in bench/node.sh: the load
                // generator should not be measuring the log writer.
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped()),
            log_dir,
        )?;
        let stdout = process
            .take_stdout()
            .ok_or_else(|| anyhow!("mayfly serve's stdout is not piped"))?;
        // Read stdout on a thread: it keeps draining the pipe for the life
        // of the node, and lets the wait for the addresses time out.
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let (mut gateway, mut admin) = (None, None);
        while gateway.is_none() || admin.is_none() {
            match lines_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("gateway listening on ") {
                        gateway = Some(url.trim().to_string());
                    } else if let Some(url) = line.strip_prefix("admin API listening on ") {
                        admin = Some(url.trim().to_string());
                    }
                }
                Err(_) => {
                    process.check_running()?;
                    bail!(
                        "mayfly serve did not print its addresses: {}",
                        process.stderr_tail()
                    );
                }
            }
        }
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .context("mayfly serve wrote no admin.token")?
            .trim()
            .to_string();
        Ok(Self {
            process,
            gateway: gateway.unwrap_or_default(),
            admin: admin.unwrap_or_default(),
            token,
        })
    }
}

/// An admin API client.
pub struct Admin {
    agent: ureq::Agent,
    base: String,
    authorization: String,
}

/// What a deploy answered.
pub struct Deployed {
    /// Whether the node compiled the component (false: artifact cached).
    pub compiled: bool,
    /// How long the node compiled for, ms (when it says).
    pub compile_ms: Option<f64>,
}

impl Admin {
    /// A client of the admin API at `base`, presenting `token`.
    pub fn new(base: &str, token: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Deploys compile with Cranelift; on a busy 2-core machine with
            // many deploys in flight one can take long.
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .new_agent();
        Self {
            agent,
            base: base.to_string(),
            authorization: format!("Bearer {token}"),
        }
    }

    /// Deploys `component` as function `name`, routed at `route` if given.
    /// Multipart written by hand like crates/cli/src/client.rs does: ureq has
    /// no encoder and two in-memory parts are a few lines.
    pub fn deploy(
        &self,
        name: &str,
        component: &[u8],
        route: Option<&str>,
    ) -> anyhow::Result<Deployed> {
        let config = route.map(|route| serde_json::json!({ "routes": [route] }));
        self.deploy_with(name, component, config)
    }

    /// Deploys `component` as function `name` with a deploy `config` (the
    /// admin API's JSON: routes, grants, …).
    pub fn deploy_with(
        &self,
        name: &str,
        component: &[u8],
        config: Option<Value>,
    ) -> anyhow::Result<Deployed> {
        let boundary = "mayfly-bench-7c1f0e4b9d2a";
        let mut body = Vec::with_capacity(component.len() + 512);
        let mut part = |field: &str, content_type: &str, bytes: &[u8]| {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                     filename=\"{field}\"\r\nContent-Type: {content_type}\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        };
        part("component", "application/wasm", component);
        if let Some(config) = config {
            part("config", "application/json", config.to_string().as_bytes());
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let url = format!("{}/v1/functions/{name}/versions", self.base);
        let mut response = self
            .agent
            .post(&url)
            .header("authorization", &self.authorization)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .send(&body[..])
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let text = response.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("deploying {name}: {status} {text}");
        }
        let answer: Value = serde_json::from_str(&text)
            .with_context(|| format!("deploying {name}: unexpected answer {text}"))?;
        Ok(Deployed {
            compiled: answer["compiled"].as_bool().unwrap_or(false),
            compile_ms: answer["compile_ms"].as_f64(),
        })
    }

    /// `GET path` on the admin API, as JSON.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .header("authorization", &self.authorization)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()?;
        if !status.is_success() {
            bail!("GET {url}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON: {text}"))
    }

    /// Each function's tier (`cold`, `warm`, `hot`) from `GET /v1/status`.
    pub fn tiers(&self) -> anyhow::Result<Vec<(String, String)>> {
        let status = self.get("/v1/status")?;
        let rows = status["scaling"]
            .as_array()
            .ok_or_else(|| anyhow!("/v1/status has no `scaling` list: {status}"))?;
        Ok(rows
            .iter()
            .map(|row| {
                let field = |name: &str| row[name].as_str().unwrap_or_default().to_string();
                (field("function"), field("tier"))
            })
            .collect())
    }

    /// The usage records of `function`, oldest first.
    pub fn usage_records(&self, function: &str) -> anyhow::Result<Vec<Value>> {
        let records = self.get(&format!(
            "/v1/usage/records?function={function}&limit=10000"
        ))?;
        match records {
            Value::Array(records) => Ok(records),
            other => bail!("/v1/usage/records is not a list: {other}"),
        }
    }
}

/// `hello` made distinct: the component with a custom section named
/// `mayfly-bench` holding `tag` appended at the end. A custom section may
/// appear anywhere in a component, and changes nothing it does, but it
/// changes the digest, so the node compiles each variant instead of reusing
/// a cached artifact.
pub fn variant(component: &[u8], tag: &str) -> Vec<u8> {
    const NAME: &[u8] = b"mayfly-bench";
    let mut payload = leb128(NAME.len() as u64);
    payload.extend_from_slice(NAME);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = Vec::with_capacity(component.len() + payload.len() + 8);
    out.extend_from_slice(component);
    // Section id 0 (custom), then the section's size, then its contents.
    out.push(0x00);
    out.extend_from_slice(&leb128(payload.len() as u64));
    out.extend_from_slice(&payload);
    out
}

/// Unsigned LEB128, the integer encoding of the wasm binary format.
fn leb128(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_encodes_like_the_spec() {
        assert_eq!(leb128(0), [0x00]);
        assert_eq!(leb128(127), [0x7f]);
        assert_eq!(leb128(128), [0x80, 0x01]);
        assert_eq!(leb128(624_485), [0xe5, 0x8e, 0x26]);
    }

    #[test]
    fn variant_appends_one_custom_section() {
        let out = variant(b"\0asm", "f7");
        assert_eq!(&out[..4], b"\0asm");
        // id, size (1 + 12 + 2), name length, name, tag.
        assert_eq!(out[4], 0);
        assert_eq!(out[5], 15);
        assert_eq!(out[6], 12);
        assert_eq!(&out[7..19], b"mayfly-bench");
        assert_eq!(&out[19..], b"f7");
    }
}
