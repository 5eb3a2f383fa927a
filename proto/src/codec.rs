//! Records ⇄ bytes. See `proto/FORMAT.md` for the layout.
//!
//! A frame is `length (varint) · body · crc32 (4 bytes, little endian)`, the
//! CRC covering the length and the body. Frames are self-delimiting so they
//! can be concatenated in files and batches. Decoding never panics: every
//! malformed input is a [`DecodeError`] that names the byte offset.

use crate::record::*;
use crate::varint;
use crate::FORMAT_VERSION;

/// Largest body a frame may declare. PostgreSQL cannot produce a larger
/// output message (its buffers stop at 1 GB), so a larger length can only be
/// corruption, and refusing it keeps a reader from allocating garbage sizes.
pub const MAX_RECORD_LEN: usize = 0x3FFF_FFFF;

mod tag {
    pub const NULL: u8 = 0;
    pub const UNCHANGED_TOAST: u8 = 1;
    pub const TEXT: u8 = 2;
    pub const INT: u8 = 3;
    pub const FALSE: u8 = 4;
    pub const TRUE: u8 = 5;
    pub const BYTES: u8 = 6;
    pub const FLOAT4: u8 = 7;
    pub const FLOAT8: u8 = 8;
    pub const DATE: u8 = 9;
    pub const TIME: u8 = 10;
    pub const TIMESTAMP: u8 = 11;
    pub const TIMESTAMPTZ: u8 = 12;
    pub const UUID: u8 = 13;
    pub const PADDED_TEXT: u8 = 14;
    pub const NUMERIC: u8 = 15;

    pub const OLD_NONE: u8 = b'n';
    pub const OLD_KEY: u8 = b'k';
    pub const OLD_ROW: u8 = b'o';

    pub const TRUNCATE_CASCADE: u8 = 1;
    pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;
    pub const MESSAGE_TRANSACTIONAL: u8 = 1;
}

// ---------------------------------------------------------------- encoding

/// The body is written once, generically: through [`Counter`] to learn its
/// length, then through [`SliceWriter`] into memory of exactly that size.
/// One definition, no drift.
trait Sink {
    fn raw(&mut self, bytes: &[u8]);

    fn u8(&mut self, v: u8) {
        self.raw(&[v]);
    }
    fn varint(&mut self, v: u64) {
        let mut scratch = [0; 10];
        self.raw(varint::encode_u64(v, &mut scratch));
    }
    fn zigzag(&mut self, v: i64) {
        self.varint(varint::zigzag(v));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.raw(b);
    }
}

struct Counter(usize);

