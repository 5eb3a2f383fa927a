//! Command line of the `decant` binary.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat, DEFAULT_CONFIG};
use crate::metrics::Metrics;
use crate::throttle::{Limits, LiveLimits};

#[derive(Debug, Parser)]
#[command(name = "decant", version, about = "Zero-downtime PostgreSQL migration: schema, full copy, then change capture")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Source side: stream the decant slot to the applier (a long-running service).
    Agent(TaskArgs),
    /// Destination side: receive records from the agent and apply them (a long-running service).
    Applier(TaskArgs),
    /// Run a whole migration task in one process: schema, full copy, then
    /// the incremental stream (per migrate.types), agent and applier talking
    /// gRPC over loopback.
    Migrate(TaskArgs),
    /// Check everything that can make the task fail, and print each check
    /// with its fix. Exits non-zero when any check fails with an error.
    Precheck(PrecheckArgs),
    /// Show a task's phase, each table's copy state, the lag and rates.
    Status(StatusArgs),
    /// Compare the selected tables of source and destination: row counts
    /// and checksums. Exits non-zero if any table differs.
    Verify(VerifyArgs),
    /// The last step: wait until the destination has everything, set its
    /// sequences, compare every table, and fence the task so nothing more is
    /// applied. Run once the application stopped writing to the source (or
    /// with --freeze-source). Idempotent.
    Cutover(CutoverArgs),
    /// Print the default configuration, with every setting documented.
    DefaultConfig,
    /// Decode and print decant change records, checking every CRC.
    Inspect(crate::inspect::InspectArgs),
    /// Mark the DDL statement at a source position to be skipped when the
    /// stream reaches it: after a task stopped on it (migrate.ddl = "stop",
    /// or a statement the destination refused) and you made the change on
    /// the destination by hand, or decided to go without it.
    SkipDdl(SkipDdlArgs),
    /// Print the SQL script that installs decant's DDL capture (event
    /// triggers) on a source database where the decant extension cannot be
    /// installed (PostgreSQL 10 or later; run it as a superuser).
    DdlCaptureSql,
}

#[derive(Debug, Args)]
pub struct RoleArgs {
    /// The task's TOML configuration (see `decant default-config`).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Override a setting: section.key=value (TOML value syntax), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// A role that runs the task (and its precheck at start).
#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// Accept a precheck warning by its name (e.g. source.large_objects),
    /// repeatable; adds to migrate.accept.
    #[arg(long = "accept", value_name = "CHECK")]
    pub accept: Vec<String>,
}

impl TaskArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(Some(&self.role.config), &self.role.overrides)?;
        config.migrate.accept.extend(self.accept.iter().cloned());
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct PrecheckArgs {
    #[command(flatten)]
    pub task: TaskArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Which servers to check: both (the default), or only the source or
    /// the destination (where one host cannot reach both).
    #[arg(long, value_enum, default_value = "both")]
    pub side: crate::precheck::Sides,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// First wait up to this many seconds until the destination has applied
    /// everything the source had written when verify started (incremental tasks).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub wait: u64,
}

#[derive(Debug, Args)]
pub struct SkipDdlArgs {
    #[command(flatten)]
    pub role: RoleArgs,
    /// The statement's source position, as the task's error gives it (e.g. 0/1A2B3C4).
    #[arg(long, value_name = "LSN")]
    pub at: String,
}

#[derive(Debug, Args)]
pub struct CutoverArgs {
    /// The task's TOML configuration; repeat it to cut over several tasks
    /// together (tasks split by tables): none is fenced unless all are
    /// caught up and equal.
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    pub config: Vec<PathBuf>,
    /// Override a setting of every task: section.key=value (TOML value syntax), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Wait up to this many seconds for the destination to apply everything
    /// the source has written (incremental tasks).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub wait: u64,
    /// First make the source database read-only for new transactions
    /// (ALTER DATABASE … SET default_transaction_read_only) and end the
    /// sessions that began before; prints how to undo it.
    #[arg(long)]
    pub freeze_source: bool,
    /// Set each destination sequence this many steps past the source's value.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub sequence_margin: i64,
    /// Print what would be done, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => crate::inspect::run(args),
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::DdlCaptureSql => {
            print!("{}", crate::ddl::capture_script());
            Ok(())
        }
        Command::SkipDdl(args) => {
            let config = Config::load(Some(&args.role.config), &args.role.overrides)?;
            let at: decant_proto::Lsn =
                args.at.parse().map_err(|e| anyhow::anyhow!("--at {}: {e} (a source position such as 0/1A2B3C4)", args.at))?;
            one_shot(&config, async {
                let destination = crate::connect::ConnInfo::parse(&config.destination.dsn, &crate::connect::ProcessEnv)?;
                let (client, _connection) = crate::connect::sql::connect(&destination, "decant skip-ddl", "").await?;
                println!("{}", crate::applier::ddl::mark_to_skip(&client, &config.task_id, at).await?);
                Ok(())
            })
        }
        Command::Migrate(args) => {
            let config = args.config()?;
            serve_role(config, args, |config, metrics, limits, shutdown| async move {
                let listen = config.agent.metrics_listen.clone();
                let _metrics_server = start_metrics(&listen, metrics.clone()).await?;
                crate::task::run_migrate(config, metrics, limits, shutdown).await.map_err(anyhow::Error::from)
            })
        }
        Command::Precheck(args) => {
            let config = args.task.config()?;
            one_shot(&config, async {
                let report = crate::precheck::run(&config, args.side).await?;
                print!("{}", if args.json { report.json() + "\n" } else { report.text() });
                match report.errors() {
                    0 => Ok(()),
                    n => Err(anyhow::anyhow!("precheck: {n} error(s); fix them and run decant precheck again")),
                }
            })
        }
        Command::Status(args) => {
            let config = Config::load(Some(&args.role.config), &args.role.overrides)?;
            one_shot(&config, crate::status::run(config.clone(), args.json))
        }
        Command::Cutover(args) => {
            let configs = args.config.iter().map(|c| Config::load(Some(c), &args.overrides)).collect::<Result<Vec<_>, _>>()?;
            let options = crate::cutover::Options {
                wait: std::time::Duration::from_secs(args.wait),
                freeze_source: args.freeze_source,
                sequence_margin: args.sequence_margin,
                dry_run: args.dry_run,
            };
            one_shot(&configs[0], crate::cutover::run(configs.clone(), options))
        }
        Command::Verify(args) => {
            let config = Config::load(Some(&args.role.config), &args.role.overrides)?;
            one_shot(&config, crate::verify::run(config.clone(), args.wait))
        }
        Command::Agent(args) => {
            let config = args.config()?;
            serve_role(config, args, |config, metrics, limits, shutdown| async move {
                let listen = config.agent.metrics_listen.clone();
                let _metrics_server = start_metrics(&listen, metrics.clone()).await?;
                crate::task::run_agent(config, metrics, limits, shutdown).await.map_err(anyhow::Error::from)
            })
        }
        Command::Applier(args) => {
            let config = args.config()?;
            serve_role(config, args, |config, metrics, limits, shutdown| async move {
                let listen = config.applier.metrics_listen.clone();
                let _metrics_server = start_metrics(&listen, metrics.clone()).await?;
                crate::task::run_applier(config, metrics, limits, shutdown).await.map_err(anyhow::Error::from)
            })
        }
    }
}

