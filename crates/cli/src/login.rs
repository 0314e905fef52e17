//! `mayfly login`, `mayfly logout` and `mayfly profile`: the verbs that edit
//! the CLI's profiles (`profiles.rs`) instead of talking to a node, except
//! for the one request that checks a new login's token.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::client::{AdminClient, Unauthorized};
use crate::output::Table;
use crate::profiles::{
    ADMIN_TOKEN_FILE, ConfigFile, DEFAULT_ADMIN_URL, FIRST_PROFILE, Given, Profile,
    is_loopback_url, local_data_dir, read_token_file,
};

/// `mayfly login`: the node's URL, token and CA come from the global
/// `--admin-url`, `--token` and `--ca-cert` (or their variables); the
/// profile from `--profile`.
#[derive(Debug, Args)]
#[command(after_help = "\
Without --token, login can read the token of a node on this machine from its data \
directory: pass --data-dir DIR to read DIR/admin.token, or run `mayfly login` in the folder \
where the node was started and answer `y` when it asks to read ./.mayfly/admin.token. It \
never reads the token without one of the two.

Without --profile, login updates the default profile if it is for the same node, or \
creates a first profile named `default`; a login for another node needs --profile NAME.

Examples:
  mayfly login --admin-url https://mayfly.example.com:8081 --token mf_... --ca-cert ca.pem
  mayfly login --data-dir ~/node/.mayfly                # a local node on the default port
  mayfly login --profile staging --admin-url https://staging:8081 --token mf_...")]
pub struct LoginArgs {
    /// Read the token of a node on this machine from DIR/admin.token (the
    /// node's --data-dir), instead of --token.
    #[arg(long, value_name = "DIR", conflicts_with = "token")]
    pub data_dir: Option<PathBuf>,
    /// Save the profile without checking the token against the node first.
    #[arg(long)]
    pub no_verify: bool,
}

/// `mayfly profile`: the CLI's profiles.
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List the profiles (`*` marks the default; tokens are never shown).
    List,
    /// Make NAME the default profile, used by every verb without --profile.
    Use {
        /// The profile's name.
        name: String,
    },
}

