//! test_decoding's text lines (with `include-xids` and
//! `include-timestamp`) turned into decant records.
//!
//! A line names its table and columns but gives no OIDs, so the table is
//! described from the catalog by name (see `relations.rs`). The position of
//! a transaction's commit is known only at its COMMIT line, so its records
//! are held until then (see [`Hold::UntilCommit`]).

use std::collections::HashMap;

use decant_proto::fromtext::{from_pg_text, oid, TextValue};
use decant_proto::options::PluginOptions;
use decant_proto::{Begin, Commit, Delete, Insert, Lsn, Message, OldTuple, Record, ReplicaIdentity, Truncate, Tuple, Update, Value};

use super::output::{Hold, Output};
use super::relations::{Catalog, RelationMeta};
use super::TranslateError;

pub struct TestDecoding {
    catalog: Catalog,
    selection: PluginOptions,
    /// By (schema, table).
    tables: HashMap<(String, String), Described>,
    pub output: Output,
}

/// A table's catalog description, and the columns of the RELATION last
/// sent for it (None: not sent in this session).
type Described = (RelationMeta, Option<Vec<String>>);

/// A column as a line prints it: name, and its value's text (None for
/// NULL, `Unchanged` for unchanged-toast-datum).
#[derive(Debug, PartialEq)]
enum Printed {
    Null,
    Unchanged,
    Text(Vec<u8>),
}

impl TestDecoding {
    pub fn new(catalog: Catalog, selection: PluginOptions) -> TestDecoding {
        TestDecoding { catalog, selection, tables: HashMap::new(), output: Output::new(Hold::UntilCommit) }
    }

    /// One line, written at `at` (for a COMMIT the end of the commit
    /// record, for a message its position).
    pub async fn feed(&mut self, at: Lsn, line: &[u8]) -> Result<(), TranslateError> {
        if let Some(rest) = line.strip_prefix(b"BEGIN ") {
            let xid = number(rest).ok_or_else(|| bad(line))?;
            self.output.begin(Begin { xid: xid as u32, final_lsn: Lsn(0), commit_time: 0 });
        } else if let Some(rest) = line.strip_prefix(b"COMMIT ") {
            let space = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            let xid = number(&rest[..space]).ok_or_else(|| bad(line))?;
            let time = rest[space..].strip_prefix(b" (at ").and_then(|t| t.strip_suffix(b")")).ok_or_else(|| bad(line))?;
            let commit_time = match from_pg_text(oid::TIMESTAMPTZ, time).as_value() {
                Value::TimestampTz(t) => t,
                _ => return Err(bad(line)),
            };
            self.output.commit(xid as u32, Commit { end_lsn: at, commit_time })?;
        } else if let Some(rest) = line.strip_prefix(b"message: transactional: ") {
            self.message(at, rest).ok_or_else(|| bad(line))??;
        } else if let Some(rest) = line.strip_prefix(b"table ") {
            self.change(rest).await.map_err(|e| match e {
                TranslateError::Protocol(m) => TranslateError::Protocol(format!("{m}: {}", String::from_utf8_lossy(line))),
                other => other,
            })?;
        } else {
            return Err(bad(line));
        }
        Ok(())
    }

    fn message(&mut self, at: Lsn, rest: &[u8]) -> Option<Result<(), TranslateError>> {
        let transactional = match rest.first()? {
            b'1' => true,
            b'0' => false,
            _ => return None,
        };
        let rest = rest[1..].strip_prefix(b" prefix: ")?;
        // `PREFIX, sz: N content:CONTENT`, where PREFIX and CONTENT may hold
        // anything: the split is the one whose N is CONTENT's length.
        let (prefix, content) = (0..rest.len()).filter(|&i| rest[i..].starts_with(b", sz: ")).find_map(|i| {
            let after = &rest[i + 6..];
            let space = after.iter().position(|&b| b == b' ')?;
            let size = number(&after[..space])? as usize;
            let content = after[space..].strip_prefix(b" content:")?;
            (content.len() == size).then(|| (&rest[..i], content))
        })?;
        let record = Record::Message(Message { transactional, lsn: at, prefix, content });
        if transactional {
            return Some(self.output.change(&record).map_err(Into::into));
        }
        self.output.outside(&record);
        Some(Ok(()))
    }

