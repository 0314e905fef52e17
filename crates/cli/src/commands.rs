//! The verbs that talk to a node's admin API.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use mayfly_store::{FunctionRecord, LogRecord};
use serde_json::Value;

use crate::Command;
use crate::client::{AdminClient, check};

pub fn run(admin_url: &str, json: bool, command: Command) -> anyhow::Result<()> {
    let client = AdminClient::new(admin_url);
    match command {
        Command::Serve(_) => unreachable!("serve runs a node, it is not a client verb"),
        Command::Deploy {
            name,
            component,
            routes,
        } => deploy(&client, json, &name, &component, routes),
        Command::List => list(&client, json),
        Command::Invoke {
            name,
            data,
            data_file,
            path,
            method,
            headers,
        } => {
            let body = match (data, data_file) {
                (Some(data), _) => Some(data.into_bytes()),
                (None, Some(file)) if file.as_os_str() == "-" => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .context("cannot read the body from stdin")?;
                    Some(bytes)
                }
                (None, Some(file)) => Some(
                    std::fs::read(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                ),
                (None, None) => None,
            };
            invoke(&client, json, &name, body, &path, method, &headers)
        }
        Command::Logs { name, follow, tail } => logs(&client, json, &name, follow, tail),
        Command::Delete { name } => {
            client.delete(&format!("/v1/functions/{}", segment(&name)))?;
            if json {
                println!("{}", serde_json::json!({"deleted": name}));
            } else {
                println!("deleted {name}");
            }
            Ok(())
        }
        Command::Status => status(&client, json),
    }
}

fn deploy(
    client: &AdminClient,
    json: bool,
    name: &str,
    component: &std::path::Path,
    routes: Vec<String>,
) -> anyhow::Result<()> {
    let wasm = std::fs::read(component)
        .with_context(|| format!("cannot read the component {}", component.display()))?;
    let config = serde_json::to_vec(&serde_json::json!({ "routes": routes }))?;
    let outcome: Value = client.post_multipart(
        &format!("/v1/functions/{}/versions", segment(name)),
        &[
            ("component", "application/wasm", &wasm),
            ("config", "application/json", &config),
        ],
    )?;
    if json {
        println!("{outcome}");
        return Ok(());
    }
    let routes = outcome["config"]["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "deployed {name} version {} ({}{})",
        outcome["version"],
        outcome["digest"].as_str().unwrap_or("?"),
        if outcome["compiled"] == Value::Bool(true) {
            ", compiled"
        } else {
            ", cached artifact"
        }
    );
    if routes.is_empty() {
        println!("no routes: call it with `mayfly invoke {name}`");
    } else {
        println!("routes: {routes}");
    }
    Ok(())
}

fn list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let functions: Vec<FunctionRecord> = client.get_json("/v1/functions")?;
    if json {
        println!("{}", serde_json::to_string(&functions)?);
        return Ok(());
    }
    if functions.is_empty() {
        println!("no functions deployed: try `mayfly deploy <name> <file.wasm> --route /path`");
        return Ok(());
    }
    println!(
        "{:<24} {:>7}  {:<24}  ROUTES",
        "NAME", "VERSION", "DEPLOYED"
    );
    for function in functions {
        println!(
            "{:<24} {:>7}  {:<24}  {}",
            function.name,
            function.live.version,
            format_time(function.live.created_at_ms),
            function.live.config.routes.join(", ")
        );
    }
    Ok(())
}

fn invoke(
    client: &AdminClient,
    json: bool,
    name: &str,
    body: Option<Vec<u8>>,
    path: &str,
    method: Option<String>,
    headers: &[String],
) -> anyhow::Result<()> {
    let method = method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_string());
    let headers = headers
        .iter()
        .map(|header| {
            header
                .split_once(':')
                .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
                .with_context(|| format!("header `{header}` is not `Name: value`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let query = format!(
        "/v1/functions/{}/invoke?path={}&method={}",
        segment(name),
        percent_encode(path, b"/"),
        percent_encode(&method, b"")
    );
    let mut response = client.send_raw("POST", &query, &headers, body.as_deref())?;
    let status = response.status();
    // A missing function is the API's error, not the function's response.
    if status == 404 && response.headers().get("x-mayfly-request-id").is_none() {
        check(response)?;
        return Ok(());
    }
    let request_id = response
        .headers()
        .get("x-mayfly-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .context("cannot read the function's response")?;
    if json {
        let headers: serde_json::Map<String, Value> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap_or(""))))
            .collect();
        let body = String::from_utf8_lossy(&bytes);
        println!(
            "{}",
            serde_json::json!({"status": status.as_u16(), "request_id": request_id, "headers": headers, "body": body})
        );
    } else {
        std::io::stdout().write_all(&bytes)?;
        if !status.is_success() {
            eprintln!("HTTP {status} (request {request_id})");
        }
    }
    Ok(())
}

fn logs(
    client: &AdminClient,
    json: bool,
    name: &str,
    follow: bool,
    tail: usize,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/functions/{}/logs?tail={tail}&follow={follow}",
        segment(name)
    );
    if !follow {
        let lines: Vec<LogRecord> = client.get_json(&path)?;
        for line in lines {
            print_log(json, &line)?;
        }
        return Ok(());
    }
    let response = check(client.send_raw("GET", &path, &[], None)?)?;
    let reader = BufReader::new(response.into_body().into_reader());
    for line in reader.lines() {
        let line = line.context("the log stream broke")?;
        if line.trim().is_empty() {
            continue;
        }
        let record: LogRecord =
            serde_json::from_str(&line).context("the log stream sent an unexpected line")?;
        print_log(json, &record)?;
    }
    bail!("the node closed the log stream")
}

fn print_log(json: bool, record: &LogRecord) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(record)?)?;
    } else {
        let line = &record.line;
        writeln!(
            out,
            "{} v{} {} {:<6} {}",
            format_time(line.ts_ms),
            line.version,
            line.request_id,
            line.stream,
            line.line
        )?;
    }
    out.flush()?;
    Ok(())
}

fn status(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let status: Value = client.get_json("/v1/status")?;
    if json {
        println!("{status}");
        return Ok(());
    }
    if let Some(fields) = status.as_object() {
        for (key, value) in fields {
            let value = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            println!("{:<22} {value}", format!("{}:", key.replace('_', " ")));
        }
    }
    Ok(())
}

fn format_time(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Percent-encodes `value` for a URL: RFC 3986 unreserved characters and
/// those in `keep` pass through.
fn percent_encode(value: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || keep.contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A function name as one URL path segment.
fn segment(name: &str) -> String {
    percent_encode(name, b"")
}
