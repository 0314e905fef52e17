//! Shared test fixtures: guest components built once, and real `mayfly serve`
//! processes on ephemeral loopback ports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Builds the guests once per test run and returns the folder of `.wasm`s.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
        let status = Command::new(env!("CARGO"))
            .current_dir(&guests)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .arg("--target-dir")
            .arg(guests.join("target"))
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building the guests failed (is the wasm32-wasip2 target installed? \
             `rustup target add wasm32-wasip2`)"
        );
        guests.join("target/wasm32-wasip2/release")
    })
}

/// Every file under `dir`, as paths relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    files
}

/// The path of a built guest, e.g. `guest("hello")`.
pub fn guest(name: &str) -> PathBuf {
    guests().join(format!("{name}.wasm"))
}

/// An HTTP agent that returns error statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// A `mayfly serve` process with its own data directory.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:<port>` of the gateway.
    pub gateway: String,
    /// `http://127.0.0.1:<port>` of the admin API.
    pub admin: String,
    /// The node's first admin token, from its data directory.
    pub token: String,
    /// Its name in a fleet (`--node-name`); empty for a node alone.
    pub name: String,
    /// `http://127.0.0.1:<port>/metrics` of the metrics listener, when
    /// started with `--metrics-addr`.
    pub metrics_url: Option<String>,
    /// `http://127.0.0.1:<port>` of the S3 endpoint when started with
    /// `--s3-listen`; empty otherwise.
    pub s3: String,
}

impl Node {
    /// Starts a node on ephemeral ports with state in `data_dir`.
    pub fn start(data_dir: &Path) -> Node {
        Self::start_with(data_dir, &[])
    }

    /// Starts a node with extra `mayfly serve` flags.
    pub fn start_with(data_dir: &Path, flags: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(if flags.contains(&"--max-instances") {
                &[][..]
            } else {
                &["--max-instances", "200"][..]
            })
            .args(flags)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mayfly serve starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut address = |prefix: &str| {
            let line = lines
                .next()
                .expect("mayfly serve printed its addresses")
                .expect("readable stdout");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string()
        };
        let gateway = address("gateway listening on ");
        let admin = address("admin API listening on ");
        let metrics_url = flags
            .contains(&"--metrics-addr")
            .then(|| address("metrics listening on "));
        let s3 = if flags.contains(&"--s3-listen") {
            address("S3 endpoint listening on ")
        } else {
            String::new()
        };
        // A node joining a fleet that has tokens writes none: the caller
        // sets the fleet's (`Node::token` is public).
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let name = flags
            .iter()
            .position(|flag| *flag == "--node-name")
            .and_then(|at| flags.get(at + 1))
            .map_or_else(String::new, |name| name.to_string());
        Node {
            child,
            gateway,
            admin,
            token,
            name,
            metrics_url,
            s3,
        }
    }

    /// Runs the `mayfly` CLI against this node; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = self.cli_in(Path::new("."), args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs the `mayfly` CLI against this node in the folder `dir` (where
    /// `mayfly deploy` finds a project's mayfly.toml).
    pub fn cli_in(&self, dir: &Path, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .current_dir(dir)
            .args(args)
            .env("MAYFLY_ADMIN_URL", &self.admin)
            .env("MAYFLY_TOKEN", &self.token)
            .output()
            .expect("mayfly runs")
    }

    /// Runs the `mayfly` CLI against this node with its stdout a pipe whose
    /// reader is already gone (a `| head` that has finished).
    pub fn cli_with_reader_gone(&self, args: &[&str]) -> std::process::Output {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(args)
            .env("MAYFLY_ADMIN_URL", &self.admin)
            .env("MAYFLY_TOKEN", &self.token)
            .stdout(writer)
            .output()
            .expect("mayfly runs")
    }

    /// Deploys a guest through the CLI, panicking on failure.
    pub fn deploy(&self, name: &str, guest_name: &str, routes: &[&str]) {
        self.deploy_with(name, guest_name, routes, &[]);
    }

