//! The service's configuration file: one section per component, each owned by the crate
//! that uses it, composed here. Defaults, then a YAML or TOML file (chosen by extension) with
//! `${VAR}` / `${VAR:-default}` expansion, then environment overrides.
//!
//! | Section | Type | Owner |
//! |---|---|---|
//! | `event_broker` (its own keys) | [`BrokerConfig`] | `eventbroker` |
//! | `event_broker.provider`, `.database`, `.redis`, `.nats` | [`BackendConfig`] | this crate, `eventbroker-sql`, `-redis`, `-nats` |
//! | `server` | [`ServerConfig`] | this crate (HTTP) |
//! | `handlers` | [`HandlersConfig`] | `eventbroker-wasm` |
//! | `log` | [`LogConfig`] | this crate (telemetry) |
//! | `capture` | [`CaptureConfig`] | this crate (change capture) |
//!
//! Expansion happens after the file is parsed, inside its string values (not keys): whatever a
//! variable holds (`#`, `: `, quotes, newlines, `$`) becomes exactly that value's text and can
//! never change the file's structure. Numbers and booleans may be written as strings
//! (`worker_count: "${WORKERS:-10}"`), which TOML requires for references anyway.
//!
//! Environment overrides are `EVENTBROKER_` followed by the key path in upper case with `__`
//! between levels, e.g. `EVENTBROKER_EVENT_BROKER__WORKER_COUNT=4` or
//! `EVENTBROKER_SERVER__LISTEN=0.0.0.0:8080`. Variables without `__` after the prefix (such as
//! `EVENTBROKER_SERVER`, used by the CLI) are not configuration keys.
//!
//! Unknown keys and bad values are errors naming the key and, for closed sets, the allowed
//! values.
//!
//! # Examples
//! ```
//! use eventbroker_server::config::{Config, FileFormat, ProviderKind};
//! let config = Config::from_text(
//!     FileFormat::Yaml,
//!     "event_broker:\n  provider: redis\n  worker_count: 4\n  redis:\n    stream_name: app:events\n",
//! )?;
//! assert_eq!(config.event_broker.worker_count, 4);
//! assert_eq!(config.backend.provider, ProviderKind::Redis);
//! assert_eq!(config.backend.redis.stream_name, "app:events");
//! # Ok::<(), eventbroker_server::config::ConfigError>(())
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

mod locate;

pub use eventbroker::config::{
    BrokerConfig, InvalidValue, MemoryConfig, ProcessingMode, RetryPolicy,
};
pub use eventbroker_nats::config::{NatsConfig, NatsStorage, NatsTlsConfig};
pub use eventbroker_redis::config::RedisConfig;
pub use eventbroker_sql::config::SqlConfig;
pub use eventbroker_wasm::config::{HandlerDefaults, HandlersConfig, InstancePolicy, PoolConfig};

pub use crate::capture::config::{CaptureConfig, CaptureOperation};
pub use crate::http::config::{ServerConfig, WebSocketConfig};
pub use crate::telemetry::{LogConfig, LogFormat};

/// The whole host configuration: every component's section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The broker (`event_broker`, without the backend's keys).
    pub event_broker: BrokerConfig,
    /// The backend (`event_broker.provider` and its section).
    pub backend: BackendConfig,
    /// The HTTP server.
    pub server: ServerConfig,
    /// WebAssembly handlers.
    pub handlers: HandlersConfig,
    /// Logging.
    pub log: LogConfig,
    /// PostgreSQL change capture (`eventbroker serve` only).
    pub capture: CaptureConfig,
}

/// The backend keys of the `event_broker` section: which provider, and each provider's
/// section (owned by its crate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BackendConfig {
    /// Backend: `memory`, `database`, `redis` or `nats`.
    pub provider: ProviderKind,
    /// The database provider (`event_broker.database`).
    pub database: SqlConfig,
    /// The Redis provider (`event_broker.redis`).
    pub redis: RedisConfig,
    /// The NATS provider (`event_broker.nats`).
    pub nats: NatsConfig,
}

/// The top-level sections of a config file.
const SECTIONS: [&str; 5] = ["event_broker", "server", "handlers", "log", "capture"];

/// Which backend stores and delivers events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// In-process, bounded, not durable (the default).
    #[default]
    Memory,
    /// SQLite or PostgreSQL.
    Database,
    /// Redis Streams.
    Redis,
    /// NATS JetStream.
    Nats,
}

