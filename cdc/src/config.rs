//! The worker's configuration: one TOML file (`raftcache-cdc --config cdc.toml`),
//! validated once at start-up. Every option, with its default, is in
//! `cdc/etc/cdc.example.toml`; a test parses that file so it cannot rot.

use crate::mapping::{KeyTemplate, TemplateError};
use crate::walsender::quote_ident;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused. Every message names the file or the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or unknown or mistyped options.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml/serde said, with line and column.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid option {option}: {message}")]
    Invalid {
        /// The option as written in the file (`table[0].keys`).
        option: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The whole worker configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where to stream from.
    pub postgres: PostgresSection,
    /// The cache cluster to write to.
    pub cache: CacheSection,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Lease and batching of this worker.
    #[serde(default)]
    pub worker: WorkerSection,
    /// The mapping: one entry per table.
    #[serde(default)]
    pub table: Vec<TableSection>,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PostgresSection {
    /// `postgres://user:password@host:port/dbname?sslmode=disable`; the user needs the
    /// REPLICATION attribute (and ownership of the tables to create the publication).
    pub url: String,
    /// The logical replication slot: the worker's checkpoint, kept by Postgres.
    #[serde(default = "default_name")]
    pub slot: String,
    /// The publication naming the mapped tables.
    #[serde(default = "default_name")]
    pub publication: String,
    /// Create the slot when it does not exist.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Create the publication (`FOR TABLE` every mapped table) when it does not exist,
    /// and add mapped tables it lacks.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// How often a standby status update is sent even when nothing changed (must be
    /// well below the server's `wal_sender_timeout`, 60 s by default).
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheSection {
    /// Seed addresses of cache nodes (host:port).
    pub endpoints: Vec<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsSection {
    /// Address of the Prometheus text endpoint (`/metrics`); none when unset.
    pub listen: Option<SocketAddr>,
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerSection {
    /// This worker's name in the lease (default: hostname-pid).
    pub id: Option<String>,
    /// How long the lease lasts without renewal: a standby takes over within about this
    /// long after the active worker dies. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Most changes in one `ApplyChanges` batch (a partition's share of a transaction is
    /// split into batches of this size).
    pub batch_max_changes: usize,
    /// Most row changes of one transaction held in memory before they are sent ahead of
    /// its commit (large transactions are streamed to the cache in pieces).
    pub tx_max_buffered: usize,
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            id: None,
            lease_ttl: Duration::from_secs(3),
            batch_max_changes: 1000,
            tx_max_buffered: 10_000,
        }
    }
}

/// What the worker does to a table's derived keys when a row changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Remove the keys (the app refills them, with `set_if_newer`).
    #[default]
    Invalidate,
    /// Write the new row as a JSON object of column name → text value (null for NULL).
    Update,
}

/// `[[table]]`: one mapped table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TableSection {
    /// `schema.table`, or `table` in `public`.
    pub name: String,
    /// Key templates: literal text with `{column}` placeholders (`{{` and `}}` for
    /// literal braces), e.g. `user:{id}`.
    pub keys: Vec<String>,
    /// `invalidate` (default) or `update`.
    #[serde(default)]
    pub mode: Mode,
    /// `update` mode: the TTL of written rows; none when unset.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// `update` mode: only these columns go into the JSON (default: all).
    pub columns: Option<Vec<String>>,
    /// `raftcache-cdc verify`: a SQL expression over the row (the table is aliased `t`)
    /// whose text is the value the cache should hold for the row's keys, e.g. `"v"` or
    /// `"row_to_json(t)::text"`. Default: the JSON object `update` mode writes.
    pub verify_value: Option<String>,
}

/// A validated table mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct TableMapping {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// The parsed key templates.
    pub keys: Vec<KeyTemplate>,
    /// What to do with the keys.
    pub mode: Mode,
    /// `update` mode: TTL of the written rows.
    pub ttl: Option<Duration>,
    /// `update` mode: the columns written (None: all).
    pub columns: Option<Vec<String>>,
}

impl TableMapping {
    /// `schema.table`, quoted for SQL.
    ///
    /// # Errors
    /// A name Postgres cannot take (empty, or with a NUL byte).
    pub fn sql_name(&self) -> Result<String, crate::walsender::Error> {
        Ok(format!(
            "{}.{}",
            quote_ident(&self.schema)?,
            quote_ident(&self.table)?
        ))
    }
}

fn default_name() -> String {
    "raftcache".to_owned()
}

fn yes() -> bool {
    true
}

