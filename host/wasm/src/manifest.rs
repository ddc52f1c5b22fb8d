//! Handler manifests (`NAME.toml` beside `NAME.wasm`) and the limits they resolve to.

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::WasmError;
use crate::config::{HandlerDefaults, InstancePolicy, PoolConfig};
use crate::http::grant::{HttpGrant, HttpManifest};
use crate::keyvalue::grant::{KeyValueGrant, KeyValueManifest};
use eventbroker::config::RetryPolicy;

/// What a manifest file may say. Every field is optional.
///
/// ```toml
/// name = "audit-logger"
/// patterns = ["*"]
/// fuel = 5_000_000
/// memory = "16MiB"
/// timeout = "2s"
/// concurrency = 8
/// instances = "fresh"   # or "reuse"
///
/// [retry]
/// max_retries = 2
///
/// [config]
/// prefix = "audit"
///
/// [http]                # outbound HTTP (wasi:http), see `http::grant`
/// allow = ["https://hooks.example.com/*"]
///
/// [keyvalue]            # key-value state (wasi:keyvalue), see `keyvalue::grant`
/// buckets = ["dedupe"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Handler name; defaults to the file name without extension. Letters, digits, `-`, `_`.
    pub name: Option<String>,
    /// Subscription patterns; override the component's exported defaults.
    pub patterns: Option<Vec<String>>,
    /// Fuel per invocation.
    pub fuel: Option<u64>,
    /// Memory limit per instance, e.g. `"32MiB"`.
    #[serde(default, with = "eventbroker::size::serde::option")]
    pub memory: Option<ByteSize>,
    /// Deadline per invocation, e.g. `"5s"`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Invocations running at once.
    pub concurrency: Option<usize>,
    /// `fresh` or `reuse`.
    pub instances: Option<InstancePolicy>,
    /// Log lines per invocation.
    pub max_log_lines: Option<usize>,
    /// Log bytes per invocation.
    #[serde(default, with = "eventbroker::size::serde::option")]
    pub max_log_bytes: Option<ByteSize>,
    /// Derived events per invocation.
    pub max_publishes: Option<u32>,
    /// Retry policy overrides (fields not given keep the host's).
    pub retry: Option<RetryOverrides>,
    /// Values the handler reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// Outbound HTTP the handler may make (`wasi:http`); none without this section.
    pub http: Option<HttpManifest>,
    /// Key-value buckets the handler may open (`wasi:keyvalue`); none without this section.
    pub keyvalue: Option<KeyValueManifest>,
}

/// A `[config]` value: strings, numbers and booleans are given to the guest as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    /// A string.
    Text(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl ConfigValue {
    fn into_text(self) -> String {
        match self {
            ConfigValue::Text(text) => text,
            ConfigValue::Integer(n) => n.to_string(),
            ConfigValue::Float(n) => n.to_string(),
            ConfigValue::Bool(b) => b.to_string(),
        }
    }
}

/// Per-handler retry overrides; unset fields inherit `event_broker.retry_policy`. The merged
/// policy is checked by the same rules as the host's ([`RetryPolicy::validate`], keys under
/// `retry.`), except that an `initial_delay` above the inherited `max_delay` (when the manifest
/// does not set `max_delay`) raises that handler's `max_delay` to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverrides {
    /// Retries after the first attempt.
    pub max_retries: Option<u32>,
    /// First delay.
    #[serde(default, with = "humantime_serde")]
    pub initial_delay: Option<Duration>,
    /// Largest delay.
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// Growth factor.
    pub backoff_factor: Option<f32>,
}