impl Sink for Counter {
    fn raw(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn varint(&mut self, v: u64) {
        self.0 += varint::len_u64(v);
    }
}

/// Writes into a buffer sized by [`Counter`] beforehand.
struct SliceWriter<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Sink for SliceWriter<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

fn put_body(rec: &Record<'_>, s: &mut impl Sink) {
    s.u8((FORMAT_VERSION << 4) | rec.kind() as u8);
    match rec {
        Record::Begin(b) => {
            s.varint(u64::from(b.xid));
            s.varint(b.final_lsn.0);
            s.zigzag(b.commit_time);
        }
        Record::Commit(c) => {
            s.varint(c.end_lsn.0);
            s.zigzag(c.commit_time);
        }
        Record::Relation(r) => {
            s.varint(u64::from(r.oid));
            s.u8(r.replica_identity.as_char());
            s.bytes(r.namespace);
            s.bytes(r.name);
            s.varint(r.columns.len() as u64);
            for c in &r.columns {
                s.u8(c.flags.0);
                s.bytes(c.name);
                s.varint(u64::from(c.type_oid));
                s.zigzag(i64::from(c.typmod));
                s.bytes(c.type_name);
            }
        }
        Record::Insert(i) => {
            s.varint(u64::from(i.relation));
            put_tuple(&i.new, s);
        }
        Record::Update(u) => {
            s.varint(u64::from(u.relation));
            put_old(u.old.as_ref(), s);
            put_tuple(&u.new, s);
        }
        Record::Delete(d) => {
            s.varint(u64::from(d.relation));
            put_old(d.old.as_ref(), s);
        }
        Record::Truncate(t) => {
            let mut flags = 0;
            if t.cascade {
                flags |= tag::TRUNCATE_CASCADE;
            }
            if t.restart_identity {
                flags |= tag::TRUNCATE_RESTART_IDENTITY;
            }
            s.u8(flags);
            s.varint(t.relations.len() as u64);
            for oid in &t.relations {
                s.varint(u64::from(*oid));
            }
        }
        Record::Message(m) => {
            s.u8(if m.transactional { tag::MESSAGE_TRANSACTIONAL } else { 0 });
            s.varint(m.lsn.0);
            s.bytes(m.prefix);
            s.bytes(m.content);
        }
    }
}

fn put_old(old: Option<&OldTuple<'_>>, s: &mut impl Sink) {
    match old {
        None => s.u8(tag::OLD_NONE),
        Some(OldTuple::Key(t)) => {
            s.u8(tag::OLD_KEY);
            put_tuple(t, s);
        }
        Some(OldTuple::Row(t)) => {
            s.u8(tag::OLD_ROW);
            put_tuple(t, s);
        }
    }
}

fn put_tuple(t: &Tuple<'_>, s: &mut impl Sink) {
    s.varint(t.0.len() as u64);
    for v in &t.0 {
        put_value(v, s);
    }
}

fn put_value(v: &Value<'_>, s: &mut impl Sink) {
    match *v {
        Value::Null => s.u8(tag::NULL),
        Value::UnchangedToast => s.u8(tag::UNCHANGED_TOAST),
        Value::Text(b) => {
            s.u8(tag::TEXT);
            s.bytes(b);
        }
        Value::PaddedText(b, pad) => {
            s.u8(tag::PADDED_TEXT);
            s.bytes(b);
            s.varint(u64::from(pad));
        }
        Value::Int(i) => {
            s.u8(tag::INT);
            s.zigzag(i);
        }
        Value::Bool(false) => s.u8(tag::FALSE),
        Value::Bool(true) => s.u8(tag::TRUE),
        Value::Bytes(b) => {
            s.u8(tag::BYTES);
            s.bytes(b);
        }
        Value::Float4(bits) => {
            s.u8(tag::FLOAT4);
            s.raw(&bits.to_le_bytes());
        }
        Value::Float8(bits) => {
            s.u8(tag::FLOAT8);
            s.raw(&bits.to_le_bytes());
        }
        Value::Date(d) => {
            s.u8(tag::DATE);
            s.zigzag(i64::from(d));
        }
        Value::Time(t) => {
            s.u8(tag::TIME);
            s.zigzag(t);
        }
        Value::Timestamp(t) => {
            s.u8(tag::TIMESTAMP);
            s.zigzag(t);
        }
        Value::TimestampTz(t) => {
            s.u8(tag::TIMESTAMPTZ);
            s.zigzag(t);
        }
        Value::Uuid(u) => {
            s.u8(tag::UUID);
            s.raw(&u);
        }
        Value::Numeric(packed) => {
            s.u8(tag::NUMERIC);
            s.bytes(packed);
        }
    }
}

fn body_len(rec: &Record<'_>) -> usize {
    let mut c = Counter(0);
    put_body(rec, &mut c);
    c.0
}

/// Size of the whole frame (length prefix, body and CRC) for `rec`.
pub fn encoded_len(rec: &Record<'_>) -> usize {
    let body = body_len(rec);
    varint::len_u64(body as u64) + body + 4
}

/// Writes the frame for `rec` into the front of `buf`, which must hold at
/// least [`encoded_len`] bytes, and returns the bytes written. The frame is
/// written in one pass and its CRC computed over it in one call, which is
/// what makes this fast for the many small records of a busy source.
pub fn encode_into(rec: &Record<'_>, buf: &mut [u8]) -> usize {
    let body = body_len(rec);
    let total = varint::len_u64(body as u64) + body + 4;
    let mut w = SliceWriter { buf: &mut buf[..total], at: 0 };
    w.varint(body as u64);
    put_body(rec, &mut w);
    let crc = crc32fast::hash(&w.buf[..total - 4]);
    w.buf[total - 4..].copy_from_slice(&crc.to_le_bytes());
    total
}

/// Appends the frame for `rec` to `out`.
pub fn encode(rec: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + encoded_len(rec), 0);
    encode_into(rec, &mut out[start..]);
}

