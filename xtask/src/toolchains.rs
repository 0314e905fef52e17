//! The toolchains of the Python and JavaScript templates (`mayfly new
//! --template python-http|js-http`), for their end-to-end tests: installed
//! once into a cache folder from the templates' own pins, so the tests build
//! with exactly what a new project's `pip install -r requirements.txt` and
//! `npm install` would install.
//!
//! - `py/`: a virtualenv with componentize-py (PyPI);
//! - `js/node_modules`: componentize-js and jco (npm).
//!
//! Each part is reinstalled when its template's pin file changes (the pins
//! in force are kept beside it as `installed-from`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// The cache folder: `$MAYFLY_TOOLCHAINS_CACHE`, else
/// `~/.cache/mayfly-toolchains`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    crate::cache_dir(
        "MAYFLY_TOOLCHAINS_CACHE",
        "mayfly-toolchains",
        "the Python and JavaScript toolchains",
    )
}

fn template_file(path: &str) -> anyhow::Result<String> {
    let path = workspace_root().join("crates/cli/templates").join(path);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Whether `dir` was installed from exactly `pins`.
fn installed_from(dir: &Path, pins: &str) -> bool {
    std::fs::read_to_string(dir.join("installed-from")).is_ok_and(|found| found == pins)
}

/// Installs what is missing and returns the cache folder, which holds
/// `py/bin/componentize-py` and `js/node_modules/.bin/componentize-js`.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let cache = cache_dir()?;
    ensure_python(&cache.join("py"))?;
    ensure_js(&cache.join("js"))?;
    Ok(cache)
}

fn ensure_python(venv: &Path) -> anyhow::Result<()> {
    let pins = template_file("python-http/requirements.txt")?;
    if installed_from(venv, &pins) && venv.join("bin/componentize-py").exists() {
        return Ok(());
    }
    eprintln!(
        "installing the python-http template's toolchain (componentize-py, PyPI) into {}",
        venv.display()
    );
    // A fresh venv, so nothing of an older pin lingers.
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the old {}", venv.display()))?;
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(venv)).context(
        "cannot create a Python virtualenv for componentize-py: install python3 (3.10 or later) \
         and python3-venv",
    )?;
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, &pins)?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))
    .context("cannot install componentize-py from PyPI")?;
    std::fs::write(venv.join("installed-from"), &pins)?;
    Ok(())
}

fn ensure_js(prefix: &Path) -> anyhow::Result<()> {
    let pins = template_file("js-http/package.json")?;
    if installed_from(prefix, &pins) && prefix.join("node_modules/.bin/componentize-js").exists() {
        return Ok(());
    }
    eprintln!(
        "installing the js-http template's toolchain (componentize-js, npm) into {}",
        prefix.display()
    );
    if prefix.exists() {
        std::fs::remove_dir_all(prefix)
            .with_context(|| format!("cannot remove the old {}", prefix.display()))?;
    }
    std::fs::create_dir_all(prefix)?;
    // The template's package.json as a project named for the cache; npm
    // rejects `{{name}}`.
    std::fs::write(
        prefix.join("package.json"),
        pins.replace("{{name}}", "mayfly-toolchains"),
    )?;
    run(Command::new("npm").current_dir(prefix).args([
        "install",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]))
    .context(
        "cannot install componentize-js with npm: install Node.js 18 or later with npm for the \
         js-http template's toolchain",
    )?;
    std::fs::write(prefix.join("installed-from"), &pins)?;
    Ok(())
}