/// The limits and settings of one handler, after defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HandlerSpec {
    /// Handler name.
    pub name: String,
    /// Patterns from the manifest, if it gave any.
    pub patterns: Option<Vec<String>>,
    /// Fuel per invocation.
    pub fuel: u64,
    /// Memory limit in bytes.
    pub memory: u64,
    /// Deadline per invocation.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Invocations at once.
    pub concurrency: usize,
    /// Instance policy.
    pub instances: InstancePolicy,
    /// Log lines per invocation.
    pub max_log_lines: usize,
    /// Log bytes per invocation.
    pub max_log_bytes: usize,
    /// Derived events per invocation.
    pub max_publishes: u32,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// `config(key)` values.
    pub config: BTreeMap<String, String>,
    /// Outbound HTTP granted (`None`: none).
    pub http: Option<HttpGrant>,
    /// Key-value buckets granted (`None`: none).
    pub keyvalue: Option<KeyValueGrant>,
}

/// Checks a handler name: 1–64 letters, digits, `-` or `_`.
///
/// # Errors
/// [`WasmError::Manifest`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), WasmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(WasmError::Manifest(format!(
            "handler name {name:?} must be 1-64 letters, digits, '-' or '_'"
        )))
    }
}

impl Manifest {
    /// Parses manifest text.
    ///
    /// # Errors
    /// [`WasmError::Manifest`] naming the key at fault.
    pub fn parse(text: &str) -> Result<Manifest, WasmError> {
        toml::from_str(text).map_err(|e| WasmError::Manifest(e.to_string()))
    }

