//! `mayfly dev`: a node in the foreground that serves a project, prints its
//! logs, and rebuilds and redeploys it when its sources change.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{agent, guests};

/// Which of the dev process's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A running `mayfly dev` and everything it printed so far.
struct Dev {
    child: Child,
    output: Arc<Mutex<Vec<(Stream, String)>>>,
    /// The threads reading its stdout and stderr.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Dev {
    fn start(project: &Path, target_dir: &Path) -> Dev {
        Self::start_with(
            project,
            target_dir,
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        )
    }

    /// `mayfly dev <flags>` in `project`.
    fn start_with(project: &Path, target_dir: &Path, flags: &[&str]) -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .current_dir(project)
            .arg("dev")
            .args(flags)
            // The build command (`cargo build …`) inherits these: the shared
            // target folder, and the crates the guests' build downloaded.
            .env("CARGO_TARGET_DIR", target_dir)
            .env("CARGO_NET_OFFLINE", "true")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mayfly dev starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            Self::collect(child.stdout.take().unwrap(), Stream::Stdout, &output),
            Self::collect(child.stderr.take().unwrap(), Stream::Stderr, &output),
        ];
        Dev {
            child,
            output,
            readers,
        }
    }

    fn collect(
        pipe: impl Read + Send + 'static,
        stream: Stream,
        output: &Arc<Mutex<Vec<(Stream, String)>>>,
    ) -> std::thread::JoinHandle<()> {
        let output = Arc::clone(output);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                output.lock().unwrap().push((stream, line));
            }
        })
    }

    /// How many lines it has printed.
    fn printed(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    /// The lines printed after the first `after` that `matches`.
    fn lines(&self, after: usize, matches: impl Fn(Stream, &str) -> bool) -> Vec<String> {
        self.output
            .lock()
            .unwrap()
            .iter()
            .skip(after)
            .filter(|(stream, line)| matches(*stream, line))
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Waits for the process to exit and for everything it printed; its
    /// status.
    fn exit_status(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its pipes are closed (it started no build): the readers
                // end once they have read the last line.
                for reader in self.readers.drain(..) {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "mayfly dev did not exit:\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything printed, for failure messages.
    fn transcript(&self) -> String {
        let output = self.output.lock().unwrap();
        let mut text = String::new();
        for (stream, line) in output.iter() {
            let tag = if *stream == Stream::Stdout {
                "out"
            } else {
                "err"
            };
            text.push_str(&format!("{tag}| {line}\n"));
        }
        text
    }

    /// Waits for a line, printed after the first `after` lines, that
    /// `matches`; returns it.
    fn wait_for(
        &mut self,
        after: usize,
        timeout: Duration,
        what: &str,
        matches: impl Fn(Stream, &str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .output
                .lock()
                .unwrap()
                .iter()
                .skip(after)
                .find(|(stream, line)| matches(*stream, line))
                .map(|(_, line)| line.clone());
            if let Some(line) = found {
                return line;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "mayfly dev exited ({status}) before {what}:\n{}",
                    self.transcript()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs a URL; returns (status, body), or (0, error) when it cannot connect.
fn get(url: &str) -> (u16, String) {
    match agent().get(url).call() {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// Polls `url` every 100 ms until it answers 200 with `body`.
fn wait_for_body(dev: &Dev, url: &str, body: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get(url);
        if answer == (200, body.to_string()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {body:?} from {url} (last answer {answer:?}):\n{}",
            dev.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dev_serves_rebuilds_on_change_and_prints_logs() {
    let started = Instant::now();
    // The same shared build folder as the `new` tests, so runs reuse it.
    let target_dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/new-template");
    // The guests' build downloads wasip2, which the project needs too.
    guests();
    std::fs::create_dir_all(&target_dir).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .current_dir(dir.path())
        .args(["new", "devfn"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let project = dir.path().join("devfn");
    std::os::unix::fs::symlink(&target_dir, project.join("target")).unwrap();
    let prepared = started.elapsed();

    let mut dev = Dev::start(&project, &target_dir);
    let line = dev.wait_for(0, Duration::from_secs(30), "the gateway URL", |s, l| {
        s == Stream::Stdout && l.starts_with("gateway listening on ")
    });
    let gateway = line["gateway listening on ".len()..].to_string();
    let url = format!("{gateway}/devfn");
    // The first build may compile the template's dependencies.
    dev.wait_for(0, Duration::from_secs(300), "the first deploy", |s, l| {
        s == Stream::Stdout && l.contains("devfn: version 1 deployed, routes /devfn")
    });
    let deployed = started.elapsed();
    assert_eq!(get(&url), (200, "Hello, world!\n".to_string()));
    dev.wait_for(
        0,
        Duration::from_secs(10),
        "the request's log line",
        |s, l| s == Stream::Stdout && l.starts_with("[devfn v1] GET /devfn -> 200"),
    );

    // An edit is rebuilt and served.
    let lib = project.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    let edited = source.replace("\"Hello, {}!\\n\"", "\"Good day, {}!\\n\"");
    assert_ne!(edited, source, "the template's greeting moved");
    std::fs::write(&lib, &edited).unwrap();
    wait_for_body(&dev, &url, "Good day, world!\n", Duration::from_secs(120));
    let redeployed = started.elapsed();
    dev.wait_for(
        0,
        Duration::from_secs(10),
        "the new version's log line",
        |s, l| s == Stream::Stdout && l.starts_with("[devfn v2] GET /devfn -> 200"),
    );

    // A broken build is reported; the last good version keeps serving.
    let before_break = dev.printed();
    std::fs::write(&lib, format!("{edited}\nfn broken( {{\n")).unwrap();
    dev.wait_for(
        before_break,
        Duration::from_secs(120),
        "the build failure",
        |s, l| s == Stream::Stderr && l.contains("still serving the last good version"),
    );
    dev.wait_for(
        before_break,
        Duration::from_secs(1),
        "the build's error",
        |s, l| s == Stream::Stderr && l.contains("--> src/lib.rs"),
    );
    dev.wait_for(
        before_break,
        Duration::from_secs(1),
        "the failed build's summary",
        |s, l| s == Stream::Stderr && l.contains("the build of `devfn`") && l.contains("failed"),
    );
    assert_eq!(get(&url), (200, "Good day, world!\n".to_string()));
    let broken = started.elapsed();

    // SIGTERM stops the node cleanly.
    let pid = dev.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mayfly dev did not stop on SIGTERM:\n{}",
            dev.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "mayfly dev exited with {status}:\n{}",
        dev.transcript()
    );
    eprintln!(
        "dev: prepared {prepared:?}, first deploy {deployed:?}, edit served {redeployed:?}, \
         broken build reported {broken:?}, stopped {:?}",
        started.elapsed()
    );
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .count()
}

#[test]
fn stopping_dev_ends_a_running_build() {
    let project = tempfile::tempdir().unwrap();
    std::fs::copy(
        guests().join("hello.wasm"),
        project.path().join("hello.wasm"),
    )
    .unwrap();
    // A build that would outlive the test; its duration is unique to it.
    let marker = format!("sleep 3000.{}", std::process::id());
    std::fs::write(
        project.path().join("mayfly.toml"),
        format!(
            "[functions.slow]\ncomponent = \"hello.wasm\"\nbuild = \"{marker}\"\n\
             routes = [\"/slow\"]\n"
        ),
    )
    .unwrap();
    let mut dev = Dev::start(project.path(), project.path());
    dev.wait_for(0, Duration::from_secs(30), "the build", |_, line| {
        line.contains("building with")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_with(&marker) == 0 {
        assert!(Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM to `mayfly dev` alone, as a process manager sends it.
    let pid = dev.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "{status}:\n{}", dev.transcript());
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with(&marker) > 0 {
        assert!(
            Instant::now() < deadline,
            "the build outlived mayfly dev:\n{}",
            dev.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A project whose build is a shell script, as a Python or JavaScript
/// toolchain's would be: it copies the guest named in `source.txt` to
/// `app.wasm` in the project folder, leaves bytecode in `__pycache__/`, and
/// counts its runs in a file outside the project.
fn script_project() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("app");
    std::fs::create_dir(&project).unwrap();
    let runs = dir.path().join("build-runs");
    let write = |file: &str, text: String| std::fs::write(project.join(file), text).unwrap();
    write(
        "source.txt",
        guests().join("hello.wasm").display().to_string(),
    );
    write("notes.txt", "first\n".to_string());
    write(".gitignore", "*.log\n".to_string());
    write(
        "build.sh",
        format!(
            "set -e\necho run >> '{}'\nmkdir -p __pycache__\n\
             echo bytecode > __pycache__/app.cpython-312.pyc\ncp \"$(cat source.txt)\" app.wasm\n",
            runs.display()
        ),
    );
    write(
        "mayfly.toml",
        "[functions.app]\ncomponent = \"app.wasm\"\nbuild = \"sh build.sh\"\n\
         routes = [\"/app\"]\n"
            .to_string(),
    );
    (dir, project, runs)
}

/// Saves `text` as `project/file` the way editors do, written beside the
/// project and renamed into place: one file event, so one round however
/// slowly the test runs.
fn save(project: &Path, file: &str, text: &str) {
    let staged = project.with_extension("saving");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, project.join(file)).unwrap();
}

/// Waits until a file written now gets a later modification time than
/// `file` has (file times advance in clock ticks of a few ms).
fn wait_for_the_clock_to_pass(file: &Path) {
    let mark = std::fs::metadata(file).unwrap().modified().unwrap();
    let probe = file.with_extension("probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::fs::write(&probe, "tick").unwrap();
        if std::fs::metadata(&probe).unwrap().modified().unwrap() > mark {
            return;
        }
        assert!(Instant::now() < deadline, "the file clock did not advance");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many times the script project's build ran.
fn build_runs(runs: &Path) -> usize {
    std::fs::read_to_string(runs)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

#[test]
fn dev_with_a_script_build_deploys_once_per_source_change() {
    script_build_round_trip(&[]);
}

#[test]
fn dev_with_a_script_build_deploys_once_per_source_change_when_polling() {
    script_build_round_trip(&["--poll"]);
}

/// A source change is built and deployed once, the build's own output
/// starts no round, and a round whose component is the same is not
/// deployed; `extra`: more flags for `mayfly dev`.
fn script_build_round_trip(extra: &[&str]) {
    let (_dir, project, runs) = script_project();
    let mut flags = vec!["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let mut dev = Dev::start_with(&project, &project, &flags);
    let out = |matches: &'static dyn Fn(&str) -> bool| {
        move |s: Stream, l: &str| s == Stream::Stdout && matches(l)
    };
    let line = dev.wait_for(
        0,
        Duration::from_secs(30),
        "the gateway URL",
        out(&|l| l.starts_with("gateway listening on ")),
    );
    let url = format!("{}/app", &line["gateway listening on ".len()..]);
    let admin = dev.wait_for(
        0,
        Duration::from_secs(5),
        "the admin URL",
        out(&|l| l.starts_with("admin API listening on ")),
    )["admin API listening on ".len()..]
        .to_string();
    // How to point the CLI at the node.
    dev.wait_for(
        0,
        Duration::from_secs(5),
        "the admin URL variable",
        |s, l| s == Stream::Stdout && l.trim() == format!("export MAYFLY_ADMIN_URL={admin}"),
    );
    let token_file = project.join(".mayfly-dev/admin.token");
    dev.wait_for(0, Duration::from_secs(5), "the token variable", |s, l| {
        s == Stream::Stdout
            && l.trim() == format!("export MAYFLY_TOKEN=\"$(cat {})\"", token_file.display())
    });

    // The first round: built, the compile phase shown, deployed.
    dev.wait_for(
        0,
        Duration::from_secs(60),
        "the first deploy",
        out(&|l| l.starts_with("app: version 1 deployed, routes /app (compiled in ")),
    );
    dev.wait_for(
        0,
        Duration::from_secs(1),
        "the compile phase",
        out(&|l| l.starts_with("app: uploading ") && l.ends_with(" and compiling")),
    );
    dev.wait_for(
        0,
        Duration::from_secs(1),
        "the build time",
        out(&|l| l.starts_with("mayfly dev: built in ")),
    );
    assert_eq!(get(&url), (200, "Hello, world!\n".to_string()));
    assert_eq!(build_runs(&runs), 1);

    // A source change that changes the component: built and deployed once.
    let mark = dev.printed();
    save(
        &project,
        "source.txt",
        &guests().join("echo.wasm").display().to_string(),
    );
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the second deploy",
        out(&|l| l.starts_with("app: version 2 deployed, routes /app (compiled in ")),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&url).1 == "Hello, world!\n" {
        assert!(
            Instant::now() < deadline,
            "v2 never served:\n{}",
            dev.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // An ignored file, then a source change that leaves the component as
    // it was: built, not deployed.
    let mark2 = dev.printed();
    std::fs::write(project.join("scratch.log"), "ignored by .gitignore\n").unwrap();
    save(&project, "notes.txt", "second\n");
    let unchanged = dev.wait_for(
        mark2,
        Duration::from_secs(60),
        "the unchanged round",
        out(&|l| l.starts_with("app: component unchanged (sha256 ")),
    );
    assert!(unchanged.ends_with("), not redeployed"), "{unchanged}");

    // Every round since the first was caused by exactly the file edited:
    // none by the build's own output (app.wasm, __pycache__) or the
    // ignored file. They would have shown up before the last round ended,
    // as a round of their own or in the last round's list.
    let rounds = dev.lines(0, |s, l| {
        s == Stream::Stdout && l.ends_with("changed; rebuilding")
    });
    assert_eq!(
        rounds,
        [
            "mayfly dev: source.txt changed; rebuilding",
            "mayfly dev: notes.txt changed; rebuilding"
        ],
        "{}",
        dev.transcript()
    );
    assert_eq!(build_runs(&runs), 3, "{}", dev.transcript());
    let deploys = dev.lines(0, |s, l| {
        s == Stream::Stdout && l.contains(" deployed, routes ")
    });
    assert_eq!(deploys.len(), 2, "{}", dev.transcript());
    assert_eq!(get(&url).0, 200);
}

#[test]
fn a_file_every_build_rewrites_stops_starting_rounds() {
    let (_dir, project, runs) = script_project();
    // An output no rule names: a stamp the build writes beside the sources.
    let script = std::fs::read_to_string(project.join("build.sh")).unwrap();
    std::fs::write(
        project.join("build.sh"),
        format!("{script}date +%s%N > stamp.txt\n"),
    )
    .unwrap();
    let mut dev = Dev::start(&project, &project);
    let out = |matches: &'static dyn Fn(&str) -> bool| {
        move |s: Stream, l: &str| s == Stream::Stdout && matches(l)
    };
    // The first build's stamp starts one more round, which changes nothing:
    // the stamp is then taken for the build's own, and its next write
    // starts no round.
    dev.wait_for(
        0,
        Duration::from_secs(60),
        "the stamp's round",
        out(&|l| l == "mayfly dev: stamp.txt changed; rebuilding"),
    );
    dev.wait_for(
        0,
        Duration::from_secs(60),
        "the hint",
        out(&|l| l.starts_with("mayfly dev: stamp.txt changed only while the build ran")),
    );
    dev.wait_for(
        0,
        Duration::from_secs(60),
        "the skipped round",
        out(&|l| l == "mayfly dev: stamp.txt rewritten by the last build; not rebuilding"),
    );
    assert_eq!(build_runs(&runs), 2, "{}", dev.transcript());

    // A real edit is still built and deployed; its stamp starts no round.
    let mark = dev.printed();
    save(
        &project,
        "source.txt",
        &guests().join("echo.wasm").display().to_string(),
    );
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the second deploy",
        out(&|l| l.starts_with("app: version 2 deployed")),
    );
    save(&project, "notes.txt", "second\n");
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the next edit's round",
        out(&|l| l.starts_with("app: component unchanged")),
    );
    // The stamp's event may come with the notes' (one round), or alone
    // (no round): either way one round per edit.
    let rounds = dev.lines(mark, |s, l| {
        s == Stream::Stdout && l.ends_with("; rebuilding")
    });
    assert_eq!(rounds.len(), 2, "{}", dev.transcript());
    assert!(
        rounds[0].starts_with("mayfly dev: source.txt "),
        "{rounds:?}"
    );
    assert!(
        rounds[1].starts_with("mayfly dev: notes.txt "),
        "{rounds:?}"
    );
    assert_eq!(build_runs(&runs), 4, "{}", dev.transcript());

    // Edited by hand (outside a build), the stamp is a source again: its
    // edit starts a round, whose build's stamp then starts one more before
    // it is taken for the build's own again. A save in the clock tick a
    // build ended in counts as the build's, so the edit waits for the
    // file system's clock to pass the last build's end.
    wait_for_the_clock_to_pass(&project.join(".mayfly-dev/build-clock"));
    let mark = dev.printed();
    save(&project, "stamp.txt", "by hand\n");
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the hand edit's round",
        out(&|l| l == "mayfly dev: stamp.txt changed; rebuilding"),
    );
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the hint again",
        out(&|l| l.starts_with("mayfly dev: stamp.txt changed only while the build ran")),
    );
    dev.wait_for(
        mark,
        Duration::from_secs(60),
        "the skipped round",
        out(&|l| l == "mayfly dev: stamp.txt rewritten by the last build; not rebuilding"),
    );
    assert_eq!(build_runs(&runs), 6, "{}", dev.transcript());
    let deploys = dev.lines(0, |s, l| {
        s == Stream::Stdout && l.contains(" deployed, routes ")
    });
    assert_eq!(deploys.len(), 2, "{}", dev.transcript());
}

#[test]
fn dev_names_the_port_in_use_and_the_flag() {
    let (_dir, project, _runs) = script_project();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = format!("127.0.0.1:{port}");
    for (flags, flag) in [
        (
            ["--listen", &busy, "--admin-listen", "127.0.0.1:0"],
            "--listen",
        ),
        (
            ["--listen", "127.0.0.1:0", "--admin-listen", &busy],
            "--admin-listen",
        ),
    ] {
        let mut dev = Dev::start_with(&project, &project, &flags);
        let status = dev.exit_status(Duration::from_secs(30));
        assert!(!status.success(), "{}", dev.transcript());
        let errors = dev.lines(0, |s, l| s == Stream::Stderr && l.starts_with("error: "));
        let [error] = errors.as_slice() else {
            panic!("one error expected:\n{}", dev.transcript());
        };
        for part in [
            format!("port {port} is already in use"),
            "`mayfly serve`".to_string(),
            format!("{flag} 127.0.0.1:PORT"),
        ] {
            assert!(error.contains(&part), "{part:?} missing from {error}");
        }
    }
    // Nothing was started, so nothing was built.
    assert!(!project.join("app.wasm").exists());
}