    async fn change(&mut self, line: &[u8]) -> Result<(), TranslateError> {
        let mut p = Parser { s: line, at: 0 };
        let mut names = vec![p.qualified()?];
        while p.eat(b", ") {
            names.push(p.qualified()?);
        }
        if !p.eat(b": ") {
            return Err(TranslateError::Protocol("test_decoding: no action after the table name".into()));
        }
        let action = p.word();
        p.eat(b":");
        if action == b"TRUNCATE" {
            let flags = &line[p.at..];
            let mut relations = Vec::new();
            for (schema, table) in &names {
                if let Some(oid) = self.prepare(schema, table, None).await? {
                    relations.push(oid);
                }
            }
            if !relations.is_empty() {
                let record = Record::Truncate(Truncate {
                    relations,
                    cascade: find_last(flags, b"cascade").is_some(),
                    restart_identity: find_last(flags, b"restart_seqs").is_some(),
                });
                self.output.change(&record)?;
            }
            return Ok(());
        }
        let [(schema, table)] = &names[..] else {
            return Err(TranslateError::Protocol("test_decoding: a change names several tables".into()));
        };
        if p.eat(b" (no-tuple-data)") {
            // REPLICA IDENTITY NOTHING: a DELETE without its row (an UPDATE
            // without a new row does not happen).
            if action == b"DELETE" {
                if let Some(oid) = self.prepare(schema, table, None).await? {
                    self.output.change(&Record::Delete(Delete { relation: oid, old: None }))?;
                }
            }
            return Ok(());
        }
        let mut old: Option<Vec<(String, Printed)>> = None;
        if p.eat(b" old-key:") {
            old = Some(p.columns()?);
            if !p.eat(b" new-tuple:") {
                return Err(TranslateError::Protocol("test_decoding: old-key without new-tuple".into()));
            }
        }
        let cols = p.columns()?;
        let shape: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        let full_row = action != b"DELETE";
        let Some(oid) = self.prepare(schema, table, full_row.then_some(&shape[..])).await? else { return Ok(()) };
        let (rel, Some(sent)) = &self.tables[&(schema.clone(), table.clone())] else { return Ok(()) };
        match action {
            b"INSERT" => {
                let new = pick(rel, sent, &cols, None);
                let new = Tuple(new.iter().map(TextValue::as_value).collect());
                self.output.change(&Record::Insert(Insert { relation: oid, new }))?;
            }
            b"UPDATE" => {
                let new = pick(rel, sent, &cols, None);
                let new = Tuple(new.iter().map(TextValue::as_value).collect());
                let old = old.as_ref().map(|o| pick(rel, sent, o, Some(rel.identity)));
                let old = old.as_ref().map(|o| old_tuple(rel.identity, o));
                self.output.change(&Record::Update(Update { relation: oid, old, new }))?;
            }
            b"DELETE" => {
                let old = pick(rel, sent, &cols, Some(rel.identity));
                self.output.change(&Record::Delete(Delete { relation: oid, old: Some(old_tuple(rel.identity, &old)) }))?;
            }
            other => return Err(TranslateError::Protocol(format!("test_decoding: unknown action {}", String::from_utf8_lossy(other)))),
        }
        Ok(())
    }

