//! What a function learns from the node besides its request: environment
//! variables (plain and from secrets), and the route headers that say how
//! the request reached it, which clients cannot forge.

use crate::common::{Node, agent};
use crate::security::set_secret;

/// GET `path` on the node's gateway with extra request `headers`; returns
/// the status and the response headers the echo guest reflected
/// (`x-echo-*`), as `name: value` lines.
fn gateway_echo(node: &Node, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = agent().get(format!("{}{path}", node.gateway));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.call().unwrap();
    let reflected: Vec<String> = response
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-echo-"))
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
        .collect();
    (response.status().as_u16(), reflected.join("\n"))
}

fn deploy(node: &Node, args: &[&str]) -> (bool, String) {
    let (ok, stdout, stderr) = node.cli(&[&["deploy"], args].concat());
    (ok, format!("{stdout}{stderr}"))
}

#[test]
fn a_function_gets_its_environment_variables_and_the_secrets_it_exposes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let caps = crate::common::guest("caps");
    let caps = caps.to_str().unwrap();
    set_secret(&node, "api-key", "k-123");

    // A secret that does not exist yet is refused at deploy, naming it.
    let (ok, output) = deploy(&node, &["env", caps, "--env-secret", "TOKEN=missing"]);
    assert!(!ok && output.contains("`missing`"), "{output}");
    assert!(output.contains("mayfly secret set missing"), "{output}");
    // Names a shell could not export, and a name given twice over.
    for bad in [["--env", "1ST=x"], ["--env", "A-B=x"]] {
        let (ok, output) = deploy(&node, &[&["env", caps], &bad[..]].concat());
        assert!(
            !ok && output.contains("letters, digits and `_`"),
            "{output}"
        );
    }
    let (ok, output) = deploy(
        &node,
        &["env", caps, "--env", "KEY=x", "--env-secret", "KEY=api-key"],
    );
    assert!(
        !ok && output.contains("both a value and a secret"),
        "{output}"
    );

    let (ok, output) = deploy(
        &node,
        &[
            "env",
            caps,
            "--env",
            "GREETING=hi there",
            "-e",
            "EMPTY=",
            "--env",
            "WITH_EQUALS=a=b",
            "--env-secret",
            "API_KEY=api-key",
        ],
    );
    assert!(ok, "{output}");
    let (status, body) = node.invoke_get("env", "/env");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body, "API_KEY=k-123\nEMPTY=\nGREETING=hi there\nWITH_EQUALS=a=b\n",
        "exactly what was given, nothing of the node's own environment"
    );

    // The API shows the plain values (like Lambda's) and which secret
    // feeds a variable, never the secret's value.
    let function = node.admin_json("/v1/functions/env");
    let text = function.to_string();
    assert!(text.contains("\"GREETING\":\"hi there\""), "{text}");
    assert!(text.contains("\"API_KEY\":\"api-key\""), "{text}");
    assert!(!text.contains("k-123"), "{text}");

    // A rotated secret reaches the next fresh instance.
    set_secret(&node, "api-key", "k-456");
    let (_, body) = node.invoke_get("env", "/env");
    assert!(body.starts_with("API_KEY=k-456\n"), "{body}");

    // Without variables, a function's environment is empty.
    let (ok, output) = deploy(&node, &["bare", caps]);
    assert!(ok, "{output}");
    let (status, body) = node.invoke_get("bare", "/env");
    assert_eq!((status, body.as_str()), (200, ""));
}

