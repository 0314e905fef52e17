//! The node's own log (stderr): plain text without colour codes off a
//! terminal, or JSON lines with `--log-format json`, `MAYFLY_LOG_FORMAT`
//! or `[log] format` in node.toml.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::guest;

/// Runs `mayfly serve` with its stderr written to a file (not a terminal)
/// and the default log level, deploys `hello` through its admin API (a log
/// line with fields), stops it with SIGTERM and returns what it logged.
fn node_log(data_dir: &Path, flags: &[&str], env: &[(&str, &str)]) -> String {
    let log_file = data_dir.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--max-instances", "50"])
        .args(flags)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("MAYFLY_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = |prefix: &str| {
        let line = lines.next().map(Result::unwrap).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "mayfly serve exited: {}",
                std::fs::read_to_string(&log_file).unwrap_or_default()
            )
        });
        line.strip_prefix(prefix).unwrap().to_string()
    };
    printed("gateway listening on ");
    let admin = printed("admin API listening on ");
    let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
    let hello = guest("hello");
    let deployed = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args([
            "deploy",
            "hello",
            hello.to_str().unwrap(),
            "--route",
            "/hello",
        ])
        .env("MAYFLY_ADMIN_URL", &admin)
        .env("MAYFLY_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mayfly serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(status.success(), "exited with {status}: {log}");
    log
}

#[test]
fn a_node_logging_to_a_file_writes_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = node_log(&dir.path().join("data"), &[], &[]);
    assert!(log.contains("node ready"), "{log}");
    assert!(log.contains("deployed"), "{log}");
    assert!(
        !log.contains("\x1b["),
        "ANSI escape codes in a log file: {log:?}"
    );
    assert!(
        serde_json::from_str::<Value>(log.lines().next().unwrap()).is_err(),
        "text by default: {log}"
    );
}

/// Every line of `log` as JSON, checked to carry a level and a message.
fn json_lines(log: &str) -> Vec<Value> {
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        assert!(line["level"].is_string(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    lines
}

#[test]
fn json_logs_are_one_object_per_line_with_level_message_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let lines = json_lines(&node_log(&data_dir, &["--log-format", "json"], &[]));
    let ready = lines
        .iter()
        .find(|line| line["fields"]["message"] == "node ready")
        .expect("a `node ready` line");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["fields"]["functions"], 0, "{ready}");
    let deployed = lines
        .iter()
        .find(|line| line["fields"]["message"] == "deployed")
        .expect("a `deployed` line");
    assert_eq!(deployed["fields"]["function"], "hello", "{deployed}");
    assert_eq!(deployed["fields"]["version"], 1, "{deployed}");

    // The same from the environment, and from the node's config file.
    json_lines(&node_log(&data_dir, &[], &[("MAYFLY_LOG_FORMAT", "json")]));
    std::fs::write(data_dir.join("node.toml"), "[log]\nformat = \"json\"\n").unwrap();
    json_lines(&node_log(&data_dir, &[], &[]));
    // A flag wins over the file.
    let text = node_log(&data_dir, &["--log-format", "text"], &[]);
    assert!(
        text.contains("node ready") && !text.contains("\"fields\""),
        "{text}"
    );
}
