//! Serving requests: routing, bodies, failures, logs, restarts.

use std::time::Duration;

use crate::common::{Node, eventually};

#[test]
fn deployed_function_answers_over_http_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);

    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.get("/hello/sub/path?q=1").0, 200);

    let (ok, stdout, stderr) = node.cli(&["invoke", "hello"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "Hello, world!\n");

    let (ok, stdout, _) = node.cli(&["list"]);
    assert!(ok);
    assert!(
        stdout.contains("hello") && stdout.contains("/hello"),
        "{stdout}"
    );
    let (ok, stdout, _) = node.cli(&["--json", "list"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list[0]["name"], "hello");
}

#[test]
fn echo_round_trips_a_mebibyte_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("echo", "echo", &["/echo"]);

    // Every byte value, in a pattern that would show a shifted or lost chunk.
    let body: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (status, echoed, id) = node.request("PUT", "/echo/a/b?x=y", &body);
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    assert!(
        echoed == body,
        "the echoed body differs from the request body"
    );
    assert_eq!(id.len(), 32, "each response carries a request id");

    let mut response = crate::common::agent()
        .post(format!("{}/echo/path?q=1", node.gateway))
        .header("x-custom", "value")
        .send("hi")
        .unwrap();
    let headers = response.headers().clone();
    assert_eq!(headers["x-echo-method"], "POST");
    assert_eq!(headers["x-echo-path"], "/echo/path?q=1");
    assert_eq!(headers["x-echo-header-x-custom"], "value");
    assert_eq!(response.body_mut().read_to_string().unwrap(), "hi");
}

#[test]
fn unknown_route_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    assert_eq!(node.get("/").0, 404);
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/nothing/here").0, 404);
    assert_eq!(
        node.get("/hellothere").0,
        404,
        "prefixes match whole segments"
    );
}

#[test]
fn host_routes_win_over_path_routes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/"]);
    node.deploy("echo", "echo", &["shop.example/"]);
    let mut response = crate::common::agent()
        .get(format!("{}/anything", node.gateway))
        .header("host", "shop.example:8080")
        .call()
        .unwrap();
    assert_eq!(response.headers()["x-echo-path"], "/anything");
    drop(response.body_mut().read_to_string());
    assert_eq!(node.get("/anything").1, "Hello, world!\n");
}

#[test]
fn trapping_guest_gets_500_while_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("trap", "trap", &["/trap"]);

    std::thread::scope(|scope| {
        let traps: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..10).map(|_| node.get("/trap").0).collect::<Vec<_>>()))
            .collect();
        let hellos: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..10).map(|_| node.get("/hello")).collect::<Vec<_>>()))
            .collect();
        for trap in traps {
            assert!(trap.join().unwrap().iter().all(|&status| status == 500));
        }
        for hello in hellos {
            for (status, body) in hello.join().unwrap() {
                assert_eq!((status, body.as_str()), (200, "Hello, world!\n"));
            }
        }
    });
    // A report is recorded just after its answer is sent.
    eventually(Duration::from_secs(10), "40 failed invocations", || {
        (node.admin_json("/v1/status")["failed_invocations"] == 40).then_some(())
    });

    // A public client learns only that it failed, and the request id...
    let (status, body, id) = node.request("GET", "/trap", b"");
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 500);
    assert_eq!(body, format!("the function failed; request id {id}\n"));
    // ...while the function's logs say why, under that request id.
    let line = eventually(Duration::from_secs(20), "the failure's log line", || {
        let lines = node.admin_json("/v1/functions/trap/logs?tail=1000");
        lines.as_array()?.iter().find_map(|line| {
            let text = line["line"].as_str()?;
            (line["request_id"] == id.as_str() && text.starts_with("mayfly: "))
                .then(|| text.to_string())
        })
    });
    assert!(
        line.starts_with("mayfly: the invocation failed: the function trapped"),
        "{line}"
    );
    // An operator invoking through the admin API is told why at once.
    let (status, body) = node.invoke_get("trap", "/trap");
    assert_eq!(status, 500);
    assert!(body.contains("the function trapped"), "{body}");
}

