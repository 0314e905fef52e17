//! Deploying: validation, versions, conflicts, deletion.

use serde_json::Value;

use crate::common::{Node, agent, files_under, guest};

/// Uploads raw bytes as a component; returns (status, error message).
fn upload(node: &Node, name: &str, wasm: &[u8]) -> (u16, String) {
    let boundary = "test-boundary-7e1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; filename=\"c.wasm\"\r\n\
         Content-Type: application/wasm\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(wasm);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut response = agent()
        .post(format!("{}/v1/functions/{name}/versions", node.admin))
        .header("authorization", node.bearer())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body[..])
        .unwrap();
    let status = response.status().as_u16();
    let json: Value = response.body_mut().read_json().unwrap_or(Value::Null);
    (
        status,
        json["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn invalid_uploads_are_rejected_with_a_clear_400_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    let before = files_under(dir.path());
    let functions_before = node.admin_json("/v1/functions");

    let garbage = b"this is not webassembly at all".to_vec();
    let (status, message) = upload(&node, "bad", &garbage);
    assert_eq!(status, 400);
    assert!(message.contains("not a WebAssembly binary"), "{message}");

    // The smallest valid core module: magic and version only.
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let (status, message) = upload(&node, "bad", &core_module);
    assert_eq!(status, 400);
    assert!(
        message.contains("core WebAssembly module, not a component"),
        "{message}"
    );
    assert!(message.contains("wasm32-wasip2"), "{message}");

    let command = std::fs::read(guest("cli-app")).unwrap();
    let (status, message) = upload(&node, "bad", &command);
    assert_eq!(status, 400);
    assert!(
        message.contains("does not export wasi:http/incoming-handler"),
        "{message}"
    );
    assert!(
        message.contains("wasi:cli/run"),
        "names what it exports: {message}"
    );

    let mut truncated = std::fs::read(guest("hello")).unwrap();
    truncated.truncate(truncated.len() / 2);
    let (status, message) = upload(&node, "bad", &truncated);
    assert_eq!(status, 400);
    assert!(message.contains("not valid"), "{message}");

    // Through the CLI, the message reaches the user too.
    let (ok, _, stderr) = node.cli(&["deploy", "bad", "/etc/hostname", "--route", "/bad"]);
    assert!(!ok);
    assert!(stderr.contains("not a WebAssembly binary"), "{stderr}");

    assert_eq!(node.admin_json("/v1/functions"), functions_before);
    assert_eq!(files_under(dir.path()), before, "nothing was stored");
    assert_eq!(node.get("/bad").0, 404);
}

#[test]
fn bad_names_routes_and_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();

    let (ok, _, stderr) = node.cli(&["deploy", "Bad Name", hello]);
    assert!(!ok);
    assert!(stderr.contains("invalid function name"), "{stderr}");

    let (ok, _, stderr) = node.cli(&["deploy", "hello", hello, "--route", "/a b"]);
    assert!(!ok);
    assert!(stderr.contains("route"), "{stderr}");

    let mut response = agent()
        .post(format!("{}/v1/functions/x/versions", node.admin))
        .header("authorization", node.bearer())
        .header("content-type", "application/json")
        .send("{}")
        .unwrap();
    assert_eq!(response.status(), 400);
    let json: Value = response.body_mut().read_json().unwrap();
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("multipart")
    );

    let (ok, _, stderr) = node.cli(&["invoke", "missing"]);
    assert!(!ok);
    assert!(stderr.contains("no function named `missing`"), "{stderr}");
}

#[test]
fn a_route_that_is_neither_a_path_nor_a_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();

    // `greet` once silently became a host route, and `/greet` answered 404.
    // Refused before the upload: no progress line.
    let (ok, stdout, stderr) = node.cli(&["deploy", "greet", hello, "--route", "greet"]);
    assert!(!ok, "{stdout}");
    assert!(!stderr.contains("uploading"), "{stderr}");
    assert!(stderr.contains("route `greet` is neither"), "{stderr}");
    assert!(stderr.contains("`/greet`"), "shows the path form: {stderr}");
    assert!(
        stderr.contains("`greet.example.com/`") && stderr.contains("`localhost`"),
        "shows the host form: {stderr}"
    );
    assert_eq!(node.admin_json("/v1/functions"), serde_json::json!([]));

    // The admin API answers 400 with the same message.
    let boundary = "route-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n\
         {{\"routes\": [\"/ok\", \"greet/hello\"]}}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"component\"; \
         filename=\"c.wasm\"\r\nContent-Type: application/wasm\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&std::fs::read(hello).unwrap());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut response = agent()
        .post(format!("{}/v1/functions/greet/versions", node.admin))
        .header("authorization", node.bearer())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body[..])
        .unwrap();
    assert_eq!(response.status(), 400);
    let json: Value = response.body_mut().read_json().unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("write `/greet/hello`"), "{message}");

    // Both accepted forms deploy and serve.
    node.deploy("greet", "hello", &["/greet", "localhost:8080/local"]);
    assert_eq!(node.get("/greet").0, 200);
    assert_eq!(node.get("/local").0, 404, "a host route needs its host");
}

