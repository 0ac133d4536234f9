//! The `raftcache-cdc` command line.
//!
//! ```text
//! raftcache-cdc --config cdc.toml [--check]          the worker (or only check the file)
//! raftcache-cdc drop-slot --config cdc.toml          drop the configured replication slot
//! raftcache-cdc verify --config cdc.toml [--sample N | --all] [--bound 1s] [--json]
//!               [--watch [--interval 10s] [--metrics-listen ADDR]] [--rate 200]
//!               [--page-size 500] [--max-time 5m] [--table NAME]...
//! ```
//!
//! Exit codes of the worker: 0 after SIGTERM / ctrl-c, 2 for errors (an invalid cache
//! endpoint, the metrics address cannot be bound, ...; a cache that does not answer yet
//! is waited for, not an error), and
//! [`EXIT_MISCONFIGURED`] (3) for configuration or set-up errors that restarting does
//! not fix — the config file, or Postgres: wal_level, the password, pg_hba.conf, a role
//! without REPLICATION, a missing database or mapped table, a slot of another
//! database... — with one line on stderr naming the cause and the fix. Transient
//! errors (Postgres down or restarting, connection limits) are retried, not fatal.

use crate::config::Config;
use crate::pg_errors::{Misconfigured, EXIT_MISCONFIGURED};
use crate::verify::{Options, Report, Scope, Verifier};
use crate::worker::{DropSlot, Worker};
use clap::{Args, Parser, Subcommand};
use humantime_serde::re::humantime;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Tails Postgres logical replication and invalidates (or rewrites) the cache keys
/// derived from every committed row change.
#[derive(Debug, Parser)]
#[command(name = "raftcache-cdc", version, subcommand_negates_reqs = true)]
struct Cli {
    /// The TOML configuration (see cdc/etc/cdc.example.toml).
    #[arg(long, short, env = "RAFTCACHE_CDC_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the cache agrees with Postgres (exit 0: no stale key, 1: stale keys,
    /// 2: an error).
    ///
    /// Reads rows of every mapped table (a random sample, or --all), renders their
    /// keys, and compares the cached values with what the rows say: the JSON update
    /// mode writes, or the table's `verify-value`. A missing key is fine. A key that
    /// disagrees is read again together with `pg_current_wal_insert_lsn()`, at a CDC
    /// watermark past that LSN, until it agrees (converged) or --bound has passed
    /// (stale: named in the report).
    Verify(VerifyArgs),
    /// Drop the configured replication slot (exit 0: dropped, or there was none; 1:
    /// refused, since a worker streams on it or it belongs to another database; 2: an
    /// error).
    ///
    /// A stopped worker's slot keeps WAL on the Postgres server until it is dropped.
    /// The next worker started with this config creates the slot again and invalidates
    /// every mapped key space once.
    DropSlot(DropSlotArgs),
}

#[derive(Debug, Args)]
struct DropSlotArgs {
    /// The TOML configuration of the worker (`[postgres] url` and `slot`).
    #[arg(long, short, env = "RAFTCACHE_CDC_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The TOML configuration of the worker (mapping, Postgres, cache).
    #[arg(long, short, env = "RAFTCACHE_CDC_CONFIG")]
    config: Option<PathBuf>,
    /// Random rows checked per table.
    #[arg(long, default_value_t = crate::verify::DEFAULT_SAMPLE,
          value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "all")]
    sample: u64,
    /// Check every row, in pages by the primary key (or replica identity).
    #[arg(long)]
    all: bool,
    /// Rows per Postgres page (and keys per cache read).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    page_size: u64,
    /// How long a disagreement may last (CDC in flight) before the key counts as stale.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    bound: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Run rounds continuously and export the figures as Prometheus metrics.
    #[arg(long)]
    watch: bool,
    /// With --watch: from the start of one round to the start of the next.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// With --watch: the metrics address (default: the config's [metrics] listen).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Most Postgres statements per second.
    #[arg(long, default_value_t = 200.0, value_parser = positive_rate)]
    rate: f64,
    /// A round stops reading rows after this long and reports what it has.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    max_time: Duration,
    /// Only this mapped table (`schema.table` or `table`); repeat for several.
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of queries per second"
        )),
    }
}

