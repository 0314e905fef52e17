//! `mayfly queue …`: the node's durable queues.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::body::{body_bytes, read_body};
use crate::client::{AdminClient, ApiError, check, query, segment};
use crate::flags::{RECEIVE_FLAGS, naming_flags};
use crate::output::{Table, text, time};

/// `mayfly queue …`: the node's durable queues.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Send a message.
    Send {
        /// Queue name (created on first use); `NAME@SITE` places it at leaf
        /// site SITE's own store.
        queue: String,
        /// The message body.
        #[arg(conflicts_with = "file")]
        body: Option<String>,
        /// Read the body from a file (`-` for stdin).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Content type stored with the message.
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
    },
    /// Receive messages; they stay invisible for the visibility timeout and
    /// come back unless acknowledged with `mayfly queue ack`.
    Receive {
        /// Queue name.
        queue: String,
        /// Most messages to receive (node default 10).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max: Option<u32>,
        /// How long received messages stay invisible, e.g. 30s (node default 30s).
        #[arg(long, value_name = "DURATION", value_parser = duration_text)]
        visibility: Option<String>,
    },
    /// Acknowledge (delete) a received message by its receipt.
    Ack {
        /// Queue name.
        queue: String,
        /// The receipt printed by `mayfly queue receive`.
        receipt: String,
    },
    /// List queues with their waiting and in-flight messages.
    List,
}

/// Checks a duration such as `30s` and keeps its text for the query string.
fn duration_text(text: &str) -> Result<String, String> {
    humantime::parse_duration(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("{e} (use e.g. 30s, 500ms or 2m)"))
}

/// Runs a `mayfly queue` verb.
pub fn run(client: &AdminClient, json: bool, command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Send {
            queue,
            body,
            file,
            content_type,
        } => {
            let body = read_body(body, file.as_deref(), "message body")?;
            queue_send(client, json, &queue, &body, content_type)
        }
        QueueCommand::Receive {
            queue,
            max,
            visibility,
        } => queue_receive(client, json, &queue, max, visibility),
        QueueCommand::Ack { queue, receipt } => queue_ack(client, json, &queue, &receipt),
        QueueCommand::List => queue_list(client, json),
    }
}

fn queue_send(
    client: &AdminClient,
    json: bool,
    queue: &str,
    body: &[u8],
    content_type: Option<String>,
) -> anyhow::Result<()> {
    let headers: Vec<_> = content_type
        .map(|t| ("content-type".to_string(), t))
        .into_iter()
        .collect();
    let path = format!("/v1/queues/{}/messages", segment(queue));
    let sent: Value = client.send_json("POST", &path, &headers, Some(body))?;
    if json {
        println!("{sent}");
    } else {
        println!("sent message {} to {queue}", text(&sent["id"]));
    }
    Ok(())
}

fn queue_receive(
    client: &AdminClient,
    json: bool,
    queue: &str,
    max: Option<u32>,
    visibility: Option<String>,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/queues/{}/receive{}",
        segment(queue),
        query(&[
            ("max", max.map(|n| n.to_string())),
            ("visibility", visibility)
        ])
    );
    let received: Value = client
        .send_json("POST", &path, &[], None)
        .map_err(|e| naming_flags(e, RECEIVE_FLAGS))?;
    if json {
        println!("{received}");
        return Ok(());
    }
    let messages = received["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        println!("no messages waiting in {queue}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for (n, message) in messages.iter().enumerate() {
        if n > 0 {
            writeln!(out)?;
        }
        writeln!(
            out,
            "message {} (attempt {}, {}, sent {})\nreceipt {}",
            text(&message["id"]),
            text(&message["attempts"]),
            text(&message["content_type"]),
            time(&message["sent_ms"]),
            text(&message["receipt"])
        )?;
        let body = body_bytes(message)?;
        if message["body"].is_string() {
            out.write_all(&body)?;
        } else {
            write!(out, "<{} bytes of binary data>", body.len())?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

fn queue_ack(client: &AdminClient, json: bool, queue: &str, receipt: &str) -> anyhow::Result<()> {
    let path = format!(
        "/v1/queues/{}/messages/{}",
        segment(queue),
        segment(receipt)
    );
    let response = client.send_raw("DELETE", &path, &[], None)?;
    if response.status() == 409 {
        return Err(ApiError::from_response(response)
            .saying(
                "stale receipt: the visibility timeout ran out and the message was received \
                 again; acknowledge it with its newer receipt",
            )
            .into());
    }
    check(response)?;
    if json {
        println!("{}", json!({"queue": queue, "acknowledged": receipt}));
    } else {
        println!("acknowledged {receipt}");
    }
    Ok(())
}

fn queue_list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let queues: Vec<Value> = client.get_json("/v1/queues")?;
    if json {
        println!("{}", Value::from(queues));
        return Ok(());
    }
    if queues.is_empty() {
        println!("no queues: send a message with `mayfly queue send <queue> <body>`");
        return Ok(());
    }
    let mut table =
        Table::new(["QUEUE", "MESSAGES", "IN_FLIGHT"]).right(&["MESSAGES", "IN_FLIGHT"]);
    for queue in &queues {
        table.row([
            text(&queue["queue"]),
            text(&queue["messages"]),
            text(&queue["in_flight"]),
        ]);
    }
    table.print();
    Ok(())
}
