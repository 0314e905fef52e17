//! `mayfly completions SHELL` and `mayfly man`: shell completion scripts
//! and man pages, generated from the command line's own definition so they
//! list exactly the verbs and flags `--help` does (hidden ones, such as the
//! node's internal `compile-worker`, left out).
//!
//! They are verbs of the binary rather than build-time files: a user who
//! installed with `cargo install` has no build folder to take them from,
//! and the binary always describes itself at its own version.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;

/// The program name completions and man pages are written for.
const BIN: &str = "mayfly";

/// `mayfly completions`: which shell to write a script for.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `mayfly man`: where the pages go.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write one page per verb (`mayfly.1`, `mayfly-deploy.1`, …) into this
    /// folder, created if missing, e.g. ~/.local/share/man/man1, instead of
    /// printing the `mayfly(1)` page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script of `cli` (the whole command line's
/// definition, which the caller owns) for `args.shell` on stdout.
pub fn completions(args: &CompletionsArgs, cli: clap::Command) -> anyhow::Result<()> {
    print(&completion_script(args.shell, cli))
}

/// The completion script of `cli` for `shell`.
pub(crate) fn completion_script(shell: clap_complete::Shell, mut cli: clap::Command) -> Vec<u8> {
    // Into memory first: the generators panic on a write error, and a
    // closed stdout (`mayfly completions bash | head`) is not worth one.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, BIN, &mut script);
    script
}

/// Prints the `mayfly(1)` page (roff) of `cli` on stdout, or writes every
/// verb's page into `args.dir`.
pub fn man(args: &ManArgs, cli: clap::Command) -> anyhow::Result<()> {
    let Some(dir) = &args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cli)
            .render(&mut page)
            .context("cannot render the man page")?;
        return print(&page);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cli, dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    eprintln!(
        "wrote the man pages of mayfly and its verbs into {} (`man mayfly` once that folder \
         is on the man path, e.g. ~/.local/share/man/man1 or MANPATH)",
        dir.display()
    );
    Ok(())
}

/// Writes `bytes` to stdout; a reader gone away surfaces as BrokenPipe,
/// which `main` treats as success.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}
