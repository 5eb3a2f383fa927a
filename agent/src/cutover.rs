//! `decant cutover`: the last step of a zero-downtime migration, once the
//! application has stopped writing to the source (or with
//! `--freeze-source`, which stops it):
//!
//! 1. wait until the destination has applied everything the source holds:
//!    the slot confirms a source position taken now, and the agent confirms
//!    only what the destination durably committed;
//! 2. set every migrated sequence on the destination to the source's value
//!    (sequences are not in the logical stream), never lowering one;
//! 3. put back identity columns whose kind differs from the source's (the
//!    applier switches GENERATED ALWAYS off only inside its own
//!    transactions, so this finds nothing unless someone changed them);
//! 4. compare every table, as `decant verify` does;
//! 5. fence the task in the destination, so that its applier takes no
//!    stream any more, and end the applier's sessions so that its agent
//!    learns it and stops.
//!
//! Nothing is fenced unless every step before succeeded; running it again
//! after a success changes nothing and says so.

use std::time::Duration;

use anyhow::Context;
use decant_proto::grpc::SequenceValue;
use decant_proto::Lsn;
use tokio_postgres::Client;

use crate::applier::migration::{cut_over, mark_cut_over};
use crate::config::{Config, MigrationType};
use crate::connect::sql::{connect, quote_ident};
use crate::connect::{ConnInfo, ProcessEnv};

/// How `decant cutover` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to wait for the destination to catch up.
    pub wait: Duration,
    /// Make the source database read-only first.
    pub freeze_source: bool,
    /// Added to every sequence's value, in the direction it counts.
    pub sequence_margin: i64,
    /// Print what would be done, change nothing.
    pub dry_run: bool,
}

/// One task to cut over, with its two sessions.
struct Pending {
    config: Config,
    destination: ConnInfo,
    src: Client,
    dest: Client,
}

/// Cuts over every task of `configs` together: nothing is fenced unless
/// every one of them is caught up, its sequences set and its tables equal.
/// Tasks that share a source database (tasks split by tables) are cut over
/// at once, the source frozen once for all of them.
pub async fn run(configs: Vec<Config>, options: Options) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for config in configs {
        let task = config.task_id.clone();
        let source = ConnInfo::parse(&config.source.dsn, &ProcessEnv).with_context(|| format!("task {task}: source.dsn"))?;
        let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv).with_context(|| format!("task {task}: destination.dsn"))?;
        let (src, _) = connect(&source, "decant cutover", "").await.with_context(|| format!("task {task}: source"))?;
        let (dest, _) = connect(&destination, "decant cutover", "").await.with_context(|| format!("task {task}: destination"))?;
        if let Some(done) = cut_over(&dest, &task).await? {
            println!(
                "task {task} was cut over at {} (source position {}, {} sequences set): nothing to do",
                done.at, done.source_lsn, done.sequences
            );
            print_next_steps(&config, &destination, None);
            continue;
        }
        pending.push(Pending { config, destination, src, dest });
    }
    let mut frozen: Vec<(String, String)> = Vec::new();
    if options.freeze_source {
        for p in &pending {
            if !frozen.iter().any(|(dsn, _)| *dsn == p.config.source.dsn) {
                frozen.push((p.config.source.dsn.clone(), freeze_source(&p.src, options.dry_run).await?));
            }
        }
    }
    let mut ready = Vec::new();
    for p in &pending {
        let task = &p.config.task_id;
        let prepared = prepare(p, &options).await;
        ready.push(match prepared {
            Ok(r) => r,
            Err(e) if pending.len() > 1 => return Err(e.context(format!("task {task}: none of the {} tasks was cut over", pending.len()))),
            Err(e) => return Err(e),
        });
    }
    for (p, (position, raised)) in pending.iter().zip(ready) {
        let task = p.config.task_id.as_str();
        if options.dry_run {
            println!("cutover: would mark task {task} cut over at source position {position}, and end its applier's sessions");
            continue;
        }
        mark_cut_over(&p.dest, task, position, raised).await?;
        let ended = end_applier_sessions(&p.dest, task).await?;
        println!("cutover: task {task} is cut over at source position {position}; its applier takes no more changes ({ended} applier sessions ended)");
        let undo = frozen.iter().find(|(dsn, _)| *dsn == p.config.source.dsn).map(|(_, undo)| undo.as_str());
        print_next_steps(&p.config, &p.destination, undo);
    }
    Ok(())
}

