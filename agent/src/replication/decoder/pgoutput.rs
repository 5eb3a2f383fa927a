//! pgoutput's messages (logical replication protocol version 1, as
//! PostgreSQL 10+ writes it) turned into decant records.
//!
//! Every value comes as its type's text output (converted by the server to
//! the connection's UTF-8), which [`from_pg_text`] turns into the value the
//! plugin sends; unchanged TOAST values are `u`; a RELATION is completed
//! from the catalog (see `relations.rs`).

use std::collections::HashMap;

use decant_proto::fromtext::{from_pg_text, TextValue};
use decant_proto::{Begin, Commit, Delete, Insert, Lsn, Message, OldTuple, Record, ReplicaIdentity, Truncate, Tuple, Update, Value};

use super::output::{Hold, Output};
use super::relations::{Catalog, RelationMeta};
use super::TranslateError;
use decant_proto::options::PluginOptions;

pub struct Pgoutput {
    catalog: Catalog,
    selection: PluginOptions,
    relations: HashMap<u32, RelationMeta>,
    pub output: Output,
    xid: u32,
}

/// One column of a tuple message.
enum Cell<'a> {
    Null,
    Unchanged,
    Text(&'a [u8]),
}

impl Pgoutput {
    pub fn new(catalog: Catalog, selection: PluginOptions) -> Pgoutput {
        Pgoutput { catalog, selection, relations: HashMap::new(), output: Output::new(Hold::Nothing), xid: 0 }
    }

    pub async fn feed(&mut self, payload: &[u8]) -> Result<(), TranslateError> {
        let mut r = Reader { buf: payload, at: 0 };
        let kind = r.u8()?;
        match kind {
            b'B' => {
                let final_lsn = Lsn(r.u64()?);
                let commit_time = r.i64()?;
                self.xid = r.u32()?;
                self.output.begin(Begin { xid: self.xid, final_lsn, commit_time });
            }
            b'C' => {
                let _flags = r.u8()?;
                let _commit_lsn = r.u64()?;
                let end_lsn = Lsn(r.u64()?);
                let commit_time = r.i64()?;
                self.output.commit(self.xid, Commit { end_lsn, commit_time })?;
            }
            b'R' => self.relation(&mut r).await?,
            b'I' => {
                let oid = r.u32()?;
                if !self.prepare(oid)? {
                    return Ok(());
                }
                let rel = &self.relations[&oid];
                r.expect(b'N')?;
                let cells = tuple(&mut r)?;
                let new = row(rel, &cells, Part::All);
                self.output.change(&Record::Insert(Insert { relation: rel.oid, new: Tuple(values(&new)) }))?;
            }
            b'U' => {
                let oid = r.u32()?;
                if !self.prepare(oid)? {
                    return Ok(());
                }
                let rel = &self.relations[&oid];
                let mut tag = r.u8()?;
                let mut old_cells = None;
                if tag == b'K' || tag == b'O' {
                    old_cells = Some((tag, tuple(&mut r)?));
                    tag = r.u8()?;
                }
                if tag != b'N' {
                    return Err(TranslateError::Protocol(format!("pgoutput UPDATE: expected N, got {:?}", char::from(tag))));
                }
                let cells = tuple(&mut r)?;
                let old = old_cells.map(|(tag, c)| row(rel, &c, if tag == b'K' { Part::Key } else { Part::All }));
                let new = row(rel, &cells, Part::All);
                let old = old.as_ref().map(|o| old_tuple(rel, o));
                self.output.change(&Record::Update(Update { relation: rel.oid, old, new: Tuple(values(&new)) }))?;
            }
            b'D' => {
                let oid = r.u32()?;
                if !self.prepare(oid)? {
                    return Ok(());
                }
                let rel = &self.relations[&oid];
                let tag = r.u8()?;
                let cells = tuple(&mut r)?;
                let old = row(rel, &cells, if tag == b'K' { Part::Key } else { Part::All });
                self.output.change(&Record::Delete(Delete { relation: rel.oid, old: Some(old_tuple(rel, &old)) }))?;
            }
            b'T' => {
                let n = r.u32()?;
                let flags = r.u8()?;
                let mut relations = Vec::new();
                for _ in 0..n {
                    let oid = r.u32()?;
                    if self.selected(oid)? {
                        relations.push(oid);
                    }
                }
                for &oid in &relations {
                    self.prepare(oid)?;
                }
                if relations.is_empty() {
                    return Ok(());
                }
                let record = Record::Truncate(Truncate { relations, cascade: flags & 1 != 0, restart_identity: flags & 2 != 0 });
                self.output.change(&record)?;
            }
            b'M' => {
                let flags = r.u8()?;
                let lsn = Lsn(r.u64()?);
                let prefix = r.cstr()?;
                let len = r.u32()? as usize;
                let content = r.take(len)?;
                let record = Record::Message(Message { transactional: flags & 1 != 0, lsn, prefix, content });
                if flags & 1 != 0 {
                    self.output.change(&record)?;
                } else {
                    self.output.outside(&record);
                }
            }
            // Origin and type announcements carry nothing the records need.
            b'O' | b'Y' => {}
            other => return Err(TranslateError::Protocol(format!("pgoutput: unknown message type {:?}", char::from(other)))),
        }
        Ok(())
    }

