//! Storage faults (issue 15, findings 7, 8, 9 and 13's file modes):
//! damaged compiled artifacts, a full disk, two nodes on one data
//! directory, and who may read the data files.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{Node, agent, eventually};

/// The compiled artifact files of a data directory (named by their 64-hex
/// cache key; sidecars and temporary files excluded).
fn artifacts(data_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(data_dir.join("blobs/artifacts"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect();
    found.sort();
    found
}

/// The one artifact of a data directory with one function deployed.
fn only_artifact(data_dir: &Path) -> PathBuf {
    let found = artifacts(data_dir);
    assert_eq!(found.len(), 1, "expected one artifact: {found:?}");
    found.into_iter().next().unwrap()
}

/// The file range of the ELF section `name` (64-bit little-endian, as
/// wasmtime writes its artifacts).
fn elf_section(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    let u64_at = |at: usize| {
        usize::try_from(u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())).unwrap()
    };
    assert_eq!(&bytes[..4], b"\x7fELF", "artifacts are ELF files");
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |index: usize| shoff + index * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .find_map(|index| {
            let at = header(index);
            let name_at =
                strtab + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let end = bytes[name_at..].iter().position(|&b| b == 0).unwrap();
            (&bytes[name_at..name_at + end] == name.as_bytes()).then(|| {
                let offset = u64_at(at + 0x18);
                offset..offset + u64_at(at + 0x20)
            })
        })
        .unwrap_or_else(|| panic!("no {name} section in the artifact"))
}

/// Overwrites the artifact's machine code with `0x06`, an invalid opcode
/// in 64-bit mode: the code that runs first raises SIGILL if it is trusted.
fn corrupt_code(artifact: &Path) {
    let mut bytes = std::fs::read(artifact).unwrap();
    let text = elf_section(&bytes, ".text");
    assert!(!text.is_empty());
    bytes[text].fill(0x06);
    // In place, as a disk or a stray writer would.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(artifact)
        .unwrap();
    file.write_all(&bytes).unwrap();
    file.sync_all().unwrap();
}

fn truncate_to_half(artifact: &Path) {
    let len = std::fs::metadata(artifact).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(artifact)
        .unwrap();
    file.set_len(len / 2).unwrap();
    file.sync_all().unwrap();
}

fn recompiles(node: &Node) -> u64 {
    let metrics = node.metrics();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("mayfly_artifact_recompiles_total "))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no mayfly_artifact_recompiles_total in\n{metrics}"))
}

#[test]
fn a_flipped_artifact_never_crashes_the_node_and_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    // A deployed function stays cold: its first request loads the
    // artifact from disk, damaged now.
    corrupt_code(&only_artifact(dir.path()));
    let (status, body) = node.get("/hello");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello"), "{body}");
    assert_eq!(node.get("/hello").0, 200);
    assert_eq!(recompiles(&node), 1);
    node.stop();

    // Damaged while the node was down: the next start must not trust it.
    corrupt_code(&only_artifact(dir.path()));
    let node = Node::start(dir.path());
    let (status, body) = node.get("/hello");
    assert_eq!(status, 200, "{body}");
    assert_eq!(node.get("/hello").0, 200);
    assert!(recompiles(&node) <= 1);
    node.stop();
    // Healed for good: a clean start compiles nothing.
    let node = Node::start(dir.path());
    assert_eq!(node.get("/hello").0, 200);
    assert_eq!(recompiles(&node), 0);
}

#[test]
fn a_truncated_artifact_is_recompiled_and_an_unchanged_redeploy_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    let artifact = only_artifact(dir.path());
    let intact = std::fs::read(&artifact).unwrap();

    // Deployed functions are cold: the first request loads the artifact.
    truncate_to_half(&artifact);
    let (status, body) = node.get("/hello");
    assert_eq!(status, 200, "{body}");
    assert_eq!(recompiles(&node), 1);
    assert_eq!(std::fs::read(&artifact).unwrap().len(), intact.len());

    // An unchanged redeploy checks the artifact too and rewrites it.
    node.stop();
    truncate_to_half(&artifact);
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(
        std::fs::read(&artifact).unwrap().len(),
        intact.len(),
        "the redeploy left the artifact truncated"
    );
    let (status, body) = node.get("/hello");
    assert_eq!(status, 200, "{body}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `8m`) on a new folder, or `None` with
    /// a message when this machine does not allow it.
    fn mount(parent: &Path, size: &str) -> Option<Tmpfs> {
        let at = parent.join("small-disk");
        std::fs::create_dir(&at).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs(at)),
            Ok(output) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here (needs root): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount: {error}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tmp-"))
            {
                found.push(path);
            }
        }
    }
    found
}