/// `mayfly login`: checks the token with the node, then saves the profile.
pub fn login(given: Given, json: bool, args: &LoginArgs) -> anyhow::Result<()> {
    let mut file = ConfigFile::load()?;
    let (name, existing) = profile_to_write(&file, &given)?;
    let admin_url = given
        .admin_url
        .clone()
        .or_else(|| existing.as_ref().map(|p| p.admin_url.clone()))
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
        .trim_end_matches('/')
        .to_string();
    let ca_cert = match &given.ca_cert {
        // Stored absolute: every later verb runs from another folder.
        Some(path) => Some(
            std::fs::canonicalize(path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?,
        ),
        None => existing
            .as_ref()
            .filter(|p| p.admin_url.trim_end_matches('/') == admin_url)
            .and_then(|p| p.ca_cert.clone()),
    };
    let token = token_to_save(&given, args, &admin_url)?;
    if !args.no_verify {
        verify(&admin_url, &token, ca_cert.as_deref())?;
    }
    file.config.profiles.insert(
        name.clone(),
        Profile {
            admin_url: admin_url.clone(),
            token: Some(token),
            token_file: None,
            ca_cert,
        },
    );
    let is_default = match &file.config.default {
        Some(default) => *default == name,
        None => {
            file.config.default = Some(name.clone());
            true
        }
    };
    file.save()?;
    if json {
        println!(
            "{}",
            json!({
                "profile": name,
                "admin_url": admin_url,
                "default": is_default,
                "config": file.path,
            })
        );
    } else if is_default {
        println!(
            "logged in to {admin_url} as profile `{name}`, the default (saved in {})",
            file.path.display()
        );
    } else {
        println!(
            "logged in to {admin_url} as profile `{name}` (saved in {}); use it with --profile \
             {name}, or make it the default with `mayfly profile use {name}`",
            file.path.display()
        );
    }
    Ok(())
}

/// The profile a login writes: `--profile NAME`; else the default profile
/// when it is for the same node (or no URL was given); else a first
/// profile named `default`. A login for another node never overwrites the
/// default profile unasked.
fn profile_to_write(file: &ConfigFile, given: &Given) -> anyhow::Result<(String, Option<Profile>)> {
    if let Some(name) = &given.profile {
        return Ok((name.clone(), file.config.profiles.get(name).cloned()));
    }
    match file.default_profile() {
        None => {
            let name = file.config.default.as_deref().unwrap_or(FIRST_PROFILE);
            Ok((name.to_string(), file.config.profiles.get(name).cloned()))
        }
        Some((name, profile)) => {
            let same_node = given.admin_url.as_deref().is_none_or(|url| {
                url.trim_end_matches('/') == profile.admin_url.trim_end_matches('/')
            });
            if !same_node {
                bail!(
                    "the default profile `{name}` is for {}: give this login a name of its own \
                     with --profile NAME (then `mayfly profile use NAME` makes it the default), \
                     or replace it with --profile {name}",
                    profile.admin_url
                );
            }
            Ok((name.to_string(), Some(profile.clone())))
        }
    }
}

/// The token to store: `--token`/`MAYFLY_TOKEN`, else a local node's
/// `admin.token`, read only with the user's consent (`--data-dir`, or a
/// `y` at the prompt).
fn token_to_save(given: &Given, args: &LoginArgs, admin_url: &str) -> anyhow::Result<String> {
    if let Some(token) = given.token.as_deref().map(str::trim) {
        if token.is_empty() {
            bail!("--token (or MAYFLY_TOKEN) is empty");
        }
        return Ok(token.to_string());
    }
    if let Some(dir) = &args.data_dir {
        return read_token_file(&dir.join(ADMIN_TOKEN_FILE)).with_context(|| {
            format!(
                "--data-dir {}: no node's token there (a node writes admin.token into its data \
                 directory on first start)",
                dir.display()
            )
        });
    }
    let usage = format!(
        "no token: run `mayfly login --admin-url {admin_url} --token TOKEN` (the node printed \
         its token file at start), or for a node on this machine `mayfly login --data-dir DIR` \
         to read DIR/{ADMIN_TOKEN_FILE}"
    );
    let candidate = local_data_dir().join(ADMIN_TOKEN_FILE);
    if !is_loopback_url(admin_url) || !candidate.is_file() {
        bail!("{usage}");
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "{usage} (found {}; pass --data-dir {} to use it)",
            candidate.display(),
            candidate.parent().map_or(Path::new("."), |d| d).display()
        );
    }
    let question = format!(
        "Read the admin token of the node at {admin_url} from {}? [y/N] ",
        candidate.display()
    );
    if !confirm(&question)? {
        bail!("{usage}");
    }
    read_token_file(&candidate)
}

