//! `mayfly new`: writes a ready function project from templates built into
//! the binary (`crates/cli/templates`): Rust (wasm32-wasip2, with a test of
//! its own), Python (componentize-py) or JavaScript (componentize-js), each
//! with a `mayfly.toml` whose `build` makes the component.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Longest name of a function, bucket or queue (the node's limit).
const MAX_NAME_LEN: usize = 63;

/// Which project to create.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// Function name: lower-case letters, digits, `-` and `_`, starting with
    /// a letter. It also names the component (and, in Rust, the crate).
    name: String,
    /// What runs the function.
    #[arg(long, short = 't', value_enum, default_value_t = Template::Http)]
    template: Template,
    /// Folder to create the project in [default: ./<name>]; it must not
    /// exist or be empty.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
}

/// The kinds of project `mayfly new` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// HTTP requests on a route: greets on GET, echoes POST bodies.
    Http,
    /// A schedule (every minute): logs each firing.
    Cron,
    /// Objects created or deleted in a bucket: logs each change.
    Object,
    /// Messages sent to a queue: logs each one; a body of `fail` fails.
    Queue,
    /// An image classifier on wasi:nn: POST a PNG or JPEG, get the model's
    /// top classes as JSON.
    Classify,
    /// HTTP in Python (componentize-py): greets on GET, echoes POST bodies.
    PythonHttp,
    /// HTTP in JavaScript (componentize-js, the Fetch API): greets on GET,
    /// echoes POST bodies.
    JsHttp,
}

/// The Rust sources of one Rust template, before substitution.
struct RustFiles {
    lib: &'static str,
    manifest: &'static str,
    try_it: &'static str,
    /// Lines added to `[dependencies]` in Cargo.toml.
    dependencies: &'static str,
    /// Files besides the shared ones: (path in the project, contents).
    extra: &'static [(&'static str, &'static str)],
}

impl Template {
    fn name(self) -> &'static str {
        match self {
            Template::Http => "http",
            Template::Cron => "cron",
            Template::Object => "object",
            Template::Queue => "queue",
            Template::Classify => "classify",
            Template::PythonHttp => "python-http",
            Template::JsHttp => "js-http",
        }
    }

    /// The README's first sentence.
    fn about(self) -> &'static str {
        match self {
            Template::Http | Template::PythonHttp | Template::JsHttp => {
                "answers HTTP requests on its route, greeting on GET and echoing POST bodies."
            }
            Template::Cron => "runs on a schedule, every minute.",
            Template::Object => "runs when objects are created or deleted in a bucket.",
            Template::Queue => "processes the messages sent to a queue.",
            Template::Classify => {
                "classifies the images POSTed to its route with a model the node runs (wasi:nn)."
            }
        }
    }

    /// The bucket or queue the trigger watches, after the function name.
    fn resource_suffix(self) -> Option<&'static str> {
        match self {
            Template::Object => Some("-uploads"),
            Template::Queue => Some("-jobs"),
            _ => None,
        }
    }
}