fn admin_put(node: &Node, path: &str, body: &[u8]) -> (u16, String) {
    let mut response = agent()
        .put(format!("{}{path}", node.admin))
        .header("authorization", node.bearer())
        .send(body)
        .unwrap();
    (
        response.status().as_u16(),
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// Fills the filesystem of `path` with one file; returns it.
fn fill_disk(folder: &Path) -> PathBuf {
    let filler = folder.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0xa5_u8; 64 * 1024];
    loop {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    // The last bytes a partial chunk left room for.
    while file.write_all(&[0xa5]).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[test]
fn a_full_disk_answers_507_leaves_no_temp_files_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(dir.path(), "8m") else {
        return;
    };
    let data_dir = disk.0.join("data");
    let node = Node::start(&data_dir);
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/hello").0, 200);

    // An upload larger than the disk fails and must not keep its space.
    let (status, body) = admin_put(&node, "/v1/buckets/b/objects/huge", &vec![7; 9 << 20]);
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    assert_eq!(temp_files(&disk.0), Vec::<PathBuf>::new());
    let (status, body) = admin_put(&node, "/v1/kv/settings/mode", b"x");
    assert_eq!(status, 200, "a failed upload kept the disk full: {body}");

    // A disk that really is full: refused with 507, nothing left behind.
    let filler = fill_disk(&disk.0);
    let (status, body) = admin_put(&node, "/v1/buckets/b/objects/small", &[1; 64 * 1024]);
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    assert_eq!(temp_files(&disk.0), Vec::<PathBuf>::new());
    let (ok, stdout, stderr) = node.cli(&[
        "deploy",
        "echo",
        crate::common::guest("echo").to_str().unwrap(),
        "--route",
        "/echo",
    ]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("disk is full"), "{stderr}");
    assert_eq!(temp_files(&disk.0), Vec::<PathBuf>::new());
    // Functions already deployed keep serving.
    assert_eq!(node.get("/hello").0, 200);

    // Space comes back: the node recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = eventually(Duration::from_secs(20), "writes to resume", || {
        let answer = admin_put(&node, "/v1/buckets/b/objects/small", &[1; 64 * 1024]);
        (answer.0 != 507).then_some(answer)
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_put(&node, "/v1/kv/settings/mode", b"y").0, 200);
    node.deploy("echo", "echo", &["/echo"]);
    assert_eq!(node.request("POST", "/echo", b"back").1, b"back");
    assert_eq!(node.get("/hello").0, 200);
    drop(node);
    drop(disk);
}

/// A token with only `scopes`, made through the admin API.
fn token_with(node: &Node, scopes: &[&str]) -> String {
    let body = serde_json::json!({"name": "reader", "scopes": scopes});
    let mut response = agent()
        .post(format!("{}/v1/tokens", node.admin))
        .header("authorization", node.bearer())
        .send(body.to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let created: serde_json::Value = response.body_mut().read_json().unwrap();
    created["token"].as_str().unwrap().to_string()
}

#[test]
fn a_refusal_that_cannot_be_audited_is_not_answered_as_if_it_were() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(dir.path(), "8m") else {
        return;
    };
    let data_dir = disk.0.join("data");
    let node = Node::start(&data_dir);
    let reader = token_with(&node, &["read"]);
    let forbidden = |i: usize| {
        agent()
            .delete(format!(
                "{}/v1/functions/f{}",
                node.admin,
                "x".repeat(400 + i)
            ))
            .header("authorization", format!("Bearer {reader}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(forbidden(0), 403);
    // The audit database's write-ahead log may have room left in pages it
    // already holds: send refusals until it needs a new one.
    let filler = fill_disk(&disk.0);
    let mut statuses = Vec::new();
    for i in 0..400 {
        statuses.push(forbidden(i));
        if statuses.last() != Some(&403) {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&507),
        "refusals answered 403 without an audit record: {} of them",
        statuses.len()
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(forbidden(0), 403);
    drop(node);
    drop(disk);
}

#[test]
fn a_second_node_on_the_same_data_directory_refuses_to_start_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = Node::start(dir.path());
    let mut second = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A node that starts prints its addresses; one that refuses exits.
    let started = BufReader::new(second.stdout.take().unwrap())
        .lines()
        .next()
        .and_then(Result::ok);
    if let Some(line) = started {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second node started on the same data directory: {line}");
    }
    let output = second.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let pid = first.pid().to_string();
    assert!(
        stderr.contains(&format!("pid {pid}")) && stderr.contains("in use"),
        "the refusal should name the first node's pid {pid}: {stderr}"
    );
    // The first node is unharmed, and once it stops the directory is free.
    assert_eq!(first.admin_json("/v1/functions"), serde_json::json!([]));
    first.stop();
    let again = Node::start(dir.path());
    assert_eq!(again.admin_json("/v1/functions"), serde_json::json!([]));
}

fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = vec![(
        dir.to_path_buf(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            found.push((path.clone(), meta.permissions().mode() & 0o777));
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

fn assert_private(dir: &Path) {
    let open: Vec<_> = modes(dir)
        .into_iter()
        .filter(|(path, mode)| {
            let wanted = if path.is_dir() { 0o700 } else { 0o600 };
            *mode != wanted
        })
        .map(|(path, mode)| format!("{} {mode:o}", path.display()))
        .collect();
    assert!(open.is_empty(), "not private to the node's user: {open:#?}");
}

#[test]
fn the_data_directory_and_its_files_are_private_to_the_node_user() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let node = Node::start(&data_dir);
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/hello").0, 200);
    assert_eq!(
        admin_put(&node, "/v1/buckets/b/objects/o", b"object").0,
        200
    );
    assert_private(&data_dir);
    node.stop();

    // A data directory from an older node: opened up, then tightened.
    // (Its key files were 0600 already, and a node refuses a key that is
    // not: those stay as they were.)
    for (path, _) in modes(&data_dir) {
        if path.extension().is_some_and(|e| e == "key") {
            continue;
        }
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let node = Node::start(&data_dir);
    assert_eq!(node.get("/hello").0, 200);
    assert_private(&data_dir);
}