#[test]
fn route_headers_tell_the_guest_how_it_was_reached_and_cannot_be_forged() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let echo = crate::common::guest("echo");
    let echo = echo.to_str().unwrap();
    let (ok, output) = deploy(&node, &["whole", echo, "--route", "/echo"]);
    assert!(ok, "{output}");
    let (ok, output) = deploy(
        &node,
        &["stripped", echo, "--route", "/api", "--strip-prefix"],
    );
    assert!(ok, "{output}");
    let port = node.gateway.rsplit(':').next().unwrap().to_string();

    let forged = [
        ("x-mayfly-client-addr", "203.0.113.9:1"),
        ("x-mayfly-path-info", "/forged"),
        ("x-mayfly-route", "/forged"),
        ("spin-client-addr", "203.0.113.9:1"),
        ("spin-full-url", "http://forged/"),
    ];
    let (status, seen) = gateway_echo(&node, "/echo/a/b?x=1", &forged);
    assert_eq!(status, 200, "{seen}");
    let expect = [
        "x-echo-path: /echo/a/b?x=1".to_string(),
        "x-echo-header-x-mayfly-route: /echo".to_string(),
        "x-echo-header-x-mayfly-path-info: /a/b".to_string(),
        format!("x-echo-header-x-mayfly-full-url: http://127.0.0.1:{port}/echo/a/b?x=1"),
        "x-echo-header-spin-path-info: /a/b".to_string(),
        format!("x-echo-header-spin-full-url: http://127.0.0.1:{port}/echo/a/b?x=1"),
    ];
    for line in &expect {
        assert!(seen.lines().any(|l| l == line), "no `{line}` in\n{seen}");
    }
    let client_addr: Vec<&str> = seen.lines().filter(|l| l.contains("client-addr")).collect();
    assert_eq!(client_addr.len(), 2, "{seen}");
    for line in client_addr {
        assert!(line.contains(": 127.0.0.1:"), "{line}");
    }
    assert!(
        !seen.contains("forged") && !seen.contains("203.0.113.9"),
        "{seen}"
    );

    // The route itself: empty path info.
    let (_, seen) = gateway_echo(&node, "/echo", &[]);
    assert!(
        seen.lines()
            .any(|l| l == "x-echo-header-x-mayfly-path-info: "),
        "{seen}"
    );

    // A stripped route: the guest sees the path below its prefix.
    let (_, seen) = gateway_echo(&node, "/api/users/7?page=2", &[]);
    assert!(
        seen.lines().any(|l| l == "x-echo-path: /users/7?page=2"),
        "{seen}"
    );
    assert!(
        seen.lines().any(|l| l
            == format!(
                "x-echo-header-x-mayfly-full-url: http://127.0.0.1:{port}/api/users/7?page=2"
            )),
        "{seen}"
    );
    let (_, seen) = gateway_echo(&node, "/api", &[]);
    assert!(seen.lines().any(|l| l == "x-echo-path: /"), "{seen}");

    // --strip-prefix names routes: without one it is an error.
    let (ok, output) = deploy(&node, &["nothing", echo, "--strip-prefix"]);
    assert!(!ok && output.contains("--route"), "{output}");
}

/// A manifest strips the prefix of the routes it names, and only those.
#[test]
fn a_manifest_strips_the_prefix_of_the_routes_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let echo = crate::common::guest("echo");
    std::fs::write(
        project.join("mayfly.toml"),
        format!(
            "[functions.both]\ncomponent = {:?}\nroutes = [\"/v1\", \"/v2\"]\nstrip_prefix = [\"/v2\"]\n\
             [functions.both.env]\nMODE = \"test\"\n",
            echo.display()
        ),
    )
    .unwrap();
    let output = node.cli_in(&project, &["deploy"]);
    assert!(output.status.success(), "{output:?}");
    let (_, seen) = gateway_echo(&node, "/v1/x", &[]);
    assert!(seen.lines().any(|l| l == "x-echo-path: /v1/x"), "{seen}");
    let (_, seen) = gateway_echo(&node, "/v2/x", &[]);
    assert!(seen.lines().any(|l| l == "x-echo-path: /x"), "{seen}");
    assert!(
        seen.lines()
            .any(|l| l == "x-echo-header-x-mayfly-route: /v2"),
        "{seen}"
    );
    let config = node.admin_json("/v1/functions/both").to_string();
    assert!(config.contains("\"strip_prefix\":[\"/v2\"]"), "{config}");
    assert!(config.contains("\"MODE\":\"test\""), "{config}");
}