/// Creates the project and prints what to do next.
pub fn run(args: &NewArgs, json: bool) -> anyhow::Result<()> {
    let NewArgs {
        name,
        template,
        dir,
    } = args;
    check_name(name, *template)?;
    let dir = dir.clone().unwrap_or_else(|| PathBuf::from(name));
    let files = render(name, *template);
    write_project(&dir, &files)?;
    if json {
        let paths: Vec<&str> = files.iter().map(|(path, _)| *path).collect();
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "template": template.name(),
                "dir": dir.display().to_string(),
                "files": paths,
            })
        );
        return Ok(());
    }
    println!(
        "created {name} ({} template) in {}",
        template.name(),
        dir.display()
    );
    let greet = format!("curl localhost:8080/{name}");
    let hello = format!("Hello from {name}!");
    let steps: Vec<(String, &str)> = match template {
        Template::Http => vec![
            ("cargo test".into(), "its own tests, on this machine"),
            (format!("curl localhost:8080/{name}/world"), "Hello, world!"),
        ],
        Template::Cron => vec![
            ("cargo test".into(), "its own tests, on this machine"),
            (format!("mayfly logs {name} --follow"), "a line a minute"),
        ],
        Template::Object => vec![
            ("cargo test".into(), "its own tests, on this machine"),
            (
                format!("mayfly object put {name}-uploads hello.txt --file README.md"),
                "logs `created hello.txt`",
            ),
        ],
        Template::Queue => vec![
            ("cargo test".into(), "its own tests, on this machine"),
            (
                format!("mayfly queue send {name}-jobs hello"),
                "logs the message",
            ),
        ],
        Template::Classify => vec![
            ("cargo test".into(), "its own tests, on this machine"),
            (
                "mayfly model put orientation MODEL.onnx".into(),
                "the model it runs: README.md says where to get it",
            ),
            (
                format!("curl localhost:8080/{name} --data-binary @page.png"),
                "the top classes, as JSON",
            ),
        ],
        Template::PythonHttp => vec![
            (
                "python3 -m venv .venv".into(),
                "once: a virtualenv for the toolchain",
            ),
            (". .venv/bin/activate".into(), "in each new shell"),
            (
                "pip install -r requirements.txt".into(),
                "once: componentize-py",
            ),
            (greet, &hello),
        ],
        Template::JsHttp => vec![
            ("npm install".into(), "once: componentize-js"),
            (greet, &hello),
        ],
    };
    println!("next:");
    println!("  cd {}", dir.display());
    // `mayfly deploy` comes after the set-up steps, before trying it.
    let (setup, try_it) = steps.split_at(steps.len() - 1);
    let deploy = (
        "mayfly deploy".to_string(),
        "builds it and deploys it per mayfly.toml",
    );
    for (command, what) in setup.iter().chain([&deploy]).chain(try_it) {
        println!("  {command:<40} # {what}");
    }
    Ok(())
}

/// Function names appear in URLs, routes and file names, and here also name
/// a component file, a Rust crate (which cannot start with a digit) and
/// maybe a bucket or queue (at most 63 characters).
fn check_name(name: &str, template: Template) -> anyhow::Result<()> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        bail!(
            "invalid function name `{name}`: use 1 to {MAX_NAME_LEN} lower-case letters, digits, \
             `-` or `_`, starting with a letter (it also names the component and, in Rust, \
             the crate)"
        );
    }
    if let Some(suffix) = template.resource_suffix()
        && name.len() + suffix.len() > MAX_NAME_LEN
    {
        bail!(
            "the name `{name}` is too long for the {} template: its trigger's `{name}{suffix}` \
             would be over {MAX_NAME_LEN} characters",
            template.name()
        );
    }
    Ok(())
}

/// The project's files: (path relative to the project, contents).
fn render(name: &str, template: Template) -> Vec<(&'static str, String)> {
    let rust = |lib, manifest, try_it| {
        render_rust(
            name,
            template,
            RustFiles {
                lib,
                manifest,
                try_it,
                dependencies: "",
                extra: &[],
            },
        )
    };
    match template {
        Template::Http => rust(
            include_str!("../templates/http/lib.rs"),
            include_str!("../templates/http/mayfly.toml"),
            include_str!("../templates/http/try.md"),
        ),
        Template::Cron => rust(
            include_str!("../templates/cron/lib.rs"),
            include_str!("../templates/cron/mayfly.toml"),
            include_str!("../templates/cron/try.md"),
        ),
        Template::Object => rust(
            include_str!("../templates/object/lib.rs"),
            include_str!("../templates/object/mayfly.toml"),
            include_str!("../templates/object/try.md"),
        ),
        Template::Queue => rust(
            include_str!("../templates/queue/lib.rs"),
            include_str!("../templates/queue/mayfly.toml"),
            include_str!("../templates/queue/try.md"),
        ),
        Template::Classify => render_rust(
            name,
            template,
            RustFiles {
                lib: include_str!("../templates/classify/lib.rs"),
                manifest: include_str!("../templates/classify/mayfly.toml"),
                try_it: include_str!("../templates/classify/try.md"),
                dependencies: CLASSIFY_DEPENDENCIES,
                extra: &[
                    ("src/nn.rs", include_str!("../templates/classify/nn.rs")),
                    // The example guest's own: the same 3 MiB initial memory.
                    (
                        "build.rs",
                        include_str!("../../../guests/classify/build.rs"),
                    ),
                    // The interface version the node speaks, unchanged.
                    (
                        "wit/wasi-nn.wit",
                        include_str!("../../runtime/wit/nn/wasi-nn.wit"),
                    ),
                ],
            },
        ),
        // The WIT of wasi:http is not in these files: each project's build
        // fetches it from a package registry (README.md of each template).
        Template::PythonHttp => render_each(
            name,
            template,
            &[
                ("app.py", include_str!("../templates/python-http/app.py")),
                (
                    "wit/app.wit",
                    include_str!("../templates/python-http/app.wit"),
                ),
                (
                    "wit_deps.py",
                    include_str!("../templates/python-http/wit_deps.py"),
                ),
                (
                    "requirements.txt",
                    include_str!("../templates/python-http/requirements.txt"),
                ),
                (
                    "mayfly.toml",
                    include_str!("../templates/python-http/mayfly.toml"),
                ),
                (
                    ".gitignore",
                    include_str!("../templates/python-http/gitignore"),
                ),
                (
                    "README.md",
                    include_str!("../templates/python-http/README.md"),
                ),
            ],
        ),
        Template::JsHttp => render_each(
            name,
            template,
            &[
                ("src/app.js", include_str!("../templates/js-http/app.js")),
                ("wit/app.wit", include_str!("../templates/js-http/app.wit")),
                (
                    "wit-deps.mjs",
                    include_str!("../templates/js-http/wit-deps.mjs"),
                ),
                (
                    "package.json",
                    include_str!("../templates/js-http/package.json"),
                ),
                (
                    "mayfly.toml",
                    include_str!("../templates/js-http/mayfly.toml"),
                ),
                (".gitignore", include_str!("../templates/js-http/gitignore")),
                ("README.md", include_str!("../templates/js-http/README.md")),
            ],
        ),
    }
}