    /// For a change of `schema`.`table`: None when it is not selected.
    /// Otherwise its OID, after writing its RELATION when none was sent or
    /// when the columns a full row prints (`printed`) are not those of the
    /// RELATION sent: the catalog's columns that the row has, so a row
    /// from before an ADD COLUMN is described without the new column.
    async fn prepare(&mut self, schema: &str, table: &str, printed: Option<&[&str]>) -> Result<Option<u32>, TranslateError> {
        if !self.selection.table_selected(schema.as_bytes(), table.as_bytes()) {
            return Ok(None);
        }
        let key = (schema.to_owned(), table.to_owned());
        let stale = match (self.tables.get(&key), printed) {
            (None, _) => true,
            // A printed column the catalog does not know: added since the
            // lookup (or dropped since the change, which reading again
            // cannot fix; checked below).
            (Some((rel, _)), Some(names)) => names.iter().any(|n| !rel.columns.iter().any(|c| c.name == *n) && !generated_now(rel, n)),
            (Some(_), None) => false,
        };
        if stale {
            let rel = self.catalog.by_name(schema, table).await?.ok_or_else(|| {
                TranslateError::Protocol(format!(
                    "test_decoding: table {schema}.{table} is not in the source's catalog any more: test_decoding gives table \
                     names only; use decoder decant or pgoutput for a source whose tables are renamed or dropped during the stream"
                ))
            })?;
            let sent = self.tables.remove(&key).and_then(|(_, s)| s);
            self.tables.insert(key.clone(), (rel, sent));
        }
        let Some((rel, sent)) = self.tables.get_mut(&key) else { return Ok(None) };
        let wanted: Vec<String> = match printed {
            Some(names) => {
                if let Some(unknown) = names.iter().find(|n| !rel.columns.iter().any(|c| c.name == **n) && !generated_now(rel, n)) {
                    return Err(TranslateError::Protocol(format!(
                        "test_decoding: column {unknown:?} of table {schema}.{table} is not in the source's catalog any more \
                         (dropped since this change): test_decoding gives column names only; use decoder decant or pgoutput"
                    )));
                }
                rel.columns.iter().filter(|c| names.contains(&c.name.as_str())).map(|c| c.name.clone()).collect()
            }
            None => sent.clone().unwrap_or_else(|| rel.columns.iter().map(|c| c.name.clone()).collect()),
        };
        if sent.as_ref() != Some(&wanted) {
            let mut described = rel.clone();
            described.columns.retain(|c| wanted.contains(&c.name));
            self.output.change(&described.record())?;
            *sent = Some(wanted);
        }
        Ok(Some(rel.oid))
    }
}

/// test_decoding prints generated columns, which the plugin leaves out.
fn generated_now(rel: &RelationMeta, name: &str) -> bool {
    rel.generated.iter().any(|g| g == name)
}

/// The values of the sent RELATION's columns (`identity`: of an old row,
/// whose NULL columns test_decoding leaves out: the key columns, or every
/// column under REPLICA IDENTITY FULL).
fn pick<'p>(
    rel: &RelationMeta,
    sent: &[String],
    printed: &'p [(String, Printed)],
    identity: Option<ReplicaIdentity>,
) -> Vec<TextValue<'p>> {
    rel.columns
        .iter()
        .filter(|c| sent.contains(&c.name))
        .filter(|c| match identity {
            None | Some(ReplicaIdentity::Full) => true,
            Some(_) => c.flags & decant_proto::ColumnFlags::IDENTITY_KEY != 0,
        })
        .map(|c| match printed.iter().find(|(n, _)| *n == c.name).map(|(_, v)| v) {
            Some(Printed::Text(text)) => from_pg_text(c.type_oid, text),
            Some(Printed::Unchanged) => TextValue::Value(Value::UnchangedToast),
            Some(Printed::Null) | None => TextValue::Value(Value::Null),
        })
        .collect()
}