/// Everything before the fence, for one task: waits until its destination
/// caught up, sets its sequences, puts back identity kinds, compares its
/// tables. Returns the source position it is cut over at, and how many
/// sequences were set.
async fn prepare(p: &Pending, options: &Options) -> anyhow::Result<(Lsn, i32)> {
    let (config, src, dest) = (&p.config, &p.src, &p.dest);
    let task = config.task_id.as_str();
    let would = if options.dry_run { "would " } else { "" };
    let position = if config.migrate.has(MigrationType::Incremental) {
        if options.dry_run {
            println!(
                "cutover: task {task}: would wait up to {}s until slot {} confirms the source's current position",
                options.wait.as_secs(),
                config.source.slot
            );
            current_position(src).await?
        } else {
            println!(
                "cutover: task {task}: waiting up to {}s until the destination has applied everything the source has written",
                options.wait.as_secs()
            );
            let lsn = crate::verify::wait_caught_up(src, &config.source.slot, options.wait).await?;
            println!("cutover: task {task}: the destination holds everything up to source position {lsn}");
            lsn
        }
    } else {
        current_position(src).await?
    };

    let sequences = crate::migrate::tables::sequence_values(src, config, &crate::throttle::SharedPace::unlimited()).await?;
    let mapping = config.mapping()?;
    let mut raised = 0;
    for s in &sequences {
        let owner = (!s.owner_name.is_empty()).then_some((s.owner_schema.as_str(), s.owner_name.as_str()));
        let (to_schema, to_name) = mapping.sequence(&s.schema, &s.name, owner);
        let to = format!("{}.{}", quote_ident(&to_schema), quote_ident(&to_name));
        if let Some(change) = sync_sequence(src, dest, s, &to, options.sequence_margin, options.dry_run).await? {
            println!("cutover: {would}set sequence {to_schema}.{to_name} {change}");
            raised += 1;
        }
    }
    println!(
        "cutover: task {task}: {} sequences checked, {raised} {}set to the source's value",
        sequences.len(),
        if options.dry_run { "would be " } else { "" }
    );

    for fix in identity_fixes(src, dest, config).await? {
        println!("cutover: {would}run on the destination: {fix}");
        if !options.dry_run {
            dest.batch_execute(&fix).await.with_context(|| format!("destination: {fix}"))?;
        }
    }

    let checks = crate::verify::compare(config, src, dest).await?;
    print!("{}", crate::verify::render(&checks));
    let differ: Vec<&str> = checks.iter().filter(|c| !c.equal()).map(|c| c.table.as_str()).collect();
    if !differ.is_empty() {
        anyhow::bail!(
            "the destination differs from the source in {} of {} tables: {}; the task was not cut over (is the source still written to?)",
            differ.len(),
            checks.len(),
            differ.join(", ")
        );
    }
    println!("cutover: task {task}: all {} tables equal", checks.len());
    Ok((position, raised))
}

async fn current_position(src: &Client) -> anyhow::Result<Lsn> {
    let lsn: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    lsn.parse().map_err(|e: String| anyhow::anyhow!(e))
}

/// Makes the source database read-only for every new transaction and ends
/// the sessions that began before (they would keep writing); decant's own
/// sessions stay. Returns the statement that undoes it.
async fn freeze_source(src: &Client, dry_run: bool) -> anyhow::Result<String> {
    let db: String = src.query_one("SELECT current_database()::text", &[]).await?.get(0);
    let freeze = format!("ALTER DATABASE {} SET default_transaction_read_only = on", quote_ident(&db));
    let undo = format!("ALTER DATABASE {} RESET default_transaction_read_only", quote_ident(&db));
    let sessions = src
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), coalesce(client_addr::text, 'local')
               FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
                AND coalesce(application_name, '') NOT LIKE 'decant%'",
            &[],
        )
        .await?;
    if dry_run {
        println!("cutover: would run on the source: {freeze}, and end {} sessions that began before", sessions.len());
        return Ok(undo);
    }
    src.batch_execute(&freeze).await.context("source: making the database read-only")?;
    for s in &sessions {
        let (pid, user, app, from): (i32, String, String, String) = (s.get(0), s.get(1), s.get(2), s.get(3));
        src.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
        println!("cutover: ended source session {pid} (user {user}, application {app:?}, from {from}) so that it reconnects read-only");
    }
    println!("cutover: the source database {db} is read-only for new transactions; undo with: {undo};");
    Ok(undo)
}

/// Sets one sequence on the destination to the source's value plus
/// `margin` (in the sequence's direction), unless it is already there or
/// past it. `to`: its qualified name on the destination. Returns what
/// changed.
async fn sync_sequence(
    src: &Client,
    dest: &Client,
    s: &SequenceValue,
    to: &str,
    margin: i64,
    dry_run: bool,
) -> anyhow::Result<Option<String>> {
    let name = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.name));
    let increment: i64 = src
        .query_one("SELECT seqincrement FROM pg_sequence WHERE seqrelid = $1::text::regclass", &[&name])
        .await
        .with_context(|| format!("source sequence {name}"))?
        .get(0);
    let current = dest
        .query_one(&format!("SELECT last_value, is_called FROM {to}"), &[])
        .await
        .with_context(|| format!("destination sequence {to} (was the schema migrated?)"))?;
    let target = SequencePosition {
        last_value: s.last_value.saturating_add(margin.saturating_mul(increment.signum())),
        is_called: s.is_called || margin != 0,
    };
    let now = SequencePosition { last_value: current.get(0), is_called: current.get(1) };
    if !target.is_ahead_of(&now, increment) {
        return Ok(None);
    }
    if !dry_run {
        dest.execute("SELECT setval($1::text::regclass, $2, $3)", &[&to, &target.last_value, &target.is_called])
            .await
            .with_context(|| format!("destination: setval({to})"))?;
    }
    Ok(Some(format!("from {} to {}", now, target)))
}

