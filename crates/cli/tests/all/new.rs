//! `mayfly new`: projects from templates that build, pass their own tests
//! and serve on a node.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{Node, eventually, files_under, guests};

/// The Rust templates.
const TEMPLATES: [&str; 5] = ["http", "cron", "object", "queue", "classify"];
/// The templates in other languages, with their files.
const OTHER_TEMPLATES: [(&str, &[&str]); 2] = [
    (
        "python-http",
        &[
            "app.py",
            "wit/app.wit",
            "wit_deps.py",
            "requirements.txt",
            "mayfly.toml",
            ".gitignore",
            "README.md",
        ],
    ),
    (
        "js-http",
        &[
            "src/app.js",
            "wit/app.wit",
            "wit-deps.mjs",
            "package.json",
            "mayfly.toml",
            ".gitignore",
            "README.md",
        ],
    ),
];

/// Runs `mayfly <args>` in `dir`; returns (success, stdout, stderr).
fn mayfly(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("mayfly runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn new_writes_a_project_for_every_template() {
    let dir = tempfile::tempdir().unwrap();
    for template in TEMPLATES {
        let name = format!("my-{template}");
        let (ok, stdout, stderr) = mayfly(dir.path(), &["new", &name, "--template", template]);
        assert!(ok, "{stdout}{stderr}");
        assert!(stdout.contains(&format!("created {name}")), "{stdout}");
        let project = dir.path().join(&name);
        for file in [
            "Cargo.toml",
            ".gitignore",
            "mayfly.toml",
            "README.md",
            "src/lib.rs",
            "src/wasi_http.rs",
        ] {
            assert!(project.join(file).is_file(), "{template}: no {file}");
        }
        let cargo = read(project.join("Cargo.toml"));
        assert!(cargo.contains(&format!("name = \"{name}\"")), "{cargo}");
        assert!(cargo.contains("crate-type = [\"cdylib\"]"), "{cargo}");
        assert!(cargo.contains("wasip2 = \"1\""), "{cargo}");
        assert!(cargo.contains("\n[workspace]\n"), "{cargo}");
        let manifest = read(project.join("mayfly.toml"));
        let crate_name = name.replace('-', "_");
        let wiring = match template {
            "http" | "classify" => format!("routes = [\"/{name}\"]"),
            "cron" => "triggers = [\"schedule:@every 1m\"]".to_string(),
            "object" => format!("triggers = [\"object:{name}-uploads\"]"),
            _ => format!("triggers = [\"queue:{name}-jobs\"]"),
        };
        let expected = format!(
            "[functions.{name}]\n\
             component = \"target/wasm32-wasip2/release/{crate_name}.wasm\"\n\
             build = \"cargo build --release --target wasm32-wasip2\"\n\
             {wiring}\n"
        );
        assert!(manifest.contains(&expected), "{manifest}");
        assert_eq!(read(project.join(".gitignore")), "target/\n.mayfly-dev/\n");
        let readme = read(project.join("README.md"));
        assert!(!readme.contains("{{"), "{readme}");
        assert!(readme.contains("cargo test"), "{readme}");
    }

    for (template, files) in OTHER_TEMPLATES {
        let name = format!("my-{template}");
        let (ok, stdout, stderr) = mayfly(dir.path(), &["new", &name, "--template", template]);
        assert!(ok, "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!("created {name} ({template} template)")),
            "{stdout}"
        );
        let project = dir.path().join(&name);
        let found = files_under(&project);
        let mut expected: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        expected.sort();
        assert_eq!(found, expected, "{template}");
        for file in files {
            let text = read(project.join(file));
            assert!(
                !text.contains("{{"),
                "{template}: {file} keeps a placeholder"
            );
        }
        let manifest = read(project.join("mayfly.toml"));
        let build = match template {
            "python-http" => format!(
                "python3 wit_deps.py && componentize-py -d wit -w app componentize app -o {name}.wasm"
            ),
            _ => "npm run --silent build".to_string(),
        };
        let expected = format!(
            "[functions.{name}]\n\
             component = \"{name}.wasm\"\n\
             build = \"{build}\"\n\
             routes = [\"/{name}\"]\n"
        );
        assert!(manifest.contains(&expected), "{manifest}");
        let ignored = read(project.join(".gitignore"));
        assert!(ignored.contains("*.wasm\nwit/deps/\n"), "{ignored}");
        let readme = read(project.join("README.md"));
        assert!(
            readme.contains(&format!("curl localhost:8080/{name}")),
            "{readme}"
        );
        match template {
            "python-http" => {
                assert!(
                    stdout.contains("pip install -r requirements.txt"),
                    "{stdout}"
                );
                let pins = read(project.join("requirements.txt"));
                assert!(pins.contains("\ncomponentize-py=="), "{pins}");
                assert!(read(project.join("app.py")).contains(&format!("\"{name}\"")));
            }
            _ => {
                assert!(stdout.contains("npm install"), "{stdout}");
                let package: serde_json::Value =
                    serde_json::from_str(&read(project.join("package.json"))).unwrap();
                assert_eq!(package["name"], name.as_str());
                let pin = package["devDependencies"]["@bytecodealliance/componentize-js"]
                    .as_str()
                    .unwrap();
                assert!(pin.chars().all(|c| c.is_ascii_digit() || c == '.'), "{pin}");
                assert!(read(project.join("src/app.js")).contains(&format!("'{name}'")));
            }
        }
    }

    // --dir, and an existing empty folder is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, stdout, stderr) = mayfly(
        dir.path(),
        &["new", "other", "--dir", empty.to_str().unwrap(), "--json"],
    );
    assert!(ok, "{stdout}{stderr}");
    let created: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["template"], "http");
    assert!(read(empty.join("mayfly.toml")).contains("[functions.other]"));
}

