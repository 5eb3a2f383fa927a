//! The events a record describes. Byte strings borrow from the buffer they
//! were decoded from (or, in the decoder, from PostgreSQL's memory), so
//! decoding copies nothing but the small fixed-size fields.
//!
//! Names and text are byte strings in the source's server encoding; they are
//! not required to be UTF-8.

use std::fmt;

/// A WAL position, printed the way PostgreSQL prints `pg_lsn` (`16/B374D848`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid LSN {s:?}: expected the form 16/B374D848");
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// One logical decoding event.
#[derive(Clone, Debug, PartialEq)]
pub enum Record<'a> {
    Begin(Begin),
    Commit(Commit),
    Relation(Relation<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(Message<'a>),
}

impl Record<'_> {
    /// The record's kind, as stored in the low nibble of its head byte.
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Begin(_) => RecordKind::Begin,
            Record::Commit(_) => RecordKind::Commit,
            Record::Relation(_) => RecordKind::Relation,
            Record::Insert(_) => RecordKind::Insert,
            Record::Update(_) => RecordKind::Update,
            Record::Delete(_) => RecordKind::Delete,
            Record::Truncate(_) => RecordKind::Truncate,
            Record::Message(_) => RecordKind::Message,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    Begin = 1,
    Commit = 2,
    Relation = 3,
    Insert = 4,
    Update = 5,
    Delete = 6,
    Truncate = 7,
    Message = 8,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecordKind::Begin,
            2 => RecordKind::Commit,
            3 => RecordKind::Relation,
            4 => RecordKind::Insert,
            5 => RecordKind::Update,
            6 => RecordKind::Delete,
            7 => RecordKind::Truncate,
            8 => RecordKind::Message,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Begin => "BEGIN",
            RecordKind::Commit => "COMMIT",
            RecordKind::Relation => "RELATION",
            RecordKind::Insert => "INSERT",
            RecordKind::Update => "UPDATE",
            RecordKind::Delete => "DELETE",
            RecordKind::Truncate => "TRUNCATE",
            RecordKind::Message => "MESSAGE",
        }
    }
}

/// Start of a committed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    pub xid: u32,
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's epoch).
    pub commit_time: i64,
}

/// End of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// LSN just past the commit record: where a consumer resumes after it.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// How a relation identifies its rows in UPDATE and DELETE
/// (`pg_class.relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Full,
    Index,
    Nothing,
}

impl ReplicaIdentity {
    pub fn as_char(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
            ReplicaIdentity::Nothing => b'n',
        }
    }

    pub fn from_char(c: u8) -> Option<Self> {
        Some(match c {
            b'd' => ReplicaIdentity::Default,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            b'n' => ReplicaIdentity::Nothing,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
            ReplicaIdentity::Nothing => "nothing",
        }
    }
}

/// A relation's shape. Sent before the first change of the relation in a
/// decoding session and again whenever the relation changed; changes refer to
/// it by OID. Dropped and generated columns are not listed, and tuples carry
/// values for exactly the listed columns, in this order.
#[derive(Clone, Debug, PartialEq)]
pub struct Relation<'a> {
    pub oid: u32,
    pub namespace: &'a [u8],
    pub name: &'a [u8],
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column<'a>>,
}

impl Relation<'_> {
    /// Indexes (into `columns`) of the replica identity key, in column order:
    /// the columns an old-key tuple carries.
    pub fn identity_key(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns.iter().enumerate().filter(|(_, c)| c.flags.identity_key()).map(|(i, _)| i)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Column<'a> {
    pub name: &'a [u8],
    pub type_oid: u32,
    /// `pg_attribute.atttypmod` (-1 when the type has none).
    pub typmod: i32,
    /// The type as `format_type(type_oid, typmod)` gives it.
    pub type_name: &'a [u8],
    pub flags: ColumnFlags,
}

/// Bit set of column properties.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColumnFlags(pub u8);

impl ColumnFlags {
    /// Part of the replica identity index (the primary key under
    /// REPLICA IDENTITY DEFAULT, the chosen index under USING INDEX).
    pub const IDENTITY_KEY: u8 = 1;
    /// Part of the primary key (whatever the replica identity).
    pub const PRIMARY_KEY: u8 = 2;
    /// Declared NOT NULL.
    pub const NOT_NULL: u8 = 4;
    const KNOWN: u8 = Self::IDENTITY_KEY | Self::PRIMARY_KEY | Self::NOT_NULL;

    pub fn identity_key(self) -> bool {
        self.0 & Self::IDENTITY_KEY != 0
    }
    pub fn primary_key(self) -> bool {
        self.0 & Self::PRIMARY_KEY != 0
    }
    pub fn not_null(self) -> bool {
        self.0 & Self::NOT_NULL != 0
    }
    pub(crate) fn is_valid(self) -> bool {
        self.0 & !Self::KNOWN == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Insert<'a> {
    pub relation: u32,
    pub new: Tuple<'a>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Update<'a> {
    pub relation: u32,
    /// Present when the replica identity is FULL (the whole old row) or when
    /// the update changed the identity key (the old key).
    pub old: Option<OldTuple<'a>>,
    pub new: Tuple<'a>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Delete<'a> {
    pub relation: u32,
    /// Absent only under REPLICA IDENTITY NOTHING.
    pub old: Option<OldTuple<'a>>,
}

/// The before-image of a row, as much of it as the replica identity logs.
#[derive(Clone, Debug, PartialEq)]
pub enum OldTuple<'a> {
    /// The identity key columns only, in column order.
    Key(Tuple<'a>),
    /// Every column (REPLICA IDENTITY FULL).
    Row(Tuple<'a>),
}

impl<'a> OldTuple<'a> {
    pub fn tuple(&self) -> &Tuple<'a> {
        match self {
            OldTuple::Key(t) | OldTuple::Row(t) => t,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tuple<'a>(pub Vec<Value<'a>>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub relations: Vec<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
}

/// A message from `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: &'a [u8],
    pub content: &'a [u8],
}

/// One column value. Every value is exactly one of: NULL, an unchanged
/// out-of-line (TOASTed) value that the change does not carry, or the value.
/// Compact forms are used for common built-in types; every other value is the
/// text its type's output function gives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    /// The column is stored out of line and the update did not change it.
    UnchangedToast,
    /// The type's text output (also the exact bytes of text, varchar, json).
    Text(&'a [u8]),
    /// bpchar: the text without its trailing spaces, and how many there were.
    PaddedText(&'a [u8], u32),
    /// int2, int4, int8.
    Int(i64),
    Bool(bool),
    /// bytea, raw.
    Bytes(&'a [u8]),
    /// float4 bit pattern (NaN payloads and -0 preserved).
    Float4(u32),
    /// float8 bit pattern.
    Float8(u64),
    /// Days since 2000-01-01; i32::MIN / i32::MAX are -infinity / infinity.
    Date(i32),
    /// Microseconds since midnight (0 ..= 24:00:00).
    Time(i64),
    /// Microseconds since 2000-01-01 00:00:00; i64::MIN / i64::MAX are
    /// -infinity / infinity.
    Timestamp(i64),
    /// As `Timestamp`, in UTC.
    TimestampTz(i64),
    Uuid([u8; 16]),
    /// numeric's text output (`-?[0-9]+(\.[0-9]+)?`) packed two characters a
    /// byte; NaN and infinities travel as `Text`.
    Numeric(&'a [u8]),
}

impl Value<'_> {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}
