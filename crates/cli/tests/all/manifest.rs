//! `mayfly.toml` manifests: `mayfly deploy` with no arguments builds and
//! applies one; an unchanged function gets no new version.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::{Node, agent, guest};

/// Runs `mayfly <args>` in `dir` against `node`; returns (success, stdout,
/// stderr).
fn mayfly_in(node: &Node, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
        .current_dir(dir)
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A manifest of two functions: hello (with a build step) and echo.
fn manifest(hello_route: &str, hello_extra: &str, hello_build: &str) -> String {
    format!(
        r#"# two functions
[functions.hello]
component = "{hello}"
build = "{hello_build}"
routes = ["{hello_route}"]
{hello_extra}

[functions.echo]
component = "{echo}"
routes = ["/echo"]
memory_mb = 64
timeout = "10s"
triggers = ["queue:orders"]
[functions.echo.grants]
kv = ["cache"]
[functions.echo.variables]
greeting = "hi"
"#,
        hello = guest("hello").display(),
        echo = guest("echo").display(),
    )
}

/// The number of versions `name` has, and its live one.
fn versions(node: &Node, name: &str) -> (usize, Value) {
    let function = node.admin_json(&format!("/v1/functions/{name}"));
    (
        function["versions"].as_array().unwrap().len(),
        function["live"]["version"].clone(),
    )
}

/// Uploads a component with a config part; returns the status and the answer.
fn upload(node: &Node, name: &str, wasm: &[u8], config: &str) -> (u16, Value) {
    let boundary = "manifest-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; filename=\"c.wasm\"\r\n\
         Content-Type: application/wasm\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(wasm);
    body.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\
             Content-Type: application/json\r\n\r\n{config}\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
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
    (status, response.body_mut().read_json().unwrap())
}

#[test]
fn a_manifest_deploys_its_functions_and_reapplying_it_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let node = Node::start(data.path());
    let file = project.path().join("mayfly.toml");
    std::fs::write(&file, manifest("/hello", "", "true")).unwrap();

    // First apply: both functions deployed, one line each.
    let (ok, stdout, stderr) = mayfly_in(&node, project.path(), &["deploy"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("hello: version 1 deployed, routes /hello"),
        "{stdout}"
    );
    assert!(
        stdout.contains("echo: version 1 deployed, routes /echo"),
        "{stdout}"
    );
    assert!(
        stdout.find("hello:") < stdout.find("echo:"),
        "in the file's order: {stdout}"
    );
    assert!(stderr.contains("hello: building with `true`"), "{stderr}");
    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.request("POST", "/echo", b"ping").1, b"ping");
    let echo = node.admin_json("/v1/functions/echo");
    assert_eq!(echo["live"]["config"]["limits"]["memory_mb"], 64);
    assert_eq!(echo["live"]["config"]["limits"]["timeout_ms"], 10_000);
    assert_eq!(echo["live"]["config"]["grants"]["kv"][0], "cache");
    assert_eq!(echo["live"]["config"]["variables"]["greeting"], "hi");
    let triggers = node.admin_json("/v1/functions/echo/triggers");
    assert_eq!(triggers.as_array().unwrap().len(), 1, "{triggers}");
    let compilations = node.admin_json("/v1/status")["compilations"].clone();

    // Again, unchanged: no version, no compilation, no second trigger.
    let (ok, stdout, stderr) = mayfly_in(&node, project.path(), &["deploy"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("hello: version 1 (unchanged)"), "{stdout}");
    assert!(stdout.contains("echo: version 1 (unchanged)"), "{stdout}");
    assert_eq!(versions(&node, "hello"), (1, Value::from(1)));
    assert_eq!(versions(&node, "echo"), (1, Value::from(1)));
    assert_eq!(node.admin_json("/v1/status")["compilations"], compilations);
    let triggers = node.admin_json("/v1/functions/echo/triggers");
    assert_eq!(triggers.as_array().unwrap().len(), 1, "{triggers}");
    assert_eq!(node.get("/hello").0, 200);

    // The same component and config by another road (the API, with the
    // defaults left out) is unchanged too: 200, not 201.
    let wasm = std::fs::read(guest("echo")).unwrap();
    let (status, outcome) = upload(
        &node,
        "echo",
        &wasm,
        r#"{"routes": ["/echo"], "limits": {"memory_mb": 64, "timeout_ms": 10000},
            "grants": {"kv": ["cache"]}, "variables": {"greeting": "hi"}}"#,
    );
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["unchanged"], true, "{outcome}");
    assert_eq!(outcome["version"], 1, "{outcome}");
    // And by flags.
    let hello = guest("hello");
    let (ok, stdout, stderr) = node.cli(&[
        "deploy",
        "hello",
        hello.to_str().unwrap(),
        "--route",
        "/hello",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("unchanged"), "{stdout}");
    assert_eq!(versions(&node, "hello"), (1, Value::from(1)));

    // A changed route is a new version of that function only.
    std::fs::write(&file, manifest("/hi", "", "true")).unwrap();
    let (ok, stdout, stderr) = mayfly_in(&node, project.path(), &["deploy"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("hello: version 2 deployed, routes /hi"),
        "{stdout}"
    );
    assert!(stdout.contains("echo: version 1 (unchanged)"), "{stdout}");
    assert_eq!(versions(&node, "hello"), (2, Value::from(2)));
    assert_eq!(node.get("/hi").0, 200);
    assert_eq!(node.get("/hello").0, 404);
    // `mayfly versions` lists both, newest first, the live one marked.
    let (ok, listing, stderr) = node.cli(&["versions", "hello"]);
    assert!(ok, "{stderr}");
    // The versions table ends at the blank line before the alias moves.
    let rows: Vec<&str> = listing
        .lines()
        .skip(1)
        .take_while(|line| !line.is_empty())
        .collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert!(
        listing.contains("1 -> 2") && listing.contains("deploy"),
        "{listing}"
    );
    assert!(
        rows[0].starts_with('2') && rows[0].contains('*') && rows[0].contains("/hi"),
        "{listing}"
    );
    assert!(
        rows[1].starts_with('1') && !rows[1].contains('*'),
        "{listing}"
    );

    // A typo is refused with the key and its line; nothing is deployed,
    // not even the function before it.
    let typo = manifest("/typo", "rotues = [\"/other\"]", "true");
    let line = typo.lines().position(|l| l.starts_with("rotues")).unwrap() + 1;
    std::fs::write(&file, typo).unwrap();
    let (ok, stdout, stderr) = mayfly_in(&node, project.path(), &["deploy"]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("rotues"), "{stderr}");
    assert!(stderr.contains(&format!("line {line}")), "{stderr}");
    assert_eq!(versions(&node, "hello"), (2, Value::from(2)));
    assert_eq!(node.get("/typo").0, 404);

    // A failing build stops everything, naming its exit status.
    std::fs::write(&file, manifest("/built", "", "echo compiling; exit 7")).unwrap();
    let (ok, stdout, stderr) = mayfly_in(&node, project.path(), &["deploy"]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("compiling"), "the build's output: {stderr}");
    assert!(stderr.contains("exit status: 7"), "{stderr}");
    assert_eq!(versions(&node, "hello"), (2, Value::from(2)));
    assert_eq!(node.get("/built").0, 404);

    // --manifest from elsewhere; relative components start at its folder.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::copy(guest("echo"), project.path().join("echo2.wasm")).unwrap();
    std::fs::write(
        project.path().join("other.toml"),
        "[functions.echo2]\ncomponent = \"echo2.wasm\"\nroutes = [\"/echo2\"]\n",
    )
    .unwrap();
    let other = project.path().join("other.toml");
    let (ok, stdout, stderr) = mayfly_in(
        &node,
        elsewhere.path(),
        &["deploy", "--manifest", other.to_str().unwrap()],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("echo2: version 1 deployed, routes /echo2"),
        "{stdout}"
    );
    assert_eq!(node.request("POST", "/echo2", b"two").1, b"two");

    // NAME without COMPONENT is a clear error.
    let (ok, _, stderr) = mayfly_in(&node, project.path(), &["deploy", "hello"]);
    assert!(!ok);
    assert!(stderr.contains("needs the component"), "{stderr}");
}
