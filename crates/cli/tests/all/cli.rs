//! CLI conventions with the real binary: `--json` errors, errors that name
//! the user's flags, and what `rollback` says.

use serde_json::Value;

use crate::common::Node;

/// stderr as the one JSON object `--json` prints for a failure.
fn json_error(stderr: &str) -> Value {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn with_json_a_failing_verb_prints_one_json_error_with_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());

    let (ok, stdout, stderr) = node.cli(&["--json", "versions", "nosuchfn"]);
    assert!(!ok && stdout.is_empty(), "{stdout}{stderr}");
    let error = json_error(&stderr);
    assert_eq!(error["error"]["status"], 404, "{error}");
    assert_eq!(error["error"]["code"], "not_found", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("nosuchfn"), "{error}");
    assert!(!message.contains("HTTP"), "the status is a field: {error}");

    // The same failure without --json is the usual line of text.
    let (ok, _, stderr) = node.cli(&["versions", "nosuchfn"]);
    assert!(!ok && stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("(HTTP 404 Not Found)"), "{stderr}");

    // A refused token is the admin API's 401, with what to run.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["--json", "list"])
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", "not-a-token")
        .output()
        .unwrap();
    let error = json_error(&String::from_utf8_lossy(&output.stderr));
    assert_eq!(error["error"]["status"], 401, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mayfly login"),
        "{error}"
    );

    // A command line the CLI refuses itself: no status (the API was not
    // asked), clap's exit code 2, and the flag named.
    let (ok, _, stderr) = node.cli(&["--json", "deploy", "f", "f.wasm", "--timeout", "soon"]);
    assert!(!ok);
    let error = json_error(&stderr);
    assert!(error["error"].get("status").is_none(), "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--timeout"),
        "{error}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["--json", "deploy", "f", "f.wasm", "--timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn errors_name_the_flags_the_user_gave_not_the_apis_fields() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = crate::common::guest("hello");
    let hello = hello.to_str().unwrap();

    // Bounds the CLI knows (the platform's constants) are clap's to refuse,
    // before the component is uploaded.
    let (ok, _, stderr) = node.cli(&["deploy", "f", hello, "--timeout", "16m"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("'--timeout <TIMEOUT>'") && stderr.contains("give 1ms to 15m"),
        "{stderr}"
    );
    let (ok, _, stderr) = node.cli(&["deploy", "f", hello, "--max-queued", "10001"]);
    assert!(
        !ok && stderr.contains("'--max-queued <N>': give 0 to 10000"),
        "{stderr}"
    );

    // Bounds only the node knows come back from it, its field names turned
    // into the flags given.
    let (ok, _, stderr) = node.cli(&["deploy", "f", hello, "--memory", "999999"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("`--memory` is 999999") && !stderr.contains("memory_mb"),
        "{stderr}"
    );
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "f",
        hello,
        "--max-concurrency",
        "2",
        "--reserved-concurrency",
        "3",
    ]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("`--reserved-concurrency` is 3: give at most `--max-concurrency` (2)"),
        "{stderr}"
    );
    assert_eq!(node.get("/f").0, 404, "nothing was deployed");

    let (ok, _, stderr) = node.cli(&["usage", "--since", "yesterday-ish"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("`--since` is `yesterday-ish`") && !stderr.contains("`from`"),
        "{stderr}"
    );
    let (ok, _, stderr) = node.cli(&["usage", "--since", "1h", "--until", "2h"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("`--since`") && stderr.contains("`--until`"),
        "{stderr}"
    );

    // The admin API itself still names its own fields for its own users.
    let response = crate::common::agent()
        .get(format!("{}/v1/usage?from=yesterday-ish", node.admin))
        .header("authorization", node.bearer())
        .call()
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.into_body().read_json().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`from` is `yesterday-ish`"), "{body}");
}

#[test]
fn rollback_says_a_second_one_returns_and_how_to_go_further_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("r", "hello", &["/r"]);
    node.deploy("r", "echo", &["/r"]);
    node.deploy("r", "logs", &["/r"]);

    let (ok, stdout, stderr) = node.cli(&["rollback", "r"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "live: 3 -> 2", "{stdout}");
    assert!(
        lines[1].contains("a second `mayfly rollback r` returns live to 3")
            && lines[1].contains("`mayfly alias set r live VERSION`"),
        "{stdout}"
    );
    // And it does: the second rollback comes back to 3, not on to 1.
    let (ok, stdout, stderr) = node.cli(&["rollback", "r"]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("live: 2 -> 3\n"), "{stdout}");
    // The way further back that it names works.
    let (ok, _, stderr) = node.cli(&["alias", "set", "r", "live", "1"]);
    assert!(ok, "{stderr}");
    assert_eq!(node.admin_json("/v1/functions/r")["live"]["version"], 1);

    // --help says the same before anyone runs it.
    let (ok, help, _) = node.cli(&["rollback", "--help"]);
    assert!(ok);
    assert!(
        help.contains("Running it again returns to the version it left")
            && help.contains("mayfly alias set NAME live VERSION"),
        "{help}"
    );
}
