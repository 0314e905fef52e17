//! Access to the admin API: the `token` verbs and the audit log (which
//! token the CLI presents is `profiles.rs`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::AdminClient;
use crate::output::{Table, format_time};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and never shown again.
    Create {
        /// What the token is for (shown in lists and the audit log).
        #[arg(long)]
        name: String,
        /// admin, deploy, invoke or read; repeat for more.
        #[arg(
            long = "scope",
            required_unless_present = "s3",
            conflicts_with = "s3",
            value_name = "SCOPE"
        )]
        scopes: Vec<String>,
        /// Limit the token to this function; repeat for more (default: all).
        #[arg(long = "function", value_name = "NAME", conflicts_with = "s3")]
        functions: Vec<String>,
        /// Create an S3 access key pair (access key id and secret) for the
        /// S3 endpoint instead of an API token; give its --bucket grants.
        #[arg(long, requires = "buckets")]
        s3: bool,
        /// A bucket the S3 key may use; repeat for more, or `*` for all.
        #[arg(long = "bucket", value_name = "BUCKET", requires = "s3")]
        buckets: Vec<String>,
    },
    /// List tokens (ids, names, scopes; never the tokens themselves).
    List {
        /// List the S3 access keys instead (ids, names, buckets).
        #[arg(long)]
        s3: bool,
    },
    /// Revoke a token: it is refused from the next request on.
    Revoke {
        /// The token's id (`tok_…`) or S3 access key id (`MF…`), as
        /// `mayfly token list [--s3]` shows it.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// How many of the latest entries to show.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

pub fn token(client: &AdminClient, json: bool, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            s3: true,
            buckets,
            ..
        } => create_s3_key(client, json, &name, &buckets),
        TokenCommand::List { s3: true } => list_s3_keys(client, json),
        TokenCommand::Revoke { id } if is_s3_key_id(&id) => {
            client.delete(&format!("/v1/tokens/s3/{}", crate::client::segment(&id)))?;
            if json {
                println!("{}", json!({ "revoked": id }));
            } else {
                println!("revoked S3 key {id}");
            }
            Ok(())
        }
        TokenCommand::Create {
            name,
            scopes,
            functions,
            ..
        } => {
            let body = json!({ "name": name, "scopes": scopes, "functions": functions });
            let created: Value = client.post_json("/v1/tokens", &body)?;
            if json {
                println!("{created}");
            } else {
                println!("{}", created["token"].as_str().unwrap_or_default());
                eprintln!(
                    "created {} ({}); the token above is shown only once",
                    created["id"].as_str().unwrap_or_default(),
                    list(&created["scopes"])
                );
            }
            Ok(())
        }
        TokenCommand::List { .. } => {
            let tokens: Vec<Value> = client.get_json("/v1/tokens")?;
            if json {
                println!("{}", Value::from(tokens));
                return Ok(());
            }
            let mut table = Table::new(["ID", "NAME", "SCOPES", "FUNCTIONS", "CREATED", "STATE"]);
            for token in tokens {
                let functions = list(&token["functions"]);
                table.row([
                    token["id"].as_str().unwrap_or_default().to_string(),
                    token["name"].as_str().unwrap_or_default().to_string(),
                    list(&token["scopes"]),
                    if functions.is_empty() {
                        "*".into()
                    } else {
                        functions
                    },
                    format_time(token["created_at_ms"].as_i64().unwrap_or(0)),
                    if token["revoked_at_ms"].is_null() {
                        "live"
                    } else {
                        "revoked"
                    }
                    .to_string(),
                ]);
            }
            table.print();
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            client.delete(&format!("/v1/tokens/{}", crate::client::segment(&id)))?;
            if json {
                println!("{}", json!({ "revoked": id }));
            } else {
                println!("revoked {id}");
            }
            Ok(())
        }
    }
}

/// Whether `id` names an S3 access key (`MF` + 18) rather than a token.
fn is_s3_key_id(id: &str) -> bool {
    id.len() == 20 && id.starts_with("MF")
}

fn create_s3_key(
    client: &AdminClient,
    json: bool,
    name: &str,
    buckets: &[String],
) -> anyhow::Result<()> {
    let body = json!({ "name": name, "buckets": buckets });
    let created: Value = client.post_json("/v1/tokens/s3", &body)?;
    if json {
        println!("{created}");
    } else {
        // The form `aws configure` and the AWS_* variables take.
        println!(
            "AWS_ACCESS_KEY_ID={}",
            created["access_key_id"].as_str().unwrap_or_default()
        );
        println!(
            "AWS_SECRET_ACCESS_KEY={}",
            created["secret_access_key"].as_str().unwrap_or_default()
        );
        eprintln!(
            "created S3 key {} for buckets {}; the secret above is shown only once",
            created["access_key_id"].as_str().unwrap_or_default(),
            list(&created["buckets"])
        );
    }
    Ok(())
}

fn list_s3_keys(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let keys: Vec<Value> = client.get_json("/v1/tokens/s3")?;
    if json {
        println!("{}", Value::from(keys));
        return Ok(());
    }
    let mut table = Table::new(["ACCESS KEY ID", "NAME", "BUCKETS", "CREATED"]);
    for key in keys {
        table.row([
            key["access_key_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            key["name"].as_str().unwrap_or_default().to_string(),
            list(&key["buckets"]),
            format_time(key["created_at_ms"].as_i64().unwrap_or(0)),
        ]);
    }
    table.print();
    Ok(())
}

pub fn audit(client: &AdminClient, json: bool, args: &AuditArgs) -> anyhow::Result<()> {
    let entries: Vec<Value> = client.get_json(&format!("/v1/audit?limit={}", args.limit))?;
    if json {
        println!("{}", Value::from(entries));
        return Ok(());
    }
    let mut table = Table::new(["WHEN", "STATUS", "ACTOR", "ACTION", "DETAIL"]);
    for entry in entries {
        table.row([
            format_time(entry["ts_ms"].as_i64().unwrap_or(0)),
            entry["status"].to_string(),
            entry["actor"].as_str().unwrap_or_default().to_string(),
            entry["action"].as_str().unwrap_or_default().to_string(),
            entry["detail"].as_str().unwrap_or_default().to_string(),
        ]);
    }
    table.print();
    Ok(())
}

fn list(value: &Value) -> String {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}
