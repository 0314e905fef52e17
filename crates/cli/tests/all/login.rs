//! CLI profiles: `mayfly login`, `logout`, `profile`, the precedence of
//! flags, variables and profiles, advice on a refused token, and a local
//! `mayfly serve` registering itself as the default profile. Each test runs
//! the CLI as a user would, in a HOME of its own.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, eventually};

/// A user of this machine with a fresh home folder: no CLI config, no
/// `MAYFLY_*` variables, the `mayfly` under test first on `PATH`, and the
/// machine's Rust toolchain (rustup and cargo find theirs through HOME
/// unless told).
pub struct User {
    /// Holds the home folder and the user's working folders.
    pub dir: tempfile::TempDir,
}

impl User {
    /// A user with an empty home folder.
    pub fn new() -> User {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        User { dir }
    }

    /// The user's HOME.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `~/.config/mayfly/config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.home().join(".config/mayfly/config.toml")
    }

    /// A folder of the user's, created if needed.
    pub fn folder(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// A command run by this user in `dir`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
        let real_home = std::env::home_dir().expect("a home folder");
        let toolchain_home = |var: &str, default: &str| {
            std::env::var_os(var).map_or_else(|| real_home.join(default), PathBuf::from)
        };
        let bin = Path::new(env!("CARGO_BIN_EXE_mayfly")).parent().unwrap();
        let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))
        .unwrap();
        let mut command = Command::new(program);
        command
            .current_dir(dir)
            .env("HOME", self.home())
            .env("PATH", path)
            .env("CARGO_HOME", toolchain_home("CARGO_HOME", ".cargo"))
            .env("RUSTUP_HOME", toolchain_home("RUSTUP_HOME", ".rustup"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MAYFLY_") {
                command.env_remove(name);
            }
        }
        command
    }

    /// Runs `mayfly <args>` in `dir` with extra variables.
    pub fn mayfly_with(&self, dir: &Path, vars: &[(&str, &str)], args: &[&str]) -> Output {
        let mut command = self.command(env!("CARGO_BIN_EXE_mayfly"), dir);
        command.args(args);
        for (name, value) in vars {
            command.env(name, value);
        }
        command.output().expect("mayfly runs")
    }

    /// Runs `mayfly <args>` in `dir`; returns (success, stdout, stderr).
    pub fn mayfly(&self, dir: &Path, args: &[&str]) -> (bool, String, String) {
        texts(&self.mayfly_with(dir, &[], args))
    }
}

/// (success, stdout, stderr) of a finished command.
pub fn texts(output: &Output) -> (bool, String, String) {
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `N` distinct loopback ports that were free a moment ago: for nodes that
/// must listen on fixed ports, as a user's do (drawn outside the ephemeral
/// range, see [`mayfly_nats::testing::free_port`]).
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| mayfly_nats::testing::free_port())
}

/// Reads a started node's stdout up to its admin API line and returns that
/// URL; the rest of its stdout is drained in the background.
pub fn await_admin_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let admin = loop {
        let line = lines
            .next()
            .expect("mayfly serve printed its addresses")
            .expect("readable stdout");
        if let Some(url) = line.strip_prefix("admin API listening on ") {
            break url.to_string();
        }
    };
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    admin
}

/// Stops a process (and any children it started in its group) with
/// SIGTERM and waits for it.
pub fn terminate_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let _ = child.wait();
}