    async fn relation(&mut self, r: &mut Reader<'_>) -> Result<(), TranslateError> {
        let oid = r.u32()?;
        let mut schema = String::from_utf8_lossy(r.cstr()?).into_owned();
        if schema.is_empty() {
            // pgoutput's name for pg_catalog.
            schema = "pg_catalog".into();
        }
        let name = String::from_utf8_lossy(r.cstr()?).into_owned();
        let identity = ReplicaIdentity::from_char(r.u8()?).unwrap_or(ReplicaIdentity::Default);
        let n = r.u16()?;
        let mut columns = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let key = r.u8()? & 1 != 0;
            let column = String::from_utf8_lossy(r.cstr()?).into_owned();
            let type_oid = r.u32()?;
            let typmod = r.i32()?;
            columns.push((column, type_oid, typmod, key));
        }
        let selected = self.selection.table_selected(schema.as_bytes(), name.as_bytes());
        let columns = if selected { self.catalog.complete(oid, identity, &columns).await? } else { Vec::new() };
        self.relations.insert(oid, RelationMeta { oid, identity, schema, name, columns, generated: Vec::new(), selected, sent: false });
        Ok(())
    }

    fn selected(&self, oid: u32) -> Result<bool, TranslateError> {
        match self.relations.get(&oid) {
            Some(rel) => Ok(rel.selected),
            None => Err(TranslateError::Protocol(format!("pgoutput: a change of relation {oid} before its RELATION message"))),
        }
    }

    /// For a change of relation `oid`: false when it is not selected;
    /// otherwise the BEGIN and the RELATION are written if they were not
    /// yet.
    fn prepare(&mut self, oid: u32) -> Result<bool, TranslateError> {
        if !self.selected(oid)? {
            return Ok(false);
        }
        if let Some(rel) = self.relations.get_mut(&oid).filter(|r| !r.sent) {
            rel.sent = true;
            self.output.change(&rel.record())?;
        }
        Ok(true)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Part {
    All,
    Key,
}

/// The parsed values of the relation's columns (or of its key columns).
fn row<'a>(rel: &RelationMeta, cells: &[Cell<'a>], part: Part) -> Vec<TextValue<'a>> {
    let positions: Vec<usize> = match part {
        Part::All => (0..rel.columns.len()).collect(),
        Part::Key => rel.key_positions(),
    };
    positions
        .into_iter()
        .map(|i| match cells.get(i) {
            Some(Cell::Text(text)) => from_pg_text(rel.columns[i].type_oid, text),
            Some(Cell::Unchanged) => TextValue::Value(Value::UnchangedToast),
            Some(Cell::Null) | None => TextValue::Value(Value::Null),
        })
        .collect()
}

fn values<'v>(row: &'v [TextValue<'_>]) -> Vec<Value<'v>> {
    row.iter().map(TextValue::as_value).collect()
}

fn old_tuple<'v>(rel: &RelationMeta, old: &'v [TextValue<'_>]) -> OldTuple<'v> {
    if rel.identity == ReplicaIdentity::Full {
        OldTuple::Row(Tuple(values(old)))
    } else {
        OldTuple::Key(Tuple(values(old)))
    }
}

fn tuple<'a>(r: &mut Reader<'a>) -> Result<Vec<Cell<'a>>, TranslateError> {
    let n = r.u16()?;
    let mut cells = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        cells.push(match r.u8()? {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            b't' => {
                let len = r.u32()? as usize;
                Cell::Text(r.take(len)?)
            }
            other => return Err(TranslateError::Protocol(format!("pgoutput: unknown column kind {:?}", char::from(other)))),
        });
    }
    Ok(cells)
}

/// Big-endian reads over a message.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TranslateError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            TranslateError::Protocol(format!("pgoutput: message of {} bytes ends early (at {}, needs {n})", self.buf.len(), self.at))
        })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, TranslateError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TranslateError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap_or_default()))
    }
    fn u32(&mut self) -> Result<u32, TranslateError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    fn i32(&mut self) -> Result<i32, TranslateError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, TranslateError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
    fn i64(&mut self) -> Result<i64, TranslateError> {
        Ok(self.u64()? as i64)
    }
    fn cstr(&mut self) -> Result<&'a [u8], TranslateError> {
        let rest = &self.buf[self.at..];
        let nul = rest.iter().position(|&b| b == 0).ok_or_else(|| TranslateError::Protocol("pgoutput: unterminated string".into()))?;
        self.at += nul + 1;
        Ok(&rest[..nul])
    }
    fn expect(&mut self, tag: u8) -> Result<(), TranslateError> {
        match self.u8()? {
            t if t == tag => Ok(()),
            t => Err(TranslateError::Protocol(format!("pgoutput: expected {:?}, got {:?}", char::from(tag), char::from(t)))),
        }
    }
}