impl ProviderKind {
    /// The name used in config.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Memory => "memory",
            ProviderKind::Database => "database",
            ProviderKind::Redis => "redis",
            ProviderKind::Nats => "nats",
        }
    }
}

/// The file formats a config file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// `.yaml` / `.yml`.
    Yaml,
    /// `.toml`.
    Toml,
}

impl FileFormat {
    /// The format of `path`, by extension.
    ///
    /// # Errors
    /// [`ConfigError::Format`] for other extensions.
    pub fn of(path: &Path) -> Result<Self, ConfigError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Ok(FileFormat::Yaml),
            Some("toml") => Ok(FileFormat::Toml),
            _ => Err(ConfigError::Format(path.to_path_buf())),
        }
    }
}

/// YAML for figment, through the maintained `serde_yaml_ng`.
struct Yaml;

impl Format for Yaml {
    type Error = serde_yaml_ng::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_yaml_ng::from_str(string)
    }
}

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "EVENTBROKER_";

impl Config {
    /// Defaults, then the file at `path` (if any), then `EVENTBROKER_…__…` variables.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or key at fault.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Self::build(None);
        };
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let format = FileFormat::of(path)?;
        Self::build(Some((format, &text)))
            .map_err(|error| error.located(&path.display().to_string(), &text))
    }

    /// Like [`Config::load`] with the file's text given directly.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable or key at fault.
    pub fn from_text(format: FileFormat, text: &str) -> Result<Config, ConfigError> {
        Self::build(Some((format, text))).map_err(|error| error.located("config", text))
    }

    fn build(file: Option<(FileFormat, &str)>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some((format, text)) = file {
            figment = figment.merge(ExpandedFile::parse(format, text)?);
        }
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        let figment = figment.merge(env);
        refuse_unknown_keys(&figment)?;
        // Lossy: a number or boolean given as a string (an expanded `${VAR}`) is converted.
        let config = Config {
            event_broker: section(&figment, "event_broker")?,
            backend: section(&figment, "event_broker")?,
            server: section(&figment, "server")?,
            handlers: section(&figment, "handlers")?,
            log: section(&figment, "log")?,
            capture: section(&figment, "capture")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every section with its owner's rules, then the rules across sections.
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.event_broker.validate()?;
        self.backend.database.validate()?;
        self.backend.redis.validate()?;
        if self.backend.provider == ProviderKind::Nats {
            // Its rules depend on the broker's lease and retries (as used with this broker).
            self.backend.nats.validate(&self.event_broker)?;
        }
        self.handlers.validate()?;
        self.server.validate()?;
        self.capture.validate()?;
        Ok(())
    }
}

/// `T` from the section at `key` (its defaults where the section or a key is missing).
fn section<T>(figment: &Figment, key: &str) -> Result<T, ConfigError>
where
    T: Default + for<'de> Deserialize<'de>,
{
    if !figment.contains(key) {
        return Ok(T::default());
    }
    figment.extract_inner_lossy(key).map_err(|mut error| {
        // Name the key from the top of the file: figment appends the section's key to the
        // path of an error inside it (`redis.port.event_broker`).
        if error.path.len() > 1 && error.path.last().map(String::as_str) == Some(key) {
            error.path.pop();
        }
        if error.path.first().map(String::as_str) != Some(key) {
            error.path.insert(0, key.to_owned());
        }
        ConfigError::Invalid(Box::new(error))
    })
}

