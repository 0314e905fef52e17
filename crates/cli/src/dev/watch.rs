//! The sources `mayfly dev` watches, and the file events that say they
//! changed.
//!
//! What counts as a source is decided by walking the project folder with
//! the `ignore` crate, the rules git and ripgrep apply: `.gitignore` (and
//! `.git/info/exclude`, the global excludes file), `.ignore`, hidden files
//! and folders (`.git`, `.mayfly-dev`, `.idea`). On top of those, what a
//! build writes is never a source: the components the manifest's build
//! commands produce, and the folders toolchains fill (`target/`,
//! `__pycache__/`, `node_modules/`), so a build that writes its output into
//! the project does not start the next build.
//!
//! Changes come from the `notify` crate (inotify on Linux), debounced by
//! `notify-debouncer-full`. Each folder the walk keeps gets its own
//! non-recursive watch rather than one recursive watch on the root: a
//! recursive watch cannot leave subtrees out, so it would put a watch on
//! every folder under `target/` (thousands after one cargo build), count
//! them against the per-user inotify limit and wake on every file a build
//! writes. After every batch of events the walk runs again (a function
//! project is a handful of files, so it costs well under a millisecond):
//! that picks up new and removed folders, and `.gitignore` edits, without
//! reimplementing either.
//!
//! Some file systems never report changes to inotify (network mounts, some
//! VM and container shares); there `--poll` swaps inotify for notify's
//! `PollWatcher`, which compares the watched folders' files (times and
//! contents) every [`POLL_INTERVAL`], behind the same debouncer and rules.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::{EventKind, PollWatcher, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache};

/// How long a file must stay still before its events are delivered, so a
/// save that touches several files (or an editor's write-and-rename)
/// gives one rebuild.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// After a batch of events, further batches this close behind it join it:
/// the debouncer delivers each file's events once that file is still, so
/// one save of several files can arrive as a few batches.
const GATHER: Duration = Duration::from_millis(150);
/// The longest a change waits for more to join it.
const GATHER_AT_MOST: Duration = Duration::from_secs(1);
/// How often `--poll` scans the watched folders.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often a wait looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Folders toolchains write their output to, never sources wherever they
/// sit: cargo's, CPython's bytecode cache, npm's packages.
const OUTPUT_FOLDERS: [&str; 3] = ["target", "__pycache__", "node_modules"];

/// What is not a source, beyond the ignore files' rules.
#[derive(Debug, Clone)]
struct Rules {
    /// The manifest: always a source, even if an ignore file names it.
    manifest: PathBuf,
    /// The node's data directory: written on every request.
    data_dir: PathBuf,
    /// Files the manifest's build commands write (absolute).
    outputs: HashSet<PathBuf>,
}

impl Rules {
    /// Whether the walk may keep `path` (`is_dir`: it is a folder).
    fn keeps(&self, path: &Path, is_dir: bool) -> bool {
        if path == self.data_dir || self.outputs.contains(path) {
            return false;
        }
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            // A name that is not UTF-8 cannot match the rules below.
            return true;
        };
        if is_dir {
            !OUTPUT_FOLDERS.contains(&name)
        } else {
            !editor_file(name)
        }
    }
}

/// Files editors write beside the one being edited: swap and lock files,
/// backups, and the file Vim writes to test a folder. (Hidden ones, such
/// as `.lib.rs.swp` and Emacs' `.#lib.rs`, the walk already leaves out.)
fn editor_file(name: &str) -> bool {
    name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || [".swp", ".swo", ".swx", ".swn"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
        || name == "4913"
}

/// The project's sources as one walk found them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tree {
    /// Folders to watch (the root included).
    folders: BTreeSet<PathBuf>,
    /// Source files.
    files: BTreeSet<PathBuf>,
}

