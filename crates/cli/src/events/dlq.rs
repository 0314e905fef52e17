//! `mayfly dlq …`: events that failed every delivery.

use std::io::Write as _;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::body::body_bytes;
use crate::client::{AdminClient, PAGE, query, segment};
use crate::output::{Table, one_line, print_fields, text, time};

/// Longest last error shown in the dead-letter table.
const ERROR_COLUMN: usize = 60;

/// `mayfly dlq …`: events that failed every delivery.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a function's dead letters.
    List {
        /// Function name.
        function: String,
    },
    /// Show one dead letter: its metadata, then its body.
    Show {
        /// Function name.
        function: String,
        /// Dead-letter id (see `mayfly dlq list`).
        id: u64,
    },
    /// Deliver dead letters again (all of them when no id is given).
    Redrive {
        /// Function name.
        function: String,
        /// Dead-letter ids.
        ids: Vec<u64>,
    },
    /// Delete dead letters (all of them unless --id is given).
    Purge {
        /// Function name.
        function: String,
        /// Only this dead letter.
        #[arg(long, value_name = "N")]
        id: Option<u64>,
    },
}

/// Runs a `mayfly dlq` verb.
pub fn run(client: &AdminClient, json: bool, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { function } => dlq_list(client, json, &function),
        DlqCommand::Show { function, id } => dlq_show(client, json, &function, id),
        DlqCommand::Redrive { function, ids } => {
            let body = if ids.is_empty() {
                json!({})
            } else {
                json!({ "ids": ids })
            };
            let path = format!("/v1/functions/{}/dlq/redrive", segment(&function));
            let outcome: Value = client.post_json(&path, &body)?;
            print_count(json, &outcome, "redriven", "redelivering")
        }
        DlqCommand::Purge { function, id } => {
            let path = format!(
                "/v1/functions/{}/dlq{}",
                segment(&function),
                query(&[("id", id.map(|id| id.to_string()))])
            );
            let outcome: Value = client.send_json("DELETE", &path, &[], None)?;
            print_count(json, &outcome, "purged", "purged")
        }
    }
}

fn print_count(json: bool, outcome: &Value, field: &str, verb: &str) -> anyhow::Result<()> {
    if json {
        println!("{outcome}");
    } else {
        let n = outcome[field].as_u64().unwrap_or(0);
        println!("{verb} {n} dead letter{}", if n == 1 { "" } else { "s" });
    }
    Ok(())
}

fn dlq_list(client: &AdminClient, json: bool, function: &str) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{}/dlq", segment(function));
    let mut letters: Vec<Value> = Vec::new();
    loop {
        let after = letters.last().map(|letter| text(&letter["id"]));
        let url = format!(
            "{path}{}",
            query(&[("after", after), ("limit", Some(PAGE.to_string()))])
        );
        let page: Vec<Value> = client.get_json(&url)?;
        let full = page.len() >= PAGE;
        letters.extend(page);
        if !full {
            break;
        }
    }
    if json {
        println!("{}", Value::from(letters));
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters for {function}");
        return Ok(());
    }
    let mut table =
        Table::new(["ID", "TYPE", "ATTEMPTS", "DIED", "LAST ERROR"]).right(&["ATTEMPTS"]);
    for letter in &letters {
        table.row([
            text(&letter["id"]),
            text(&letter["type"]),
            text(&letter["attempts"]),
            time(&letter["died_ms"]),
            one_line(&text(&letter["last_error"]), ERROR_COLUMN),
        ]);
    }
    table.print();
    Ok(())
}

fn dlq_show(client: &AdminClient, json: bool, function: &str, id: u64) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{}/dlq/{id}", segment(function));
    let letter: Value = client.get_json(&path)?;
    if json {
        println!("{letter}");
        return Ok(());
    }
    let mut fields = letter.clone();
    if let Some(map) = fields.as_object_mut() {
        map.remove("body");
        map.remove("body_base64");
    }
    print_fields(&fields);
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    let body = body_bytes(&letter)?;
    out.write_all(&body)?;
    // End the terminal line; the data itself is printed as stored.
    if !body.ends_with(b"\n") {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}
