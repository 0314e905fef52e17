//! `mayfly completions SHELL` and `mayfly man`, run as a user runs them.

use std::process::Command;

/// Runs `mayfly ARGS` with no node around; returns its stdout, panicking
/// unless it succeeded with nothing on stderr.
fn mayfly(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "mayfly {args:?}: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn bash_and_zsh_completions_name_the_verbs_and_hide_the_internal_one() {
    let bash = mayfly(&["completions", "bash"]);
    assert!(bash.contains("complete -F _mayfly"), "{bash}");
    let zsh = mayfly(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef mayfly"), "{zsh}");
    for script in [&bash, &zsh] {
        for verb in ["deploy", "logs", "serve", "--log-format", "--route"] {
            assert!(script.contains(verb), "no `{verb}`");
        }
        assert!(!script.contains("compile-worker"));
    }
    let help = mayfly(&["--help"]);
    assert!(help.contains("completions") && !help.contains("compile-worker"));

    let unknown = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("bash") && stderr.contains("zsh"),
        "{stderr}"
    );
}

#[test]
fn the_man_page_renders_with_its_verbs_and_one_page_per_verb_with_dir() {
    let page = mayfly(&["man"]);
    assert!(page.contains(".TH mayfly 1"), "{page}");
    assert!(page.contains(".SH SYNOPSIS"), "{page}");
    // roff escapes the hyphen: `mayfly\-deploy(1)` in the verbs' list.
    assert!(page.contains("mayfly\\-deploy(1)"), "{page}");
    assert!(!page.contains("compile\\-worker"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("share/man/man1");
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["man", "--dir"])
        .arg(&man1)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(output.stdout.is_empty(), "pages go to files, not stdout");
    let deploy = std::fs::read_to_string(man1.join("mayfly-deploy.1")).unwrap();
    assert!(deploy.contains(".TH mayfly-deploy 1"), "{deploy}");
    assert!(deploy.contains("\\-\\-route"), "{deploy}");
    assert!(man1.join("mayfly.1").is_file());
    assert!(
        man1.join("mayfly-alias-set.1").is_file(),
        "nested verbs too"
    );
    assert!(!man1.join("mayfly-compile-worker.1").exists());
}