#[test]
fn new_refuses_bad_names_and_existing_folders() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Hello", "9lives", "a.b", "../x", ""] {
        let (ok, _, stderr) = mayfly(dir.path(), &["new", bad]);
        assert!(!ok, "{bad:?} was accepted");
        assert!(
            stderr.contains(&format!("invalid function name `{bad}`")),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = mayfly(dir.path(), &["new", "f", "--template", "lambda"]);
    assert!(!ok);
    assert!(stderr.contains("invalid value 'lambda'"), "{stderr}");
    let long = "a".repeat(60);
    let (ok, _, stderr) = mayfly(dir.path(), &["new", &long, "--template", "object"]);
    assert!(!ok);
    assert!(
        stderr.contains("too long for the object template"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // An existing folder with anything in it is left alone.
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), "mine").unwrap();
    let (ok, _, stderr) = mayfly(dir.path(), &["new", "taken"]);
    assert!(!ok);
    assert!(
        stderr.contains("already exists and is not empty"),
        "{stderr}"
    );
    let (ok, _, stderr) = mayfly(
        dir.path(),
        &[
            "new",
            "f",
            "--dir",
            taken.join("notes.txt").to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("is not a folder"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&taken).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(read(taken.join("notes.txt")), "mine");
}

/// Runs cargo in `project` with the shared target folder; panics on failure.
fn cargo(project: &Path, target_dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO"))
        .current_dir(project)
        .args(args)
        // The generated project pins no versions: take the crates the
        // guests already downloaded, so this needs no network.
        .arg("--offline")
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} in {} failed:\n{}{}",
        project.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Slow (a few seconds a template once the dependencies are built): every
/// template builds for wasm32-wasip2 and passes its own tests on the host;
/// the http one then serves on a node.
#[test]
fn new_projects_build_pass_their_tests_and_serve() {
    // Built under the workspace's target/ so later runs reuse it.
    let target_dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/new-template");
    // The guests' build downloads wasip2, which the projects need too.
    guests();
    std::fs::create_dir_all(&target_dir).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for template in TEMPLATES {
        let name = format!("new-{template}");
        let (ok, stdout, stderr) = mayfly(dir.path(), &["new", &name, "--template", template]);
        assert!(ok, "{stdout}{stderr}");
        let project = dir.path().join(&name);
        // The project's own target/ is the shared one, so the component
        // lands where its mayfly.toml says.
        std::os::unix::fs::symlink(&target_dir, project.join("target")).unwrap();
        let started = Instant::now();
        cargo(
            &project,
            &target_dir,
            &["build", "--release", "--target", "wasm32-wasip2"],
        );
        let built = started.elapsed();
        let output = cargo(&project, &target_dir, &["test"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("test result: ok.") && !stdout.contains("running 0 tests"),
            "{stdout}"
        );
        eprintln!(
            "{template}: built in {built:?}, tested in {:?}",
            started.elapsed() - built
        );
    }

    // As a new user would: `mayfly deploy` in the project reads its
    // mayfly.toml, runs its build command and deploys.
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(data.path());
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("deploy")
        .current_dir(dir.path().join("new-http"))
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("new-http: version 1 deployed"), "{stdout}");
    assert_eq!(node.get("/new-http"), (200, "Hello, world!\n".to_string()));
    assert_eq!(
        node.get("/new-http/Ada"),
        (200, "Hello, Ada!\n".to_string())
    );
    let (status, body, _) = node.request("POST", "/new-http", b"echo me");
    assert_eq!((status, body.as_slice()), (200, &b"echo me"[..]));
    eventually(Duration::from_secs(10), "the request's log line", || {
        let (ok, logs, stderr) = node.cli(&["logs", "new-http"]);
        assert!(ok, "{stderr}");
        logs.contains("GET /new-http/Ada -> 200").then_some(())
    });

    // The classifier, with the model its README names: a page of text
    // upright and turned by a quarter is classified as the guests/classify
    // example classifies it.
    let (ok, _, stderr) = node.cli(&[
        "model",
        "put",
        "orientation",
        crate::nn::model_path().to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("deploy")
        .current_dir(dir.path().join("new-classify"))
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let page = crate::nn::text_page();
    for quarters in [0, 1] {
        let image = crate::nn::png(&crate::nn::rotate(&page, quarters));
        let (status, body, _) = node.request("POST", "/new-classify", &image);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(
            answer["top"][0]["label"],
            crate::nn::expected_label(quarters),
            "{answer}"
        );
    }
}

/// The templates' toolchains that `cargo xtask test` installs (`cargo xtask
/// toolchains` installs them alone): a folder with `py/` (componentize-py)
/// and `js/node_modules` (componentize-js), installed from the templates'
/// own pins.
fn toolchains() -> PathBuf {
    if let Ok(error) = std::env::var("MAYFLY_TOOLCHAINS_ERROR") {
        panic!("the Python and JavaScript template toolchains could not be installed: {error}");
    }
    let dir = match std::env::var_os("MAYFLY_TOOLCHAINS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/mayfly-toolchains"),
    };
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    for (part, tool, pins) in [
        ("py", "bin/componentize-py", "python-http/requirements.txt"),
        (
            "js",
            "node_modules/.bin/componentize-js",
            "js-http/package.json",
        ),
    ] {
        let installed = std::fs::read_to_string(dir.join(part).join("installed-from"));
        assert!(
            dir.join(part).join(tool).exists()
                && installed.ok() == Some(read(templates.join(pins))),
            "{} does not hold the toolchain pinned by {pins}: run `cargo xtask toolchains` (or the \
             tests through `cargo xtask test`), which installs it",
            dir.join(part).display()
        );
    }
    dir
}

/// `mayfly new` with `template`, then `mayfly deploy` in the project (which
/// runs its build) against a real node, then GET and POST on its route.
/// `prepare` readies the project for its toolchain and gives the deploy's
/// extra environment.
fn template_builds_deploys_and_serves(
    template: &str,
    prepare: impl FnOnce(&Path) -> Vec<(&'static str, std::ffi::OsString)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("hi-{template}");
    let (ok, stdout, stderr) = mayfly(dir.path(), &["new", &name, "--template", template]);
    assert!(ok, "{stdout}{stderr}");
    let project = dir.path().join(&name);
    let env = prepare(&project);

    let data = tempfile::tempdir().unwrap();
    // These components are tens of MB: on a busy 2-core machine their
    // compile can approach the default limit of 5 minutes.
    let node = Node::start_with(data.path(), &["--compile-timeout", "600s"]);
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("deploy")
        .current_dir(&project)
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("{name}: version 1 deployed, routes /{name}")),
        "{stdout}"
    );
    let size = std::fs::metadata(project.join(format!("{name}.wasm")))
        .unwrap()
        .len();
    eprintln!(
        "{template}: built and deployed in {:?} ({:.1} MiB component): {}",
        started.elapsed(),
        size as f64 / f64::from(1 << 20),
        stdout.trim()
    );

    assert_eq!(
        node.get(&format!("/{name}")),
        (200, format!("Hello from {name}!\n"))
    );
    let (status, body, _) = node.request("POST", &format!("/{name}"), b"echo me");
    assert_eq!((status, body.as_slice()), (200, &b"echo me"[..]));
    // Larger than one read or write of the guests' streams.
    let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body, _) = node.request("POST", &format!("/{name}"), &large);
    assert_eq!(status, 200);
    assert!(
        body == large,
        "{template}: {} bytes echoed of {}",
        body.len(),
        large.len()
    );
    let (status, _, _) = node.request("PUT", &format!("/{name}"), b"");
    assert_eq!(status, 405);

    // The handler reads its greeting from the environment: a new version
    // of the same component (compiled already) with GREETING set.
    let wasm = project.join(format!("{name}.wasm"));
    let route = format!("/{name}");
    let (ok, stdout, stderr) = node.cli(&[
        "deploy",
        &name,
        wasm.to_str().unwrap(),
        "--route",
        &route,
        "--env",
        "GREETING=Hi",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(node.get(&route), (200, format!("Hi from {name}!\n")));
}

/// Slow (a build of 15 to 45 s and a compile of 10 to 90 s on a busy
/// machine): the Python template, built with componentize-py.
#[test]
fn python_template_builds_deploys_and_serves() {
    let toolchains = toolchains();
    template_builds_deploys_and_serves("python-http", |_| {
        // As an activated virtualenv would: its python3 and componentize-py
        // first on the PATH.
        let mut path = std::ffi::OsString::from(toolchains.join("py/bin"));
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        vec![("PATH", path)]
    });
}

/// Slow, as the Python one: the JavaScript template, built with
/// componentize-js.
#[test]
fn js_template_builds_deploys_and_serves() {
    let toolchains = toolchains();
    template_builds_deploys_and_serves("js-http", |project| {
        // What `npm install` would put there, shared between runs.
        std::os::unix::fs::symlink(
            toolchains.join("js/node_modules"),
            project.join("node_modules"),
        )
        .unwrap();
        Vec::new()
    });
}
