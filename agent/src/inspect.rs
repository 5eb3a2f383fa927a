//! `decant inspect`: decode decant records from a slot or a pg_recvlogical
//! file, check every CRC, and print them readably or as JSON lines.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use decant_proto::options::PluginOptions;
use decant_proto::pgtext::timestamptz_text;
use decant_proto::{decode, frame_len, Lsn, OldTuple, Record, Relation, Tuple, Value};
use serde_json::{json, Map, Value as Json};

use crate::connect::sql::connect;
use crate::connect::{ConnInfo, ProcessEnv};
use crate::replication::decoder::{start_options, Decoder, Translator};

/// `decant inspect`'s arguments.
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

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let stdout = io::stdout().lock();
    let mut printer = Printer::new(
        BufWriter::new(stdout),
        if args.json {
            Style::Json
        } else if args.summary {
            Style::Summary
        } else {
            Style::Text
        },
    );
    let limit = args.limit.unwrap_or(u64::MAX);
    match (&args.file, &args.slot) {
        (Some(path), _) => read_file(path, limit, &mut printer)?,
        (None, Some(slot)) => {
            let dsn = args.dsn.as_deref().context("--slot needs --dsn (or DECANT_DSN)")?;
            read_slot(dsn, slot, &args.options, args.limit, &mut printer)?
        }
        (None, None) => bail!("give --file FILE or --slot NAME"),
    }
    printer.finish()
}

/// Reads a file written by `pg_recvlogical -f`, which writes each message
/// followed by a newline. Streams it, so files of any size are fine.
fn read_file(path: &Path, limit: u64, printer: &mut Printer<impl Write>) -> anyhow::Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0usize; // start of the unread part of buf
    let mut base = 0u64; // file offset of buf[0]
    let mut eof = false;
    let mut changes = 0u64;
    // Fill until buf[start..] holds `want` bytes or the file ends.
    let mut fill = |buf: &mut Vec<u8>, start: &mut usize, base: &mut u64, want: usize, eof: &mut bool| -> io::Result<()> {
        if *start > 0 && *start >= buf.len() / 2 {
            buf.drain(..*start);
            *base += *start as u64;
            *start = 0;
        }
        while buf.len() - *start < want && !*eof {
            let mut chunk = [0u8; 64 * 1024];
            let n = file.read(&mut chunk)?;
            if n == 0 {
                *eof = true;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    loop {
        fill(&mut buf, &mut start, &mut base, 10, &mut eof)?;
        if start == buf.len() {
            return Ok(());
        }
        let offset = base + start as u64;
        let total = match frame_len(&buf[start..]) {
            Ok(Some(total)) => total,
            Ok(None) => bail!("{}: truncated record at byte offset {offset}: the file ends inside its length prefix", path.display()),
            Err(e) => bail!("{}: bad record at byte offset {}: {}", path.display(), offset + e.offset as u64, e.kind),
        };
        fill(&mut buf, &mut start, &mut base, total, &mut eof)?;
        let used = {
            let (record, used) = match decode(&buf[start..]) {
                Ok(ok) => ok,
                Err(e) => bail!("{}: bad record at byte offset {}: {}", path.display(), offset + e.offset as u64, e.kind),
            };
            if is_change(&record) {
                changes += 1;
            }
            printer.record(None, &record, used)?;
            used
        };
        start += used;
        if changes >= limit {
            return Ok(());
        }
        // pg_recvlogical ends each message with a newline; a message holds
        // one record, or several when the plugin packs them
        // (max_message_bytes). So a record is followed by a newline or by
        // the next record; a newline byte that begins a whole record with a
        // valid CRC is that record.
        fill(&mut buf, &mut start, &mut base, 11, &mut eof)?;
        match buf.get(start) {
            None => bail!(
                "{}: byte offset {}: the file ends without the newline pg_recvlogical writes after each message",
                path.display(),
                base + start as u64
            ),
            Some(b'\n') => {
                let record_here = match frame_len(&buf[start..]) {
                    Ok(Some(n)) => {
                        fill(&mut buf, &mut start, &mut base, n, &mut eof)?;
                        decode(&buf[start..]).is_ok()
                    }
                    _ => false,
                };
                if !record_here {
                    start += 1;
                }
            }
            Some(_) => {}
        }
    }
}

fn is_change(r: &Record<'_>) -> bool {
    matches!(r, Record::Insert(_) | Record::Update(_) | Record::Delete(_) | Record::Truncate(_))
}

/// Peeks at a slot with `pg_logical_slot_peek_binary_changes` (nothing is
/// consumed). A slot of plugin decant gives records as they are; one of
/// pgoutput or test_decoding is translated as the agent translates it
/// (`--option`s then go to that plugin, after the agent's own: for
/// pgoutput, the publication named after the slot).
fn read_slot(dsn: &str, slot: &str, options: &[String], limit: Option<u64>, printer: &mut Printer<impl Write>) -> anyhow::Result<()> {
    let mut flat: Vec<String> = Vec::new();
    for o in options {
        let (name, value) = o.split_once('=').with_context(|| format!("--option {o:?}: expected NAME=VALUE"))?;
        flat.push(name.to_owned());
        flat.push(value.to_owned());
    }
    let limit = limit.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        // The same connection settings (TLS, text output settings) as every
        // other decant session.
        let info = ConnInfo::parse(dsn, &ProcessEnv).context("--dsn")?;
        let (client, connection) = connect(&info, "decant inspect", "").await.context("cannot connect to the source (--dsn)")?;
        let plugin: Option<String> =
            client.query_opt("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?.map(|r| r.get(0));
        let decoder = match plugin.as_deref() {
            None => bail!("slot {slot:?} does not exist"),
            Some(p) => Decoder::from_plugin(p).with_context(|| format!("slot {slot:?} has plugin {p}, which decant cannot read"))?,
        };
        let mut translator = None;
        if decoder == Decoder::Decant {
            // Check the options here first: same parser as the plugin, clearer error.
            PluginOptions::parse(flat.chunks(2).map(|p| (p[0].as_str(), Some(p[1].as_str())))).map_err(|e| anyhow::anyhow!("{e}"))?;
        } else {
            let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
            // The agent's options, unless --option sets the same one.
            let given: Vec<String> = flat.chunks(2).map(|p| p[0].clone()).collect();
            let own = start_options(decoder, slot, u32::try_from(version).unwrap_or(0));
            flat =
                own.into_iter().filter(|(k, _)| !given.iter().any(|g| g == k)).flat_map(|(k, v)| [k.to_owned(), v]).chain(flat).collect();
            translator = Translator::new(decoder, &info, PluginOptions::default()).await?;
        }
        let sql = if decoder == Decoder::TestDecoding {
            "SELECT lsn::text, convert_to(data, 'UTF8') FROM pg_logical_slot_peek_changes($1, NULL, $2, VARIADIC $3::text[])"
        } else {
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, VARIADIC $3::text[])"
        };
        let rows = client.query(sql, &[&slot, &limit, &flat]).await.with_context(|| format!("cannot read slot {slot:?}"))?;
        for row in rows {
            let lsn: String = row.get(0);
            let data: &[u8] = row.get(1);
            let lsn: Lsn = lsn.parse().map_err(anyhow::Error::msg)?;
            match &mut translator {
                None => print_records(slot, lsn, data, printer)?,
                Some(t) => {
                    t.feed(lsn, data).await.with_context(|| format!("slot {slot:?}, message at LSN {lsn}"))?;
                    while let Some(chunk) = t.next_chunk()? {
                        print_records(slot, lsn, &chunk, printer)?;
                    }
                }
            }
        }
        drop(client);
        let _ = connection.await;
        Ok(())
    })
}

