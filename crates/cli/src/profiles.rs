//! The CLI's own config: named profiles (admin URL, token, CA) in
//! `$XDG_CONFIG_HOME/mayfly/config.toml`, and how a verb picks the node it
//! talks to and the token it presents.
//!
//! Precedence, per setting: `--admin-url`/`--token`/`--ca-cert` flags, then
//! `MAYFLY_ADMIN_URL`/`MAYFLY_TOKEN`/`MAYFLY_CA_CERT` (clap merges those two
//! levels), then the profile named by `--profile`/`MAYFLY_PROFILE`, then the
//! default profile, then the token a local node wrote to
//! `./.mayfly/admin.token` (or `$MAYFLY_DATA_DIR/admin.token`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Where a node listens for the admin API when nothing says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8081";

/// The file in a node's data directory holding its first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The profile a local `mayfly serve` registers itself as.
pub const LOCAL_PROFILE: &str = "local";

/// The profile `mayfly login` writes when no profile is named and none is
/// the default yet.
pub const FIRST_PROFILE: &str = "default";

/// The config file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Config {
    /// The profile every verb uses unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One node (or fleet) the CLI can talk to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// The admin API's base URL.
    pub admin_url: String,
    /// The bearer token, stored as given (`mayfly login`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file to read the token from at each use instead: a local node's
    /// `admin.token`, so a profile `mayfly serve` registered keeps working
    /// when that node's data directory is reset and it writes a new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A PEM file of certificates to trust for an `https://` admin URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// The config file on disk: where it is and what it holds.
#[derive(Debug)]
pub struct ConfigFile {
    /// `<config dir>/mayfly/config.toml`.
    pub path: PathBuf,
    /// Its content (empty when the file does not exist yet).
    pub config: Config,
}

impl ConfigFile {
    /// The config file's path: `mayfly/config.toml` under the XDG config
    /// directory (`$XDG_CONFIG_HOME`, else `$HOME/.config`).
    pub fn path() -> anyhow::Result<PathBuf> {
        use etcetera::BaseStrategy as _;
        let base = etcetera::choose_base_strategy().map_err(|_| {
            anyhow!(
                "cannot find your home folder for the CLI's config: set HOME or XDG_CONFIG_HOME"
            )
        })?;
        Ok(base.config_dir().join("mayfly").join("config.toml"))
    }