// ---------------------------------------------------------------- decoding

/// A malformed or truncated input, with the offset (from the start of the
/// buffer given to the decoder) where the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at byte offset {offset}: {kind}")]
pub struct DecodeError {
    pub offset: usize,
    pub kind: DecodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("input ends inside a record (the record needs {needed} bytes, {available} are present)")]
    Truncated { needed: usize, available: usize },
    #[error("record length prefix is not a valid varint")]
    BadLength,
    #[error("record length {0} exceeds the maximum of {MAX_RECORD_LEN} bytes")]
    TooLong(u64),
    #[error("CRC mismatch: the record stores {stored:#010x}, its bytes give {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Reads the length prefix: `Ok(Some((body length, prefix length)))`, or
/// `Ok(None)` when `buf` ends inside the prefix.
fn length_prefix(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    match varint::decode_u64(buf) {
        Ok(None) => Ok(None),
        Err(()) => Err(DecodeError { offset: 0, kind: DecodeErrorKind::BadLength }),
        Ok(Some((len, _))) if len > MAX_RECORD_LEN as u64 => Err(DecodeError { offset: 0, kind: DecodeErrorKind::TooLong(len) }),
        Ok(Some((len, n))) => Ok(Some((len as usize, n))),
    }
}

/// Length of the frame at the start of `buf`, once enough of it is present
/// to tell: `Ok(None)` means "need more bytes".
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(length_prefix(buf)?.map(|(body, prefix)| prefix + body + 4))
}

/// The kind of the frame at the start of `buf` and its whole length, read
/// from the head byte without checking the CRC or decoding the body: for a
/// reader that only routes records (the agent), while whoever applies them
/// decodes and checks each in full.
pub fn peek_kind(buf: &[u8]) -> Result<(RecordKind, usize), DecodeError> {
    let Some((body, prefix)) = length_prefix(buf)? else {
        return Err(DecodeError { offset: 0, kind: DecodeErrorKind::Truncated { needed: buf.len() + 1, available: buf.len() } });
    };
    let total = prefix + body + 4;
    if buf.len() < total || body == 0 {
        return Err(DecodeError { offset: 0, kind: DecodeErrorKind::Truncated { needed: total.max(prefix + 5), available: buf.len() } });
    }
    let head = buf[prefix];
    if head >> 4 != FORMAT_VERSION {
        return Err(DecodeError { offset: prefix, kind: DecodeErrorKind::UnsupportedVersion(head >> 4) });
    }
    match RecordKind::from_u8(head & 0x0F) {
        Some(kind) => Ok((kind, total)),
        None => Err(DecodeError { offset: prefix, kind: DecodeErrorKind::UnknownKind(head & 0x0F) }),
    }
}