/// The records of one message (one, or several with max_message_bytes).
fn print_records(slot: &str, lsn: Lsn, data: &[u8], printer: &mut Printer<impl Write>) -> anyhow::Result<()> {
    let mut at = 0;
    while at < data.len() {
        let (record, used) =
            decode(&data[at..]).map_err(|e| anyhow::anyhow!("slot {slot:?}, message at LSN {lsn}, byte {}: {}", at + e.offset, e.kind))?;
        printer.record(Some(lsn), &record, used)?;
        at += used;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    Text,
    Json,
    Summary,
}

/// What is remembered of a relation record, to name tables and columns.
struct KnownRelation {
    table: String,
    columns: Vec<String>,
    key: Vec<usize>,
}

struct Printer<W: Write> {
    out: W,
    style: Style,
    relations: HashMap<u32, KnownRelation>,
    counts: BTreeMap<&'static str, u64>,
    bytes: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl<W: Write> Printer<W> {
    fn new(out: W, style: Style) -> Self {
        Printer { out, style, relations: HashMap::new(), counts: BTreeMap::new(), bytes: 0 }
    }

    fn remember(&mut self, r: &Relation<'_>) {
        self.relations.insert(
            r.oid,
            KnownRelation {
                table: format!("{}.{}", lossy(r.namespace), lossy(r.name)),
                columns: r.columns.iter().map(|c| lossy(c.name)).collect(),
                key: r.identity_key().collect(),
            },
        );
    }

    fn table(&self, oid: u32) -> String {
        self.relations.get(&oid).map_or_else(|| format!("relation {oid}"), |r| r.table.clone())
    }

    /// Column names for the values of a tuple: all columns, or the key
    /// columns for an old key; positions when the relation is unknown.
    fn names(&self, oid: u32, key_only: bool, n: usize) -> Vec<String> {
        let names = self.relations.get(&oid).map(|r| {
            if key_only {
                r.key.iter().filter_map(|&i| r.columns.get(i).cloned()).collect::<Vec<_>>()
            } else {
                r.columns.clone()
            }
        });
        match names {
            Some(names) if names.len() == n => names,
            _ => (1..=n).map(|i| format!("${i}")).collect(),
        }
    }

    fn record(&mut self, at: Option<Lsn>, rec: &Record<'_>, size: usize) -> anyhow::Result<()> {
        *self.counts.entry(rec.kind().name()).or_default() += 1;
        self.bytes += size as u64;
        if let Record::Relation(r) = rec {
            self.remember(r);
        }
        match self.style {
            Style::Summary => Ok(()),
            Style::Json => {
                let mut obj = self.json(rec);
                if let (Some(at), Json::Object(map)) = (at, &mut obj) {
                    map.insert("at".into(), json!(at.to_string()));
                }
                writeln!(self.out, "{obj}")?;
                Ok(())
            }
            Style::Text => {
                let line = self.text(rec);
                match at {
                    Some(at) => writeln!(self.out, "{:<12} {line}", at.to_string())?,
                    None => writeln!(self.out, "{line}")?,
                }
                Ok(())
            }
        }
    }

    fn finish(mut self) -> anyhow::Result<()> {
        if self.style == Style::Summary {
            let total: u64 = self.counts.values().sum();
            for (kind, n) in &self.counts {
                writeln!(self.out, "{kind:<10} {n}")?;
            }
            writeln!(self.out, "{:<10} {total} records, {} bytes", "total", self.bytes)?;
        }
        self.out.flush()?;
        Ok(())
    }

    fn text(&self, rec: &Record<'_>) -> String {
        match rec {
            Record::Begin(b) => {
                format!("BEGIN xid {} final_lsn {} commit_time {}", b.xid, b.final_lsn, timestamptz_text(b.commit_time))
            }
            Record::Commit(c) => format!("COMMIT end_lsn {} commit_time {}", c.end_lsn, timestamptz_text(c.commit_time)),
            Record::Relation(r) => {
                let cols: Vec<String> = r
                    .columns
                    .iter()
                    .map(|c| {
                        let mut flags = Vec::new();
                        if c.flags.identity_key() {
                            flags.push("key");
                        }
                        if c.flags.primary_key() {
                            flags.push("pk");
                        }
                        if c.flags.not_null() {
                            flags.push("not null");
                        }
                        let flags = if flags.is_empty() { String::new() } else { format!(" [{}]", flags.join(", ")) };
                        format!("{} {}{flags}", lossy(c.name), lossy(c.type_name))
                    })
                    .collect();
                format!("RELATION {} {} replica identity {}: {}", r.oid, self.table(r.oid), r.replica_identity.name(), cols.join(", "))
            }
            Record::Insert(i) => format!("INSERT {}: {}", self.table(i.relation), self.text_tuple(i.relation, false, &i.new)),
            Record::Update(u) => {
                let old = match &u.old {
                    None => String::new(),
                    Some(OldTuple::Key(t)) => format!("old key ({}) ", self.text_tuple(u.relation, true, t)),
                    Some(OldTuple::Row(t)) => format!("old ({}) ", self.text_tuple(u.relation, false, t)),
                };
                format!("UPDATE {}: {old}new {}", self.table(u.relation), self.text_tuple(u.relation, false, &u.new))
            }
            Record::Delete(d) => match &d.old {
                None => format!("DELETE {}: (no replica identity)", self.table(d.relation)),
                Some(OldTuple::Key(t)) => format!("DELETE {}: key {}", self.table(d.relation), self.text_tuple(d.relation, true, t)),
                Some(OldTuple::Row(t)) => format!("DELETE {}: old {}", self.table(d.relation), self.text_tuple(d.relation, false, t)),
            },
            Record::Truncate(t) => {
                let tables: Vec<String> = t.relations.iter().map(|&oid| self.table(oid)).collect();
                let mut s = format!("TRUNCATE {}", tables.join(", "));
                if t.cascade {
                    s.push_str(" CASCADE");
                }
                if t.restart_identity {
                    s.push_str(" RESTART IDENTITY");
                }
                s
            }
            Record::Message(m) => format!(
                "MESSAGE {} lsn {} prefix {} content {} ({} bytes)",
                if m.transactional { "transactional" } else { "non-transactional" },
                m.lsn,
                quote(m.prefix),
                quote(m.content),
                m.content.len()
            ),
        }
    }

    fn text_tuple(&self, oid: u32, key_only: bool, t: &Tuple<'_>) -> String {
        let names = self.names(oid, key_only, t.0.len());
        names
            .iter()
            .zip(&t.0)
            .map(|(name, v)| {
                let shown = match v {
                    Value::Null => "null".to_owned(),
                    Value::UnchangedToast => "<unchanged toast>".to_owned(),
                    Value::Int(_) | Value::Bool(_) | Value::Float4(_) | Value::Float8(_) | Value::Numeric(_) => {
                        v.to_pg_text().map(|t| lossy(&t)).unwrap_or_default()
                    }
                    _ => v.to_pg_text().map(|t| quote(&t)).unwrap_or_default(),
                };
                format!("{name}={shown}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn json(&self, rec: &Record<'_>) -> Json {
        match rec {
            Record::Begin(b) => json!({
                "kind": "begin", "xid": b.xid, "final_lsn": b.final_lsn.to_string(),
                "commit_time": timestamptz_text(b.commit_time),
            }),
            Record::Commit(c) => json!({
                "kind": "commit", "end_lsn": c.end_lsn.to_string(), "commit_time": timestamptz_text(c.commit_time),
            }),
            Record::Relation(r) => json!({
                "kind": "relation", "oid": r.oid, "schema": lossy(r.namespace), "name": lossy(r.name),
                "replica_identity": r.replica_identity.name(),
                "columns": r.columns.iter().map(|c| json!({
                    "name": lossy(c.name), "type_oid": c.type_oid, "type": lossy(c.type_name), "typmod": c.typmod,
                    "identity_key": c.flags.identity_key(), "primary_key": c.flags.primary_key(), "not_null": c.flags.not_null(),
                })).collect::<Vec<_>>(),
            }),
            Record::Insert(i) => json!({
                "kind": "insert", "relation": i.relation, "table": self.table(i.relation),
                "new": self.json_tuple(i.relation, false, &i.new),
            }),
            Record::Update(u) => {
                let mut obj = json!({"kind": "update", "relation": u.relation, "table": self.table(u.relation)});
                match &u.old {
                    Some(OldTuple::Key(t)) => obj["old_key"] = self.json_tuple(u.relation, true, t),
                    Some(OldTuple::Row(t)) => obj["old"] = self.json_tuple(u.relation, false, t),
                    None => {}
                }
                obj["new"] = self.json_tuple(u.relation, false, &u.new);
                obj
            }
            Record::Delete(d) => {
                let mut obj = json!({"kind": "delete", "relation": d.relation, "table": self.table(d.relation)});
                match &d.old {
                    Some(OldTuple::Key(t)) => obj["old_key"] = self.json_tuple(d.relation, true, t),
                    Some(OldTuple::Row(t)) => obj["old"] = self.json_tuple(d.relation, false, t),
                    None => {}
                }
                obj
            }
            Record::Truncate(t) => json!({
                "kind": "truncate", "relations": t.relations,
                "tables": t.relations.iter().map(|&oid| self.table(oid)).collect::<Vec<_>>(),
                "cascade": t.cascade, "restart_identity": t.restart_identity,
            }),
            Record::Message(m) => {
                let mut obj = json!({
                    "kind": "message", "transactional": m.transactional, "lsn": m.lsn.to_string(), "prefix": lossy(m.prefix),
                });
                match std::str::from_utf8(m.content) {
                    Ok(s) => obj["content"] = json!(s),
                    Err(_) => obj["content_hex"] = json!(m.content.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                }
                obj
            }
        }
    }

    /// A tuple as an object of column name → text form. Values are always
    /// JSON strings (never numbers, which would lose numeric precision),
    /// null for NULL, and {"unchanged_toast": true} for an unchanged value.
    fn json_tuple(&self, oid: u32, key_only: bool, t: &Tuple<'_>) -> Json {
        let names = self.names(oid, key_only, t.0.len());
        let mut map = Map::new();
        for (name, v) in names.into_iter().zip(&t.0) {
            let j = match v {
                Value::Null => Json::Null,
                Value::UnchangedToast => json!({"unchanged_toast": true}),
                _ => json!(v.to_pg_text().map(|t| lossy(&t)).unwrap_or_default()),
            };
            map.insert(name, j);
        }
        Json::Object(map)
    }
}

/// `'text'` with quotes doubled, as an SQL literal; invalid UTF-8 replaced.
fn quote(b: &[u8]) -> String {
    format!("'{}'", lossy(b).replace('\'', "''"))
}
