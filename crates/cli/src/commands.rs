//! The verbs that talk to a node's admin API.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use mayfly_store::{FunctionRecord, LogRecord};
use serde_json::Value;

use crate::args::{AliasCommand, Command, InvokeArgs, NodeCommand, UsageArgs};
use crate::body::read_file;
use crate::client::{AdminClient, check, encode, encode_keeping_slashes, segment};
use crate::deploy::{DeployArgs, FunctionDeploy, print_warnings, send_deploy};
use crate::events;
use crate::flags::{CANARY_FLAGS, DEPLOY_FLAGS, USAGE_FLAGS, naming_flags};
use crate::output::{Table, aligned_fields, format_time, text};

pub fn run(client: &AdminClient, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve runs a node, it is not a client verb"),
        Command::Simulate(_) => {
            unreachable!("simulate runs locally, it is not a client verb")
        }
        Command::New(_) => unreachable!("new runs locally, it is not a client verb"),
        Command::Dev(_) => unreachable!("dev runs a node, it is not a client verb"),
        Command::Login(_) | Command::Logout | Command::Profile { .. } => {
            unreachable!("login, logout and profile edit the CLI's config")
        }
        Command::Completions(_) | Command::Man(_) => {
            unreachable!("completions and man describe the CLI itself")
        }
        Command::Deploy(args) => deploy(client, json, *args),
        Command::List => list(client, json),
        Command::Invoke(args) => invoke(client, json, &args),
        Command::Logs { name, follow, tail } => logs(client, json, &name, follow, tail),
        Command::Delete { name } => {
            client.delete(&format!("/v1/functions/{}", segment(&name)))?;
            if json {
                println!("{}", serde_json::json!({"deleted": name}));
            } else {
                println!("deleted {name}");
            }
            Ok(())
        }
        Command::Status { fleet: false } => status(client, json),
        Command::Status { fleet: true } => fleet_status(client, json),
        Command::Node {
            command: NodeCommand::List,
        } => node_list(client, json),
        Command::Versions {
            name,
            delete: Some(version),
            ..
        } => {
            client.delete(&format!(
                "/v1/functions/{}/versions/{version}",
                segment(&name)
            ))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"function": name, "deleted_version": version})
                );
            } else {
                println!("deleted version {version} of {name}");
            }
            Ok(())
        }
        Command::Versions {
            name,
            delete: None,
            fleet: true,
        } => fleet_versions(client, json, &name),
        Command::Versions {
            name,
            delete: None,
            fleet: false,
        } => versions(client, json, &name),
        Command::Alias { command } => alias(client, json, command),
        Command::Rollback { name } => {
            let answer: Value = client.post_json(
                &format!("/v1/functions/{}/rollback", segment(&name)),
                &serde_json::json!({}),
            )?;
            if json {
                println!("{answer}");
            } else {
                let alias = answer["alias"].as_str().unwrap_or("live");
                // bench/fleet.sh reads the first line: keep it `live: 2 -> 1`.
                println!("{alias}: {} -> {}", answer["from"], answer["version"]);
                // A rollback goes to the version the alias left last, so a
                // second one comes back: say so before it surprises anyone.
                println!(
                    "a second `mayfly rollback {name}` returns {alias} to {}, the version it \
                     left; to go further back, run `mayfly alias set {name} {alias} VERSION` \
                     (`mayfly versions {name}` lists them)",
                    answer["from"]
                );
            }
            Ok(())
        }
        Command::Usage(args) => usage(client, json, &args),
        Command::Job { command } => crate::jobs::run(client, json, command),
        Command::Pipeline { command } => crate::pipelines::run(client, json, command),
        Command::Object { command } => events::objects::run(client, json, command),
        Command::Kv { command } => events::kv::run(client, json, command),
        Command::Queue { command } => events::queues::run(client, json, command),
        Command::Trigger { command } => events::triggers::run(client, json, command),
        Command::Dlq { command } => events::dlq::run(client, json, command),
        Command::Secret { command } => crate::secrets::run(client, json, command),
        Command::Model { command } => crate::models::run(client, json, command),
        Command::Token { command } => crate::access::token(client, json, command),
        Command::Audit(args) => crate::access::audit(client, json, &args),
    }
}