/// Asks a yes/no question on the terminal; anything but `y`/`yes` is no.
fn confirm(question: &str) -> anyhow::Result<bool> {
    let mut stderr = std::io::stderr();
    stderr.write_all(question.as_bytes())?;
    stderr.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// Checks the token with the node: a 401 means the node does not know it.
/// A 403 is a valid token without the `read` scope, which is fine to save.
fn verify(admin_url: &str, token: &str, ca_cert: Option<&Path>) -> anyhow::Result<()> {
    let client =
        AdminClient::new(admin_url, Some(token.to_string()), ca_cert)?.with_login_advice(format!(
            "the admin API at {admin_url} does not know this token (wrong or revoked); a \
             local node's first token is in admin.token in its data directory (the node \
             printed its token file at start); nothing was saved"
        ));
    let response = match client.send_raw("GET", "/v1/status", &[], None) {
        Ok(response) => response,
        Err(error) if error.is::<Unauthorized>() => return Err(error),
        Err(error) => {
            return Err(error.context(
                "cannot check the token with the node (pass --no-verify to save it anyway)",
            ));
        }
    };
    let status = response.status();
    if !status.is_success() && status != 403 {
        bail!(
            "{admin_url} answered HTTP {status} to GET /v1/status: is it the admin API of a \
             Mayfly node? (nothing was saved)"
        );
    }
    Ok(())
}

/// `mayfly logout`: forgets the named or default profile.
pub fn logout(profile: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut file = ConfigFile::load()?;
    let Some(name) = profile
        .map(str::to_string)
        .or_else(|| file.config.default.clone())
    else {
        bail!(
            "no profile to log out of: there is no default profile in {} (`mayfly profile list` \
             shows them)",
            file.path.display()
        );
    };
    let Some(removed) = file.config.profiles.remove(&name) else {
        bail!(
            "there is no profile `{name}` in {} (`mayfly profile list` shows them)",
            file.path.display()
        );
    };
    if file.config.default.as_deref() == Some(name.as_str()) {
        file.config.default = None;
    }
    file.save()?;
    if json {
        println!(
            "{}",
            json!({"removed": name, "admin_url": removed.admin_url, "config": file.path})
        );
    } else {
        println!(
            "logged out: removed profile `{name}` ({}) from {}",
            removed.admin_url,
            file.path.display()
        );
    }
    Ok(())
}

/// `mayfly profile list|use`.
pub fn profile(json: bool, command: ProfileCommand) -> anyhow::Result<()> {
    let mut file = ConfigFile::load()?;
    match command {
        ProfileCommand::List => {
            let default = file.config.default.as_deref();
            if json {
                let profiles: Vec<_> = file
                    .config
                    .profiles
                    .iter()
                    .map(|(name, p)| {
                        json!({
                            "name": name,
                            "admin_url": p.admin_url,
                            "default": default == Some(name.as_str()),
                            "token": token_kind(p),
                            "token_file": p.token_file,
                            "ca_cert": p.ca_cert,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"config": file.path, "default": default, "profiles": profiles})
                );
                return Ok(());
            }
            if file.config.profiles.is_empty() {
                println!(
                    "no profiles in {}: `mayfly login --admin-url URL --token TOKEN` adds one",
                    file.path.display()
                );
                return Ok(());
            }
            // `*` marks the default profile, in front of its name as
            // before, so the names stay in one column.
            let mut table = Table::new(["  NAME", "ADMIN URL", "TOKEN"]);
            for (name, p) in &file.config.profiles {
                let mark = if default == Some(name.as_str()) {
                    '*'
                } else {
                    ' '
                };
                let mut token = token_kind(p).to_string();
                if let Some(path) = &p.token_file {
                    token = format!("from {}", path.display());
                }
                if let Some(ca) = &p.ca_cert {
                    token.push_str(&format!(" (CA {})", ca.display()));
                }
                table.row([format!("{mark} {name}"), p.admin_url.clone(), token]);
            }
            table.print();
            eprintln!("(from {})", file.path.display());
            Ok(())
        }
        ProfileCommand::Use { name } => {
            let Some(p) = file.config.profiles.get(&name) else {
                bail!(
                    "there is no profile `{name}` in {}: `mayfly profile list` shows them; \
                     create it with `mayfly login --profile {name} --admin-url URL --token TOKEN`",
                    file.path.display()
                );
            };
            let admin_url = p.admin_url.clone();
            file.config.default = Some(name.clone());
            file.save()?;
            if json {
                println!("{}", json!({"default": name, "admin_url": admin_url}));
            } else {
                println!("default profile: `{name}` ({admin_url})");
            }
            Ok(())
        }
    }
}

/// How a profile holds its token, for listings that never show it.
fn token_kind(profile: &Profile) -> &'static str {
    match (&profile.token, &profile.token_file) {
        (Some(_), _) => "stored",
        (None, Some(_)) => "file",
        (None, None) => "none",
    }
}
