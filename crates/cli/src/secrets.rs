//! `mayfly secret …`: the node's secrets. Values go in from stdin or a
//! file, never from a flag (where `ps` and shell history would keep them),
//! and never come back out: functions read them through wasi:config.

use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use crate::client::{AdminClient, read_json, segment};
use crate::output::{Table, format_time};

/// `mayfly secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret, replacing any value it had. The value is read from
    /// stdin (one trailing newline removed, so `echo x | mayfly secret set
    /// NAME` stores `x`) or, as it is, from --file.
    Set {
        /// Secret name: 1–128 letters, digits, `_`, `.` or `-`.
        name: String,
        /// Read the value from this file, byte for byte.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// List secrets' names and versions (never their values).
    List,
    /// Delete a secret.
    Delete {
        /// Secret name.
        name: String,
    },
    /// Replace the node's master key with a new one and reseal every secret
    /// under it.
    RotateKey,
}

/// Runs a `mayfly secret` verb.
pub fn run(client: &AdminClient, json: bool, command: SecretCommand) -> anyhow::Result<()> {
    match command {
        SecretCommand::Set { name, file } => {
            let value = match file {
                Some(file) => std::fs::read(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                None => read_stdin()?,
            };
            set(client, json, &name, &value)
        }
        SecretCommand::List => list(client, json),
        SecretCommand::Delete { name } => {
            client.delete(&path(&name))?;
            if json {
                println!("{}", serde_json::json!({"deleted": name}));
            } else {
                println!("deleted secret {name}");
            }
            Ok(())
        }
        SecretCommand::RotateKey => {
            let answer: Value = client.send_json("POST", "/v1/secrets/rotate", &[], None)?;
            if json {
                println!("{answer}");
            } else {
                println!(
                    "rotated the master key: resealed {} secret(s)",
                    answer["resealed"]
                );
            }
            Ok(())
        }
    }
}

fn path(name: &str) -> String {
    format!("/v1/secrets/{}", segment(name))
}

/// The value from stdin, less one trailing newline.
fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("enter the secret's value, then press Ctrl-D:");
    }
    let mut value = Vec::new();
    stdin
        .read_to_end(&mut value)
        .context("cannot read the secret's value from stdin")?;
    strip_newline(&mut value);
    Ok(value)
}

/// Removes exactly one trailing `\n` (or `\r\n`): what `echo` and a typed
/// line add.
fn strip_newline(value: &mut Vec<u8>) {
    if value.last() == Some(&b'\n') {
        value.pop();
        if value.last() == Some(&b'\r') {
            value.pop();
        }
    }
}

fn set(client: &AdminClient, json: bool, name: &str, value: &[u8]) -> anyhow::Result<()> {
    let headers = [(
        "content-type".to_string(),
        "application/octet-stream".to_string(),
    )];
    let response = client.send_raw("PUT", &path(name), &headers, Some(value))?;
    let created = response.status() == 201;
    let answer: Value = read_json(response)?;
    if json {
        println!("{answer}");
    } else {
        let verb = if created { "created" } else { "updated" };
        println!("{verb} secret {name} (version {})", answer["version"]);
    }
    Ok(())
}

fn list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let secrets: Vec<Value> = client.get_json("/v1/secrets")?;
    if json {
        println!("{}", Value::from(secrets));
        return Ok(());
    }
    if secrets.is_empty() {
        println!("no secrets: set one with `mayfly secret set NAME < value.txt`");
        return Ok(());
    }
    let mut table = Table::new(["NAME", "VERSION", "UPDATED"]).right(&["VERSION"]);
    for secret in &secrets {
        table.row([
            secret["name"].as_str().unwrap_or_default().to_string(),
            secret["version"].to_string(),
            secret["updated_at_ms"]
                .as_i64()
                .map(format_time)
                .unwrap_or_default(),
        ]);
    }
    table.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::strip_newline;

    #[test]
    fn secrets_stdin_loses_exactly_one_newline() {
        for (input, expected) in [
            (&b"x\n"[..], &b"x"[..]),
            (b"x\r\n", b"x"),
            (b"x\n\n", b"x\n"),
            (b"x", b"x"),
            (b"\n", b""),
            (b"", b""),
        ] {
            let mut value = input.to_vec();
            strip_newline(&mut value);
            assert_eq!(value, expected, "{input:?}");
        }
    }
}