    /// Deploys a guest with extra `mayfly deploy` flags (limits).
    pub fn deploy_with(&self, name: &str, guest_name: &str, routes: &[&str], flags: &[&str]) {
        let wasm = guest(guest_name);
        let mut args = vec!["deploy", name, wasm.to_str().expect("utf-8 path")];
        for route in routes {
            args.extend(["--route", route]);
        }
        args.extend(flags);
        let (ok, stdout, stderr) = self.cli(&args);
        assert!(ok, "deploy {name} failed: {stdout}{stderr}");
    }

    /// `Bearer <admin token>`, for the authorization header.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// GETs an admin API path and parses the JSON answer.
    pub fn admin_json(&self, path: &str) -> Value {
        let mut response = agent()
            .get(format!("{}{path}", self.admin))
            .header("authorization", self.bearer())
            .call()
            .expect("admin API answers");
        response.body_mut().read_json().expect("JSON answer")
    }

    /// Sends a request to the gateway; returns (status, body, request id).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>, String) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.gateway))
            .body(body.to_vec())
            .expect("valid request");
        let mut response = agent().run(request).expect("gateway answers");
        let id = response
            .headers()
            .get("x-mayfly-request-id")
            .map(|v| v.to_str().expect("ascii").to_string())
            .unwrap_or_default();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .expect("body");
        (response.status().as_u16(), bytes, id)
    }

    /// Runs `function` with a GET of `path` through the admin API's
    /// `invoke`; returns (status, body).
    pub fn invoke_get(&self, function: &str, path: &str) -> (u16, String) {
        let path: String = path
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let mut response = agent()
            .post(format!(
                "{}/v1/functions/{function}/invoke?method=GET&path={path}",
                self.admin
            ))
            .header("authorization", self.bearer())
            .send_empty()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    /// GETs a gateway path; returns (status, body as text).
    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, body, _) = self.request("GET", path, b"");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The ledger's records (of one function, or all), oldest first.
    pub fn usage_records(&self, function: Option<&str>) -> Vec<Value> {
        let filter = function.map_or(String::new(), |f| format!("&function={f}"));
        let records = self.admin_json(&format!("/v1/usage/records?limit=10000{filter}"));
        records.as_array().expect("a JSON array").clone()
    }

    /// Waits until the ledger holds `count` records of `function` and
    /// returns them.
    pub fn await_usage_records(&self, function: &str, count: usize) -> Vec<Value> {
        eventually(Duration::from_secs(30), "usage records", || {
            let records = self.usage_records(Some(function));
            assert!(
                records.len() <= count,
                "more records than invocations: {records:?}"
            );
            (records.len() == count).then_some(records)
        })
    }

    /// The node's Prometheus metrics text.
    pub fn metrics(&self) -> String {
        agent()
            .get(format!("{}/metrics", self.admin))
            .header("authorization", self.bearer())
            .call()
            .expect("metrics answer")
            .body_mut()
            .read_to_string()
            .expect("metrics text")
    }

    /// The node process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node process's resident memory, in bytes (Linux).
    pub fn rss_bytes(&self) -> u64 {
        proc_status_bytes(self.child.id(), "VmRSS")
    }

    /// The most resident memory the node process has had, in bytes
    /// (Linux's high-water mark, `VmHWM`).
    pub fn peak_rss_bytes(&self) -> u64 {
        proc_status_bytes(self.child.id(), "VmHWM")
    }

    /// The files the node process has mapped into memory (Linux).
    pub fn mapped_files(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.child.id()))
            .expect("the node's /proc maps")
    }

    /// One function's row of `mayfly status --json`'s scaling table.
    pub fn scaling_status(&self, function: &str) -> Value {
        let status = self.admin_json("/v1/status");
        status["scaling"]
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["function"] == function))
            .cloned()
            .unwrap_or_else(|| panic!("no scaling row for {function}: {status}"))
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }

    /// Kills the node with SIGKILL (no chance to flush anything).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the node with SIGTERM and waits for it to exit.
    pub fn stop(self) {
        self.terminate();
        self.wait_exit();
    }

    /// Waits for the node to exit after a signal; it must exit 0.
    pub fn wait_exit(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                assert!(status.success(), "mayfly serve exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mayfly serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A size field (`VmRSS`, `VmHWM`, …) of process `pid`'s
/// `/proc/PID/status`, in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("a {field} line in /proc/{pid}/status"));
    kib * 1024
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