/// Refuses top-level keys that name no section, and keys of `event_broker` that neither the
/// broker nor the backend knows (the two share the section, so neither can refuse the other's
/// keys itself; every other section refuses its unknown keys).
fn refuse_unknown_keys(figment: &Figment) -> Result<(), ConfigError> {
    let data = figment
        .data()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
    let known_broker: BTreeSet<String> = [
        serde_json::to_value(BrokerConfig::default()),
        serde_json::to_value(BackendConfig::default()),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .filter_map(|value| match value {
        serde_json::Value::Object(map) => Some(map.into_iter().map(|(key, _)| key)),
        _ => None,
    })
    .flatten()
    .collect();
    for dict in data.values() {
        for (key, value) in dict {
            if !SECTIONS.contains(&key.as_str()) {
                return Err(unknown(key, &SECTIONS.join(", ")));
            }
            if key == "event_broker"
                && let Value::Dict(_, keys) = value
                && let Some(bad) = keys.keys().find(|key| !known_broker.contains(*key))
            {
                let expected = known_broker.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(unknown(&format!("event_broker.{bad}"), &expected));
            }
        }
    }
    Ok(())
}

fn unknown(key: &str, expected: &str) -> ConfigError {
    ConfigError::Value(InvalidValue::new(
        key,
        format!("is not a configuration key; expected one of: {expected}"),
    ))
}

/// A config file, parsed, with `${VAR}`, `${VAR:-default}` and `$VAR` expanded inside its
/// string values (`$$` is a literal `$`). Comments are gone by then, so a commented-out
/// reference needs no variable.
struct ExpandedFile {
    format: FileFormat,
    data: Map<Profile, Dict>,
}

impl ExpandedFile {
    fn parse(format: FileFormat, text: &str) -> Result<ExpandedFile, ConfigError> {
        let mut data = match format {
            FileFormat::Yaml => Yaml::string(text).data(),
            FileFormat::Toml => Toml::string(text).data(),
        }
        .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        for dict in data.values_mut() {
            for (key, value) in dict.iter_mut() {
                expand_value(key, value)?;
            }
        }
        Ok(ExpandedFile { format, data })
    }
}

impl Provider for ExpandedFile {
    fn metadata(&self) -> Metadata {
        Metadata::named(match self.format {
            FileFormat::Yaml => "YAML config file",
            FileFormat::Toml => "TOML config file",
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

/// Expands references in every string under `value`; `key` is its path, for errors.
fn expand_value(key: &str, value: &mut Value) -> Result<(), ConfigError> {
    match value {
        Value::String(_, text) if text.contains('$') => {
            let expanded = shellexpand::env(text).map_err(|e| ConfigError::Variable {
                key: key.to_owned(),
                name: e.var_name,
                reason: e.cause.to_string(),
            })?;
            *text = expanded.into_owned();
        }
        Value::Dict(_, dict) => {
            for (name, value) in dict.iter_mut() {
                expand_value(&format!("{key}.{name}"), value)?;
            }
        }
        Value::Array(_, items) => {
            for (index, value) in items.iter_mut().enumerate() {
                expand_value(&format!("{key}[{index}]"), value)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error (in this message, not repeated as a source).
        cause: std::io::Error,
    },
    /// The file extension names no supported format.
    #[error("config file {0} must end in .yaml, .yml or .toml")]
    Format(PathBuf),
    /// A `${VAR}` reference cannot be expanded.
    #[error(
        "config key {key} refers to environment variable {name:?}, which is {reason}; set it or write ${{{name}:-default}}"
    )]
    Variable {
        /// The key whose value holds the reference.
        key: String,
        /// The variable.
        name: String,
        /// Why it failed (not present, not unicode).
        reason: String,
    },
    /// Parsing or typing failed; the message names the key and the allowed values.
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    /// A value breaks a rule (the error names the key).
    #[error(transparent)]
    Value(#[from] InvalidValue),
    /// An error about a key written in the config file, with where it is written.
    #[error("{location}: {error}")]
    At {
        /// `FILE:LINE` of the key.
        location: String,
        /// The error.
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The key this error is about, as a path of segments, when it names one.
    fn key(&self) -> Option<Vec<String>> {
        match self {
            ConfigError::Invalid(error) if !error.path.is_empty() => Some(error.path.clone()),
            ConfigError::Value(error) => {
                Some(error.key.split(['.', '[']).map(str::to_owned).collect())
            }
            ConfigError::Variable { key, .. } => {
                Some(key.split(['.', '[']).map(str::to_owned).collect())
            }
            _ => None,
        }
    }

    /// This error with the `FILE:LINE` where its key is written in `text` (the file `name`),
    /// when it is written there.
    fn located(self, name: &str, text: &str) -> ConfigError {
        let Some(key) = self.key() else {
            return self;
        };
        let path: Vec<&str> = key.iter().map(String::as_str).collect();
        match locate::line_of(text, &path) {
            Some(line) => ConfigError::At {
                location: format!("{name}:{line}"),
                error: Box::new(self),
            },
            None => self,
        }
    }
}

/// Runs `f` with an empty process environment, serialized with every other test that touches
/// the environment: config loading reads `EVENTBROKER_*` variables, and tests that set them do
/// so inside figment's `Jail`, which only serializes its own users.
#[cfg(test)]
#[allow(clippy::result_large_err)]
pub(crate) fn with_isolated_env<T>(f: impl FnOnce() -> T) -> T {
    let mut out = None;
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        out = Some(f());
        Ok(())
    });
    out.expect("the jailed closure ran")
}

#[cfg(test)]
// figment's `Jail` closures must return its large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use std::time::Duration;

    use eventbroker::config::default_instance_id;
    use figment::Jail;

    use super::*;

    #[test]
    fn defaults_match_the_plan() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            defaults_are_the_plans();
            Ok(())
        });
    }

    fn defaults_are_the_plans() {
        let config = Config::load(None).expect("defaults");
        let broker = &config.event_broker;
        let backend = &config.backend;
        assert!(!broker.enabled);
        assert_eq!(backend.provider, ProviderKind::Memory);
        assert_eq!(broker.mode, ProcessingMode::Async);
        assert_eq!(broker.worker_count, 10);
        assert_eq!(broker.buffer_size, 1000);
        assert_eq!(broker.instance_id, default_instance_id());
        assert_eq!(broker.retry_policy.max_retries, 3);
        assert_eq!(broker.retry_policy.initial_delay, Duration::from_secs(1));
        assert_eq!(broker.retry_policy.max_delay, Duration::from_secs(30));
        assert_eq!(broker.retry_policy.backoff_factor, 2.0);
        assert_eq!(backend.redis.stream_name, "resolvespec:events");
        assert_eq!(backend.redis.consumer_group, "resolvespec-workers");
        assert_eq!(backend.nats.url, "nats://localhost:4222");
        assert_eq!(backend.nats.stream_name, "RESOLVESPEC_EVENTS");
        assert_eq!(backend.database.poll_interval, Duration::from_secs(1));
        assert_eq!(config.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn every_example_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("config-") && (name.ends_with(".yaml") || name.ends_with(".toml")) {
                with_isolated_env(|| Config::load(Some(&path)))
                    .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
                checked.push(name.to_owned());
            }
        }
        assert!(checked.len() >= 6, "examples found: {checked:?}");
        for (file, provider, url) in [
            ("config-sqlite.yaml", ProviderKind::Database, "sqlite://"),
            (
                "config-postgres.yaml",
                ProviderKind::Database,
                "postgres://",
            ),
            ("config-redis.yaml", ProviderKind::Redis, ""),
            ("config-nats.yaml", ProviderKind::Nats, ""),
            ("config-memory.yaml", ProviderKind::Memory, ""),
        ] {
            let config = with_isolated_env(|| Config::load(Some(&dir.join(file))))
                .unwrap_or_else(|e| panic!("{file} does not load: {e}"));
            assert_eq!(config.backend.provider, provider, "{file}");
            assert!(
                config.backend.database.url.starts_with(url) || provider != ProviderKind::Database,
                "{file}"
            );
        }
    }

    #[test]
    fn yaml_and_toml_files() {
        with_isolated_env(|| {
            let yaml = "event_broker:\n  provider: redis\n  worker_count: 4\n  retry_policy:\n    initial_delay: 250ms\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("yaml");
            assert_eq!(config.backend.provider, ProviderKind::Redis);
            assert_eq!(config.event_broker.worker_count, 4);
            assert_eq!(
                config.event_broker.retry_policy.initial_delay,
                Duration::from_millis(250)
            );
            assert_eq!(
                config.event_broker.retry_policy.max_retries, 3,
                "untouched default"
            );
            let toml = "[event_broker]\nmode = \"sync\"\n[event_broker.redis]\nport = 6380\n";
            let config = Config::from_text(FileFormat::Toml, toml).expect("toml");
            assert_eq!(config.event_broker.mode, ProcessingMode::Sync);
            assert_eq!(config.backend.redis.port, 6380);
        });
    }

    #[test]
    fn env_expansion_in_files() {
        Jail::expect_with(|jail| {
            jail.set_env("EB_TEST_HOST", "redis.internal");
            let yaml = "event_broker:\n  instance_id: \"${EB_TEST_HOST}\"\n  redis:\n    host: ${EB_TEST_HOST}\n    password: \"${EB_TEST_UNSET:-fallback}\"\n    stream_name: \"cost$$\"\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("expanded");
            assert_eq!(config.event_broker.instance_id, "redis.internal");
            assert_eq!(config.backend.redis.host, "redis.internal");
            assert_eq!(config.backend.redis.password, "fallback");
            assert_eq!(config.backend.redis.stream_name, "cost$");
            let err = Config::from_text(FileFormat::Yaml, "log:\n  level: ${EB_TEST_MISSING}\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("EB_TEST_MISSING") && err.contains("log.level"),
                "{err}"
            );
            // A commented-out reference needs no variable, in either format.
            let yaml = "server:\n  # admin_token: \"${EB_TEST_MISSING}\"\n  listen: 127.0.0.1:1\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("comment ignored");
            assert_eq!(config.server.listen, "127.0.0.1:1");
            let toml =
                "[server]\n  # admin_token = \"${EB_TEST_MISSING}\"\nlisten = \"127.0.0.1:2\"\n";
            let config = Config::from_text(FileFormat::Toml, toml).expect("comment ignored");
            assert_eq!(config.server.listen, "127.0.0.1:2");
            Ok(())
        });
    }

    #[test]
    fn expanded_values_round_trip_exactly_and_cannot_change_the_structure() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let secrets = [
                "p#ss: word",
                "# all comment",
                "line one\nline two: x\n- item",
                "quo\"te and 'apostrophe'",
                "cost $5, $$ and ${NOT_A_VAR}",
                "back\\slash\t{x: [y]}",
                " padded ",
                "",
            ];
            for secret in secrets {
                jail.set_env("EB_TEST_SECRET", secret);
                let yaml = "event_broker:\n  redis:\n    password: ${EB_TEST_SECRET}\n    url: \"redis://:${EB_TEST_SECRET}@h/0\"\n  nats:\n    password: '${EB_TEST_SECRET}'\n";
                let toml = "[event_broker.redis]\npassword = \"${EB_TEST_SECRET}\"\nurl = 'redis://:${EB_TEST_SECRET}@h/0'\n[event_broker.nats]\npassword = \"\"\"${EB_TEST_SECRET}\"\"\"\n";
                for (format, text) in [(FileFormat::Yaml, yaml), (FileFormat::Toml, toml)] {
                    let config = Config::from_text(format, text)
                        .unwrap_or_else(|e| panic!("{format:?} with {secret:?}: {e}"));
                    let backend = &config.backend;
                    assert_eq!(backend.redis.password, secret, "{format:?}");
                    assert_eq!(
                        backend.redis.url.as_deref(),
                        Some(format!("redis://:{secret}@h/0").as_str()),
                        "{format:?}"
                    );
                    assert_eq!(backend.nats.password.as_deref(), Some(secret), "{format:?}");
                }
            }
            // Numbers and booleans come through strings; `$$` stays a literal `$`.
            jail.set_env("EB_TEST_WORKERS", "4");
            jail.set_env("EB_TEST_WATCH", "false");
            let yaml = "event_broker:\n  worker_count: ${EB_TEST_WORKERS}\n  consumer_group: \"g$$1\"\nhandlers:\n  watch: ${EB_TEST_WATCH}\n";
            let toml = "[event_broker]\nworker_count = \"${EB_TEST_WORKERS}\"\nconsumer_group = \"g$$1\"\n[handlers]\nwatch = \"${EB_TEST_WATCH:-true}\"\n";
            for (format, text) in [(FileFormat::Yaml, yaml), (FileFormat::Toml, toml)] {
                let config = Config::from_text(format, text).expect("typed values");
                assert_eq!(config.event_broker.worker_count, 4, "{format:?}");
                assert_eq!(config.event_broker.consumer_group, "g$1", "{format:?}");
                assert!(!config.handlers.watch, "{format:?}");
            }
            Ok(())
        });
    }

    #[test]
    fn server_security_settings_are_validated() {
        with_isolated_env(|| {
            let yaml = "server:\n  token: abc\n  metrics_token: m\n  allowed_hosts: [events.example.com, \"10.0.0.2:8080\"]\n  allowed_origins: [\"https://app.example\"]\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("valid");
            assert_eq!(config.server.token.as_deref(), Some("abc"));
            assert_eq!(config.server.allowed_hosts.len(), 2);
            for (yaml, key) in [
                ("server:\n  token: \"\"\n", "server.token"),
                ("server:\n  admin_token: \"a b\"\n", "server.admin_token"),
                (
                    "server:\n  allowed_hosts: [\"a b\"]\n",
                    "server.allowed_hosts",
                ),
                (
                    "server:\n  allowed_origins: [app.example]\n",
                    "server.allowed_origins",
                ),
            ] {
                let err = Config::from_text(FileFormat::Yaml, yaml)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(key), "{yaml}: {err}");
            }
        });
    }

    #[test]
    fn env_overrides_files() {
        Jail::expect_with(|jail| {
            jail.set_env("EVENTBROKER_EVENT_BROKER__WORKER_COUNT", "7");
            jail.set_env("EVENTBROKER_EVENT_BROKER__RETRY_POLICY__MAX_RETRIES", "0");
            jail.set_env("EVENTBROKER_SERVER__LISTEN", "0.0.0.0:9000");
            jail.set_env("EVENTBROKER_SERVER", "not-config:1");
            let config = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_count: 3\n")
                .expect("env");
            assert_eq!(config.event_broker.worker_count, 7);
            assert_eq!(config.event_broker.retry_policy.max_retries, 0);
            assert_eq!(config.server.listen, "0.0.0.0:9000");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        with_isolated_env(|| {
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_cont: 3\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("worker_cont"), "{err}");
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  provider: kafka\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("kafka") && err.contains("memory") && err.contains("nats"),
                "{err}"
            );
            assert!(err.contains("provider"), "{err}");
            let err = Config::from_text(
                FileFormat::Toml,
                "[event_broker]\nworker_count = \"many\"\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("worker_count"), "{err}");
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_count: 0\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("event_broker.worker_count"), "{err}");
            let err = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  retry_policy:\n    initial_delay: soon\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("initial_delay"), "{err}");
            assert!(FileFormat::of(Path::new("c.ini")).is_err());
        });
    }

    #[test]
    fn watcher_buffers_and_the_write_timeout_are_validated_by_key() {
        with_isolated_env(|| {
            for provider in ["memory", "database", "redis", "nats"] {
                let text = format!(
                    "event_broker:\n  provider: {}\n  {provider}:\n    watcher_buffer: 0\n",
                    if provider == "nats" { "nats" } else { "memory" }
                );
                let err = Config::from_text(FileFormat::Yaml, &text)
                    .unwrap_err()
                    .to_string();
                let key = format!("event_broker.{provider}.watcher_buffer");
                assert!(err.contains(&key), "{err}");
            }
            let err = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  database:\n    write_timeout: 0s\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("event_broker.database.write_timeout"), "{err}");
            let config = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  redis:\n    watcher_buffer: 16\n  database:\n    \
                 write_timeout: 3s\n",
            )
            .expect("valid");
            assert_eq!(config.backend.redis.watcher_buffer, 16);
            assert_eq!(
                config.backend.database.write_timeout,
                Duration::from_secs(3)
            );
        });
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        let policy = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay(1), Duration::from_secs(1));
        assert_eq!(policy.delay(2), Duration::from_secs(2));
        assert_eq!(policy.delay(3), Duration::from_secs(4));
        assert_eq!(policy.delay(20), Duration::from_secs(30));
        let jittered = RetryPolicy::default();
        for retry in 1..6 {
            let delay = jittered.delay(retry);
            assert!(
                delay >= policy.delay(retry).min(policy.max_delay) && delay <= policy.max_delay
            );
        }
    }

    /// Every NATS key parses, durations included.
    #[test]
    fn nats_settings_parse() {
        with_isolated_env(|| {
            let text = r#"
    event_broker:
      provider: nats
      nats:
        url: "nats://a:4222,nats://b:4222"
        stream_name: EV
        subjects: ["ev.>", "other.>"]
        storage: memory
        max_age: 1h
        duplicate_window: 30s
        kv_bucket: EV_KV
        user: u
        password: p
        tls: { required: true, ca_file: /etc/ca.pem }
        ack_wait: 45s
        max_deliver: 10
        backoff: [1s, 5s, 1m]
      lease: 1500ms
    "#;
            let parsed = Config::from_text(FileFormat::Yaml, text).expect("parses");
            let nats = &parsed.backend.nats;
            assert_eq!(nats.storage, NatsStorage::Memory);
            assert_eq!(nats.duplicate_window, Duration::from_secs(30));
            assert_eq!(nats.kv_bucket(), "EV_KV");
            assert_eq!(nats.ack_wait, Some(Duration::from_secs(45)));
            assert_eq!(nats.max_deliver, Some(10));
            assert_eq!(nats.backoff, [1, 5, 60].map(Duration::from_secs).to_vec());
            assert!(nats.tls.required);
            assert_eq!(
                NatsConfig::default().kv_bucket(),
                "RESOLVESPEC_EVENTS_STATE"
            );
        });
    }

    /// Acknowledgement deadlines shorter than two lease renewal periods are refused at load,
    /// naming both keys; `max_deliver` must leave room for every retry.
    #[test]
    fn nats_deadlines_and_max_deliver_are_checked_against_the_broker() {
        with_isolated_env(|| {
            let load = |nats: &str, lease: &str| {
                let text = format!(
                    "event_broker:\n  provider: nats\n  lease: {lease}\n  nats:\n    {nats}\n"
                );
                Config::from_text(FileFormat::Yaml, &text).map_err(|e| e.to_string())
            };
            let error = load("backoff: [1s, 5s]\n    max_deliver: 5", "60s").unwrap_err();
            assert!(
                error.contains("event_broker.nats.backoff") && error.contains("event_broker.lease"),
                "{error}"
            );
            assert!(error.contains("40s"), "names the bound: {error}");
            let error = load("ack_wait: 30s", "60s").unwrap_err();
            assert!(
                error.contains("event_broker.nats.ack_wait")
                    && error.contains("event_broker.lease"),
                "{error}"
            );
            let error = load("backoff: [1m, 5s]\n    max_deliver: 5", "60s").unwrap_err();
            assert!(error.contains("entry 1"), "a later entry counts: {error}");
            for (nats, lease) in [
                ("backoff: [1s, 5s]\n    max_deliver: 5", "1500ms"),
                ("ack_wait: 40s", "60s"),
                ("backoff: [40s, 2m]\n    max_deliver: 5", "60s"),
            ] {
                load(nats, lease).unwrap_or_else(|e| panic!("{nats} with lease {lease}: {e}"));
            }
            let other = "event_broker:\n  provider: memory\n  nats:\n    backoff: [1s]\n";
            Config::from_text(FileFormat::Yaml, other).expect("only checked for the NATS provider");
            let error = load("max_deliver: 2", "60s").unwrap_err();
            assert!(
                error.contains("event_broker.nats.max_deliver") && error.contains("max_retries"),
                "{error}"
            );
        });
    }

    #[test]
    fn the_capture_example_config_loads() {
        with_isolated_env(|| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../examples/config-capture.yaml");
            let config = Config::load(Some(&path)).expect("example loads");
            assert!(config.capture.enabled());
            assert_eq!(config.capture.tables, ["public.orders"]);
            let bad = Config::from_text(
                FileFormat::Yaml,
                "capture:\n  url: postgres://x/y\n  tables: [orders]\n",
            )
            .unwrap_err();
            assert!(bad.to_string().contains("capture.tables"), "{bad}");
        });
    }

    /// A config error is one line naming the file, the line and the key, printed once (no
    /// repeated source in the error chain).
    #[test]
    fn errors_name_the_file_line_and_key_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("host.yaml");
        std::fs::write(
            &path,
            "server:\n  listen: 127.0.0.1:0\nevent_broker:\n  worker_count: 0\n",
        )
        .expect("write");
        let error = with_isolated_env(|| Config::load(Some(&path))).unwrap_err();
        let shown = error.to_string();
        assert!(
            shown.starts_with(&format!("{}:4: ", path.display())),
            "{shown}"
        );
        assert!(shown.contains("event_broker.worker_count"), "{shown}");
        assert!(
            std::error::Error::source(&error).is_none(),
            "printed once: {shown}"
        );
        std::fs::write(&path, "event_broker:\n  redis:\n    port: many\n").expect("write");
        let shown = with_isolated_env(|| Config::load(Some(&path)))
            .unwrap_err()
            .to_string();
        assert!(
            shown.starts_with(&format!("{}:3: ", path.display())),
            "{shown}"
        );
        assert!(shown.contains("event_broker.redis.port\""), "{shown}");
    }
}
