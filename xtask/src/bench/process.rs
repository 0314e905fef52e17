//! Child processes of the benchmark (servers under test and drivers), what
//! `/proc` says about them, and a minimal HTTP client for readiness probes.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

/// A `Command` for `program` without `RUST_BACKTRACE`: with it set, wasmtime
/// captures a backtrace for every internal error, which costs ~10% of
/// throughput (see shared/BASELINES.md). Every child of the bench goes
/// through here.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_remove("RUST_BACKTRACE");
    command
}

/// Runs `command` to completion and returns its stdout, failing with its
/// stderr when it exits unsuccessfully.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running child that is stopped when dropped, so that an error anywhere
/// in the bench never leaves a server holding a port or a core.
pub struct Process {
    child: Child,
    name: String,
    /// Where the child's stderr goes, quoted in errors.
    stderr_log: PathBuf,
}

impl Process {
    /// Starts `command` with stdin closed and stderr sent to a file in
    /// `log_dir`; stdout goes to a file too unless the caller set it.
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> anyhow::Result<Self> {
        let stderr_log = log_dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_log)
            .with_context(|| format!("cannot create {}", stderr_log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            child,
            name: name.to_string(),
            stderr_log,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout pipe, if it was piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Fails with the end of the child's stderr if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}: {}", self.name, self.stderr_tail());
        }
        Ok(())
    }

    /// The last lines of the child's stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// User plus system CPU time the child has used, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // The command name (field 2) is in parentheses and may hold spaces:
        // count fields from the last `)`. utime and stime are fields 14 and
        // 15, so the 12th and 13th after the name.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow!("unexpected {path}: {stat}"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| -> anyhow::Result<u64> {
            fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .ok_or_else(|| anyhow!("unexpected {path}: {stat}"))
        };
        Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_second())
    }

    /// A memory figure of `/proc/<pid>/status` (such as `VmRSS` or the peak,
    /// `VmHWM`), in bytes.
    pub fn memory_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| anyhow!("no {field} in {path}"))
    }

    /// Stops the child: SIGTERM first so that a Mayfly node closes its
    /// database cleanly (the next start must not pay for recovery), SIGKILL
    /// if it has not exited after a few seconds.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = command("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `CLK_TCK`, the unit of the CPU times in `/proc/<pid>/stat`.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        output(command("getconf").arg("CLK_TCK"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            // 100 on every Linux architecture the bench runs on.
            .unwrap_or(100.0)
    })
}

/// A loopback port nobody listens on right now, for peers that take their
/// address on the command line. Another process could take it before the
/// peer binds it; on a benchmark machine that is unlikely, and the peer
/// then fails to start with a clear error.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The status and body of `GET url` over a fresh connection
/// (`Connection: close`), or the I/O error. Written by hand rather than with
/// ureq so that a probe is one connect, one write and one read: nothing
/// pooled or retried behind the measurement.
pub fn get(url: &str, timeout: Duration) -> std::io::Result<(u16, Vec<u8>)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let address = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {host}")))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("incomplete HTTP response"))?;
    let status = std::str::from_utf8(&response[..head_end])
        .ok()
        .and_then(|head| head.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP status line"))?;
    // Every server here answers hello with a Content-Length body; chunked
    // bodies are left as they are (only compared, never decoded).
    Ok((status, response[head_end + 4..].to_vec()))
}

/// Polls `url` until it answers 200 and returns how long that took from
/// `since`. `process` is checked between attempts so that a server that
/// died fails fast with its stderr.
pub fn wait_for_200(
    url: &str,
    since: Instant,
    process: &mut Process,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let deadline = since + timeout;
    loop {
        if let Ok((200, _)) = get(url, Duration::from_secs(5)) {
            return Ok(since.elapsed());
        }
        process.check_running()?;
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {timeout:?}");
        }
        // Short enough not to blur a start-up of a few milliseconds.
        std::thread::sleep(Duration::from_micros(500));
    }
}
