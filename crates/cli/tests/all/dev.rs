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
}

impl Dev {
    fn start(project: &Path, target_dir: &Path) -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
            .current_dir(project)
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
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
        Self::collect(child.stdout.take().unwrap(), Stream::Stdout, &output);
        Self::collect(child.stderr.take().unwrap(), Stream::Stderr, &output);
        Dev { child, output }
    }

    fn collect(
        pipe: impl Read + Send + 'static,
        stream: Stream,
        output: &Arc<Mutex<Vec<(Stream, String)>>>,
    ) {
        let output = Arc::clone(output);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                output.lock().unwrap().push((stream, line));
            }
        });
    }

    /// How many lines it has printed.
    fn printed(&self) -> usize {
        self.output.lock().unwrap().len()
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