fn old_tuple<'v>(identity: ReplicaIdentity, old: &'v [TextValue<'_>]) -> OldTuple<'v> {
    let values = Tuple(old.iter().map(TextValue::as_value).collect());
    if identity == ReplicaIdentity::Full {
        OldTuple::Row(values)
    } else {
        OldTuple::Key(values)
    }
}

fn bad(line: &[u8]) -> TranslateError {
    TranslateError::Protocol(format!("test_decoding: unexpected line: {}", String::from_utf8_lossy(&line[..line.len().min(200)])))
}

fn number(s: &[u8]) -> Option<u64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn find_last(s: &[u8], needle: &[u8]) -> Option<usize> {
    s.windows(needle.len()).rposition(|w| w == needle)
}

/// The column part of a line.
struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a [u8] {
        &self.s[self.at..]
    }

    fn eat(&mut self, token: &[u8]) -> bool {
        let found = self.rest().starts_with(token);
        if found {
            self.at += token.len();
        }
        found
    }

    /// Letters up to a space, colon or the end.
    fn word(&mut self) -> &'a [u8] {
        let start = self.at;
        while self.at < self.s.len() && !matches!(self.s[self.at], b' ' | b':') {
            self.at += 1;
        }
        &self.s[start..self.at]
    }

    /// The rest of a string opened by `quote` (already read), where a
    /// doubled `quote` stands for one.
    fn quoted(&mut self, quote: u8, what: &str) -> Result<Vec<u8>, TranslateError> {
        let mut out = Vec::new();
        loop {
            match self.rest() {
                [q, r, ..] if *q == quote && *r == quote => {
                    out.push(quote);
                    self.at += 2;
                }
                [q, ..] if *q == quote => {
                    self.at += 1;
                    return Ok(out);
                }
                [c, ..] => {
                    out.push(*c);
                    self.at += 1;
                }
                [] => return Err(TranslateError::Protocol(format!("test_decoding: unterminated {what}"))),
            }
        }
    }

    /// An identifier as `quote_identifier` prints it.
    fn identifier(&mut self) -> Result<String, TranslateError> {
        let mut out = Vec::new();
        if self.eat(b"\"") {
            out = self.quoted(b'"', "quoted name")?;
        } else {
            while let Some(&c) = self.s.get(self.at) {
                if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80) {
                    break;
                }
                out.push(c);
                self.at += 1;
            }
        }
        if out.is_empty() {
            return Err(TranslateError::Protocol("test_decoding: a name was expected".into()));
        }
        String::from_utf8(out).map_err(|_| TranslateError::Protocol("test_decoding: a name is not UTF-8".into()))
    }

    fn qualified(&mut self) -> Result<(String, String), TranslateError> {
        let schema = self.identifier()?;
        if !self.eat(b".") {
            return Err(TranslateError::Protocol("test_decoding: a table name without its schema".into()));
        }
        Ok((schema, self.identifier()?))
    }

    /// ` name[type]:value` repeated, up to the end or ` new-tuple:`.
    fn columns(&mut self) -> Result<Vec<(String, Printed)>, TranslateError> {
        let mut out = Vec::new();
        while self.rest().starts_with(b" ") && !self.rest().starts_with(b" new-tuple:") {
            self.at += 1;
            let name = self.identifier()?;
            if !self.eat(b"[") {
                return Err(TranslateError::Protocol(format!("test_decoding: no type after column {name:?}")));
            }
            let close = find_first(self.rest(), b"]:")
                .ok_or_else(|| TranslateError::Protocol(format!("test_decoding: no value for column {name:?}")))?;
            self.at += close + 2;
            out.push((name, self.value()?));
        }
        Ok(out)
    }

    fn value(&mut self) -> Result<Printed, TranslateError> {
        if self.eat(b"'") || self.eat(b"B'") {
            return Ok(Printed::Text(self.quoted(b'\'', "value")?));
        }
        let start = self.at;
        while self.at < self.s.len() && self.s[self.at] != b' ' {
            self.at += 1;
        }
        Ok(match &self.s[start..self.at] {
            b"null" => Printed::Null,
            b"unchanged-toast-datum" => Printed::Unchanged,
            token => Printed::Text(token.to_vec()),
        })
    }
}

fn find_first(s: &[u8], needle: &[u8]) -> Option<usize> {
    s.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_parse_with_quotes_arrays_and_markers() {
        let line = b" id[integer]:1 \"Odd \"\"name\"\"\"[text]:'it''s a [x]:y' a[integer[]]:'{1,2}' b[boolean]:true \
            n[numeric]:null t[text]:unchanged-toast-datum v[bit varying]:B'101' new-tuple: id[integer]:2";
        let mut p = Parser { s: line, at: 0 };
        let cols = p.columns().unwrap();
        assert_eq!(
            cols,
            vec![
                ("id".into(), Printed::Text(b"1".to_vec())),
                ("Odd \"name\"".into(), Printed::Text(b"it's a [x]:y".to_vec())),
                ("a".into(), Printed::Text(b"{1,2}".to_vec())),
                ("b".into(), Printed::Text(b"true".to_vec())),
                ("n".into(), Printed::Null),
                ("t".into(), Printed::Unchanged),
                ("v".into(), Printed::Text(b"101".to_vec())),
            ]
        );
        assert!(p.eat(b" new-tuple:"));
        assert_eq!(p.columns().unwrap(), vec![("id".into(), Printed::Text(b"2".to_vec()))]);
        let mut q = Parser { s: b"\"My Schema\".t, public.\"T2\": TRUNCATE: restart_seqs cascade", at: 0 };
        assert_eq!(q.qualified().unwrap(), ("My Schema".into(), "t".into()));
        assert!(q.eat(b", "));
        assert_eq!(q.qualified().unwrap(), ("public".into(), "T2".into()));
    }
}
