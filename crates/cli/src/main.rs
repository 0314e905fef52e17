//! The `mayfly` command: runs a node (`serve`) and drives one through its
//! admin API (every other verb).

mod access;
mod args;
mod body;
mod client;
mod commands;
mod completions;
mod deploy;
mod dev;
mod events;
mod flags;
mod jobs;
mod login;
mod manifest;
mod models;
mod new;
mod output;
mod pipelines;
mod profiles;
mod progress;
mod secrets;
mod serve;
mod simulate;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::args::{Cli, Command};

/// mimalloc instead of glibc's malloc: the request path allocates and frees
/// many small objects across threads, where glibc's arenas spent ~14% of the
/// node's CPU under load (perf, hello at wrk -c64).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let (result, json) = match serve::CompileWorkerCli::from_args() {
        Some(worker) => (serve::compile_worker(&worker), false),
        None => match Cli::try_parse() {
            Ok(cli) => {
                let json = cli.json;
                (run(cli), json)
            }
            Err(error) => return bad_command_line(&error),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`mayfly logs -f | head`): not an error.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) if json => {
            eprintln!("{}", output::error_json(&error));
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the verb the command line names.
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Dev(args) => dev::run(args),
        Command::Simulate(args) => simulate::run(args, cli.json),
        Command::New(args) => new::run(&args, cli.json),
        Command::Completions(args) => completions::completions(&args, Cli::command()),
        Command::Man(args) => completions::man(&args, Cli::command()),
        command => {
            let given = profiles::Given {
                admin_url: cli.admin_url,
                token: cli.token,
                ca_cert: cli.ca_cert,
                profile: cli.profile,
            };
            match command {
                Command::Login(args) => login::login(given, cli.json, &args),
                Command::Logout => login::logout(given.profile.as_deref(), cli.json),
                Command::Profile { command } => login::profile(cli.json, command),
                command => {
                    end_quietly_when_the_reader_goes();
                    profiles::ConfigFile::load_if_any()
                        .and_then(|file| profiles::resolve(given, file.as_ref()))
                        .and_then(|target| client::AdminClient::for_target(&target))
                        .and_then(|client| commands::run(&client, cli.json, command))
                }
            }
        }
    }
}

/// A command line clap refuses (or `--help`/`--version`, which clap also
/// answers as an error). With `--json` the refusal is one JSON object on
/// stderr like any failed verb's, its message clap's first paragraph (the
/// usage and tips after it are for people); otherwise clap prints it.
/// Either way the exit code is clap's (2 for a bad command line).
fn bad_command_line(error: &clap::Error) -> ExitCode {
    // The command line could not be parsed, so look for the flag itself
    // (before any `--`, after which everything is an argument).
    let json = std::env::args_os()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json");
    if !json || !error.use_stderr() {
        error.exit();
    }
    let text = error.render().to_string();
    let message = text
        .trim()
        .strip_prefix("error: ")
        .unwrap_or(text.trim())
        .split("\n\n")
        .next()
        .unwrap_or_default();
    eprintln!("{}", serde_json::json!({"error": {"message": message}}));
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}

/// Turns transparent huge pages off for this process (and the compile
/// workers it starts). mimalloc asks for them on its arenas (`madvise`), so
/// the first touch of every 2 MiB there faulted in and zeroed a whole huge
/// page: a third of a node's start-up CPU went to `clear_page`, and a node
/// serving hello at wrk -c64 held 92 MB resident instead of 55 MB. Guest
/// memories and code are not mimalloc's and never had huge pages.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag
    // of this process's address space; no memory of ours is touched.
    #[expect(unsafe_code, reason = "no safe wrapper sets PR_SET_THP_DISABLE")]
    unsafe {
        // A kernel without the flag keeps huge pages: slower, not wrong.
        let _ = libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A client verb whose reader goes away (`mayfly status | head`) ends at
/// once and silently, as Unix tools do, instead of panicking in `println!`
/// on the closed pipe. Only for client verbs: a node (`serve`, `dev`) must
/// outlive any closed pipe, so it keeps Rust's default of ignoring SIGPIPE.
fn end_quietly_when_the_reader_goes() {
    #[cfg(unix)]
    // SAFETY: called on the main thread before any other thread starts;
    // restoring a signal's default disposition shares no memory.
    #[expect(unsafe_code, reason = "no safe wrapper resets a signal disposition")]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