/// A sequence's state: `last_value`, and whether it was handed out.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SequencePosition {
    last_value: i64,
    is_called: bool,
}

impl SequencePosition {
    /// Whether the next value handed out from `self` comes after the one
    /// from `other`, for a sequence counting by `increment`.
    fn is_ahead_of(&self, other: &SequencePosition, increment: i64) -> bool {
        let next = |p: &SequencePosition| p.last_value as i128 + if p.is_called { increment as i128 } else { 0 };
        if increment >= 0 {
            next(self) > next(other)
        } else {
            next(self) < next(other)
        }
    }
}

impl std::fmt::Display for SequencePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.last_value, if self.is_called { "" } else { " (not yet used)" })
    }
}

/// The statements that give each selected table's identity columns on the
/// destination the kind they have on the source.
async fn identity_fixes(src: &Client, dest: &Client, config: &Config) -> anyhow::Result<Vec<String>> {
    const IDENTITIES: &str = "SELECT n.nspname::text, c.relname::text, a.attname::text, a.attidentity::text
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE a.attidentity <> '' AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')";
    let selected = config.selection();
    let on_destination: std::collections::HashMap<(String, String, String), String> =
        dest.query(IDENTITIES, &[]).await?.iter().map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3))).collect();
    let mut fixes = Vec::new();
    for r in src.query(IDENTITIES, &[]).await? {
        let key: (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let kind: String = r.get(3);
        if !selected.table_selected(key.0.as_bytes(), key.1.as_bytes()) {
            continue;
        }
        if let Some(there) = on_destination.get(&key) {
            if *there != kind {
                let generated = if kind == "a" { "ALWAYS" } else { "BY DEFAULT" };
                fixes.push(format!(
                    "ALTER TABLE ONLY {}.{} ALTER COLUMN {} SET GENERATED {generated}",
                    quote_ident(&key.0),
                    quote_ident(&key.1),
                    quote_ident(&key.2)
                ));
            }
        }
    }
    Ok(fixes)
}

/// Ends the destination sessions of the task's applier: a stream still
/// open then fails, and its agent, reconnecting, is refused and stops.
async fn end_applier_sessions(dest: &Client, task_id: &str) -> anyhow::Result<u64> {
    let names = crate::applier::session_names(task_id);
    let ended = dest
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
            &[&names.to_vec()],
        )
        .await?;
    Ok(ended.len() as u64)
}

fn print_next_steps(config: &Config, destination: &ConnInfo, undo_freeze: Option<&str>) {
    println!("next:");
    println!("  - point the application at the destination ({destination})");
    println!(
        "  - stop the task's agent and applier if they run as services (they stop by themselves once they reconnect): \
         systemctl disable --now decant-agent@{task} decant-applier@{task}",
        task = config.task_id
    );
    if config.migrate.has(MigrationType::Incremental) {
        println!(
            "  - once you no longer need to go back, drop the source slot, which holds WAL on the source: SELECT pg_drop_replication_slot('{}');",
            config.source.slot.replace('\'', "''")
        );
        if config.source.decoder != crate::config::decoder::DecoderChoice::Decant && config.source.publication.is_empty() {
            // Created by the agent when the task streams through pgoutput.
            println!(
                "  - if the task streamed through pgoutput, also drop the publication decant created (while it exists, UPDATE and \
                 DELETE on new tables without a replica identity fail): DROP PUBLICATION IF EXISTS {};",
                crate::quote::quote_ident(config.source.publication())
            );
        }
    }
    if let Some(undo) = undo_freeze {
        println!("  - the source database stays read-only for new transactions; undo with: {undo};");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_is_only_ever_moved_forward_in_its_direction() {
        let p = |last_value, is_called| SequencePosition { last_value, is_called };
        // Ascending: the next value decides.
        assert!(p(10, true).is_ahead_of(&p(9, true), 1));
        assert!(!p(10, true).is_ahead_of(&p(10, true), 1));
        assert!(p(10, true).is_ahead_of(&p(10, false), 1));
        assert!(!p(10, false).is_ahead_of(&p(9, true), 1));
        assert!(!p(5, true).is_ahead_of(&p(50, true), 1));
        // Descending: smaller is further.
        assert!(p(-10, true).is_ahead_of(&p(-9, true), -1));
        assert!(!p(-9, true).is_ahead_of(&p(-10, true), -1));
        // Increments of 10: 20 called hands out 30 next, 25 unused 25.
        assert!(p(20, true).is_ahead_of(&p(25, false), 10));
    }
}
