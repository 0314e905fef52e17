//! The README's "A function in five minutes", run as written: the blocks
//! marked `<!-- quickstart:node` and `<!-- quickstart:client` are read from
//! README.md itself, so the README and this test cannot drift apart.
//!
//! The one liberty taken: the node listens on free ports (through
//! `MAYFLY_LISTEN`/`MAYFLY_ADMIN_LISTEN`, and `localhost:8080` in the client
//! block becomes the gateway's port), since other tests run beside this
//! one. The user has a fresh HOME, the node runs in one folder and the
//! client block in another, and nothing tells the CLI where the node is:
//! it finds it through the profile the node registers.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::{eventually, guests};
use crate::login::{User, await_admin_url, free_ports, terminate_group, texts};

/// The shell block that follows `marker` in `readme`.
fn block_after<'a>(readme: &'a str, marker: &str) -> &'a str {
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}` marker"));
    let rest = &readme[at..];
    let start = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block's end");
    &rest[start..start + end]
}

/// About ten seconds: `mayfly new`'s project builds for the host (`cargo
/// test`) and for wasm32-wasip2 (`mayfly deploy`) in a target of its own.
#[test]
fn the_readme_quickstart_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let node_block = block_after(&readme, "<!-- quickstart:node");
    let client_block = block_after(&readme, "<!-- quickstart:client");
    // What the block's comments promise curl prints.
    let promised: Vec<&str> = client_block
        .lines()
        .filter(|line| line.trim_start().starts_with("curl "))
        .filter_map(|line| line.split_once('#').map(|(_, said)| said.trim()))
        .collect();
    assert!(!promised.is_empty(), "{client_block}");
    // The project's dependencies come from the cache the guests' build
    // filled, as in `new.rs`: the test needs no network.
    guests();

    let user = User::new();
    let [gateway_port, admin_port] = free_ports();
    let node_dir = user.folder("node");
    let mut node = user
        .command("sh", &node_dir)
        .args(["-ec", node_block])
        .env("MAYFLY_LISTEN", format!("127.0.0.1:{gateway_port}"))
        .env("MAYFLY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(user.dir.path().join("node.log")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let admin = await_admin_url(&mut node);
    // The node writes the profile right after printing its addresses.
    eventually(Duration::from_secs(10), "the node's profile", || {
        std::fs::read_to_string(user.config_file())
            .ok()
            .filter(|config| config.contains(&admin))
    });

    let script = client_block.replace("localhost:8080", &format!("localhost:{gateway_port}"));
    let output = user
        .command("sh", &user.folder("work"))
        .args(["-ec", &script])
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap();
    terminate_group(&mut node);
    let (ok, stdout, stderr) = texts(&output);
    let node_log = std::fs::read_to_string(user.dir.path().join("node.log")).unwrap_or_default();
    assert!(
        ok,
        "the README's client block failed:\n{stdout}\n{stderr}\nnode:\n{node_log}"
    );
    for said in promised {
        assert!(
            stdout.contains(said),
            "curl did not print `{said}`:\n{stdout}"
        );
    }
}