#[test]
fn each_deploy_is_a_new_version_and_identical_content_is_not_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("greeter", "hello", &["/greet"]);
    node.deploy("greeter", "echo", &["/greet"]);
    assert_eq!(
        node.request("POST", "/greet", b"v2").1,
        b"v2",
        "the latest version serves"
    );
    node.deploy("greeter", "hello", &["/greet"]);
    assert_eq!(node.get("/greet").1, "Hello, world!\n");

    let function = node.admin_json("/v1/functions/greeter");
    assert_eq!(function["live"]["version"], 3);
    assert_eq!(function["versions"].as_array().unwrap().len(), 3);
    let status = node.admin_json("/v1/status");
    assert_eq!(status["compilations"], 2, "{status}");
    assert_eq!(status["artifact_cache_hits"], 1, "{status}");
}

#[test]
fn a_route_belongs_to_one_function() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/shared"]);
    let echo = guest("echo");
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "echo",
        echo.to_str().unwrap(),
        "--route",
        "/shared/",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("already served by function `hello`"),
        "{stderr}"
    );
    assert!(stderr.contains("409"), "{stderr}");
    assert_eq!(node.get("/shared").1, "Hello, world!\n");
}

#[test]
fn deleting_a_function_removes_its_route() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/hello").0, 200);
    let (ok, stdout, _) = node.cli(&["delete", "hello"]);
    assert!(ok, "{stdout}");
    assert_eq!(node.get("/hello").0, 404);
    assert_eq!(node.admin_json("/v1/functions"), serde_json::json!([]));
    let (ok, _, stderr) = node.cli(&["delete", "hello"]);
    assert!(!ok);
    assert!(stderr.contains("no function named"), "{stderr}");
    // The route is free for another function.
    node.deploy("other", "echo", &["/hello"]);
    assert_eq!(node.request("POST", "/hello", b"mine").1, b"mine");
}

#[test]
fn a_deploy_shows_its_upload_and_compile_and_answers_the_compile_time() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();

    // Off a terminal: one plain line per phase on stderr, the result with
    // the node's compile time on stdout.
    let (ok, stdout, stderr) = node.cli(&["deploy", "hello", hello, "--route", "/hello"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].starts_with("hello: uploading hello.wasm (")
            && lines[0].ends_with("KiB)…")
            && lines[1] == "hello: uploaded, compiling…",
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "no bar or spinner off a terminal");
    let result = stdout.lines().next().unwrap();
    assert!(
        result.starts_with("deployed hello version 1 (sha256:")
            && result.contains(", compiled in "),
        "{stdout}"
    );
    assert!(result.ends_with(" s)"), "{stdout}");

    // --json: the answer alone, with the compile time; nothing on stderr.
    let (ok, stdout, stderr) =
        node.cli(&["deploy", "--json", "echo", guest("echo").to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(stderr, "", "--json shows no progress");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["compiled"], true, "{answer}");
    let compile_ms = answer["compile_ms"]
        .as_u64()
        .expect("compile_ms is a number");
    assert!(compile_ms > 0 && compile_ms < 120_000, "{answer}");

    // The same component again: its artifact is cached, nothing compiles.
    let (ok, stdout, stderr) = node.cli(&["deploy", "--json", "other", hello]);
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (&answer["compiled"], &answer["compile_ms"]),
        (&Value::Bool(false), &Value::from(0)),
        "{answer}"
    );
    let (ok, stdout, _) = node.cli(&["deploy", "again", hello]);
    assert!(ok);
    assert!(stdout.contains(", already compiled)"), "{stdout}");

    // A manifest deploy shows the same phases and the compile time.
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::copy(guest("trap"), project.join("trap.wasm")).unwrap();
    std::fs::write(
        project.join("mayfly.toml"),
        "[functions.trap]\ncomponent = \"trap.wasm\"\n",
    )
    .unwrap();
    let output = node.cli_in(&project, &["deploy"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("trap: uploading trap.wasm ("), "{stderr}");
    assert!(stderr.contains("trap: uploaded, compiling…"), "{stderr}");
    assert!(
        stdout.starts_with("trap: version 1 deployed, no routes (compiled in "),
        "{stdout}"
    );
}