fn default_status_interval() -> Duration {
    Duration::from_secs(1)
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the option at fault.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.mappings()?;
        Ok(config)
    }

    /// Parses `text` (no file), validating like [`Config::load`].
    ///
    /// # Errors
    /// As [`Config::load`], with the path shown as `<string>`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<string>".into(),
            message: e.to_string(),
        })?;
        config.mappings()?;
        Ok(config)
    }

    /// The validated table mappings.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a bad name, template, TTL or duplicate table.
    pub fn mappings(&self) -> Result<Vec<TableMapping>, ConfigError> {
        let invalid = |option: String, message: String| ConfigError::Invalid { option, message };
        if self.cache.endpoints.is_empty() {
            return Err(invalid(
                "cache.endpoints".into(),
                "at least one cache node address is needed".into(),
            ));
        }
        if self.postgres.slot.is_empty() || self.postgres.publication.is_empty() {
            return Err(invalid(
                "postgres.slot / postgres.publication".into(),
                "must not be empty".into(),
            ));
        }
        if self.postgres.status_interval.is_zero()
            || self.postgres.status_interval > Duration::from_secs(30)
        {
            return Err(invalid(
                "postgres.status-interval".into(),
                "must be between 1ms and 30s (below wal_sender_timeout)".into(),
            ));
        }
        if self.worker.lease_ttl < Duration::from_millis(300) {
            return Err(invalid(
                "worker.lease-ttl".into(),
                "must be at least 300ms".into(),
            ));
        }
        if self.worker.batch_max_changes == 0 || self.worker.tx_max_buffered == 0 {
            return Err(invalid(
                "worker.batch-max-changes / worker.tx-max-buffered".into(),
                "must be at least 1".into(),
            ));
        }
        if self.table.is_empty() {
            return Err(invalid(
                "table".into(),
                "no [[table]] is mapped: nothing to do".into(),
            ));
        }
        let mut out: Vec<TableMapping> = Vec::new();
        for (i, t) in self.table.iter().enumerate() {
            let option = |field: &str| format!("table[{i}].{field}");
            let (schema, table) = match t.name.split_once('.') {
                Some((s, t)) => (s.to_owned(), t.to_owned()),
                None => ("public".to_owned(), t.name.clone()),
            };
            if schema.is_empty() || table.is_empty() || table.contains('.') {
                return Err(invalid(
                    option("name"),
                    format!("{:?} is not `schema.table` or `table`", t.name),
                ));
            }
            if out.iter().any(|m| m.schema == schema && m.table == table) {
                return Err(invalid(
                    option("name"),
                    format!("{schema}.{table} is mapped twice; list all its keys in one entry"),
                ));
            }
            if t.keys.is_empty() {
                return Err(invalid(option("keys"), "at least one key template".into()));
            }
            let keys = t
                .keys
                .iter()
                .map(|k| KeyTemplate::parse(k))
                .collect::<Result<Vec<_>, TemplateError>>()
                .map_err(|e| invalid(option("keys"), e.to_string()))?;
            match (t.mode, t.ttl, &t.columns) {
                (Mode::Invalidate, Some(_), _) | (Mode::Invalidate, _, Some(_)) => {
                    return Err(invalid(
                        option("ttl"),
                        "ttl and columns only apply to mode = \"update\"".into(),
                    ))
                }
                (_, Some(ttl), _) if ttl.is_zero() => {
                    return Err(invalid(
                        option("ttl"),
                        "must be above zero (leave it out for no expiry)".into(),
                    ))
                }
                _ => {}
            }
            if t.verify_value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(
                    option("verify-value"),
                    "must not be empty (a SQL expression over the row aliased `t`, \
                     e.g. \"row_to_json(t)::text\"; leave it out for the update-mode JSON)"
                        .into(),
                ));
            }
            out.push(TableMapping {
                schema,
                table,
                keys,
                mode: t.mode,
                ttl: t.ttl,
                columns: t.columns.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [postgres]
        url = "postgres://app:secret@127.0.0.1:5432/app"
        [cache]
        endpoints = ["127.0.0.1:7001"]
        [[table]]
        name = "users"
        keys = ["user:{id}"]
    "#;

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/cdc.example.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let maps = config.mappings().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(maps[0].schema, "public");
        assert_eq!(maps[0].table, "users");
        assert_eq!(maps[0].keys.len(), 2);
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(MIN).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.postgres.slot, "raftcache");
        assert!(c.postgres.create_slot && c.postgres.create_publication);
        assert_eq!(c.worker.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.table[0].mode, Mode::Invalidate);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (patch, needle) in [
            (
                "[[table]]\nname = \"users\"\nkeys = [\"x:{id}\"]",
                "mapped twice",
            ),
            (
                "[[table]]\nname = \"a.b.c\"\nkeys = [\"x:{id}\"]",
                "schema.table",
            ),
            ("[[table]]\nname = \"t\"\nkeys = []", "at least one key"),
            ("[[table]]\nname = \"t\"\nkeys = [\"x:{id\"]", "unclosed"),
            (
                "[[table]]\nname = \"t\"\nkeys = [\"x\"]\nttl = \"1m\"",
                "only apply",
            ),
            (
                "[[table]]\nname = \"t\"\nkeys = [\"x:{id}\"]\nmode = \"upsert\"",
                "unknown variant",
            ),
            (
                "[[table]]\nname = \"t\"\nkeys = [\"x:{id}\"]\ncolour = 1",
                "unknown field",
            ),
        ] {
            let text = format!("{MIN}\n{patch}");
            let e = Config::parse(&text).expect_err(patch).to_string();
            assert!(e.contains(needle), "{patch}: {e}");
        }
        let e = Config::parse("[cache]\nendpoints = []").expect_err("no postgres");
        assert!(e.to_string().contains("postgres"), "{e}");
    }
}