/// Walks `root` keeping what `rules` and the ignore files keep. Entries
/// that cannot be read are left out; symlinked folders are not followed
/// (no cycles, no shared build folders), symlinked files are kept.
fn walk(root: &Path, rules: &Rules) -> Tree {
    let mut tree = Tree::default();
    tree.folders.insert(root.to_path_buf());
    if rules.manifest.is_file() {
        tree.files.insert(rules.manifest.clone());
    }
    let filter = Arc::new(rules.clone());
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(true)
        // A fresh project is often not a git repository yet; its
        // .gitignore still says what is not a source.
        .require_git(false)
        .follow_links(false)
        .filter_entry(move |entry| {
            let is_dir = entry.file_type().is_some_and(|kind| kind.is_dir());
            filter.keeps(entry.path(), is_dir)
        })
        .build();
    for entry in walker.flatten() {
        let Some(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.into_path();
        if kind.is_dir() {
            tree.folders.insert(path);
        } else if path.is_file() {
            tree.files.insert(path);
        }
    }
    tree
}

/// How changes are noticed: the two debouncers differ only in the watcher
/// behind them.
enum Backend {
    /// The kernel's notifications (inotify).
    Native(Debouncer<RecommendedWatcher, RecommendedCache>),
    /// Scans every [`POLL_INTERVAL`] (`--poll`).
    Poll(Debouncer<PollWatcher, RecommendedCache>),
}

impl Backend {
    fn new(poll: bool, sender: mpsc::Sender<DebounceEventResult>) -> notify::Result<Self> {
        if poll {
            // Contents too: the poller's modification times have whole
            // seconds, so an edit in the second of the last scan would be
            // missed. Only source folders are scanned, so the hashing reads
            // a project's sources, not its build output.
            let config = notify::Config::default()
                .with_poll_interval(POLL_INTERVAL)
                .with_compare_contents(true);
            notify_debouncer_full::new_debouncer_opt(
                DEBOUNCE,
                None,
                sender,
                RecommendedCache::new(),
                config,
            )
            .map(Self::Poll)
        } else {
            notify_debouncer_full::new_debouncer(DEBOUNCE, None, sender).map(Self::Native)
        }
    }

    fn watch(&mut self, folder: &Path) -> notify::Result<()> {
        match self {
            Self::Native(debouncer) => debouncer.watch(folder, RecursiveMode::NonRecursive),
            Self::Poll(debouncer) => debouncer.watch(folder, RecursiveMode::NonRecursive),
        }
    }

    fn unwatch(&mut self, folder: &Path) -> notify::Result<()> {
        match self {
            Self::Native(debouncer) => debouncer.unwatch(folder),
            Self::Poll(debouncer) => debouncer.unwatch(folder),
        }
    }
}

/// A failed watch, with what to do when the reason is the inotify limit.
fn watch_error(error: notify::Error, folder: &Path) -> anyhow::Error {
    let limit = matches!(error.kind, notify::ErrorKind::MaxFilesWatch);
    let error = anyhow::Error::new(error).context(format!("cannot watch {}", folder.display()));
    if limit {
        error.context(
            "the per-user inotify limit is reached: raise it (sysctl \
             fs.inotify.max_user_watches and fs.inotify.max_user_instances), add folders that \
             are not sources to .gitignore, or run `mayfly dev --poll`",
        )
    } else {
        error
    }
}

/// Watches a project's sources for changes.
pub(crate) struct Watcher {
    /// The manifest's folder.
    root: PathBuf,
    rules: Rules,
    /// The sources as last walked.
    tree: Tree,
    /// The folders watched now.
    watched: BTreeSet<PathBuf>,
    /// Delivers the debounced events; stops on drop.
    debouncer: Backend,
    events: Receiver<DebounceEventResult>,
}

impl Watcher {
    /// Watches the project in `root` whose manifest is `manifest` (an
    /// absolute path) and whose node keeps its state in `data_dir`;
    /// `poll`: scan for changes instead of asking the kernel.
    pub(crate) fn new(
        root: PathBuf,
        manifest: PathBuf,
        data_dir: PathBuf,
        poll: bool,
    ) -> anyhow::Result<Self> {
        let (sender, events) = mpsc::channel();
        let debouncer = Backend::new(poll, sender).map_err(|error| watch_error(error, &root))?;
        let rules = Rules {
            manifest,
            data_dir,
            outputs: HashSet::new(),
        };
        let mut watcher = Self {
            root,
            rules,
            tree: Tree::default(),
            watched: BTreeSet::new(),
            debouncer,
            events,
        };
        if let (_, Some(error)) = watcher.rewalk() {
            // Without the root nothing is watched; without a subfolder,
            // the rest still is.
            if !watcher.watched.contains(&watcher.root) {
                return Err(error);
            }
            eprintln!("mayfly dev: {error:#}");
        }
        Ok(watcher)
    }

    /// The folder watched.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Sets the files the build commands write (read from the manifest
    /// each round, as it may have changed): never sources.
    pub(crate) fn set_outputs(&mut self, outputs: impl IntoIterator<Item = PathBuf>) {
        let outputs: HashSet<PathBuf> = outputs.into_iter().collect();
        if outputs != self.rules.outputs {
            self.rules.outputs = outputs;
            if let (_, Some(error)) = self.rewalk() {
                eprintln!("mayfly dev: {error:#}");
            }
        }
    }

    /// Walks the project again and brings the watches in line with it;
    /// returns the walk before this one, and the first folder that could
    /// not be watched (the others are watched all the same).
    fn rewalk(&mut self) -> (Tree, Option<anyhow::Error>) {
        let tree = walk(&self.root, &self.rules);
        for gone in self.watched.difference(&tree.folders) {
            // The folder may be gone, and its watch with it.
            let _ = self.debouncer.unwatch(gone);
        }
        self.watched.retain(|folder| tree.folders.contains(folder));
        let mut failed = None;
        for folder in &tree.folders {
            if self.watched.contains(folder) {
                continue;
            }
            match self.debouncer.watch(folder) {
                Ok(()) => {
                    self.watched.insert(folder.clone());
                }
                // Removed since the walk: nothing to watch.
                Err(_) if !folder.exists() => {}
                Err(error) => {
                    failed.get_or_insert_with(|| watch_error(error, folder));
                }
            }
        }
        (std::mem::replace(&mut self.tree, tree), failed)
    }

    /// The source files as last walked.
    #[cfg(test)]
    fn files(&self) -> &BTreeSet<PathBuf> {
        &self.tree.files
    }

    /// Blocks until sources change; returns the files that changed (added,
    /// edited or removed), sorted, or `None` once `stopping` is set.
    pub(crate) fn wait_for_change(&mut self, stopping: &AtomicBool) -> Option<Vec<PathBuf>> {
        self.wait(stopping, None)
    }

    /// [`Self::wait_for_change`], giving up with `None` at `deadline`.
    fn wait(&mut self, stopping: &AtomicBool, deadline: Option<Instant>) -> Option<Vec<PathBuf>> {
        loop {
            let mut touched = Touched::default();
            // The first batch: wait as long as it takes.
            loop {
                if stopping.load(Ordering::SeqCst) {
                    return None;
                }
                let wait = match deadline {
                    Some(deadline) => deadline
                        .checked_duration_since(Instant::now())
                        .filter(|left| !left.is_zero())?
                        .min(STOP_POLL),
                    None => STOP_POLL,
                };
                match self.events.recv_timeout(wait) {
                    Ok(batch) => {
                        collect(batch, &mut touched);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The debouncer lives as long as `self`: unreachable,
                    // but never a busy loop.
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
            // Those right behind it join it, for a while: an ignored file
            // written without pause (a log beside the sources) must not
            // hold back a source change forever.
            let gathering = Instant::now();
            while gathering.elapsed() < GATHER_AT_MOST {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return None;
                }
                match self.events.recv_timeout(GATHER) {
                    Ok(batch) => collect(batch, &mut touched),
                    Err(_) => break,
                }
            }
            let changed = self.changed(&touched);
            if !changed.is_empty() {
                return Some(changed);
            }
        }
    }

    /// Which sources changed, given the paths events named: those among
    /// the sources before or after, and any file that appeared or went
    /// (in a folder made or removed before its watch could see inside).
    /// When events were lost, any source may have changed: all are named.
    fn changed(&mut self, touched: &Touched) -> Vec<PathBuf> {
        let (before, failed) = self.rewalk();
        if let Some(error) = failed {
            // Keep going with the watches that work; say which failed.
            eprintln!("mayfly dev: {error:#}");
        }
        let after = &self.tree.files;
        if touched.lost {
            return before.files.union(after).cloned().collect();
        }
        let mut changed: BTreeSet<PathBuf> = touched
            .paths
            .iter()
            .filter(|path| before.files.contains(*path) || after.contains(*path))
            .cloned()
            .collect();
        changed.extend(before.files.symmetric_difference(after).cloned());
        changed.into_iter().collect()
    }
}

/// What a run of event batches says.
#[derive(Debug, Default)]
struct Touched {
    /// The paths the events name.
    paths: BTreeSet<PathBuf>,
    /// Events were lost (the kernel's queue overflowed): which paths they
    /// named is unknown.
    lost: bool,
}

/// Adds what a batch of events says to `touched`. Reads (an open or
/// close without writing) are not changes: every build reads the
/// sources. Watch errors are reported and otherwise ignored: a failed
/// watch must not stop the loop.
fn collect(batch: DebounceEventResult, touched: &mut Touched) {
    match batch {
        Ok(events) => {
            for event in events {
                if event.need_rescan() {
                    touched.lost = true;
                }
                if matches!(event.kind, EventKind::Access(_)) {
                    continue;
                }
                touched.paths.extend(event.event.paths);
            }
        }
        Err(errors) => {
            for error in errors {
                eprintln!("mayfly dev: watching the sources: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use notify_debouncer_full::DebouncedEvent;

    use super::*;

    /// Writes `text` to `root/relative`, making its folder.
    fn write(root: &Path, relative: &str, text: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn relative(root: &Path, paths: impl IntoIterator<Item = PathBuf>) -> Vec<String> {
        paths
            .into_iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    /// The next change, failing the test after 10 s.
    fn next(watcher: &mut Watcher) -> Vec<String> {
        let stopping = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        let changed = watcher
            .wait(&stopping, Some(deadline))
            .expect("a change within 10 s");
        relative(&watcher.root.clone(), changed)
    }

    fn project() -> (tempfile::TempDir, PathBuf, Watcher) {
        project_with(false)
    }

    fn project_with(poll: bool) -> (tempfile::TempDir, PathBuf, Watcher) {
        let dir = tempfile::tempdir().unwrap();
        // Canonical: events name real paths (the temp folder may sit
        // behind a symlink).
        let root = dir.path().canonicalize().unwrap();
        write(&root, "mayfly.toml", "[functions]\n");
        write(&root, "app.py", "one");
        write(&root, "src/old.rs", "old");
        let watcher = Watcher::new(
            root.clone(),
            root.join("mayfly.toml"),
            root.join(".mayfly-dev"),
            poll,
        )
        .unwrap();
        (dir, root, watcher)
    }

    #[test]
    fn editor_files_are_not_sources() {
        for file in ["lib.rs.swo", "lib.rs~", "#lib.rs#", "4913", "x.swp"] {
            assert!(editor_file(file), "{file}");
        }
        for file in ["lib.rs", "Cargo.toml", "mayfly.toml", "Cargo.lock", "a#b"] {
            assert!(!editor_file(file), "{file}");
        }
    }

    #[test]
    fn the_walk_honours_ignore_files_outputs_and_toolchain_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for (file, text) in [
            ("mayfly.toml", "x"),
            ("Cargo.toml", "x"),
            ("src/lib.rs", "x"),
            ("src/nested/mod.rs", "x"),
            ("src/.lib.rs.swp", "x"),
            ("src/lib.rs~", "x"),
            ("target/debug/out", "x"),
            ("src/__pycache__/app.cpython-312.pyc", "x"),
            ("web/node_modules/left-pad/index.js", "x"),
            (".git/HEAD", "x"),
            (".gitignore", "*.log\n/dist/\n"),
            (".ignore", "scratch.txt\n"),
            ("debug.log", "x"),
            ("dist/bundle.js", "x"),
            ("scratch.txt", "x"),
            ("app.wasm", "x"),
            ("prebuilt.wasm", "x"),
            ("state/db", "x"),
        ] {
            write(&root, file, text);
        }
        std::os::unix::fs::symlink(root.join("src"), root.join("src-link")).unwrap();
        let rules = Rules {
            manifest: root.join("mayfly.toml"),
            data_dir: root.join("state"),
            outputs: HashSet::from([root.join("app.wasm")]),
        };
        let tree = walk(&root, &rules);
        assert_eq!(
            relative(&root, tree.files),
            [
                "Cargo.toml",
                "mayfly.toml",
                "prebuilt.wasm",
                "src/lib.rs",
                "src/nested/mod.rs"
            ]
        );
        assert_eq!(
            relative(&root, tree.folders),
            ["", "src", "src/nested", "web"]
        );
    }

    #[test]
    fn edits_additions_and_removals_are_one_change() {
        let (_dir, root, mut watcher) = project();
        write(&root, "app.py", "two");
        write(&root, "src/new.rs", "new");
        std::fs::remove_file(root.join("src/old.rs")).unwrap();
        write(&root, "src/.new.rs.swp", "swap");
        assert_eq!(next(&mut watcher), ["app.py", "src/new.rs", "src/old.rs"]);
        // Editor-style save: a new file renamed over the old.
        write(&root, "app.py.tmp~", "three");
        std::fs::rename(root.join("app.py.tmp~"), root.join("app.py")).unwrap();
        assert_eq!(next(&mut watcher), ["app.py"]);
    }

    #[test]
    fn build_output_and_ignored_files_are_not_changes() {
        let (_dir, root, mut watcher) = project();
        write(&root, ".gitignore", "*.log\n");
        // Hidden: no change of its own; its rule applies from now on.
        write(&root, "after.py", "x");
        assert_eq!(next(&mut watcher), ["after.py"]);
        watcher.set_outputs([root.join("app.wasm")]);
        // What a componentize-py build leaves behind, and a log file.
        write(&root, "app.wasm", "component");
        write(&root, "__pycache__/app.cpython-312.pyc", "bytecode");
        write(&root, "target/wasm32-wasip2/release/x.wasm", "x");
        write(&root, "build.log", "log");
        // Then a real edit: the only change reported.
        write(&root, "app.py", "edited");
        assert_eq!(next(&mut watcher), ["app.py"]);
        assert!(!watcher.files().contains(&root.join("app.wasm")));
        assert!(
            !watcher
                .watched
                .iter()
                .any(|folder| folder.ends_with("__pycache__") || folder.ends_with("target"))
        );
    }

    #[test]
    fn an_ignored_file_written_without_pause_holds_nothing_back() {
        let (_dir, root, mut watcher) = project();
        write(&root, ".gitignore", "*.log\n");
        write(&root, "after.py", "x");
        assert_eq!(next(&mut watcher), ["after.py"]);
        let writing = Arc::new(AtomicBool::new(true));
        let writer = {
            let writing = Arc::clone(&writing);
            let log = root.join("app.log");
            std::thread::spawn(move || {
                let mut n = 0;
                while writing.load(Ordering::SeqCst) {
                    n += 1;
                    std::fs::write(&log, format!("line {n}\n")).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        write(&root, "app.py", "edited");
        let changed = next(&mut watcher);
        writing.store(false, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(changed, ["app.py"]);
    }

    #[test]
    fn files_in_a_new_folder_are_seen() {
        let (_dir, root, mut watcher) = project();
        write(&root, "lib/deep/util.py", "x");
        assert_eq!(next(&mut watcher), ["lib/deep/util.py"]);
        // The new folders are watched from now on.
        write(&root, "lib/deep/util.py", "y");
        assert_eq!(next(&mut watcher), ["lib/deep/util.py"]);
        std::fs::remove_dir_all(root.join("lib")).unwrap();
        assert_eq!(next(&mut watcher), ["lib/deep/util.py"]);
    }

    #[test]
    fn polling_sees_the_same_changes() {
        let (_dir, root, mut watcher) = project_with(true);
        watcher.set_outputs([root.join("app.wasm")]);
        write(&root, "app.wasm", "component");
        write(&root, "__pycache__/app.cpython-312.pyc", "bytecode");
        write(&root, "app.py", "edited, and longer");
        assert_eq!(next(&mut watcher), ["app.py"]);
        write(&root, "lib/util.py", "x");
        assert_eq!(next(&mut watcher), ["lib/util.py"]);
    }

    #[test]
    fn lost_events_name_every_source() {
        let (_dir, root, mut watcher) = project();
        let mut touched = Touched::default();
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        let read = notify::Event::new(EventKind::Access(notify::event::AccessKind::Any))
            .add_path(root.join("app.py"));
        collect(
            Ok(vec![
                DebouncedEvent::new(read, Instant::now()),
                DebouncedEvent::new(overflow, Instant::now()),
            ]),
            &mut touched,
        );
        assert!(touched.lost);
        assert!(touched.paths.is_empty());
        assert_eq!(
            relative(&root, watcher.changed(&touched)),
            ["app.py", "mayfly.toml", "src/old.rs"]
        );
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let (_dir, _root, mut watcher) = project();
        let stopping = AtomicBool::new(true);
        assert_eq!(watcher.wait_for_change(&stopping), None);
    }
}