/// `mayfly deploy`: NAME and COMPONENT with flags, or neither to apply the
/// manifest.
fn deploy(client: &AdminClient, json: bool, args: DeployArgs) -> anyhow::Result<()> {
    let DeployArgs {
        name,
        component,
        manifest,
        routes,
        strip_prefix,
        triggers,
        limits,
        scaling,
        grants,
        place,
        wait,
    } = args;
    // Clap refuses --manifest with NAME.
    let (name, component) = match (name, component) {
        (Some(name), Some(component)) => (name, component),
        (None, None) => {
            let flags_given = !routes.is_empty()
                || !triggers.is_empty()
                || limits.memory.is_some()
                || limits.timeout.is_some()
                || limits.max_request_bytes.is_some()
                || limits.max_response_bytes.is_some()
                || limits.max_log_bytes.is_some()
                || limits.streaming_request
                || scaling.max_concurrency.is_some()
                || scaling.reserved_concurrency.is_some()
                || scaling.max_queued.is_some()
                || scaling.queue_timeout.is_some()
                || scaling.reuse
                || !grants.kv.is_empty()
                || !grants.objects.is_empty()
                || !grants.queues.is_empty()
                || !grants.outbound.is_empty()
                || !grants.secrets.is_empty()
                || !grants.models.is_empty()
                || !grants.variables.is_empty()
                || !grants.env.is_empty()
                || !grants.env_secrets.is_empty()
                || !place.is_empty()
                || strip_prefix;
            if wait.is_some() {
                bail!(
                    "--wait needs NAME and COMPONENT (`mayfly deploy NAME COMPONENT --wait`); \
                     after a manifest deploy, watch the rollout with `mayfly versions NAME --fleet`"
                );
            }
            if flags_given {
                bail!(
                    "routes, triggers, limits and grants given as flags need NAME and \
                     COMPONENT (`mayfly deploy NAME COMPONENT --route /x`); to deploy a \
                     manifest, set them in its [functions.<name>] tables"
                );
            }
            let path = manifest.unwrap_or_else(|| PathBuf::from(crate::manifest::DEFAULT_PATH));
            return crate::manifest::apply(client, json, &path);
        }
        (Some(name), None) => bail!(
            "`mayfly deploy {name}` needs the component too: `mayfly deploy {name} \
             path/to/{name}.wasm`; or give neither NAME nor COMPONENT to deploy every \
             function in {}",
            crate::manifest::DEFAULT_PATH
        ),
        (None, Some(component)) => bail!(
            "`mayfly deploy` needs a function NAME before the component {}",
            component.display()
        ),
    };
    if strip_prefix && routes.is_empty() {
        bail!(
            "--strip-prefix takes the prefix of each --route off the path the function sees: \
             give a --route too"
        );
    }
    let deploy = FunctionDeploy {
        name,
        component,
        strip_prefix: if strip_prefix {
            routes.clone()
        } else {
            Vec::new()
        },
        routes,
        triggers,
        limits,
        scaling,
        grants,
        placement: place.into_iter().collect(),
    };
    let mut outcome =
        send_deploy(client, &deploy, !json).map_err(|e| naming_flags(e, DEPLOY_FLAGS))?;
    if !json {
        // Before a wait, which may end in an error they explain.
        print_warnings(&outcome);
    }
    let rollout = match wait {
        Some(timeout) => {
            let version = outcome["version"].as_u64().unwrap_or_default();
            Some(wait_for_rollout(
                client,
                &deploy.name,
                version,
                &deploy.placement,
                timeout,
            )?)
        }
        None => None,
    };
    if json {
        if let Some((nodes, took)) = rollout {
            outcome["rollout"] = serde_json::json!({"nodes": nodes, "seconds": took.as_secs_f64()});
        }
        println!("{outcome}");
        return Ok(());
    }
    let FunctionDeploy { name, triggers, .. } = &deploy;
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
    if outcome["unchanged"] == Value::Bool(true) {
        println!(
            "{name} version {} is live with this component and config already: unchanged",
            outcome["version"]
        );
    } else {
        println!(
            "deployed {name} version {} ({}, {})",
            outcome["version"],
            outcome["digest"].as_str().unwrap_or("?"),
            crate::progress::compile_note(&outcome)
        );
    }
    if let Some((nodes, took)) = rollout {
        let placed = if deploy.placement.is_empty() {
            String::new()
        } else {
            format!(" with {}", mayfly_store::labels_text(&deploy.placement))
        };
        println!(
            "live on {nodes} of {nodes} nodes{placed} after {:.2}s",
            took.as_secs_f64()
        );
    }
    if routes.is_empty() {
        println!("no routes: call it with `mayfly invoke {name}`");
    } else {
        println!("routes: {routes}");
    }
    if !triggers.is_empty() {
        events::triggers::print_deployed_triggers(&outcome, triggers)?;
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
    let mut table = Table::new(["NAME", "VERSION", "DEPLOYED", "ROUTES"]).right(&["VERSION"]);
    for function in functions {
        table.row([
            function.name,
            function.live.version.to_string(),
            format_time(function.live.created_at_ms),
            function.live.config.routes.join(", "),
        ]);
    }
    table.print();
    Ok(())
}

fn invoke(client: &AdminClient, json: bool, args: &InvokeArgs) -> anyhow::Result<()> {
    let body = match (&args.data, &args.data_file) {
        (Some(data), _) => Some(data.clone().into_bytes()),
        (None, Some(file)) => Some(read_file(file)?),
        (None, None) => None,
    };
    let headers = args
        .headers
        .iter()
        .map(|header| {
            header
                .split_once(':')
                .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
                .with_context(|| format!("header `{header}` is not `Name: value`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (name, path) = (&args.name, &args.path);
    if args.delivery.async_invoke {
        return events::invoke_async::run(
            client,
            json,
            name,
            body.as_deref(),
            path,
            &headers,
            &args.delivery,
        );
    }
    let method = args
        .method
        .clone()
        .unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_string());
    let mut query = format!(
        "/v1/functions/{}/invoke?path={}&method={}",
        segment(name),
        encode_keeping_slashes(path),
        encode(&method)
    );
    if let Some(alias) = &args.alias {
        query.push_str(&format!("&alias={}", encode(alias)));
    }
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
        // In a fleet every line names its node.
        let lines: Vec<Followed> = client.get_json(&path)?;
        for line in lines {
            print_log(json, line.node.as_deref(), &line.record)?;
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
        let record: Followed =
            serde_json::from_str(&line).context("the log stream sent an unexpected line")?;
        print_log(json, record.node.as_deref(), &record.record)?;
    }
    bail!("the node closed the log stream")
}

/// A log line as the admin API sends it: in a fleet it names the node
/// that wrote it.
#[derive(serde::Deserialize)]
struct Followed {
    #[serde(default)]
    node: Option<String>,
    #[serde(flatten)]
    record: LogRecord,
}

/// Prints one log line; `node`, in a fleet, as a `[node]` prefix (a `node`
/// field in JSON).
fn print_log(json: bool, node: Option<&str>, record: &LogRecord) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(record)?;
        if let (Some(node), Value::Object(fields)) = (node, &mut value) {
            fields.insert("node".into(), node.into());
        }
        writeln!(out, "{value}")?;
    } else {
        let line = &record.line;
        if let Some(node) = node {
            write!(out, "[{node}] ")?;
        }
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

/// Polls the fleet's membership until every live node that runs
/// `function` (every node, or those whose labels match `placement`) serves
/// `version` on its `live` alias; returns how many nodes that is and how
/// long it took. Nodes report every second, so this sees a rollout within
/// about a second of its end.
fn wait_for_rollout(
    client: &AdminClient,
    function: &str,
    version: u64,
    placement: &std::collections::BTreeMap<String, String>,
    timeout: std::time::Duration,
) -> anyhow::Result<(usize, std::time::Duration)> {
    let started = std::time::Instant::now();
    loop {
        let mut nodes: Vec<mayfly_store::NodeInfo> = client.get_json("/v1/nodes")?;
        // A node on its own runs every function, whatever its labels.
        if nodes.len() > 1
            || nodes
                .iter()
                .any(|node| !node.functions.contains_key(function))
        {
            nodes.retain(|node| mayfly_store::placement_matches(&node.labels, placement));
        }
        if nodes.is_empty() && started.elapsed() >= timeout {
            let wanted = mayfly_store::labels_text(placement);
            bail!(
                "{function} version {version} is deployed, but after {:.1}s no live node has labels {wanted}: start one with `mayfly serve --labels {wanted}`",
                started.elapsed().as_secs_f64(),
            );
        }
        let behind: Vec<String> = nodes
            .iter()
            .filter(|node| node.functions.get(function) != Some(&version))
            .map(|node| match node.functions.get(function) {
                Some(v) => format!("{} (version {v})", node.name),
                None => format!("{} (not yet)", node.name),
            })
            .collect();
        if behind.is_empty() && !nodes.is_empty() {
            return Ok((nodes.len(), started.elapsed()));
        }
        if started.elapsed() >= timeout {
            bail!(
                "{function} version {version} is deployed, but after {:.1}s these nodes do not serve it yet: {}",
                started.elapsed().as_secs_f64(),
                behind.join(", ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `mayfly versions NAME --fleet`: the version each node serves; a node
/// whose labels do not match the function's placement is marked so.
fn fleet_versions(client: &AdminClient, json: bool, function: &str) -> anyhow::Result<()> {
    let nodes: Vec<mayfly_store::NodeInfo> = client.get_json("/v1/nodes")?;
    let described: Value = client.get_json(&format!("/v1/functions/{}", segment(function)))?;
    let placement: std::collections::BTreeMap<String, String> =
        serde_json::from_value(described["live"]["config"]["placement"].clone())
            .unwrap_or_default();
    let serving: Vec<(&str, Option<u64>, bool)> = nodes
        .iter()
        .map(|node| {
            (
                node.name.as_str(),
                node.functions.get(function).copied(),
                nodes.len() == 1 || mayfly_store::placement_matches(&node.labels, &placement),
            )
        })
        .collect();
    if json {
        let rows: Vec<Value> = serving
            .iter()
            .map(|(node, version, placed)| {
                serde_json::json!({"node": node, "version": version, "placed": placed})
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    let mut table = Table::new(["NODE", "LIVE VERSION"]);
    let labels = mayfly_store::labels_text(&placement);
    for (node, version, placed) in serving {
        let version = match (version, placed) {
            (Some(version), _) => version.to_string(),
            (None, true) => "-".to_string(),
            (None, false) => format!("- (placed on {labels})"),
        };
        table.row([node.to_string(), version]);
    }
    table.print();
    Ok(())
}

fn node_list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let nodes: Vec<mayfly_store::NodeInfo> = client.get_json("/v1/nodes")?;
    if json {
        println!("{}", serde_json::to_string(&nodes)?);
        return Ok(());
    }
    print_nodes(&nodes);
    Ok(())
}

/// The table of nodes `node list` and `status --fleet` print: labels,
/// gateway, load, and the `live` version of each function served.
fn print_nodes(nodes: &[mayfly_store::NodeInfo]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut table = Table::new([
        "NODE",
        "LABELS",
        "GATEWAY",
        "IN-FLIGHT",
        "MEMORY MB",
        "SEEN",
        "FUNCTIONS",
    ])
    .right(&["IN-FLIGHT", "MEMORY MB", "SEEN"]);
    for node in nodes {
        let labels = mayfly_store::labels_text(&node.labels);
        let functions = node
            .functions
            .iter()
            .map(|(name, version)| format!("{name}@{version}"))
            .collect::<Vec<_>>()
            .join(" ");
        let or_dash = |text: String| {
            if text.is_empty() {
                "-".to_string()
            } else {
                text
            }
        };
        table.row([
            node.name.clone(),
            or_dash(labels),
            or_dash(node.gateway.clone()),
            node.in_flight.to_string(),
            format!("{}/{}", node.memory_used_mb, node.memory_budget_mb),
            format!("{:.1}s", (now - node.at_ms).max(0) as f64 / 1000.0),
            or_dash(functions),
        ]);
    }
    table.print();
}

/// `mayfly status --fleet`: the answering node's link to the fleet, then
/// every node as `node list` shows it, then the edge nodes by leaf site.
fn fleet_status(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let status: Value = client.get_json("/v1/status")?;
    // Cut off from the fleet, a node cannot read the membership list; its
    // link is still worth showing (it says why).
    let nodes = client.get_json::<Vec<mayfly_store::NodeInfo>>("/v1/nodes");
    // An edge node answers with at least its own site while cut off.
    let sites = client.get_json::<Vec<mayfly_store::SiteNode>>("/v1/sites");
    if json {
        let (list, error) = match &nodes {
            Ok(nodes) => (serde_json::to_value(nodes)?, Value::Null),
            Err(error) => (Value::Null, format!("{error:#}").into()),
        };
        let mut out = serde_json::json!({"link": status.get("fleet"), "nodes": list});
        if !error.is_null() {
            out["nodes_error"] = error;
        }
        match &sites {
            Ok(sites) => out["sites"] = serde_json::to_value(sites)?,
            Err(error) => out["sites_error"] = format!("{error:#}").into(),
        }
        println!("{out}");
    } else {
        let link = match status.get("fleet") {
            Some(link) => link_fields(link),
            None => vec![("fleet".into(), "none: this node runs on its own".into())],
        };
        print!("{}", aligned_fields(&link));
        println!();
        if let Ok(nodes) = &nodes {
            print_nodes(nodes);
        }
        match &sites {
            Ok(sites) if !sites.is_empty() => {
                println!();
                print_sites(sites);
            }
            Ok(_) => {}
            Err(error) => eprintln!("cannot list the fleet's sites: {error:#}"),
        }
    }
    nodes.map(|_| ()).context("cannot list the fleet's nodes")
}

/// The edge nodes by site: the link to the hub as each last reported it,
/// or, for a record no longer refreshed, out of touch since its last
/// contact (the hub's view of a cut site).
fn print_sites(sites: &[mayfly_store::SiteNode]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut table = Table::new([
        "SITE",
        "NODE",
        "LINK",
        "SINCE",
        "SEEN",
        "BACKLOG",
        "FUNCTIONS",
    ])
    .right(&["SEEN", "BACKLOG"]);
    for record in sites {
        let (link, since) = if record.stale {
            ("stale", record.node.at_ms)
        } else if record.link.up {
            ("connected", record.link.since_ms)
        } else {
            ("disconnected", record.link.since_ms)
        };
        let functions = record
            .node
            .functions
            .iter()
            .map(|(name, version)| format!("{name}@{version}"))
            .collect::<Vec<_>>()
            .join(" ");
        table.row([
            record.site.clone(),
            record.node.name.clone(),
            link.to_string(),
            format_time(since),
            format!("{:.1}s", (now - record.node.at_ms).max(0) as f64 / 1000.0),
            record.usage_backlog.to_string(),
            if functions.is_empty() {
                "-".to_string()
            } else {
                functions
            },
        ]);
    }
    table.print();
}

/// The `fleet` part of a status as `name: value` pairs: the NATS
/// connection and the usage not yet published.
fn link_fields(link: &Value) -> Vec<(String, String)> {
    let servers = link["servers"].as_str().unwrap_or("?");
    let connection = if link["connected"].as_bool() == Some(true) {
        format!("connected to {servers}")
    } else {
        match link["disconnected_since_ms"].as_i64() {
            Some(since) => format!("disconnected since {} from {servers}", format_time(since)),
            None => format!("disconnected from {servers}"),
        }
    };
    let mut fields = vec![("fleet".to_string(), connection)];
    if let Some(hub) = link.get("hub").filter(|hub| hub.is_object()) {
        let state = if hub["up"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        };
        fields.push((
            "hub link".to_string(),
            format!(
                "{state} since {} (site {} to hub {})",
                format_time(hub["since_ms"].as_i64().unwrap_or(0)),
                text(&hub["site"]),
                text(&hub["hub_domain"]),
            ),
        ));
    }
    fields.extend([(
        "usage backlog".to_string(),
        format!("{} usage records not yet published", link["usage_backlog"]),
    )]);
    if let Some(dropped) = link["log_lines_unpublished"].as_u64().filter(|n| *n > 0) {
        fields.push(("log lines unpublished".to_string(), dropped.to_string()));
    }
    fields
}

fn status(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let status: Value = client.get_json("/v1/status")?;
    if json {
        println!("{status}");
        return Ok(());
    }
    let mut fields: Vec<(String, String)> = status
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| *key != "scaling" && *key != "fleet")
        .map(|(key, value)| {
            let value = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            (key.replace('_', " "), value)
        })
        .collect();
    if let Some(link) = status.get("fleet") {
        fields.extend(link_fields(link));
    }
    print!("{}", aligned_fields(&fields));
    if let Some(functions) = status["scaling"].as_array().filter(|f| !f.is_empty()) {
        let mut table = Table::new([
            "FUNCTION",
            "TIER",
            "RUNNING",
            "KEPT",
            "QUEUED",
            "IDLE",
            "COLD",
            "THROTTLED",
        ])
        .right(&["RUNNING", "KEPT", "QUEUED", "IDLE", "COLD", "THROTTLED"]);
        for function in functions {
            let idle = function["idle_seconds"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"));
            table.row([
                text(&function["function"]),
                text(&function["tier"]),
                text(&function["running"]),
                text(&function["kept"]),
                text(&function["queued"]),
                idle,
                text(&function["cold_starts"]),
                text(&function["throttled"]),
            ]);
        }
        println!();
        table.print();
    }
    Ok(())
}

/// How a usage column's numbers are written.
#[derive(Clone, Copy)]
enum Measure {
    /// A count or a sum of integers, written as it is.
    Count,
    /// CPU time: the ledger's microseconds, written as milliseconds.
    CpuMs,
    /// GB-seconds or money: fractions, where small values matter.
    Fraction,
}

/// Columns of the usage table and CSV: header, JSON pointer in a row, and
/// how its numbers are written. The outcomes the ledger tells apart (all
/// but `ok`, which is INVOCATIONS less the rest) each have a column.
const USAGE_COLUMNS: &[(&str, &str, Measure)] = &[
    ("INVOCATIONS", "/invocations", Measure::Count),
    ("ERRORS", "/errors", Measure::Count),
    ("TIMEOUTS", "/outcomes/timeout", Measure::Count),
    ("OOM", "/outcomes/oom", Measure::Count),
    ("CLIENT_CLOSED", "/outcomes/client_closed", Measure::Count),
    ("COLD", "/cold_starts", Measure::Count),
    ("INIT_MS", "/init_us", Measure::CpuMs),
    ("BILLED_MS", "/billed_ms", Measure::Count),
    ("BILLED_GB_S", "/billed_gb_s", Measure::Fraction),
    ("USED_GB_S", "/used_gb_s", Measure::Fraction),
    ("CPU_MS", "/cpu_us", Measure::CpuMs),
    ("COLD_COST", "/cost/cold_starts", Measure::Fraction),
    ("COST", "/cost/total", Measure::Fraction),
];

/// A usage cell for CSV: numbers at full precision. Fractions use Rust's
/// shortest round-trip formatting of an f64 (`{}`: the fewest digits that
/// read back as the same number, never an exponent), so a cost of 2e-7 is
/// `0.0000002`, not `0.000000`; a spreadsheet reads it exactly. A value the
/// node did not send (an older node) is an empty cell.
fn usage_csv_cell(row: &Value, pointer: &str, measure: Measure) -> String {
    let Some(value) = row.pointer(pointer).filter(|v| !v.is_null()) else {
        return String::new();
    };
    match measure {
        Measure::Count => text(value),
        Measure::CpuMs => format!("{}", value.as_f64().unwrap_or(0.0) / 1000.0),
        Measure::Fraction => format!("{}", value.as_f64().unwrap_or(0.0)),
    }
}

/// A usage cell for the table, for people: CPU to a tenth of a
/// millisecond; fractions to 6 decimals, or to 3 significant digits when
/// smaller, so that a cost of 2e-7 shows as `0.000000200`, not as zero.
fn usage_table_cell(row: &Value, pointer: &str, measure: Measure) -> String {
    let Some(value) = row.pointer(pointer).filter(|v| !v.is_null()) else {
        return "-".to_string();
    };
    match measure {
        Measure::Count => text(value),
        Measure::CpuMs => format!("{:.1}", value.as_f64().unwrap_or(0.0) / 1000.0),
        Measure::Fraction => approximate(value.as_f64().unwrap_or(0.0)),
    }
}

/// `x` with 6 decimals, or more for a small non-zero `x`: enough for 3
/// significant digits.
fn approximate(x: f64) -> String {
    let decimals = if x == 0.0 || !x.is_finite() {
        6
    } else {
        // -floor(log10 |x|) is the position of the first significant digit.
        let first = (-x.abs().log10().floor()).clamp(0.0, 300.0) as usize;
        (first + 2).max(6)
    };
    format!("{x:.decimals$}")
}

fn usage(client: &AdminClient, json: bool, args: &UsageArgs) -> anyhow::Result<()> {
    let mut path = format!("/v1/usage?group_by={}", encode(&args.by));
    match (&args.since, &args.job) {
        (Some(since), _) => path.push_str(&format!("&from={}", encode(since))),
        // A job's records, whenever they were made.
        (None, Some(_)) => {}
        (None, None) => path.push_str("&from=24h"),
    }
    if let Some(job) = &args.job {
        path.push_str(&format!("&job={}", encode(job)));
    }
    if let Some(until) = &args.until {
        path.push_str(&format!("&to={}", encode(until)));
    }
    if let Some(function) = &args.function {
        path.push_str(&format!("&function={}", encode(function)));
    }
    let report: Value = client
        .get_json(&path)
        .map_err(|e| naming_flags(e, USAGE_FLAGS))?;
    if json {
        println!("{report}");
        return Ok(());
    }
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let key = |row: &Value| -> String {
        match args.by.as_str() {
            "version" => format!(
                "{} v{}",
                row["function"].as_str().unwrap_or("?"),
                row["version"]
            ),
            "hour" | "day" => row["period_start"].as_str().unwrap_or("?").to_string(),
            _ => row["function"].as_str().unwrap_or("?").to_string(),
        }
    };
    let mut out = std::io::stdout().lock();
    if args.csv {
        write_usage_csv(&mut out, &args.by, rows.iter().map(|row| (key(row), row)))?;
        return Ok(());
    }
    writeln!(
        out,
        "usage from {} to {} ({}; prices in {})",
        report["from"].as_str().unwrap_or("?"),
        report["to"].as_str().unwrap_or("?"),
        args.by,
        report["prices"]["currency"].as_str().unwrap_or("?")
    )?;
    let numbers: Vec<&str> = USAGE_COLUMNS.iter().map(|(name, _, _)| *name).collect();
    let by = args.by.to_uppercase();
    let mut table =
        Table::new(std::iter::once(by.as_str()).chain(numbers.iter().copied())).right(&numbers);
    let total = report["total"].clone();
    for (label, row) in rows
        .iter()
        .map(|row| (key(row), row))
        .chain(std::iter::once(("TOTAL".to_string(), &total)))
    {
        table.row(
            std::iter::once(label).chain(
                USAGE_COLUMNS
                    .iter()
                    .map(|(_, pointer, measure)| usage_table_cell(row, pointer, *measure)),
            ),
        );
    }
    write!(out, "{}", table.render())?;
    Ok(())
}

/// Writes usage rows as CSV (RFC 4180, by the `csv` crate): a header of
/// lower-case column names, then one record per `(key, row)`.
fn write_usage_csv<'a>(
    out: impl Write,
    by: &str,
    rows: impl Iterator<Item = (String, &'a Value)>,
) -> anyhow::Result<()> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(
        std::iter::once(by.to_lowercase())
            .chain(USAGE_COLUMNS.iter().map(|(name, _, _)| name.to_lowercase())),
    )?;
    for (key, row) in rows {
        csv.write_record(
            std::iter::once(key).chain(
                USAGE_COLUMNS
                    .iter()
                    .map(|(_, pointer, measure)| usage_csv_cell(row, pointer, *measure)),
            ),
        )?;
    }
    csv.flush()?;
    Ok(())
}

/// `mayfly alias set|list|delete`.
fn alias(client: &AdminClient, json: bool, command: AliasCommand) -> anyhow::Result<()> {
    match command {
        AliasCommand::Set {
            name,
            alias,
            to,
            canary,
            auto,
        } => {
            let mut body = serde_json::json!({"version": to});
            if let Some((canary, percent)) = canary {
                body["canary"] = serde_json::json!({"version": canary, "weight_percent": percent});
                if let Some(auto) = auto.to_json() {
                    body["canary"]["auto"] = auto;
                }
            }
            let body = serde_json::to_vec(&body)?;
            let headers = [("content-type".to_string(), "application/json".to_string())];
            let answer: Value = client
                .send_json(
                    "PUT",
                    &format!(
                        "/v1/functions/{}/aliases/{}",
                        segment(&name),
                        segment(&alias)
                    ),
                    &headers,
                    Some(&body),
                )
                .map_err(|e| naming_flags(e, CANARY_FLAGS))?;
            if json {
                println!("{answer}");
            } else {
                println!("{name} {}", alias_summary(&answer));
            }
            Ok(())
        }
        AliasCommand::List { name } => {
            let aliases: Vec<Value> =
                client.get_json(&format!("/v1/functions/{}/aliases", segment(&name)))?;
            if json {
                println!("{}", Value::from(aliases));
                return Ok(());
            }
            let mut table = Table::new(["ALIAS", "VERSION", "CANARY", "PREVIOUS", "UPDATED"])
                .right(&["VERSION", "PREVIOUS"]);
            for alias in aliases {
                let canary = canary_text(&alias["canary"]).unwrap_or_else(|| "-".to_string());
                table.row([
                    text(&alias["alias"]),
                    text(&alias["version"]),
                    canary,
                    text(&alias["previous_version"]),
                    format_time(alias["updated_at_ms"].as_i64().unwrap_or(0)),
                ]);
            }
            table.print();
            Ok(())
        }
        AliasCommand::Delete { name, alias } => {
            client.delete(&format!(
                "/v1/functions/{}/aliases/{}",
                segment(&name),
                segment(&alias)
            ))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"function": name, "deleted_alias": alias})
                );
            } else {
                println!("deleted alias {alias} of {name}");
            }
            Ok(())
        }
    }
}

/// `live: 7 (canary 8 at 10%)` for an alias as the API shows it.
fn alias_summary(alias: &Value) -> String {
    let mut text = format!(
        "{}: {}",
        alias["alias"].as_str().unwrap_or_default(),
        alias["version"]
    );
    if let Some(canary) = canary_text(&alias["canary"]) {
        text.push_str(&format!(" (canary {canary})"));
    }
    text
}

/// A canary as `8 at 10%`, with an automatic one's thresholds and how far
/// it has been judged: `8 at 10%, auto 37/100 judged, 0 errors`.
fn canary_text(canary: &Value) -> Option<String> {
    let canary = canary.as_object()?;
    let mut text = format!(
        "{} at {}%",
        canary["version"],
        canary["weight_percent"].as_f64().unwrap_or(0.0)
    );
    if let Some(auto) = canary.get("auto").and_then(Value::as_object) {
        let requests = auto["requests"].as_u64().unwrap_or(0);
        match canary.get("progress").and_then(Value::as_object) {
            Some(progress) => text.push_str(&format!(
                ", auto {}/{requests} judged, {} errors",
                progress["requests"].as_u64().unwrap_or(0),
                progress["errors"].as_u64().unwrap_or(0)
            )),
            None => text.push_str(&format!(", auto over {requests}")),
        }
    }
    Some(text)
}

/// Prints a function's alias moves, newest first.
fn print_history(history: &[Value]) {
    if history.is_empty() {
        return;
    }
    println!("\nALIAS MOVES (newest first)");
    let mut table = Table::new(["WHEN", "ALIAS", "MOVE", "CAUSE", "DETAIL"]);
    for moved in history {
        let to = moved["version"].as_u64().unwrap_or(0);
        let step = match moved["from_version"].as_u64() {
            Some(from) if from != to => format!("{from} -> {to}"),
            _ => to.to_string(),
        };
        let mut detail = moved["detail"].as_str().unwrap_or_default().to_string();
        if let Some(canary) = canary_text(&moved["canary"]) {
            detail = format!(
                "canary {canary}{}{detail}",
                if detail.is_empty() { "" } else { "; " }
            );
        }
        table.row([
            format_time(moved["at_ms"].as_i64().unwrap_or(0)),
            text(&moved["alias"]),
            step,
            text(&moved["cause"]),
            if detail.is_empty() {
                "-".to_string()
            } else {
                detail
            },
        ]);
    }
    table.print();
}

/// The aliases pointing at `version`, for the versions table: `*live` for
/// the live one, `live(canary 10%)` for a canary, other names as they are.
fn aliases_of(aliases: &[Value], version: Option<u64>) -> String {
    let mut names = Vec::new();
    for alias in aliases {
        let name = alias["alias"].as_str().unwrap_or_default();
        if alias["version"].as_u64() == version {
            names.push(if name == "live" {
                "*live".to_string()
            } else {
                name.to_string()
            });
        }
        if alias["canary"]["version"].as_u64() == version {
            names.push(format!(
                "{name}(canary {}%)",
                alias["canary"]["weight_percent"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    if names.is_empty() {
        "-".to_string()
    } else {
        names.join(",")
    }
}

/// `mayfly versions <fn>`: every immutable version, newest first, with the
/// aliases that point at it.
fn versions(client: &AdminClient, json: bool, name: &str) -> anyhow::Result<()> {
    let function: Value = client.get_json(&format!("/v1/functions/{}", segment(name)))?;
    if json {
        println!("{}", function["versions"]);
        return Ok(());
    }
    let aliases = function["aliases"].as_array().cloned().unwrap_or_default();
    let mut versions = function["versions"].as_array().cloned().unwrap_or_default();
    versions.sort_by_key(|v| std::cmp::Reverse(v["version"].as_u64()));
    let mut table = Table::new(["VERSION", "DIGEST", "CREATED", "ALIASES", "ROUTES"]);
    for version in versions {
        let number = version["version"].as_u64();
        let digest = version["digest"].as_str().unwrap_or_default();
        let digest = digest.strip_prefix("sha256:").unwrap_or(digest);
        let routes = version["config"]["routes"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        table.row([
            number.map(|n| n.to_string()).unwrap_or_default(),
            digest.get(..12).unwrap_or(digest).to_string(),
            format_time(version["created_at_ms"].as_i64().unwrap_or(0)),
            aliases_of(&aliases, number),
            if routes.is_empty() {
                "-".to_string()
            } else {
                routes
            },
        ]);
    }
    table.print();
    print_history(function["history"].as_array().map_or(&[], Vec::as_slice));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_csv_keeps_full_precision_and_quotes_keys() {
        let row = serde_json::json!({
            "invocations": 1,
            "errors": 0,
            "outcomes": {"timeout": 0, "oom": 0, "client_closed": 3},
            "cold_starts": 1,
            "billed_ms": 1,
            "billed_gb_s": 0.000125,
            "used_gb_s": 1.5e-9,
            "cpu_us": 1234,
            "cost": {"total": 2e-7},
        });
        let mut out = Vec::new();
        write_usage_csv(
            &mut out,
            "function",
            [("a,b \"quoted\"".to_string(), &row)].into_iter(),
        )
        .unwrap();
        let mut reader = csv::Reader::from_reader(&out[..]);
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(
            header,
            [
                "function",
                "invocations",
                "errors",
                "timeouts",
                "oom",
                "client_closed",
                "cold",
                "init_ms",
                "billed_ms",
                "billed_gb_s",
                "used_gb_s",
                "cpu_ms",
                "cold_cost",
                "cost"
            ]
        );
        let record = reader.records().next().unwrap().unwrap();
        let field = |name: &str| &record[header.iter().position(|h| h == name).unwrap()];
        assert_eq!(field("function"), "a,b \"quoted\"");
        assert_eq!(field("client_closed"), "3");
        assert_eq!(field("cost"), "0.0000002");
        assert_eq!(field("cost").parse::<f64>().unwrap(), 2e-7);
        assert_eq!(field("used_gb_s").parse::<f64>().unwrap(), 1.5e-9);
        assert_eq!(field("cpu_ms"), "1.234");
    }

    #[test]
    fn the_usage_table_shows_small_fractions_as_more_than_zero() {
        assert_eq!(approximate(2e-7), "0.000000200");
        assert_eq!(approximate(0.5), "0.500000");
        assert_eq!(approximate(0.0), "0.000000");
        assert_eq!(approximate(1234.5), "1234.500000");
        let row = serde_json::json!({"cost": {"total": 2e-7}});
        assert_eq!(
            usage_table_cell(&row, "/cost/total", Measure::Fraction),
            "0.000000200"
        );
        assert_eq!(
            usage_table_cell(&row, "/outcomes/client_closed", Measure::Count),
            "-"
        );
    }
}