/// `mayfly profile list --json`, as the user sees it.
fn profiles(user: &User, dir: &Path) -> Value {
    let (ok, stdout, stderr) = user.mayfly(dir, &["profile", "list", "--json"]);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn login_saves_profiles_that_every_verb_uses_from_any_folder() {
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(data.path());
    let admin = node.admin.as_str();
    let user = User::new();
    let elsewhere = user.folder("elsewhere");

    // No token anywhere: the error names the login to run.
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["--admin-url", admin, "list"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "needs a token: run `mayfly login --admin-url {admin} --token TOKEN` (the node \
             printed its token file at start)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("token create"), "{stderr}");

    // A login without a token, or with a wrong one, saves nothing.
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["login", "--admin-url", admin]);
    assert!(!ok);
    assert!(stderr.contains("no token: run `mayfly login"), "{stderr}");
    assert!(stderr.contains("--data-dir DIR"), "{stderr}");
    let (ok, _, stderr) = user.mayfly(
        &elsewhere,
        &["login", "--admin-url", admin, "--token", "mf_wrong"],
    );
    assert!(!ok);
    assert!(stderr.contains("does not know this token"), "{stderr}");
    assert!(!user.config_file().exists());

    // Reading the local node's token with --data-dir: the first profile
    // becomes the default, in a file only the user can read.
    let data_dir = data.path().to_str().unwrap();
    let (ok, stdout, stderr) = user.mayfly(
        &elsewhere,
        &["login", "--admin-url", admin, "--data-dir", data_dir],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("as profile `default`, the default"),
        "{stdout}"
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(user.config_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (ok, stdout, stderr) = user.mayfly(&elsewhere, &["list"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("no functions deployed"), "{stdout}");

    // A second, read-only profile that is not the default.
    let (ok, read_token, stderr) = user.mayfly(
        &elsewhere,
        &["token", "create", "--name", "reader", "--scope", "read"],
    );
    assert!(ok, "{stderr}");
    let read_token = read_token.trim().to_string();
    let (ok, stdout, stderr) = user.mayfly(
        &elsewhere,
        &[
            "login",
            "--profile",
            "reader",
            "--admin-url",
            admin,
            "--token",
            &read_token,
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mayfly profile use reader"), "{stdout}");
    let (ok, listing, stderr) = user.mayfly(&elsewhere, &["profile", "list"]);
    assert!(ok, "{stderr}");
    assert!(listing.contains("* default"), "{listing}");
    assert!(listing.contains("  reader"), "{listing}");
    assert!(
        !listing.contains(&read_token) && !listing.contains(&node.token),
        "tokens are never listed: {listing}"
    );

    // --profile and MAYFLY_PROFILE pick a profile; a missing one is named.
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["--profile", "reader", "list"]);
    assert!(ok, "{stderr}");
    let output = user.mayfly_with(&elsewhere, &[("MAYFLY_PROFILE", "nope")], &["list"]);
    let (ok, _, stderr) = texts(&output);
    assert!(!ok);
    assert!(
        stderr.contains("no profile `nope`")
            && stderr.contains("mayfly login --profile nope --admin-url URL --token TOKEN"),
        "{stderr}"
    );

    // MAYFLY_TOKEN beats the profile, and a refusal says where it came from.
    let output = user.mayfly_with(&elsewhere, &[("MAYFLY_TOKEN", "mf_wrong")], &["list"]);
    let (ok, _, stderr) = texts(&output);
    assert!(!ok);
    assert!(
        stderr.contains("refused the token from --token or MAYFLY_TOKEN"),
        "{stderr}"
    );

    // A login for another node does not overwrite the default unasked.
    let (ok, _, stderr) = user.mayfly(
        &elsewhere,
        &[
            "login",
            "--admin-url",
            "http://127.0.0.1:9",
            "--token",
            "x",
            "--no-verify",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("with --profile NAME"), "{stderr}");

    // A revoked token: the advice names the profile and its login.
    let tokens: Value = {
        let (ok, stdout, stderr) = user.mayfly(&elsewhere, &["token", "list", "--json"]);
        assert!(ok, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let reader_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "reader")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["token", "revoke", &reader_id]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["--profile", "reader", "list"]);
    assert!(!ok);
    assert!(
        stderr.contains("refused the token of profile `reader`")
            && stderr.contains(&format!(
                "run `mayfly login --profile reader --admin-url {admin} --token TOKEN`"
            )),
        "{stderr}"
    );

    // profile use, then logout of the default and of a named profile.
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["profile", "use", "reader"]);
    assert!(ok, "{stderr}");
    assert_eq!(profiles(&user, &elsewhere)["default"], "reader");
    let (ok, stdout, stderr) = user.mayfly(&elsewhere, &["logout"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("removed profile `reader`"), "{stdout}");
    let after = profiles(&user, &elsewhere);
    assert_eq!(after["default"], Value::Null);
    assert_eq!(after["profiles"].as_array().unwrap().len(), 1);
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["logout", "--profile", "default"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        profiles(&user, &elsewhere)["profiles"],
        serde_json::json!([])
    );
}

#[test]
fn a_local_node_registers_itself_as_the_default_profile() {
    use std::os::unix::process::CommandExt as _;
    let user = User::new();
    let start = |folder: &str, [gateway_port, admin_port]: [u16; 2]| {
        let dir = user.folder(folder);
        let mut child = user
            .command(env!("CARGO_BIN_EXE_mayfly"), &dir)
            .arg("serve")
            .env("MAYFLY_LISTEN", format!("127.0.0.1:{gateway_port}"))
            .env("MAYFLY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let admin = await_admin_url(&mut child);
        (child, admin, dir)
    };
    let first_ports = free_ports();
    let (mut first, admin, first_dir) = start("first", first_ports);
    let stderr = || std::fs::read_to_string(first_dir.join("stderr")).unwrap();
    eventually(Duration::from_secs(10), "the registration", || {
        stderr()
            .contains("registered this node as the CLI's default profile `local`")
            .then_some(())
    });
    let token_file = std::fs::canonicalize(first_dir.join(".mayfly/admin.token")).unwrap();
    assert!(
        stderr().contains(&format!("admin token in {}", token_file.display())),
        "{}",
        stderr()
    );
    let listed = profiles(&user, &user.folder("elsewhere"));
    assert_eq!(listed["default"], "local");
    assert_eq!(listed["profiles"][0]["admin_url"], admin.as_str());
    assert_eq!(listed["profiles"][0]["token"], "file");
    assert_eq!(
        listed["profiles"][0]["token_file"],
        token_file.to_str().unwrap()
    );

    // A second node finds a default profile and leaves it alone.
    let (mut second, _, second_dir) = start("second", free_ports());
    let (ok, _, stderr) = user.mayfly(&user.folder("elsewhere"), &["status"]);
    assert!(ok, "{stderr}");
    terminate_group(&mut second);
    let second_stderr = std::fs::read_to_string(second_dir.join("stderr")).unwrap();
    assert!(
        !second_stderr.contains("registered this node"),
        "{second_stderr}"
    );
    assert_eq!(profiles(&user, &user.folder("elsewhere")), listed);

    // With the second node gone, the profile still reaches the first.
    let (ok, _, stderr) = user.mayfly(&user.folder("elsewhere"), &["status"]);
    assert!(ok, "{stderr}");

    // A node started from another folder on the same ports (the first
    // node's, free again) has another token: the profile follows it.
    terminate_group(&mut first);
    let (mut third, third_admin, third_dir) = start("third", first_ports);
    assert_eq!(third_admin, admin);
    let third_stderr = || std::fs::read_to_string(third_dir.join("stderr")).unwrap();
    eventually(Duration::from_secs(10), "the profile to follow", || {
        third_stderr()
            .contains("the CLI profile `local`")
            .then_some(())
    });
    let (ok, _, stderr) = user.mayfly(&user.folder("elsewhere"), &["status"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        profiles(&user, &user.folder("elsewhere"))["default"],
        "local"
    );
    terminate_group(&mut third);

    // No node there any more: the error says which profile named the URL.
    let (ok, _, stderr) = user.mayfly(&user.folder("elsewhere"), &["status"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "cannot reach the admin API at {admin} (the URL of profile `local`)"
        )),
        "{stderr}"
    );
}

#[test]
fn login_reads_a_local_nodes_token_only_with_consent() {
    let user = User::new();
    let node_dir = user.folder("node");
    let node = Node::start(&node_dir.join(".mayfly"));
    let admin = node.admin.as_str();

    // Not on a terminal: no question, and the error names the flag.
    let (ok, _, stderr) = user.mayfly(&node_dir, &["login", "--admin-url", admin]);
    assert!(!ok);
    assert!(
        stderr.contains("found .mayfly/admin.token; pass --data-dir .mayfly to use it"),
        "{stderr}"
    );

    // On a terminal (`script` gives the CLI one), it asks; only a yes reads it.
    let on_a_terminal = |answer: &str| {
        let login = format!("{} login --admin-url {admin}", env!("CARGO_BIN_EXE_mayfly"));
        let mut child = user
            .command("script", &node_dir)
            .args(["-qec", &login, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux) runs");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        texts(&child.wait_with_output().unwrap())
    };
    let (ok, said, _) = on_a_terminal("n");
    assert!(!ok, "{said}");
    assert!(
        said.contains("Read the admin token of the node at"),
        "{said}"
    );
    assert!(!user.config_file().exists());
    let (ok, said, _) = on_a_terminal("y");
    assert!(ok, "{said}");
    assert!(said.contains("as profile `default`, the default"), "{said}");
    let (ok, _, stderr) = user.mayfly(&user.folder("elsewhere"), &["list"]);
    assert!(ok, "{stderr}");
}

#[test]
fn a_local_https_node_registers_its_certificate_to_trust() {
    use std::os::unix::process::CommandExt as _;
    let user = User::new();
    let dir = user.folder("node");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).unwrap();
    let [gateway_port, admin_port] = free_ports();
    let mut node = user
        .command(env!("CARGO_BIN_EXE_mayfly"), &dir)
        .args(["serve", "--tls-cert", "cert.pem", "--tls-key", "key.pem"])
        .env("MAYFLY_LISTEN", format!("127.0.0.1:{gateway_port}"))
        .env("MAYFLY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let admin = await_admin_url(&mut node);
    assert!(admin.starts_with("https://"), "{admin}");
    let elsewhere = user.folder("elsewhere");
    let listed = eventually(Duration::from_secs(10), "the node's profile", || {
        user.config_file()
            .exists()
            .then(|| profiles(&user, &elsewhere))
    });
    let cert_file = std::fs::canonicalize(dir.join("cert.pem")).unwrap();
    assert_eq!(
        listed["profiles"][0]["ca_cert"],
        cert_file.to_str().unwrap()
    );
    let (ok, _, stderr) = user.mayfly(&elsewhere, &["status"]);
    terminate_group(&mut node);
    assert!(ok, "{stderr}");
}