/// Substitutes `{{name}}` and `{{template}}` in each file.
fn render_each(
    name: &str,
    template: Template,
    files: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let vars = [("name", name), ("template", template.name())];
    files
        .iter()
        .map(|(path, text)| (*path, substitute(text, &vars)))
        .collect()
}

/// The classify template's dependencies: image decoding (PNG and JPEG only,
/// so the rest of `image` stays out of the component) and the bindings
/// generator for wasi:nn, which the `wasip2` crate does not cover.
const CLASSIFY_DEPENDENCIES: &str = "\
image = { version = \"0.25\", default-features = false, features = [\"png\", \"jpeg\"] }

[target.'cfg(target_arch = \"wasm32\")'.dependencies]
wit-bindgen = { version = \"0.57\", default-features = false, features = [\"macros\"] }
";

/// A Rust project: a crate with the template's `lib.rs` and the shared glue.
fn render_rust(name: &str, template: Template, files: RustFiles) -> Vec<(&'static str, String)> {
    let crate_name = name.replace('-', "_");
    let vars = [
        ("name", name),
        ("crate_name", crate_name.as_str()),
        ("template", template.name()),
        ("dependencies", files.dependencies),
    ];
    let try_it = substitute(files.try_it, &vars);
    let mut readme_vars = vars.to_vec();
    readme_vars.extend([("about", template.about()), ("try_it", try_it.as_str())]);
    vec![
        (
            "Cargo.toml",
            substitute(include_str!("../templates/common/Cargo.toml.tmpl"), &vars),
        ),
        (
            ".gitignore",
            include_str!("../templates/common/gitignore").to_string(),
        ),
        ("mayfly.toml", substitute(files.manifest, &vars)),
        (
            "README.md",
            substitute(include_str!("../templates/common/README.md"), &readme_vars),
        ),
        ("src/lib.rs", substitute(files.lib, &vars)),
        (
            "src/wasi_http.rs",
            include_str!("../templates/common/wasi_http.rs").to_string(),
        ),
    ]
    .into_iter()
    .chain(
        files
            .extra
            .iter()
            .map(|(path, text)| (*path, substitute(text, &vars))),
    )
    .collect()
}

/// Replaces each `{{key}}` of `vars` in `text`, in one pass (values are not
/// scanned again); other `{{…}}` stay as they are.
fn substitute(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let value = after.find("}}").and_then(|end| {
            let key = &after[..end];
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, value)| (*value, end))
        });
        match value {
            Some((value, end)) => {
                out.push_str(value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Writes `files` under `dir`, which must not exist or be empty; never
/// replaces a file.
fn write_project(dir: &Path, files: &[(&str, String)]) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} already exists and is not empty: choose another name or --dir",
                    dir.display()
                );
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) if dir.exists() && !dir.is_dir() => {
            bail!("{} already exists and is not a folder", dir.display())
        }
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", dir.display())),
    }
    for (path, contents) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // create_new: a file that appeared meanwhile is not overwritten.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| file.write_all(contents.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUST: [Template; 4] = [
        Template::Http,
        Template::Cron,
        Template::Object,
        Template::Queue,
    ];
    const ALL: [Template; 6] = [
        Template::Http,
        Template::Cron,
        Template::Object,
        Template::Queue,
        Template::PythonHttp,
        Template::JsHttp,
    ];

    #[test]
    fn substitution_replaces_known_keys_once() {
        let vars = [("name", "a-b"), ("crate_name", "a_b"), ("x", "{{name}}")];
        assert_eq!(
            substitute("{{name}}/{{crate_name}}.wasm {{x}} {{other}} {{", &vars),
            "a-b/a_b.wasm {{name}} {{other}} {{"
        );
    }

    #[test]
    fn every_template_renders_without_leftover_placeholders() {
        for template in ALL {
            let files = render("my-fn", template);
            for (path, contents) in &files {
                assert!(
                    !contents.contains("{{"),
                    "{path} of {template:?} keeps a placeholder"
                );
            }
        }
        for template in [Template::PythonHttp, Template::JsHttp] {
            let files = render("my-fn", template);
            let manifest = &files.iter().find(|(p, _)| *p == "mayfly.toml").unwrap().1;
            assert!(manifest.contains("[functions.my-fn]"), "{manifest}");
            assert!(
                manifest.contains(r#"component = "my-fn.wasm""#),
                "{manifest}"
            );
            // The WIT of wasi:http comes from a registry at build time, never
            // from these files: only the project's own world is written.
            let wit: Vec<_> = files.iter().filter(|(p, _)| p.ends_with(".wit")).collect();
            assert_eq!(wit.len(), 1, "{template:?}");
            assert!(
                wit[0].1.contains("include wasi:http/proxy@0.2."),
                "{}",
                wit[0].1
            );
        }
        for template in RUST {
            let files = render("my-fn", template);
            let manifest = &files.iter().find(|(p, _)| *p == "mayfly.toml").unwrap().1;
            assert!(manifest.contains("[functions.my-fn]"), "{manifest}");
            assert!(
                manifest.contains(r#"component = "target/wasm32-wasip2/release/my_fn.wasm""#),
                "{manifest}"
            );
            let cargo = &files.iter().find(|(p, _)| *p == "Cargo.toml").unwrap().1;
            assert!(cargo.contains(r#"name = "my-fn""#), "{cargo}");
        }
    }

    /// The manifests use only keys `mayfly deploy` knows, the commented
    /// examples too.
    #[test]
    fn every_manifest_is_one_deploy_accepts() {
        for template in ALL {
            let files = render("my-fn", template);
            let manifest = &files.iter().find(|(p, _)| *p == "mayfly.toml").unwrap().1;
            let path = std::path::Path::new("my-fn/mayfly.toml");
            let parsed = crate::manifest::Manifest::parse(path, manifest).unwrap();
            assert_eq!(parsed.functions.len(), 1);
            let uncommented: String = manifest
                .lines()
                .map(|line| match line.strip_prefix("# ") {
                    Some(rest)
                        if rest.starts_with("[functions.")
                            || rest.split_once(" = ").is_some_and(|(key, _)| {
                                key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                            }) =>
                    {
                        rest
                    }
                    _ => line,
                })
                .flat_map(|line| [line, "\n"])
                .collect();
            assert!(uncommented.contains("\nmemory_mb = 128"), "{uncommented}");
            assert!(
                uncommented.contains("\n[functions.my-fn.grants]"),
                "{uncommented}"
            );
            crate::manifest::Manifest::parse(path, &uncommented)
                .unwrap_or_else(|e| panic!("{template:?}: {e:#}\n{uncommented}"));
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["hello", "a", "my-fn_2"] {
            check_name(good, Template::Http).unwrap();
        }
        for bad in ["", "Hello", "2fast", "-x", "a.b", "a/b", &"a".repeat(64)] {
            let error = check_name(bad, Template::Http).unwrap_err().to_string();
            assert!(error.contains("invalid function name"), "{bad}: {error}");
        }
        let long = "a".repeat(56);
        check_name(&long, Template::Http).unwrap();
        let error = check_name(&long, Template::Object).unwrap_err().to_string();
        assert!(
            error.contains("too long for the object template"),
            "{error}"
        );
    }
}