    /// Resolves the manifest against the host's defaults. `fallback_name` is used when the
    /// manifest has no name (the file stem).
    ///
    /// # Errors
    /// [`WasmError::Manifest`] for an invalid name, an invalid pattern (or more than
    /// [`super::limits::MAX_PATTERNS`], or one longer than [`super::limits::MAX_PATTERN_LEN`]),
    /// zero concurrency, or a memory limit larger than the pool allows.
    pub fn resolve(
        self,
        fallback_name: &str,
        defaults: &HandlerDefaults,
        retry: &RetryPolicy,
        pool: &PoolConfig,
    ) -> Result<HandlerSpec, WasmError> {
        let name = self.name.unwrap_or_else(|| fallback_name.to_owned());
        validate_name(&name)?;
        if let Some(patterns) = &self.patterns {
            if patterns.is_empty() {
                return Err(WasmError::Manifest(
                    "patterns must list at least one pattern (or be left out to use the component's defaults)".into(),
                ));
            }
            super::limits::check_patterns(patterns, "manifest").map_err(WasmError::Manifest)?;
        }
        let memory = self.memory.unwrap_or(defaults.memory).as_u64();
        if memory > pool.max_memory.as_u64() {
            return Err(WasmError::Manifest(format!(
                "memory {} exceeds the host's largest allowed memory (handlers.pool.max_memory = {})",
                ByteSize::b(memory),
                pool.max_memory
            )));
        }
        let concurrency = self.concurrency.unwrap_or(defaults.concurrency);
        if concurrency == 0 {
            return Err(WasmError::Manifest("concurrency must be at least 1".into()));
        }
        let mut retry = retry.clone();
        if let Some(overrides) = self.retry {
            if let Some(v) = overrides.max_retries {
                retry.max_retries = v;
            }
            if let Some(v) = overrides.initial_delay {
                retry.initial_delay = v;
            }
            match overrides.max_delay {
                Some(v) => retry.max_delay = v,
                // A handler's own first delay above the host's cap is what its author asked
                // for: the cap it inherits rises to it (documented on `RetryOverrides`).
                None => retry.max_delay = retry.max_delay.max(retry.initial_delay),
            }
            if let Some(v) = overrides.backoff_factor {
                retry.backoff_factor = v;
            }
            // The same rules as `event_broker.retry_policy`, one copy of them.
            retry
                .validate("retry")
                .map_err(|e| WasmError::Manifest(format!("{} {}", e.key, e.reason)))?;
        }
        Ok(HandlerSpec {
            name,
            patterns: self.patterns,
            fuel: self.fuel.unwrap_or(defaults.fuel),
            memory,
            timeout: self.timeout.unwrap_or(defaults.timeout),
            concurrency,
            instances: self.instances.unwrap_or(defaults.instances),
            max_log_lines: self.max_log_lines.unwrap_or(defaults.max_log_lines),
            max_log_bytes: self
                .max_log_bytes
                .unwrap_or(defaults.max_log_bytes)
                .as_u64() as usize,
            max_publishes: self.max_publishes.unwrap_or(defaults.max_publishes),
            retry,
            config: self
                .config
                .into_iter()
                .map(|(k, v)| (k, v.into_text()))
                .collect(),
            http: self.http.map(HttpManifest::resolve).transpose()?,
            keyvalue: self.keyvalue.map(KeyValueManifest::resolve).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<HandlerSpec, WasmError> {
        Manifest::parse(text)?.resolve(
            "from-file",
            &HandlerDefaults::default(),
            &RetryPolicy::default(),
            &PoolConfig::default(),
        )
    }

    #[test]
    fn empty_manifest_takes_defaults_and_file_name() {
        let spec = resolve("").expect("empty is valid");
        let defaults = HandlerDefaults::default();
        assert_eq!(spec.name, "from-file");
        assert_eq!(spec.fuel, defaults.fuel);
        assert_eq!(spec.memory, defaults.memory.as_u64());
        assert_eq!(spec.timeout, defaults.timeout);
        assert_eq!(spec.instances, InstancePolicy::Fresh);
        assert!(spec.patterns.is_none());
    }

    #[test]
    fn full_manifest() {
        let spec = resolve(
            r#"
            name = "validator"
            patterns = ["shop.orders.*", "shop.returns.>"]
            fuel = 1000
            memory = "8MiB"
            timeout = "250ms"
            concurrency = 2
            instances = "reuse"
            max_publishes = 3
            [retry]
            max_retries = 0
            [config]
            limit = 5
            mode = "strict"
            enabled = true
            "#,
        )
        .expect("valid");
        assert_eq!(spec.name, "validator");
        assert_eq!(spec.patterns.as_ref().unwrap().len(), 2);
        assert_eq!(spec.memory, 8 * 1024 * 1024);
        assert_eq!(spec.timeout, Duration::from_millis(250));
        assert_eq!(spec.instances, InstancePolicy::Reuse);
        assert_eq!(spec.retry.max_retries, 0);
        assert_eq!(spec.config["limit"], "5");
        assert_eq!(spec.config["enabled"], "true");
    }

    #[test]
    fn bad_manifests_say_why() {
        for (text, needle) in [
            ("fule = 3", "fule"),
            ("patterns = [\"a..b\"]", "invalid pattern"),
            ("patterns = []", "at least one"),
            ("name = \"has space\"", "handler name"),
            ("memory = \"8TiB\"", "max_memory"),
            ("concurrency = 0", "concurrency"),
            ("instances = \"shared\"", "shared"),
            ("timeout = \"soon\"", "timeout"),
            ("[retry]\nbackoff_factor = 0.5", "backoff_factor"),
            (
                "[retry]\ninitial_delay = \"2m\"\nmax_delay = \"1m\"",
                "retry.initial_delay",
            ),
        ] {
            let err = resolve(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let many = format!("patterns = [{}]", vec!["\"a.b\""; 101].join(","));
        let err = resolve(&many).expect_err("too many").to_string();
        assert!(err.contains("at most 100"), "{err}");
    }

    #[test]
    fn an_initial_delay_above_the_inherited_cap_raises_it() {
        let spec = resolve("[retry]\ninitial_delay = \"2m\"").expect("valid");
        assert_eq!(spec.retry.initial_delay, Duration::from_secs(120));
        assert_eq!(spec.retry.max_delay, Duration::from_secs(120));
        let spec = resolve("[retry]\ninitial_delay = \"2s\"").expect("valid");
        assert_eq!(
            spec.retry.max_delay,
            RetryPolicy::default().max_delay,
            "a cap above it is kept"
        );
    }
}