#[test]
fn guest_output_becomes_log_lines_tagged_with_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("logs", "logs", &["/logs"]);
    let (status, _, request_id) = node.request("GET", "/logs/first", b"");
    assert_eq!(status, 200);

    let lines = eventually(Duration::from_secs(20), "log lines", || {
        let lines = node.admin_json("/v1/functions/logs/logs");
        let lines = lines.as_array()?.clone();
        (lines.len() >= 4).then_some(lines)
    });
    let text: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["line"].as_str().unwrap()))
        .collect();
    assert!(
        text.contains(&("stdout", "stdout line one for /logs/first")),
        "{text:?}"
    );
    assert!(text.contains(&("stdout", "stdout line two")));
    assert!(text.contains(&("stderr", "stderr line")));
    assert!(text.contains(&("stdout", "no trailing newline")));
    for line in &lines {
        assert_eq!(line["request_id"], request_id.as_str());
        assert_eq!(line["version"], 1);
    }

    let (ok, stdout, _) = node.cli(&["logs", "logs"]);
    assert!(ok);
    assert!(
        stdout.contains(&request_id) && stdout.contains("stderr line"),
        "{stdout}"
    );
}

#[test]
fn logs_follow_streams_new_lines() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("logs", "logs", &["/logs"]);
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["logs", "logs", "--follow"])
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("stdout line one for /logs/followed"))
    });
    // The follower may connect after the first request: keep requesting
    // until it has seen one.
    eventually(Duration::from_secs(20), "the follower to print", || {
        node.get("/logs/followed");
        reader.is_finished().then_some(())
    });
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(reader.join().unwrap().is_some());
}

#[test]
fn restart_serves_again_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("echo", "echo", &["/echo"]);
    assert_eq!(node.admin_json("/v1/status")["compilations"], 2);
    node.stop();

    let node = Node::start(dir.path());
    let status = node.admin_json("/v1/status");
    assert_eq!(status["compilations"], 0, "{status}");
    assert_eq!(status["artifact_cache_hits"], 2, "{status}");
    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.request("POST", "/echo", b"again").1, b"again");
    assert_eq!(node.admin_json("/v1/status")["compilations"], 0);
}

#[test]
fn component_written_for_other_wasi_http_hosts_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("compat", "proxy_compat", &["/compat"]);
    assert_eq!(
        node.get("/compat/x"),
        (200, "compat guest saw /compat/x\n".to_string())
    );
}

/// A `mayfly serve` on an admin address of the test's choosing (`Node`
/// always puts the admin API on loopback).
struct Exposed {
    child: std::process::Child,
    /// The admin URL as printed, e.g. `https://0.0.0.0:41234`.
    printed_admin: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    token: Option<String>,
}

impl Exposed {
    fn start(data_dir: &std::path::Path, flags: &[&str]) -> Exposed {
        use std::io::BufRead as _;
        let mut child = serve_command(data_dir, flags)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let collected = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut stderr = collected.lock().unwrap();
                stderr.push_str(&line);
                stderr.push('\n');
            }
        });
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut address = |prefix: &str| {
            let line = match lines.next() {
                Some(line) => line.unwrap(),
                None => {
                    let _ = child.wait();
                    panic!("mayfly serve exited: {}", stderr.lock().unwrap());
                }
            };
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string()
        };
        address("gateway listening on ");
        let printed_admin = address("admin API listening on ");
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .ok()
            .map(|token| token.trim().to_string());
        Exposed {
            child,
            printed_admin,
            stderr,
            token,
        }
    }

    /// The admin URL to connect to: the wildcard address reached over loopback.
    fn admin(&self) -> String {
        self.printed_admin.replace("0.0.0.0", "127.0.0.1")
    }

    /// `GET /v1/status` answers: 200, or 401 with a JSON error should the
    /// bearer-token gate (still settling) want more than the node's own
    /// `admin.token`. Either way the admin API itself answered.
    fn assert_status_answers(&self, agent: &ureq::Agent) {
        let mut request = agent.get(format!("{}/v1/status", self.admin()));
        if let Some(token) = &self.token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.body_mut().read_json().unwrap();
        assert!(
            status == 200 || (status == 401 && body["error"]["message"].is_string()),
            "{status}: {body}"
        );
    }

    /// SIGTERM, then the process must exit 0 (graceful shutdown).
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = wait_with_deadline(&mut self.child).expect("mayfly serve stops on SIGTERM");
        assert!(status.success(), "exited with {status}: {}", self.stderr());
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_command(data_dir: &std::path::Path, flags: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--max-instances", "50"])
        .args(flags)
        .env("RUST_LOG", "error")
        .env_remove("MAYFLY_TLS_CERT")
        .env_remove("MAYFLY_TLS_KEY");
    command
}