async fn start_metrics(listen: &str, metrics: Arc<Metrics>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|e| anyhow::anyhow!("metrics_listen {listen:?}: {e}"))?;
    let handle = crate::metrics::serve(addr, metrics).await.map_err(|e| anyhow::anyhow!("metrics_listen {listen}: {e}"))?;
    Ok(Some(handle))
}

/// Runs a short command on a small runtime.
fn one_shot(config: &Config, work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    init_logging(config);
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work)
}

/// Sets up logging, a runtime and signal handling (SIGINT and SIGTERM
/// stop, SIGHUP reloads the configuration), then runs a role.
fn serve_role<F, Fut>(config: Config, args: TaskArgs, role: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, Arc<Metrics>, LiveLimits, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let metrics = Arc::new(Metrics::default());
        let limits = Limits::from_config(&config);
        set_throttle_gauges(&metrics, &limits);
        let (limits_tx, limits_rx) = tokio::sync::watch::channel(limits);
        // Registered before the role starts: a SIGHUP from then on reloads,
        // never kills the process.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(reload_on_hangup(hangup, config.clone(), args, limits_tx, metrics.clone()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("stopping");
            let _ = stop_tx.send(true);
        });
        role(config, metrics, limits_rx, stop_rx).await
    })
}

fn set_throttle_gauges(metrics: &Metrics, limits: &Limits) {
    for (gauge, (_, value)) in metrics.throttle.iter().zip(limits.settings()) {
        gauge.set(value);
    }
}

/// On each SIGHUP: reads the configuration file again (with the same
/// `--set` and `--accept`), puts the new throttle in force at once, and
/// warns of every other changed setting, which takes effect only when the
/// role is restarted.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    started: Config,
    args: TaskArgs,
    limits: tokio::sync::watch::Sender<Limits>,
    metrics: Arc<Metrics>,
) {
    while hangup.recv().await.is_some() {
        let config = match args.config() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the configuration cannot be read; nothing changed");
                continue;
            }
        };
        let new = Limits::from_config(&config);
        let changes = limits.borrow().changes(&new);
        if changes.is_empty() {
            tracing::info!("SIGHUP: configuration read again; the throttle is unchanged");
        } else {
            tracing::info!(changes = %changes.join(", "), "SIGHUP: new throttle in force");
            set_throttle_gauges(&metrics, &new);
            limits.send_replace(new);
        }
        let restart = changed_settings(&started, &config);
        if !restart.is_empty() {
            tracing::warn!(
                settings = %restart.join(", "),
                "SIGHUP: these settings differ from the ones this process started with and take effect only after a restart"
            );
        }
    }
}

/// The settings ("section.key") that differ between `a` and `b`, except
/// the throttle's (values are not shown: some are secrets).
fn changed_settings(a: &Config, b: &Config) -> Vec<String> {
    fn flat(config: &Config) -> std::collections::BTreeMap<String, toml::Value> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(config) {
            for (key, value) in t {
                match value {
                    toml::Value::Table(section) => {
                        out.extend(section.into_iter().map(|(k, v)| (format!("{key}.{k}"), v)));
                    }
                    v => {
                        out.insert(key, v);
                    }
                }
            }
        }
        out
    }
    let (a, b) = (flat(a), flat(b));
    let throttle = Limits::default().settings().map(|(name, _)| name);
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| !throttle.contains(&k.as_str())).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| a.get(k) != b.get(k));
    keys
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},tokio_postgres=warn,h2=warn", config.log.level)));
    // Colors only on a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
