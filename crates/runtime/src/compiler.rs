//! Compiling uploads within bounds: how many at once, how long, how much
//! memory, and not after the uploader has gone.
//!
//! Cranelift's time and memory grow with what a component contains, and a
//! hostile upload can make both huge (a 58 MB component of pathological
//! functions once compiled for over a minute at ~1 GB). A [`Compiler`]
//! holds a semaphore of compile slots and runs each compile either
//! in-process (unit tests, benchmarks: bounded in concurrency and wait
//! only) or in a child process (the node: `mayfly compile-worker`), which
//! the parent kills at a wall-clock deadline or once its resident memory
//! passes the budget (polled from `/proc`), with `RLIMIT_CPU` set on itself
//! as a backstop. The child is spawned with `kill_on_drop`, so dropping the
//! compile future (a deploy whose client hung up) kills it.
//!
//! Why resident memory polled rather than `RLIMIT_AS` or `RLIMIT_DATA`:
//! both count address space, and the engine reserves gigabytes for its
//! instance pool and mimalloc reserves arenas up front without touching
//! them. Measured: `RLIMIT_DATA` of 64 MiB over what the engine had mapped
//! still let a compile reach 206 MB resident, and limits low enough to
//! matter refused to build the engine at all.
//!
//! The worker's protocol: the component's bytes on stdin; on stdout one
//! line of JSON (a [`WorkerAnswer`]) and then, on success, the artifact's
//! bytes.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;

use crate::engine::{Runtime, RuntimeConfig};
use crate::validate::{CompiledComponent, DeployError};

/// Bounds on compiling uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// Compilations running at once; more wait for a slot (as long as one
    /// compile may take), then are refused as busy.
    pub concurrency: usize,
    /// Longest one compilation may take (wall clock).
    pub timeout: Duration,
    /// Most resident memory one compilation may use, in bytes (child
    /// process on Linux only).
    pub memory_bytes: u64,
}

impl Default for CompileLimits {
    /// One compile at a time (Cranelift already uses every core for one),
    /// 60 s and 2 GiB each: a large real component (an interpreter of tens
    /// of MB) compiles well within these on a small node.
    fn default() -> Self {
        Self {
            concurrency: 1,
            timeout: Duration::from_secs(60),
            memory_bytes: 2 << 30,
        }
    }
}

/// Where compilations run.
#[derive(Debug, Clone)]
enum Mode {
    /// On a blocking thread of this process: no memory bound, and a
    /// compile that times out finishes in the background (its result is
    /// dropped). For tests and benchmarks.
    InProcess,
    /// In a child process: `program` with `args` and then the worker's
    /// own flags (see [`WorkerArgs`]).
    Worker {
        program: PathBuf,
        args: Vec<OsString>,
        config: RuntimeConfig,
    },
}

/// Compiles uploads for a [`Runtime`] within [`CompileLimits`].
#[derive(Debug)]
pub struct Compiler {
    mode: Mode,
    limits: CompileLimits,
    slots: Arc<Semaphore>,
}

impl Compiler {
    /// Compiles in this process (tests, benchmarks, embedders).
    pub fn in_process(limits: CompileLimits) -> Self {
        Self::new(Mode::InProcess, limits)
    }

    /// Compiles in child processes: `program args… --cpu-seconds N
    /// --max-instance-memory N`, which must run [`run_worker`], setting
    /// its own `RLIMIT_CPU` from that flag. The node passes its own binary and its hidden
    /// `compile-worker` mode. `config` is the node's runtime config,
    /// so the worker's engine compiles for the node's.
    pub fn worker(
        program: PathBuf,
        args: Vec<OsString>,
        config: RuntimeConfig,
        limits: CompileLimits,
    ) -> Self {
        Self::new(
            Mode::Worker {
                program,
                args,
                config,
            },
            limits,
        )
    }

    fn new(mode: Mode, limits: CompileLimits) -> Self {
        Self {
            mode,
            slots: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            limits,
        }
    }