/// Runs the command line; the worker's exit code is 0 on a clean shutdown, 2 on
/// errors, 3 ([`EXIT_MISCONFIGURED`]) on configuration or set-up errors; `verify`'s is 0
/// (no stale key), 1 (stale keys) or 2 (errors); `drop-slot`'s is 0 (dropped or
/// absent), 1 (refused) or 2 (errors).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify(args)) => return verify_main(args, cli.config, cli.check),
        Some(Command::DropSlot(args)) => return drop_slot_main(args, cli.config, cli.check),
        None => {}
    }
    let Some(config_path) = cli.config else {
        eprintln!("error: --config is required");
        return ExitCode::from(2);
    };
    init_logging("info");
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            return ExitCode::from(EXIT_MISCONFIGURED);
        }
    };
    if cli.check {
        println!("configuration OK: {} table(s) mapped", config.table.len());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A set-up error is one line that already names the cause and the fix.
            if let Some(m) = e.chain().find_map(|c| c.downcast_ref::<Misconfigured>()) {
                eprintln!("error: {}", one_line(&m.0));
                return ExitCode::from(EXIT_MISCONFIGURED);
            }
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

/// `raftcache-cdc drop-slot`: drops the configured slot and says what it did on
/// stdout; refuses (exit 1) while a walsender streams from it.
fn drop_slot_main(args: DropSlotArgs, outer_config: Option<PathBuf>, check: bool) -> ExitCode {
    init_logging("raftcache_cdc=warn");
    if check {
        return fail("--check is for the worker; drop-slot takes only --config".into());
    }
    let Some(path) = args.config.or(outer_config) else {
        return fail("drop-slot needs --config cdc.toml".into());
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let slot = &config.postgres.slot;
    match runtime.block_on(crate::worker::drop_slot(&config)) {
        Ok(DropSlot::Dropped {
            database,
            confirmed,
            retained_bytes,
        }) => {
            println!(
                "dropped replication slot \"{slot}\" of database \"{database}\" (confirmed up \
                 to {confirmed}; {retained_bytes} bytes of WAL held for it are released). The \
                 next worker started with this config creates it again and invalidates every \
                 mapped key space once."
            );
            ExitCode::SUCCESS
        }
        Ok(DropSlot::Absent { database }) => {
            println!(
                "replication slot \"{slot}\" does not exist in database \"{database}\": \
                 nothing dropped"
            );
            ExitCode::SUCCESS
        }
        Ok(DropSlot::Refused(why)) => {
            eprintln!("error: {}", one_line(&why));
            ExitCode::from(1)
        }
        Err(e) => fail(format!("{e:#}")),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(listen) = config.metrics.listen {
        crate::metrics::install(listen)?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    let worker = Worker::new(config).await?;
    worker.run(shutdown).await
}

/// `raftcache-cdc verify`: logs only this crate's warnings unless `RUST_LOG` says
/// otherwise, so that an error is the one line on stderr.
fn verify_main(args: VerifyArgs, outer_config: Option<PathBuf>, check: bool) -> ExitCode {
    init_logging("raftcache_cdc=warn");
    if check {
        return fail("--check is for the worker; verify checks the configuration itself".into());
    }
    let Some(path) = args.config.clone().or(outer_config) else {
        return fail("verify needs --config cdc.toml".into());
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let options = Options {
        scope: if args.all {
            Scope::All
        } else {
            Scope::Sample(args.sample)
        },
        page_size: args.page_size,
        bound: args.bound,
        rate: args.rate,
        max_time: args.max_time,
        tables: args.tables.clone(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(verify(config, options, &args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(format!("{e:#}")),
    }
}

fn print_report(report: &Report, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot encode the report: {e}"),
        }
    } else {
        print!("{}", report.text());
    }
}

/// One round (exit 0 or 1), or rounds until SIGTERM / ctrl-c (exit 0).
async fn verify(config: Config, options: Options, args: &VerifyArgs) -> anyhow::Result<u8> {
    let mut verifier = Verifier::connect(&config, options).await?;
    if !args.watch {
        let report = verifier.round().await?;
        print_report(&report, args.json);
        return Ok(report.exit_code());
    }
    match args.metrics_listen.or(config.metrics.listen) {
        Some(listen) => crate::verify_metrics::install(listen)?,
        None => tracing::warn!(
            "no metrics address ([metrics] listen or --metrics-listen): printing only"
        ),
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    let json = args.json;
    verifier
        .watch(args.interval, shutdown, |result| match result {
            Ok(report) => {
                print_report(report, json);
                if !json {
                    println!();
                }
            }
            Err(e) => eprintln!("error: round failed: {}", one_line(&format!("{e:#}"))),
        })
        .await;
    Ok(0)
}

/// `text` on one line: every run of white space (newlines too) becomes one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Logs to stderr with `RUST_LOG`, or `default` without it; colours only on a terminal.
fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A subcommand's error: one line on stderr, exit 2.
fn fail(message: String) -> ExitCode {
    eprintln!("error: {}", one_line(&message));
    ExitCode::from(2)
}
