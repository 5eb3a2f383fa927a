//! Command line of the `decant` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "decant", version, about = "Zero-downtime PostgreSQL migration: schema, full copy, then change capture")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode and print decant change records, checking every CRC.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["file", "slot"]))]
pub struct InspectArgs {
    /// A file written by `pg_recvlogical -P decant -f FILE` (one newline after each message).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Peek at the pending changes of this logical slot (plugin decant)
    /// without consuming them, over an ordinary connection (--dsn).
    #[arg(long, value_name = "NAME", requires = "dsn")]
    pub slot: Option<String>,

    /// Connection string for --slot, libpq key=value or URI form.
    #[arg(long, env = "DECANT_DSN", value_name = "CONNINFO")]
    pub dsn: Option<String>,

    /// A plugin option for --slot, NAME=VALUE (repeatable), e.g. include_messages=off.
    #[arg(long = "option", short = 'o', value_name = "NAME=VALUE")]
    pub options: Vec<String>,

    /// Stop after this many changes (--slot: passed to the server as upto_nchanges).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Print one JSON object per record instead of readable lines.
    #[arg(long, conflicts_with = "summary")]
    pub json: bool,

    /// Print only the number of records of each kind and the total bytes.
    #[arg(long)]
    pub summary: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => crate::inspect::run(args),
    }
}
