//! `decant verify`: compares every selected table of the source with the
//! destination — row count and a checksum of all rows — and prints a
//! table. Optionally waits first until the destination has caught up.

use std::time::{Duration, Instant};

use decant_proto::Lsn;
use tokio_postgres::Client;

use crate::config::{Config, MigrationType};
use crate::connect::sql::connect;
use crate::connect::sql::quote_ident;
use crate::connect::{ConnInfo, ProcessEnv};

pub struct TableCheck {
    pub table: String,
    pub source: (i64, String),
    pub destination: Result<(i64, String), String>,
}

impl TableCheck {
    pub fn equal(&self) -> bool {
        self.destination.as_ref().is_ok_and(|d| *d == self.source)
    }
}

/// Runs the comparison; the error names the tables that differ.
pub async fn run(config: Config, wait_seconds: u64) -> anyhow::Result<()> {
    let source = ConnInfo::parse(&config.source.dsn, &ProcessEnv)?;
    let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv)?;
    let (src, _c1) = connect(&source, "decant verify", "").await?;
    let (dest, _c2) = connect(&destination, "decant verify", "").await?;
    if wait_seconds > 0 && config.migrate.has(MigrationType::Incremental) {
        wait_caught_up(&src, &config.source.slot, Duration::from_secs(wait_seconds)).await?;
    }
    let checks = compare(&config, &src, &dest).await?;
    print!("{}", render(&checks));
    let differ: Vec<&str> = checks.iter().filter(|c| !c.equal()).map(|c| c.table.as_str()).collect();
    if !differ.is_empty() {
        anyhow::bail!("the destination differs from the source in {} of {} tables: {}", differ.len(), checks.len(), differ.join(", "));
    }
    println!("all {} tables equal", checks.len());
    Ok(())
}

/// Row count and checksum of every selected table on both sides.
pub async fn compare(config: &Config, src: &Client, dest: &Client) -> anyhow::Result<Vec<TableCheck>> {
    let version: i32 = src.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    let dest_version: i32 = dest.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    if (version < 120000) != (dest_version < 120000) {
        // PostgreSQL 12 prints floats in their shortest exact form, older
        // servers with 17 digits under extra_float_digits = 3: equal
        // values would print differently. With 0 both print 15
        // significant digits (so floats are compared to that precision).
        for client in [src, dest] {
            client.batch_execute("SET extra_float_digits = 0").await?;
        }
    }
    let tables = crate::migrate::tables::list_tables(src, config, version as u32, &crate::throttle::SharedPace::unlimited()).await?;
    let mapping = config.mapping()?;
    let mut checks = Vec::new();
    for t in &tables {
        // Through migrate.map: the source's rows as the destination gets
        // them, against the destination table under its own names.
        let p = mapping.projection(&t.schema, &t.name, &t.columns);
        let (to_schema, to_name) = mapping.table(&t.schema, &t.name);
        let source_table = format!("ONLY {}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        let source_sql = if p.is_plain() {
            digest_sql(&source_table, &t.columns)
        } else {
            let aliased: Vec<String> = p.values.iter().zip(&p.targets).map(|(v, c)| format!("{v} AS {}", quote_ident(c))).collect();
            let select = crate::config::Projection { values: aliased, ..p.clone() }.select(&source_table, None);
            digest_sql(&format!("({select})"), &p.targets)
        };
        let dest_sql = digest_sql(&format!("ONLY {}.{}", quote_ident(&to_schema), quote_ident(&to_name)), &p.targets);
        let (s, d) = tokio::join!(digest(src, &source_sql), digest(dest, &dest_sql));
        let moved = (to_schema.as_str(), to_name.as_str()) != (t.schema.as_str(), t.name.as_str());
        checks.push(TableCheck {
            table: if moved { format!("{}.{} -> {to_schema}.{to_name}", t.schema, t.name) } else { format!("{}.{}", t.schema, t.name) },
            source: s.map_err(|e| anyhow::anyhow!("source: {e}"))?,
            destination: d,
        });
    }
    Ok(checks)
}

/// Waits until the slot has confirmed the source's current WAL position:
/// everything written before this call is then in the destination.
pub async fn wait_caught_up(src: &Client, slot: &str, timeout: Duration) -> anyhow::Result<Lsn> {
    let target: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let target: Lsn = target.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let until = Instant::now() + timeout;
    loop {
        let confirmed: Option<String> = src
            .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?
            .and_then(|r| r.get(0));
        let confirmed: Lsn = confirmed.and_then(|s| s.parse().ok()).unwrap_or_default();
        if confirmed >= target {
            return Ok(target);
        }
        if Instant::now() >= until {
            anyhow::bail!(
                "the destination did not catch up within {}s: slot {slot} confirmed {confirmed}, source was at {target} ({} bytes behind); is the agent running?",
                timeout.as_secs(),
                target.0.saturating_sub(confirmed.0)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Row count and the md5 of the sorted md5s of the rows' text forms (over
/// the copied columns, in the source's column order) of the rows of
/// `from` (a table or a subquery). The text is hashed in UTF-8 whatever
/// the database's encoding, so a LATIN1 source and a UTF-8 destination
/// holding the same characters compare equal. A table without columns
/// compares by its row count (each row is `()`).
fn digest_sql(from: &str, columns: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| format!("t.{}", quote_ident(c))).collect();
    let row = format!("md5(convert_to(ROW({})::text, 'UTF8'))", cols.join(", "));
    format!("SELECT count(*), coalesce(md5(string_agg({row}, '' ORDER BY {row})), '') FROM {from} t")
}

async fn digest(client: &Client, sql: &str) -> Result<(i64, String), String> {
    client.query_one(sql, &[]).await.map(|r| (r.get(0), r.get(1))).map_err(|e| crate::error::report(&e))
}

pub fn render(checks: &[TableCheck]) -> String {
    use std::fmt::Write;
    let width = checks.iter().map(|c| c.table.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:width$}  {:>12}  {:>12}  {:32}  RESULT", "TABLE", "SOURCE ROWS", "DEST ROWS", "CHECKSUM (SOURCE)");
    for c in checks {
        let (rows, result) = match &c.destination {
            Ok((n, sum)) if (*n, sum) == (c.source.0, &c.source.1) => (n.to_string(), "equal".to_owned()),
            Ok((n, _)) => (n.to_string(), "DIFFERENT".to_owned()),
            Err(e) => ("-".to_owned(), format!("ERROR: {e}")),
        };
        let sum = if c.source.1.is_empty() { "(empty)" } else { c.source.1.as_str() };
        let _ = writeln!(out, "{:width$}  {:>12}  {:>12}  {:32}  {}", c.table, c.source.0, rows, sum, result);
    }
    out
}
