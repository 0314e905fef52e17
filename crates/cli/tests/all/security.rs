//! Least privilege end to end: grants decide what a guest reaches (KV,
//! secrets, outbound HTTP), secrets never appear in plaintext, tokens carry
//! scopes, and a function's credential works only for that function, only
//! for a while.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, agent, eventually};

/// Sends an admin API request with `token` (or none); returns (status, JSON).
fn admin(node: &Node, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.admin));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = agent().run(request.body(body.to_vec()).unwrap()).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `mayfly secret set <name>` with the value on stdin.
pub(crate) fn set_secret(node: &Node, name: &str, value: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["secret", "set", name])
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "secret set failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A one-thread HTTP server on loopback answering every request with
/// `upstream-ok`; returns its port.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nupstream-ok",
            );
        }
    });
    port
}

fn function_logs(node: &Node, function: &str) -> String {
    node.admin_json(&format!("/v1/functions/{function}/logs?tail=1000"))
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["line"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_function_reaches_only_what_it_was_granted() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let port = upstream();
    let (status, _) = admin(&node, "PUT", "/v1/kv/orders/k1", Some(&node.token), b"v1");
    assert_eq!(status, 200);
    set_secret(&node, "db_password", "hunter2-granted");

    node.deploy("bare", "caps", &[]);
    let local = format!("http://127.0.0.1:{port}");
    node.deploy_with(
        "granted",
        "caps",
        &[],
        &[
            "--kv",
            "orders",
            "--secret",
            "db_password",
            "--var",
            "greeting=hi there",
            "--outbound",
            &local,
        ],
    );
    let by_name = format!("http://localhost:{port}");
    node.deploy_with(
        "public-only",
        "caps",
        &[],
        &["--outbound", "https://example.com", "--outbound", &by_name],
    );

    // Without grants: each capability is refused with its interface's error.
    let (status, body) = node.invoke_get("bare", "/kv/get?bucket=orders&key=k1");
    assert_eq!(status, 403, "{body}");
    let (status, body) = node.invoke_get("bare", "/config/get?key=db_password");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not granted"), "{body}");
    assert!(!body.contains("hunter2"), "{body}");
    let (status, body) = node.invoke_get("bare", &format!("/fetch?url={local}/"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    // And every refusal is in the function's log, where its author looks.
    let logs = eventually(Duration::from_secs(30), "denial log lines", || {
        let logs = function_logs(&node, "bare");
        (logs.matches("denied").count() >= 3).then_some(logs)
    });
    assert!(logs.contains("wasi:keyvalue"), "{logs}");
    assert!(logs.contains("wasi:config"), "{logs}");
    assert!(logs.contains("outbound"), "{logs}");

    // With them, the same calls work.
    let (status, body) = node.invoke_get("granted", "/kv/get?bucket=orders&key=k1");
    assert_eq!((status, body.as_str()), (200, "v1"));
    let (status, body) = node.invoke_get("granted", "/kv/incr?bucket=orders&key=n&by=5");
    assert_eq!((status, body.trim()), (200, "5"));
    let (_, stored) = admin(&node, "GET", "/v1/kv/orders", Some(&node.token), b"");
    assert!(stored.to_string().contains("\"n\""), "{stored}");
    let (status, body) = node.invoke_get("granted", "/kv/get?bucket=other&key=k1");
    assert_eq!(status, 403, "only the granted bucket: {body}");
    // wasi:keyvalue open(""): each function's own default store, `fn.<name>`,
    // no grant needed, no other function's to reach, an admin's to read.
    let (status, body) = node.invoke_get("bare", "/kv/incr?bucket=&key=n&by=2");
    assert_eq!((status, body.trim()), (200, "2"));
    let (status, body) = node.invoke_get("granted", "/kv/incr?bucket=&key=n&by=7");
    assert_eq!((status, body.trim()), (200, "7"), "a store of its own");
    let (status, body) = node.invoke_get("granted", "/kv/get?bucket=fn.bare&key=n");
    assert_eq!(status, 403, "another function's default store: {body}");
    let (_, stored) = admin(&node, "GET", "/v1/kv/fn.bare", Some(&node.token), b"");
    assert!(stored.to_string().contains("\"n\""), "{stored}");
    let caps_wasm = crate::common::guest("caps");
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "spy",
        caps_wasm.to_str().unwrap(),
        "--kv",
        "fn.bare",
    ]);
    assert!(!ok && stderr.contains("default KV store"), "{stderr}");
    let (status, body) = node.invoke_get("granted", "/config/get?key=db_password");
    assert_eq!((status, body.as_str()), (200, "hunter2-granted"));
    let (status, body) = node.invoke_get("granted", "/config/get?key=greeting");
    assert_eq!((status, body.as_str()), (200, "hi there"));
    let (status, body) = node.invoke_get("granted", "/config/get?key=missing");
    assert_eq!(status, 404, "{body}");
    let (status, body) = node.invoke_get("granted", &format!("/fetch?url={local}/x"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "status=200\nupstream-ok");

    // SSRF: a loopback address is refused when only names are allowed,
    // whether asked for directly or through a name that resolves to it.
    let (status, body) = node.invoke_get("public-only", &format!("/fetch?url={local}/"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let (status, body) = node.invoke_get("public-only", &format!("/fetch?url={by_name}/"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    eventually(
        Duration::from_secs(30),
        "the SSRF denial in the logs",
        || {
            function_logs(&node, "public-only")
                .contains("private")
                .then_some(())
        },
    );

    // A grant the node cannot honour is refused at deploy, naming it.
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "bad",
        crate::common::guest("caps").to_str().unwrap(),
        "--outbound",
        "ftp://example.com",
    ]);
    assert!(!ok);
    assert!(stderr.contains("ftp://example.com"), "{stderr}");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn assert_nowhere_on_disk(dir: &Path, needle: &str) {
    for file in files(dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes()),
            "the secret is in plaintext in {}",
            file.display()
        );
    }
}

#[test]
fn no_secret_value_is_stored_logged_or_returned_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let value = "pl41ntext-canary-7f3a9c";
    set_secret(&node, "api_key", value);
    node.deploy_with("reader", "caps", &[], &["--secret", "api_key"]);
    let (status, body) = node.invoke_get("reader", "/config/get?key=api_key");
    assert_eq!((status, body.as_str()), (200, value));

    // The API lists names and versions only.
    let (status, list) = admin(&node, "GET", "/v1/secrets", Some(&node.token), b"");
    assert_eq!(status, 200);
    assert!(list.to_string().contains("api_key"), "{list}");
    for path in [
        "/v1/secrets",
        "/v1/functions/reader",
        "/v1/audit",
        "/v1/functions/reader/logs",
        "/v1/status",
    ] {
        let (_, answer) = admin(&node, "GET", path, Some(&node.token), b"");
        assert!(!answer.to_string().contains(value), "{path}: {answer}");
    }
    assert!(!node.metrics().contains(value));

    // Rotating the master key reseals it; the function still reads it.
    let (ok, stdout, stderr) = node.cli(&["secret", "rotate-key"]);
    assert!(ok, "{stdout}{stderr}");
    let (status, body) = node.invoke_get("reader", "/config/get?key=api_key");
    assert_eq!((status, body.as_str()), (200, value));
    node.stop();
    assert_nowhere_on_disk(dir.path(), value);

    // After a restart it is still readable (the key file is in the data
    // directory, 0600).
    let node = Node::start(dir.path());
    let (status, body) = node.invoke_get("reader", "/config/get?key=api_key");
    assert_eq!((status, body.as_str()), (200, value));
    node.stop();
    assert_nowhere_on_disk(dir.path(), value);
}

fn create_token(node: &Node, scopes: &[&str], functions: &[&str]) -> (String, String) {
    let body = serde_json::json!({"name": "test", "scopes": scopes, "functions": functions});
    let (status, created) = admin(
        node,
        "POST",
        "/v1/tokens",
        Some(&node.token),
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 201, "{created}");
    (
        created["id"].as_str().unwrap().to_string(),
        created["token"].as_str().unwrap().to_string(),
    )
}

#[test]
fn tokens_carry_scopes_and_revoked_ones_stop_working() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = crate::common::guest("hello");
    let hello = hello.to_str().unwrap();

    let (status, answer) = admin(&node, "GET", "/v1/functions", None, b"");
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token")
    );
    let (status, _) = admin(&node, "GET", "/v1/functions", Some("mf_made_up"), b"");
    assert_eq!(status, 401);

    let (read_id, read) = create_token(&node, &["read"], &[]);
    let (status, _) = admin(&node, "GET", "/v1/functions", Some(&read), b"");
    assert_eq!(status, 200);
    let deploy_as = |token: &str, name: &str, flags: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .args(["deploy", name, hello])
            .args(flags)
            .env("MAYFLY_ADMIN_URL", &node.admin)
            .env("MAYFLY_TOKEN", token)
            .output()
            .unwrap()
    };
    let output = deploy_as(&read, "a", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("deploy"),
        "{stderr}"
    );
    let (status, _) = admin(&node, "GET", "/v1/secrets", Some(&read), b"");
    assert_eq!(status, 403, "secrets are for admins");

    // A deploy token limited to function `a` deploys `a`, not `b`, and
    // cannot widen what `a` reaches.
    let (_, deploy_a) = create_token(&node, &["deploy"], &["a"]);
    assert!(deploy_as(&deploy_a, "a", &[]).status.success());
    let output = deploy_as(&deploy_a, "b", &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("403"));
    let output = deploy_as(&deploy_a, "a", &["--kv", "payments"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("payments"),
        "{stderr}"
    );
    // Granting a secret is an admin's call, even for an unlimited deploy token.
    let (_, deployer) = create_token(&node, &["deploy"], &[]);
    assert!(
        deploy_as(&deployer, "c", &["--kv", "payments"])
            .status
            .success()
    );
    let output = deploy_as(&deployer, "c", &["--secret", "db_password"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("admin"),
        "{stderr}"
    );

    // Revoked: refused from the next request on.
    let (ok, stdout, stderr) = node.cli(&["token", "revoke", &read_id]);
    assert!(ok, "{stdout}{stderr}");
    let (status, _) = admin(&node, "GET", "/v1/functions", Some(&read), b"");
    assert_eq!(status, 401);

    // The tokens are stored hashed; listing shows ids, never tokens.
    let (ok, list, _) = node.cli(&["token", "list"]);
    assert!(ok);
    assert!(
        list.contains(&read_id) && list.contains("revoked"),
        "{list}"
    );
    assert!(!list.contains(&read) && !list.contains(&deploy_a), "{list}");
    let db = std::fs::read(dir.path().join("auth.db")).unwrap();
    assert!(!db.windows(read.len()).any(|w| w == read.as_bytes()));

    // The audit log has who did what: the deploy, the refusals, the revoke.
    let (ok, audit, stderr) = node.cli(&["audit", "--limit", "100"]);
    assert!(ok, "{stderr}");
    assert!(audit.contains("POST /v1/functions/a/versions"), "{audit}");
    assert!(audit.contains("403"), "{audit}");
    assert!(
        audit.contains("401") && audit.contains("anonymous"),
        "{audit}"
    );
    assert!(
        audit.contains(&format!("DELETE /v1/tokens/{read_id}")),
        "{audit}"
    );
}

#[test]
fn a_function_credential_acts_only_for_that_function_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--credential-ttl", "10s"]);
    node.deploy_with(
        "alpha",
        "caps",
        &[],
        &["--kv", "alpha-data", "--send-queue", "alpha-out"],
    );
    node.deploy_with("beta", "caps", &[], &["--kv", "beta-data"]);
    let (status, credential) = node.invoke_get("alpha", "/config/get?key=mayfly.credential");
    assert_eq!(status, 200, "{credential}");
    let credential = credential.trim().to_string();
    // It knows where to use it.
    let (status, api) = node.invoke_get("alpha", "/config/get?key=mayfly.api_url");
    assert_eq!((status, api.as_str()), (200, node.admin.as_str()));

    let as_alpha = |method: &str, path: &str| admin(&node, method, path, Some(&credential), b"x").0;
    assert_eq!(as_alpha("PUT", "/v1/kv/alpha-data/k"), 200);
    assert_eq!(as_alpha("GET", "/v1/kv/alpha-data/k"), 200);
    assert_eq!(as_alpha("POST", "/v1/queues/alpha-out/messages"), 201);
    // Not beta's bucket, not beta itself, not the control plane.
    assert_eq!(as_alpha("PUT", "/v1/kv/beta-data/k"), 403);
    assert_eq!(as_alpha("POST", "/v1/functions/beta/invoke"), 403);
    assert_eq!(as_alpha("POST", "/v1/functions/alpha/versions"), 403);
    assert_eq!(as_alpha("GET", "/v1/functions"), 403);

    // Tampered: any change to the signed part is refused.
    let (signed, tag) = credential.rsplit_once('.').unwrap();
    let mut forged = signed.as_bytes().to_vec();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = format!("{}.{tag}", String::from_utf8(forged).unwrap());
    let (status, _) = admin(&node, "PUT", "/v1/kv/alpha-data/k", Some(&forged), b"x");
    assert_eq!(status, 401);

    // A redeploy that drops a grant takes it from live credentials at once.
    node.deploy_with("alpha", "caps", &[], &["--send-queue", "alpha-out"]);
    assert_eq!(as_alpha("GET", "/v1/kv/alpha-data/k"), 403);
    assert_eq!(as_alpha("POST", "/v1/queues/alpha-out/messages"), 201);

    // Expired: refused once its lifetime is over.
    let answer = eventually(Duration::from_secs(60), "the credential to expire", || {
        let (status, answer) = admin(&node, "GET", "/v1/kv/alpha-data/k", Some(&credential), b"");
        (status == 401).then_some(answer)
    });
    assert!(answer.to_string().contains("expired"), "{answer}");
}