    /// Reads the config file, or `None` when there is no home folder to
    /// look in (profiles are then simply not used).
    pub fn load_if_any() -> anyhow::Result<Option<Self>> {
        match Self::path() {
            Ok(path) => Self::load_from(path).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Reads the config file, or an empty config if there is none.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_from(Self::path()?)
    }

    /// Reads the config file at `path`, or an empty config if there is none.
    pub fn load_from(path: PathBuf) -> anyhow::Result<Self> {
        let config = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!(
                    "the CLI config {} is not valid (fix it, or delete it and run `mayfly login` \
                     again)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        Ok(Self { path, config })
    }

    /// Writes the config atomically (a temporary file in the same folder,
    /// then a rename), readable by its owner only: it holds tokens.
    pub fn save(&self) -> anyhow::Result<()> {
        let dir = self
            .path
            .parent()
            .context("the CLI config path has no folder")?;
        create_private_dir(dir)?;
        let text = format!(
            "# Mayfly CLI profiles: written by `mayfly login`, `mayfly logout`,\n\
             # `mayfly profile use` and a local `mayfly serve`. Holds tokens: keep it private.\n\n{}",
            toml::to_string_pretty(&self.config).context("cannot encode the CLI config")?
        );
        // tempfile creates the file with mode 0600, so the token is never
        // readable by others, not even for a moment.
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.as_file().sync_all())
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        file.persist(&self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        // The rename is only durable once the folder is synced; losing it
        // would lose a login, not data, so a failure here is not reported.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The default profile, if one is set and exists.
    pub fn default_profile(&self) -> Option<(&str, &Profile)> {
        let name = self.config.default.as_deref()?;
        self.config
            .profiles
            .get_key_value(name)
            .map(|(name, profile)| (name.as_str(), profile))
    }
}

/// Creates `dir` (and its parents) readable by its owner only, as the
/// config in it holds tokens.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// What the command line and the environment said (flags and variables
/// are already merged by clap).
#[derive(Debug, Default, Clone)]
pub struct Given {
    /// `--admin-url` or `MAYFLY_ADMIN_URL`.
    pub admin_url: Option<String>,
    /// `--token` or `MAYFLY_TOKEN`.
    pub token: Option<String>,
    /// `--ca-cert` or `MAYFLY_CA_CERT`.
    pub ca_cert: Option<PathBuf>,
    /// `--profile` or `MAYFLY_PROFILE`.
    pub profile: Option<String>,
}

/// Where the token a verb presents came from, to say what to fix when the
/// node refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// `--token` or `MAYFLY_TOKEN`.
    Given,
    /// A profile's stored token or token file.
    Profile {
        /// The profile's name.
        name: String,
        /// The config file holding it.
        config: PathBuf,
    },
    /// A local node's `admin.token` found from the current folder.
    DataDir(PathBuf),
    /// No token at all.
    None,
}

/// The node a verb talks to and the credentials it presents.
#[derive(Debug, Clone)]
pub struct Target {
    /// The admin API's base URL.
    pub admin_url: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Extra certificates to trust.
    pub ca_cert: Option<PathBuf>,
    /// Where the token came from.
    pub origin: TokenOrigin,
    /// The profile the URL came from, if it came from one.
    pub url_profile: Option<String>,
}

/// Picks the admin URL, token and CA for a verb from what was given, the
/// config file and the local data directory, in the order of this module's
/// doc. A profile's token is only presented to that profile's own URL, so
/// `--admin-url` pointing elsewhere never leaks it.
pub fn resolve(given: Given, file: Option<&ConfigFile>) -> anyhow::Result<Target> {
    let profile = match (&given.profile, file) {
        (Some(name), Some(file)) => {
            let profile = file
                .config
                .profiles
                .get(name)
                .with_context(|| no_such_profile(name, &file.path))?;
            Some((name.as_str(), profile))
        }
        (Some(name), None) => bail!(
            "there is no profile `{name}` (the CLI config cannot be found): create it with \
             `mayfly login --profile {name} --admin-url URL --token TOKEN`"
        ),
        (None, Some(file)) => match (&file.config.default, file.default_profile()) {
            // A dangling default only matters when nothing names the node.
            (Some(name), None) if given.admin_url.is_none() => bail!(
                "the default profile `{name}` is missing from {}: choose another with `mayfly \
                 profile use NAME`, or create it with `mayfly login --profile {name} --admin-url \
                 URL --token TOKEN`",
                file.path.display()
            ),
            (_, found) => found,
        },
        (None, None) => None,
    };
    let admin_url = given
        .admin_url
        .clone()
        .or_else(|| profile.map(|(_, p)| p.admin_url.clone()))
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
    // The profile's credentials are for its own node only.
    let profile = profile.filter(|(_, p)| same_url(&p.admin_url, &admin_url));
    let ca_cert = given
        .ca_cert
        .clone()
        .or_else(|| profile.and_then(|(_, p)| p.ca_cert.clone()));
    // Named in "cannot reach" errors: a default profile's node that is not
    // running is a common surprise.
    let url_profile = match (&given.admin_url, profile) {
        (None, Some((name, _))) => Some(name.to_string()),
        _ => None,
    };
    let (token, origin) = token_for(given.token, profile, file, &admin_url)?;
    Ok(Target {
        admin_url,
        token,
        ca_cert,
        origin,
        url_profile,
    })
}

/// The token for `admin_url` and where it came from: given, else the
/// profile's (already known to be for this URL), else a local node's.
fn token_for(
    given: Option<String>,
    profile: Option<(&str, &Profile)>,
    file: Option<&ConfigFile>,
    admin_url: &str,
) -> anyhow::Result<(Option<String>, TokenOrigin)> {
    if let Some(token) = given.filter(|t| !t.trim().is_empty()) {
        return Ok((Some(token), TokenOrigin::Given));
    }
    if let (Some((name, p)), Some(file)) = (profile, file) {
        let origin = TokenOrigin::Profile {
            name: name.to_string(),
            config: file.path.clone(),
        };
        if let Some(token) = p.token.clone().filter(|t| !t.trim().is_empty()) {
            return Ok((Some(token), origin));
        }
        if let Some(path) = &p.token_file {
            let token = read_token_file(path).with_context(|| {
                format!(
                    "profile `{name}` reads its token from {}: is that node's data directory \
                     gone? Log in again with `mayfly login --profile {name} --admin-url \
                     {admin_url} --token TOKEN`",
                    path.display()
                )
            })?;
            return Ok((Some(token), origin));
        }
    }
    // Today's fallback: next to the node it started, the CLI works with no
    // setup. That file's token only ever goes to a node on this machine.
    if is_loopback_url(admin_url) {
        let path = local_data_dir().join(ADMIN_TOKEN_FILE);
        if let Ok(token) = read_token_file(&path) {
            return Ok((Some(token), TokenOrigin::DataDir(path)));
        }
    }
    Ok((None, TokenOrigin::None))
}

fn no_such_profile(name: &str, config: &Path) -> String {
    format!(
        "there is no profile `{name}` in {}: `mayfly profile list` shows them; create it with \
         `mayfly login --profile {name} --admin-url URL --token TOKEN`",
        config.display()
    )
}

/// The data directory a local node started from this folder uses:
/// `MAYFLY_DATA_DIR`, else `.mayfly` (as `mayfly serve` defaults to).
pub fn local_data_dir() -> PathBuf {
    std::env::var_os("MAYFLY_DATA_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(".mayfly"), PathBuf::from)
}

/// Reads a token file; an empty one is an error too.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let token =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(token.to_string())
}

/// Whether two admin URLs name the same API (a trailing slash aside).
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether `url`'s host is this machine.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// What to run when the node refuses the token (HTTP 401): the exact
/// `mayfly login` command for this node and profile.
pub fn login_advice(target: &Target) -> String {
    let url = target.admin_url.trim_end_matches('/');
    let login = |profile: Option<&str>| {
        let flag = profile
            .filter(|name| *name != FIRST_PROFILE)
            .map(|name| format!(" --profile {name}"))
            .unwrap_or_default();
        format!(
            "run `mayfly login{flag} --admin-url {url} --token TOKEN` (the node printed its \
             token file at start)"
        )
    };
    match &target.origin {
        TokenOrigin::None => format!("the admin API at {url} needs a token: {}", login(None)),
        TokenOrigin::Given => format!(
            "the admin API at {url} refused the token from --token or MAYFLY_TOKEN: check it, \
             or unset it and {}",
            login(None)
        ),
        TokenOrigin::Profile { name, config } => format!(
            "the admin API at {url} refused the token of profile `{name}` ({}): {}",
            config.display(),
            login(Some(name))
        ),
        TokenOrigin::DataDir(path) => format!(
            "the admin API at {url} refused the token in {} (a node's token from this \
             folder, perhaps of another node): {}",
            path.display(),
            login(None)
        ),
    }
}

/// Says where a starting node's admin token is (so a 401's advice can
/// point at it) and registers a local node as the CLI's default profile
/// when there is none. Never fails the node: a config it cannot write is a
/// warning.
pub fn announce_node(admin_url: &str, admin_port: u16, data_dir: &Path, tls_cert: Option<&Path>) {
    let token_file = data_dir.join(ADMIN_TOKEN_FILE);
    if token_file.is_file() {
        let shown = std::fs::canonicalize(&token_file).unwrap_or(token_file);
        tracing::info!(
            "admin token in {} (from another folder: mayfly login --admin-url {admin_url} \
             --data-dir {})",
            shown.display(),
            shown.parent().unwrap_or(data_dir).display()
        );
    }
    // Plain stderr, whatever RUST_LOG says: it changes the user's own
    // config.
    match register_local_node(admin_url, admin_port, data_dir, tls_cert) {
        Ok(Some((Registration::Created, config))) => {
            let _ = writeln!(
                std::io::stderr(),
                "registered this node as the CLI's default profile `{LOCAL_PROFILE}` in {}: \
                 `mayfly` verbs reach {admin_url} from any folder",
                config.display()
            );
        }
        Ok(Some((Registration::Repointed, config))) => {
            let _ = writeln!(
                std::io::stderr(),
                "the CLI profile `{LOCAL_PROFILE}` ({admin_url}, in {}) now reads this node's \
                 admin token",
                config.display()
            );
        }
        Ok(None) => {}
        Err(error) => tracing::warn!("could not register this node as a CLI profile: {error:#}"),
    }
}

/// What [`register_local_node`] did to the config.
#[derive(Debug, PartialEq, Eq)]
pub enum Registration {
    /// Added the `local` profile, as the default.
    Created,
    /// Pointed the existing `local` profile at this node's token file.
    Repointed,
}

/// Registers a local node as the default profile `local`, if no default
/// profile exists yet: the first `mayfly serve` on a machine makes every
/// verb work from any folder. A `local` profile that an earlier node
/// registered for the same URL follows the node now listening there (a
/// node started from another folder has another token), unless the user
/// has since given it a token of their own. Returns what it did and the
/// config file's path.
///
/// Only for a node on loopback with a fixed port (an ephemeral port, as
/// tests use, would be wrong at the next start) and a token file to point
/// at (a node joining a fleet that already has tokens writes none).
pub fn register_local_node(
    admin_url: &str,
    admin_port: u16,
    data_dir: &Path,
    ca_cert: Option<&Path>,
) -> anyhow::Result<Option<(Registration, PathBuf)>> {
    if admin_port == 0 || !is_loopback_url(admin_url) {
        return Ok(None);
    }
    let token_file = data_dir.join(ADMIN_TOKEN_FILE);
    if !token_file.is_file() {
        return Ok(None);
    }
    let absolute = |path: &Path| {
        std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))
    };
    let profile = Profile {
        admin_url: admin_url.to_string(),
        token: None,
        token_file: Some(absolute(&token_file)?),
        ca_cert: ca_cert.map(absolute).transpose()?,
    };
    let mut file = ConfigFile::load()?;
    let registration = match file.config.profiles.get(LOCAL_PROFILE) {
        None if file.config.default.is_none() => {
            file.config.default = Some(LOCAL_PROFILE.to_string());
            Registration::Created
        }
        Some(local)
            if local.token.is_none()
                && local.token_file.is_some()
                && same_url(&local.admin_url, admin_url)
                && *local != profile =>
        {
            Registration::Repointed
        }
        _ => return Ok(None),
    };
    file.config
        .profiles
        .insert(LOCAL_PROFILE.to_string(), profile);
    file.save()?;
    Ok(Some((registration, file.path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(default: Option<&str>, profiles: &[(&str, Profile)]) -> ConfigFile {
        ConfigFile {
            path: PathBuf::from("/home/u/.config/mayfly/config.toml"),
            config: Config {
                default: default.map(str::to_string),
                profiles: profiles
                    .iter()
                    .map(|(name, p)| ((*name).to_string(), p.clone()))
                    .collect(),
            },
        }
    }

    fn profile(url: &str, token: &str) -> Profile {
        Profile {
            admin_url: url.into(),
            token: Some(token.into()),
            token_file: None,
            ca_cert: Some(PathBuf::from(format!("/ca/{token}.pem"))),
        }
    }

    fn origin_profile(name: &str) -> TokenOrigin {
        TokenOrigin::Profile {
            name: name.into(),
            config: PathBuf::from("/home/u/.config/mayfly/config.toml"),
        }
    }

    #[test]
    fn flags_and_env_beat_the_named_profile_which_beats_the_default() {
        let file = file_with(
            Some("prod"),
            &[
                ("prod", profile("https://prod.example:8081", "p")),
                ("stage", profile("https://stage.example:8081", "s")),
            ],
        );
        let target = resolve(Given::default(), Some(&file)).unwrap();
        assert_eq!(target.admin_url, "https://prod.example:8081");
        assert_eq!(target.token.as_deref(), Some("p"));
        assert_eq!(target.ca_cert, Some(PathBuf::from("/ca/p.pem")));
        assert_eq!(target.origin, origin_profile("prod"));
        assert_eq!(target.url_profile.as_deref(), Some("prod"));

        let named = Given {
            profile: Some("stage".into()),
            ..Given::default()
        };
        let target = resolve(named.clone(), Some(&file)).unwrap();
        assert_eq!(target.admin_url, "https://stage.example:8081");
        assert_eq!(target.token.as_deref(), Some("s"));

        // A given token replaces the profile's; the URL stays the profile's.
        let target = resolve(
            Given {
                token: Some("t".into()),
                ..named.clone()
            },
            Some(&file),
        )
        .unwrap();
        assert_eq!(target.admin_url, "https://stage.example:8081");
        assert_eq!(
            (target.token.as_deref(), target.origin),
            (Some("t"), TokenOrigin::Given)
        );
        assert_eq!(target.ca_cert, Some(PathBuf::from("/ca/s.pem")));

        // The same URL (up to a trailing slash) keeps the profile's token.
        let target = resolve(
            Given {
                admin_url: Some("https://stage.example:8081/".into()),
                ..named
            },
            Some(&file),
        )
        .unwrap();
        assert_eq!(target.token.as_deref(), Some("s"));
    }

    #[test]
    fn a_profiles_token_never_goes_to_another_url() {
        let file = file_with(
            Some("prod"),
            &[("prod", profile("https://prod.example:8081", "p"))],
        );
        let target = resolve(
            Given {
                admin_url: Some("https://elsewhere.example:8081".into()),
                ..Given::default()
            },
            Some(&file),
        )
        .unwrap();
        assert_eq!(target.token, None);
        assert_eq!(target.ca_cert, None);
        assert_eq!(target.origin, TokenOrigin::None);
    }

    #[test]
    fn missing_profiles_are_errors_that_say_what_to_run() {
        let file = file_with(None, &[]);
        let error = resolve(
            Given {
                profile: Some("nope".into()),
                ..Given::default()
            },
            Some(&file),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("mayfly login --profile nope --admin-url URL --token TOKEN"),
            "{error}"
        );
        let dangling = file_with(Some("gone"), &[]);
        let error = resolve(Given::default(), Some(&dangling))
            .unwrap_err()
            .to_string();
        assert!(error.contains("mayfly profile use NAME"), "{error}");
        let named = Given {
            admin_url: Some("http://10.0.0.1:8081".into()),
            ..Given::default()
        };
        assert!(resolve(named, Some(&dangling)).is_ok());
    }

    #[test]
    fn without_any_profile_the_url_defaults_to_the_local_node() {
        let target = resolve(
            Given {
                token: Some("t".into()),
                ..Given::default()
            },
            Some(&file_with(None, &[])),
        )
        .unwrap();
        assert_eq!(target.admin_url, DEFAULT_ADMIN_URL);
        assert_eq!(target.origin, TokenOrigin::Given);
    }

    #[test]
    fn a_token_file_is_read_at_each_use() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join(ADMIN_TOKEN_FILE);
        std::fs::write(&token_file, "first\n").unwrap();
        let file = file_with(
            Some("local"),
            &[(
                "local",
                Profile {
                    admin_url: DEFAULT_ADMIN_URL.into(),
                    token_file: Some(token_file.clone()),
                    ..Profile::default()
                },
            )],
        );
        let token = || resolve(Given::default(), Some(&file)).map(|t| t.token);
        assert_eq!(token().unwrap().as_deref(), Some("first"));
        std::fs::write(&token_file, "second").unwrap();
        assert_eq!(token().unwrap().as_deref(), Some("second"));
        std::fs::remove_file(&token_file).unwrap();
        let error = token().unwrap_err().to_string();
        assert!(error.contains("mayfly login --profile local"), "{error}");
    }

    #[test]
    fn advice_names_the_login_command_for_the_node() {
        let target = |origin| Target {
            admin_url: "http://127.0.0.1:9000/".into(),
            token: None,
            ca_cert: None,
            origin,
            url_profile: None,
        };
        let advice = login_advice(&target(TokenOrigin::None));
        assert!(
            advice.contains(
                "run `mayfly login --admin-url http://127.0.0.1:9000 --token TOKEN` (the node \
                 printed its token file at start)"
            ),
            "{advice}"
        );
        let advice = login_advice(&target(origin_profile("stage")));
        assert!(advice.contains("profile `stage`"), "{advice}");
        assert!(
            advice.contains("mayfly login --profile stage --admin-url"),
            "{advice}"
        );
        for origin in [TokenOrigin::Given, TokenOrigin::DataDir("x".into())] {
            assert!(!login_advice(&target(origin)).contains("token create"));
        }
    }

    #[test]
    fn the_config_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg/mayfly/config.toml");
        let mut file = ConfigFile::load_from(path.clone()).unwrap();
        assert!(file.config.profiles.is_empty());
        file.config
            .profiles
            .insert("prod".into(), profile("https://prod.example", "p"));
        file.config.default = Some("prod".into());
        file.save().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ConfigFile::load_from(path.clone()).unwrap();
        assert_eq!(
            again.default_profile(),
            Some(("prod", &profile("https://prod.example", "p")))
        );
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.toml"]);

        std::fs::write(&path, "profiles = 3").unwrap();
        let error = format!("{:#}", ConfigFile::load_from(path).unwrap_err());
        assert!(error.contains("is not valid"), "{error}");
    }

    #[test]
    fn only_local_admin_urls_are_loopback() {
        for url in [
            "http://127.0.0.1:8081",
            "http://localhost:8081/",
            "https://[::1]:8081",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:8081",
            "https://admin.example.com",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }
}
