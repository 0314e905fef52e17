//! The S3 clients the S3 endpoint's tests drive: the AWS CLI and boto3,
//! pinned, from PyPI, installed into a cached virtualenv
//! (`$MAYFLY_S3_CLIENTS_CACHE`, else `~/.cache/mayfly-s3-clients`). Its
//! `bin` folder holds `aws` and `python` (with boto3 importable), and
//! `openapi-spec-validator`, which checks the admin API's description (one
//! venv, so CI installs Python tools once).

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use crate::run;

/// The pinned clients (boto3 1.44 sends CRC checksums by default, which the
/// endpoint must accept) and the OpenAPI validator.
const PACKAGES: [&str; 3] = [
    "boto3==1.44.5",
    "awscli==1.46.2",
    "openapi-spec-validator==0.9.0",
];

/// The virtualenv's `bin` folder, installed first if missing or if it
/// holds other versions.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let root = crate::cache_dir(
        "MAYFLY_S3_CLIENTS_CACHE",
        "mayfly-s3-clients",
        "the S3 clients",
    )?;
    let venv = root.join("venv");
    let bin = venv.join("bin");
    // The pins are written beside the venv once installed: a change of
    // pins installs again, an interrupted install is retried.
    let stamp = root.join("installed");
    let wanted = PACKAGES.join(" ");
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have.trim() == wanted
        && bin.join("aws").exists()
        && bin.join("openapi-spec-validator").exists()
    {
        return Ok(bin);
    }
    eprintln!("installing {wanted} from PyPI into {}", venv.display());
    let _ = std::fs::remove_file(&stamp);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
        "cannot create a Python virtualenv for the S3 clients: install python3-venv \
         (apt-get install python3-venv)",
    )?;
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES))?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(bin)
}