    /// The bounds this compiler applies.
    pub fn limits(&self) -> CompileLimits {
        self.limits
    }

    /// Validates and compiles `wasm` for `runtime`, within the limits.
    /// Dropping the future gives back its slot and kills its worker.
    pub async fn compile(
        &self,
        runtime: &Arc<Runtime>,
        wasm: Bytes,
    ) -> Result<CompiledComponent, DeployError> {
        let wait = self.limits.timeout;
        let _slot = tokio::time::timeout(wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| DeployError::Busy {
                running: self.limits.concurrency.max(1),
                waited_secs: wait.as_secs(),
            })?
            .map_err(|_| DeployError::Internal("the compiler is closed".into()))?;
        match &self.mode {
            Mode::InProcess => {
                let runtime = runtime.clone();
                let compile = tokio::task::spawn_blocking(move || runtime.compile(&wasm));
                match tokio::time::timeout(wait, compile).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(panic)) => Err(DeployError::Internal(panic.to_string())),
                    Err(_) => Err(self.too_slow()),
                }
            }
            Mode::Worker {
                program,
                args,
                config,
            } => {
                let compiled = self.in_worker(program, args, config, &wasm).await?;
                if compiled.fingerprint != runtime.fingerprint() {
                    return Err(DeployError::Internal(format!(
                        "the compile worker's engine ({}) differs from the node's ({}): is the \
                         binary on disk a different mayfly than the one running?",
                        compiled.fingerprint,
                        runtime.fingerprint()
                    )));
                }
                Ok(compiled.component)
            }
        }
    }

    fn too_slow(&self) -> DeployError {
        DeployError::TooSlow {
            limit_secs: self.limits.timeout.as_secs_f64().ceil() as u64,
        }
    }

    fn too_much_memory(&self) -> DeployError {
        DeployError::TooMuchMemory {
            limit_mib: self.limits.memory_bytes >> 20,
        }
    }

    async fn in_worker(
        &self,
        program: &PathBuf,
        args: &[OsString],
        config: &RuntimeConfig,
        wasm: &[u8],
    ) -> Result<WorkerOutput, DeployError> {
        let internal = |what: &str, e: std::io::Error| {
            DeployError::Internal(format!("compile worker {}: {what}: {e}", program.display()))
        };
        let worker = WorkerArgs {
            cpu_seconds: cpu_seconds(self.limits.timeout),
            max_instance_memory: config.max_instance_memory,
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .args(worker.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| internal("cannot start it", e))?;
        let pid = child.id();
        let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(DeployError::Internal(
                "the compile worker has no pipes".into(),
            ));
        };
        let run = async {
            // Feed and drain at once: the pipes are small, and the worker
            // may answer (an early error) before reading everything.
            let feed = async {
                let _ = stdin.write_all(wasm).await;
                drop(stdin);
            };
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = stdout.read_to_end(&mut out);
            // Only the end of stderr matters (a panic or an allocation
            // failure message), so it is read bounded.
            let mut stderr_head = (&mut stderr).take(64 * 1024);
            let read_err = stderr_head.read_to_end(&mut err);
            let ((), out_read, _) = tokio::join!(feed, read_out, read_err);
            out_read.map_err(|e| internal("cannot read its answer", e))?;
            let status = child
                .wait()
                .await
                .map_err(|e| internal("cannot wait for it", e))?;
            Ok::<_, DeployError>((status, out, err))
        };
        let watch = watch_memory(pid, self.limits.memory_bytes);
        let bounded = async {
            tokio::select! {
                finished = run => finished,
                () = watch => Err(self.too_much_memory()),
            }
        };
        // Past the deadline or the memory budget the worker is killed and
        // reaped before the slot goes back: a dying worker still holds its
        // memory, and the slot is what bounds compiles. (A dropped future,
        // a deploy whose client hung up, kills it through kill_on_drop.)
        let finished = tokio::time::timeout(self.limits.timeout, bounded)
            .await
            .unwrap_or_else(|_| Err(self.too_slow()));
        let (status, out, err) = match finished {
            Ok(finished) => finished,
            Err(error) => {
                reap(&mut child).await;
                return Err(error);
            }
        };
        if let Some((answer, artifact)) = split_answer(&out) {
            return match answer {
                WorkerAnswer::Compiled {
                    imports,
                    fingerprint,
                } => Ok(WorkerOutput {
                    component: CompiledComponent {
                        artifact: artifact.to_vec(),
                        imports,
                    },
                    fingerprint,
                }),
                WorkerAnswer::Refused(error) => Err(error),
            };
        }
        Err(self.explain_failure(status, &err))
    }

    /// Why a worker ended without an answer: its resource limits, or a
    /// fault of the node.
    fn explain_failure(&self, status: std::process::ExitStatus, stderr: &[u8]) -> DeployError {
        use std::os::unix::process::ExitStatusExt as _;
        let stderr = String::from_utf8_lossy(stderr);
        // RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
        const SIGKILL: i32 = 9;
        const SIGXCPU: i32 = 24;
        const SIGABRT: i32 = 6;
        // An allocation that failed outright (the machine itself is out).
        let out_of_memory = stderr.contains("memory allocation")
            || stderr.contains("out of memory")
            || stderr.contains("unable to allocate");
        match status.signal() {
            _ if out_of_memory => self.too_much_memory(),
            Some(SIGXCPU | SIGKILL) => self.too_slow(),
            // Rust aborts when an allocation fails.
            Some(SIGABRT) => self.too_much_memory(),
            _ => DeployError::Internal(format!(
                "the compile worker ended with {status} without an answer: {}",
                stderr.trim()
            )),
        }
    }
}