fn wait_with_deadline(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs `mayfly serve` expecting it to refuse to start; returns its stderr.
fn refused(data_dir: &std::path::Path, flags: &[&str]) -> String {
    let mut child = serve_command(data_dir, flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child);
    if status.is_none() {
        let _ = child.kill();
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = status.unwrap_or_else(|| panic!("mayfly serve {flags:?} kept running"));
    assert!(
        !status.success(),
        "mayfly serve {flags:?} started: {stderr}"
    );
    stderr
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM:
/// (certificate file, key file, certificate DER).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signing_key.serialize_pem()).unwrap();
    (cert_file, key_file, cert.der().to_vec())
}

#[test]
fn admin_api_off_loopback_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let stderr = refused(&data_dir, &["--admin-listen", "0.0.0.0:0"]);
    assert!(
        stderr.contains("the admin API would listen on 0.0.0.0:0 without TLS")
            && stderr.contains("--tls-cert and --tls-key")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "refused before touching the data dir");

    // Unreadable TLS files are named.
    let (cert, key, _) = self_signed(dir.path());
    let missing = dir.path().join("missing.pem");
    let flags = |cert: &std::path::Path, key: &std::path::Path| {
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        refused(
            &data_dir,
            &[
                "--admin-listen",
                "0.0.0.0:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
        )
    };
    let stderr = flags(&missing, &key);
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    let stderr = flags(&cert, &missing);
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    // A key file holding a certificate is not a key.
    let stderr = flags(&cert, &cert);
    assert!(
        stderr.contains(&format!("private key from {}", cert.display())),
        "{stderr}"
    );
}

#[test]
fn admin_api_serves_https_off_loopback_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let node = Exposed::start(
        &dir.path().join("data"),
        &[
            "--admin-listen",
            "0.0.0.0:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        node.printed_admin.starts_with("https://0.0.0.0:"),
        "{}",
        node.printed_admin
    );

    let trusting = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[
                    ureq::tls::Certificate::from_der(&der).to_owned(),
                ]))
                .build(),
        )
        .build()
        .new_agent();
    node.assert_status_answers(&trusting);

    // The `mayfly` verbs trust it with --ca-cert (or MAYFLY_CA_CERT).
    let token = node.token.clone().expect("the node wrote admin.token");
    let mayfly = |args: &[&str], ca_cert_env: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"));
        command
            .args(args)
            .env("MAYFLY_ADMIN_URL", node.admin())
            .env("MAYFLY_TOKEN", &token)
            .env_remove("MAYFLY_CA_CERT");
        if let Some(path) = ca_cert_env {
            command.env("MAYFLY_CA_CERT", path);
        }
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = mayfly(&["list", "--ca-cert", cert.to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("no functions deployed"), "{stdout}");
    let (ok, stdout, stderr) = mayfly(&["--json", "list"], Some(&cert));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "[]");
    // Without it the certificate is refused, and the error says how to trust it.
    let (ok, _, stderr) = mayfly(&["list"], None);
    assert!(
        !ok && stderr.contains("certificate") && stderr.contains("--ca-cert"),
        "{stderr}"
    );
    // A --ca-cert that is not a certificate is named.
    let (ok, _, stderr) = mayfly(&["list", "--ca-cert", key.to_str().unwrap()], None);
    assert!(
        !ok && stderr.contains(&format!("no PEM certificate in {}", key.display())),
        "{stderr}"
    );

    // A client that does not trust the certificate gets no answer, and
    // neither does plain HTTP.
    let error = crate::common::agent()
        .get(format!("{}/v1/status", node.admin()))
        .call()
        .unwrap_err();
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
    let plain = node.admin().replace("https://", "http://");
    assert!(
        crate::common::agent()
            .get(format!("{plain}/v1/status"))
            .call()
            .is_err()
    );
    node.stop();
}

#[test]
fn admin_api_serves_plain_http_off_loopback_with_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let node = Exposed::start(
        &dir.path().join("data"),
        &["--admin-listen", "0.0.0.0:0", "--insecure"],
    );
    assert!(
        node.printed_admin.starts_with("http://0.0.0.0:"),
        "{}",
        node.printed_admin
    );
    node.assert_status_answers(&crate::common::agent());
    eventually(Duration::from_secs(10), "the --insecure warning", || {
        node.stderr().contains("warning: --insecure").then_some(())
    });
    node.stop();
}

#[test]
fn a_client_verb_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    // `mayfly status | head` once head is done: no panic, no message.
    for verb in ["status", "list"] {
        let output = node.cli_with_reader_gone(&[verb]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.is_empty(), "mayfly {verb}: {stderr}");
    }
}