/// Decodes the frame at the start of `buf`, checking its CRC, and returns the
/// record and the number of bytes it occupied.
pub fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), DecodeError> {
    let Some((body, prefix)) = length_prefix(buf)? else {
        return Err(DecodeError { offset: 0, kind: DecodeErrorKind::Truncated { needed: buf.len() + 1, available: buf.len() } });
    };
    let total = prefix + body + 4;
    if buf.len() < total {
        return Err(DecodeError { offset: 0, kind: DecodeErrorKind::Truncated { needed: total, available: buf.len() } });
    }
    let (covered, crc_bytes) = buf[..total].split_at(total - 4);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(DecodeError { offset: total - 4, kind: DecodeErrorKind::CrcMismatch { stored, computed } });
    }
    let mut r = Reader { buf: covered, pos: prefix };
    let rec = r.record()?;
    if r.pos != covered.len() {
        return Err(r.err(DecodeErrorKind::Malformed("bytes left over after the record's last field")));
    }
    Ok((rec, total))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, kind: DecodeErrorKind) -> DecodeError {
        DecodeError { offset: self.pos, kind }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(DecodeErrorKind::Malformed(what))),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        match varint::decode_u64(&self.buf[self.pos..]) {
            Ok(Some((v, n))) => {
                self.pos += n;
                Ok(v)
            }
            _ => Err(self.err(DecodeErrorKind::Malformed(what))),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let at = self.pos;
        u32::try_from(self.varint(what)?).map_err(|_| DecodeError { offset: at, kind: DecodeErrorKind::Malformed(what) })
    }

    fn zigzag(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(varint::unzigzag(self.varint(what)?))
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let n = self.varint(what)?;
        let n = usize::try_from(n).map_err(|_| DecodeError { offset: at, kind: DecodeErrorKind::Malformed(what) })?;
        self.take(n, what)
    }

    /// A count of items that each take at least one byte: bounded by what is
    /// left, so a corrupt count cannot make us reserve a huge vector.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.varint(what)?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed(what) });
        }
        Ok(n as usize)
    }

    fn record(&mut self) -> Result<Record<'a>, DecodeError> {
        let head = self.u8("missing head byte")?;
        if head >> 4 != FORMAT_VERSION {
            self.pos -= 1;
            return Err(self.err(DecodeErrorKind::UnsupportedVersion(head >> 4)));
        }
        let Some(kind) = RecordKind::from_u8(head & 0x0F) else {
            self.pos -= 1;
            return Err(self.err(DecodeErrorKind::UnknownKind(head & 0x0F)));
        };
        Ok(match kind {
            RecordKind::Begin => Record::Begin(Begin {
                xid: self.u32("begin: xid")?,
                final_lsn: Lsn(self.varint("begin: final LSN")?),
                commit_time: self.zigzag("begin: commit time")?,
            }),
            RecordKind::Commit => {
                Record::Commit(Commit { end_lsn: Lsn(self.varint("commit: end LSN")?), commit_time: self.zigzag("commit: commit time")? })
            }
            RecordKind::Relation => {
                let oid = self.u32("relation: OID")?;
                let at = self.pos;
                let replica_identity = ReplicaIdentity::from_char(self.u8("relation: replica identity")?)
                    .ok_or(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("relation: unknown replica identity") })?;
                let namespace = self.bytes("relation: schema name")?;
                let name = self.bytes("relation: name")?;
                let n = self.count("relation: column count")?;
                let mut columns = Vec::with_capacity(n);
                for _ in 0..n {
                    let at = self.pos;
                    let flags = ColumnFlags(self.u8("column: flags")?);
                    if !flags.is_valid() {
                        return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("column: unknown flag bits") });
                    }
                    let name = self.bytes("column: name")?;
                    let type_oid = self.u32("column: type OID")?;
                    let at = self.pos;
                    let typmod = i32::try_from(self.zigzag("column: typmod")?)
                        .map_err(|_| DecodeError { offset: at, kind: DecodeErrorKind::Malformed("column: typmod out of range") })?;
                    let type_name = self.bytes("column: type name")?;
                    columns.push(Column { name, type_oid, typmod, type_name, flags });
                }
                Record::Relation(Relation { oid, namespace, name, replica_identity, columns })
            }
            RecordKind::Insert => Record::Insert(Insert { relation: self.u32("insert: relation OID")?, new: self.tuple()? }),
            RecordKind::Update => {
                let relation = self.u32("update: relation OID")?;
                let old = self.old()?;
                Record::Update(Update { relation, old, new: self.tuple()? })
            }
            RecordKind::Delete => Record::Delete(Delete { relation: self.u32("delete: relation OID")?, old: self.old()? }),
            RecordKind::Truncate => {
                let at = self.pos;
                let flags = self.u8("truncate: flags")?;
                if flags & !(tag::TRUNCATE_CASCADE | tag::TRUNCATE_RESTART_IDENTITY) != 0 {
                    return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("truncate: unknown flag bits") });
                }
                let n = self.count("truncate: relation count")?;
                let mut relations = Vec::with_capacity(n);
                for _ in 0..n {
                    relations.push(self.u32("truncate: relation OID")?);
                }
                Record::Truncate(Truncate {
                    relations,
                    cascade: flags & tag::TRUNCATE_CASCADE != 0,
                    restart_identity: flags & tag::TRUNCATE_RESTART_IDENTITY != 0,
                })
            }
            RecordKind::Message => {
                let at = self.pos;
                let flags = self.u8("message: flags")?;
                if flags & !tag::MESSAGE_TRANSACTIONAL != 0 {
                    return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("message: unknown flag bits") });
                }
                Record::Message(Message {
                    transactional: flags & tag::MESSAGE_TRANSACTIONAL != 0,
                    lsn: Lsn(self.varint("message: LSN")?),
                    prefix: self.bytes("message: prefix")?,
                    content: self.bytes("message: content")?,
                })
            }
        })
    }

    fn old(&mut self) -> Result<Option<OldTuple<'a>>, DecodeError> {
        let at = self.pos;
        match self.u8("old tuple kind")? {
            tag::OLD_NONE => Ok(None),
            tag::OLD_KEY => Ok(Some(OldTuple::Key(self.tuple()?))),
            tag::OLD_ROW => Ok(Some(OldTuple::Row(self.tuple()?))),
            _ => Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("unknown old tuple kind") }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let n = self.count("tuple: column count")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(self.value()?);
        }
        Ok(Tuple(values))
    }

    fn value(&mut self) -> Result<Value<'a>, DecodeError> {
        let at = self.pos;
        Ok(match self.u8("value tag")? {
            tag::NULL => Value::Null,
            tag::UNCHANGED_TOAST => Value::UnchangedToast,
            tag::TEXT => Value::Text(self.bytes("text value")?),
            tag::PADDED_TEXT => {
                let text = self.bytes("padded text value")?;
                Value::PaddedText(text, self.u32("padded text: pad count")?)
            }
            tag::INT => Value::Int(self.zigzag("integer value")?),
            tag::FALSE => Value::Bool(false),
            tag::TRUE => Value::Bool(true),
            tag::BYTES => Value::Bytes(self.bytes("bytea value")?),
            tag::FLOAT4 => {
                let b = self.take(4, "float4 value")?;
                Value::Float4(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            tag::FLOAT8 => {
                let b = self.take(8, "float8 value")?;
                Value::Float8(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            }
            tag::DATE => {
                let at = self.pos;
                let d = i32::try_from(self.zigzag("date value")?)
                    .map_err(|_| DecodeError { offset: at, kind: DecodeErrorKind::Malformed("date value out of range") })?;
                Value::Date(d)
            }
            tag::TIME => Value::Time(self.zigzag("time value")?),
            tag::TIMESTAMP => Value::Timestamp(self.zigzag("timestamp value")?),
            tag::TIMESTAMPTZ => Value::TimestampTz(self.zigzag("timestamptz value")?),
            tag::UUID => {
                let b = self.take(16, "uuid value")?;
                let mut u = [0; 16];
                u.copy_from_slice(b);
                Value::Uuid(u)
            }
            tag::NUMERIC => {
                let at = self.pos;
                let packed = self.bytes("numeric value")?;
                if !crate::pgtext::is_valid_packed_numeric(packed) {
                    return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("numeric value: bad packed digits") });
                }
                Value::Numeric(packed)
            }
            _ => return Err(DecodeError { offset: at, kind: DecodeErrorKind::Malformed("unknown value tag") }),
        })
    }
}

#[cfg(test)]
mod tests;