/// Returns once the process `pid` is resident over `limit` bytes: polled
/// every 20 ms (Cranelift allocates at most some tens of MB in that time);
/// never returns if its memory cannot be read (not Linux, or gone).
async fn watch_memory(pid: Option<u32>, limit: u64) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let path = format!("/proc/{pid}/status");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let Ok(status) = tokio::fs::read_to_string(&path).await else {
            return std::future::pending().await;
        };
        if resident_bytes(&status).is_some_and(|rss| rss > limit) {
            return;
        }
    }
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Kills a compile worker and waits until it is gone.
async fn reap(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// CPU seconds a worker may use: its wall-clock limit on every core (it
/// compiles in parallel), plus one; the parent's deadline comes first, this
/// is the backstop should the parent be unable to kill it.
fn cpu_seconds(timeout: Duration) -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    timeout.as_secs().saturating_add(1).saturating_mul(cores)
}

struct WorkerOutput {
    component: CompiledComponent,
    fingerprint: String,
}

/// The worker's first line on stdout.
#[derive(Debug, Serialize, Deserialize)]
enum WorkerAnswer {
    /// Compiled: the artifact's bytes follow the line.
    Compiled {
        imports: Vec<String>,
        fingerprint: String,
    },
    /// The upload cannot be deployed.
    Refused(DeployError),
}

/// The answer line and the bytes after it, if the output has one.
fn split_answer(out: &[u8]) -> Option<(WorkerAnswer, &[u8])> {
    let end = out.iter().position(|&b| b == b'\n')?;
    let answer = serde_json::from_slice(&out[..end]).ok()?;
    Some((answer, &out[end + 1..]))
}

/// The flags a worker is started with, after the program's own arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerArgs {
    /// `--cpu-seconds`: the worker's `RLIMIT_CPU`.
    pub cpu_seconds: u64,
    /// `--max-instance-memory`: the node's [`RuntimeConfig`] setting, so
    /// the worker's engine matches the node's.
    pub max_instance_memory: usize,
}

impl WorkerArgs {
    fn to_args(self) -> [String; 4] {
        [
            "--cpu-seconds".into(),
            self.cpu_seconds.to_string(),
            "--max-instance-memory".into(),
            self.max_instance_memory.to_string(),
        ]
    }
}

