//! `mayfly model …`: ONNX models that functions load by name through
//! wasi:nn (granted with `--model NAME`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use crate::client::{AdminClient, read_json, segment};
use crate::output::{Table, format_time};

/// `mayfly model …`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload an ONNX model under NAME (a new version if NAME exists). The
    /// node parses it first and refuses a file it cannot run.
    Put {
        /// Model name: lower-case letters, digits, `-`, `_` or `.`.
        name: String,
        /// The .onnx file.
        file: PathBuf,
    },
    /// List models: name, version, size, digest, inputs and outputs.
    List,
    /// Delete a model no deployed function is granted.
    Delete {
        /// Model name.
        name: String,
    },
}

/// Runs a `mayfly model` verb.
pub fn run(client: &AdminClient, json: bool, command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Put { name, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let headers = [(
                "content-type".to_string(),
                "application/octet-stream".to_string(),
            )];
            let response = client.send_raw("PUT", &path(&name), &headers, Some(&bytes))?;
            let answer: Value = read_json(response)?;
            if json {
                println!("{answer}");
            } else {
                println!(
                    "stored model {name} version {} ({} bytes, {})",
                    answer["version"],
                    answer["size"],
                    answer["digest"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
        ModelCommand::List => list(client, json),
        ModelCommand::Delete { name } => {
            client.delete(&path(&name))?;
            if json {
                println!("{}", serde_json::json!({"deleted": name}));
            } else {
                println!("deleted model {name}");
            }
            Ok(())
        }
    }
}

fn path(name: &str) -> String {
    format!("/v1/models/{}", segment(name))
}

fn list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let models: Vec<Value> = client.get_json("/v1/models")?;
    if json {
        println!("{}", Value::from(models));
        return Ok(());
    }
    if models.is_empty() {
        println!("no models: upload one with `mayfly model put NAME FILE.onnx`");
        return Ok(());
    }
    let names = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let mut table = Table::new(["NAME", "VERSION", "BYTES", "INPUTS", "OUTPUTS", "UPDATED"])
        .right(&["VERSION", "BYTES"]);
    for model in &models {
        table.row([
            model["name"].as_str().unwrap_or_default().to_string(),
            model["version"].to_string(),
            model["size"].to_string(),
            names(&model["inputs"]),
            names(&model["outputs"]),
            model["updated_at_ms"]
                .as_i64()
                .map(format_time)
                .unwrap_or_default(),
        ]);
    }
    table.print();
    Ok(())
}