/// The worker's side: reads a component from `input`, builds an engine
/// configured like the node's, calls `limit` (which sets the process's
/// resource limits), compiles, and writes the answer to `output`.
pub fn run_worker(
    max_instance_memory: usize,
    limit: impl FnOnce() -> anyhow::Result<()>,
    mut input: impl Read,
    mut output: impl Write,
) -> anyhow::Result<()> {
    let mut wasm = Vec::new();
    input.read_to_end(&mut wasm)?;
    // One pool slot: the worker never runs a guest, and the engine's
    // compile settings do not depend on the pool's size (the fingerprint,
    // checked by the node, proves it).
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 1,
        max_instance_memory,
    })?;
    limit()?;
    let (answer, artifact) = match runtime.compile(&wasm) {
        Ok(compiled) => (
            WorkerAnswer::Compiled {
                imports: compiled.imports,
                fingerprint: runtime.fingerprint().to_string(),
            },
            compiled.artifact,
        ),
        Err(error) => (WorkerAnswer::Refused(error), Vec::new()),
    };
    serde_json::to_writer(&mut output, &answer)?;
    output.write_all(b"\n")?;
    output.write_all(&artifact)?;
    output.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_line_splits_from_the_artifact() {
        let mut out = Vec::new();
        serde_json::to_writer(
            &mut out,
            &WorkerAnswer::Compiled {
                imports: vec!["wasi:http/types@0.2.0".into()],
                fingerprint: "f".into(),
            },
        )
        .unwrap();
        out.extend_from_slice(b"\n\0asm\n\x01");
        let (answer, artifact) = split_answer(&out).unwrap();
        assert!(matches!(answer, WorkerAnswer::Compiled { .. }));
        assert_eq!(artifact, b"\0asm\n\x01");

        let mut out = Vec::new();
        serde_json::to_writer(&mut out, &WorkerAnswer::Refused(DeployError::CoreModule)).unwrap();
        out.push(b'\n');
        let (answer, _) = split_answer(&out).unwrap();
        assert!(matches!(
            answer,
            WorkerAnswer::Refused(DeployError::CoreModule)
        ));
        assert!(split_answer(b"no newline").is_none());
    }

    #[tokio::test]
    async fn in_process_compiles_are_bounded_in_number() {
        let runtime = Runtime::new(&RuntimeConfig {
            max_instances: 4,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let compiler = Compiler::in_process(CompileLimits {
            concurrency: 1,
            timeout: Duration::from_millis(50),
            memory_bytes: 1 << 30,
        });
        // Hold the only slot: the next compile waits its bound, then is busy.
        let _held = compiler.slots.clone().acquire_owned().await.unwrap();
        let error = compiler
            .compile(&runtime, Bytes::from_static(b"\0asm\x01\0\0\0"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, DeployError::Busy { running: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("compilations are running"));
        drop(_held);
        let error = compiler
            .compile(&runtime, Bytes::from_static(b"\0asm\x01\0\0\0"))
            .await
            .unwrap_err();
        assert!(matches!(error, DeployError::CoreModule), "{error}");
    }

    #[test]
    fn resident_memory_is_read_from_proc_status() {
        let status = "Name:\tmayfly\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(resident_bytes(status), Some(2 << 20));
        assert_eq!(resident_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn worker_failures_are_explained_by_their_bound() {
        use std::os::unix::process::ExitStatusExt as _;
        let compiler = Compiler::in_process(CompileLimits {
            concurrency: 1,
            timeout: Duration::from_secs(5),
            memory_bytes: 256 << 20,
        });
        let killed = std::process::ExitStatus::from_raw(24);
        assert!(
            compiler
                .explain_failure(killed, b"")
                .to_string()
                .contains("more than 5s")
        );
        let aborted = std::process::ExitStatus::from_raw(6);
        let message = compiler
            .explain_failure(aborted, b"memory allocation of 4096 bytes failed\n")
            .to_string();
        assert!(
            message.contains("more than 256 MiB") && message.contains("pathological"),
            "{message}"
        );
    }
}
