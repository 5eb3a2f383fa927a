//! The way back from [`crate::pgtext`]: a column's text form, as a server
//! prints it under decant's session settings (`DateStyle = ISO`,
//! `TimeZone = UTC`, `extra_float_digits = 3`, `bytea_output = hex`), turned
//! into the [`Value`] the decant plugin sends for that type. Decoders that
//! give text only (pgoutput, test_decoding) then produce the plugin's exact
//! records. A text this module does not recognise stays [`Value::Text`],
//! which every consumer handles: the value is right, only less compact.

use crate::pgtext::{pack_numeric, packed_numeric_len};
use crate::record::Value;

/// Type OIDs with a compact form (fixed since PostgreSQL 7).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// A value parsed from text: either a [`Value`] borrowing the text, or one
/// whose bytes had to be built (bytea, numeric).
#[derive(Clone, Debug, PartialEq)]
pub enum TextValue<'a> {
    Value(Value<'a>),
    Bytes(Vec<u8>),
    Numeric(Vec<u8>),
}

impl TextValue<'_> {
    pub fn as_value(&self) -> Value<'_> {
        match self {
            TextValue::Value(v) => *v,
            TextValue::Bytes(b) => Value::Bytes(b),
            TextValue::Numeric(n) => Value::Numeric(n),
        }
    }
}

/// The plugin's value for a non-NULL column of type `type_oid` whose text
/// form is `text`.
pub fn from_pg_text(type_oid: u32, text: &[u8]) -> TextValue<'_> {
    let parsed = match type_oid {
        oid::BOOL => match text {
            b"t" | b"true" => Some(Value::Bool(true)),
            b"f" | b"false" => Some(Value::Bool(false)),
            _ => None,
        },
        oid::INT2 | oid::INT4 | oid::INT8 => ascii(text).and_then(|s| s.parse().ok()).map(Value::Int),
        oid::FLOAT4 => float(text).map(|v| Value::Float4((v as f32).to_bits())).filter(|_| float4_exact(text)),
        oid::FLOAT8 => float(text).map(|v| Value::Float8(v.to_bits())),
        oid::DATE => date(text).map(Value::Date),
        oid::TIME => time(text).map(Value::Time),
        oid::TIMESTAMP => timestamp(text, false).map(Value::Timestamp),
        oid::TIMESTAMPTZ => timestamp(text, true).map(Value::TimestampTz),
        oid::UUID => uuid(text).map(Value::Uuid),
        oid::TEXT | oid::VARCHAR | oid::JSON => Some(Value::Text(text)),
        oid::BPCHAR => {
            let kept = text.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
            Some(match u32::try_from(text.len() - kept) {
                Ok(pad) => Value::PaddedText(&text[..kept], pad),
                Err(_) => Value::Text(text),
            })
        }
        oid::BYTEA => {
            if let Some(bytes) = bytea(text) {
                return TextValue::Bytes(bytes);
            }
            None
        }
        oid::NUMERIC => {
            let mut packed = vec![0; packed_numeric_len(text.len())];
            if let Some(n) = pack_numeric(text, &mut packed) {
                packed.truncate(n);
                return TextValue::Numeric(packed);
            }
            None
        }
        _ => None,
    };
    TextValue::Value(parsed.unwrap_or(Value::Text(text)))
}

fn ascii(text: &[u8]) -> Option<&str> {
    std::str::from_utf8(text).ok().filter(|s| s.is_ascii())
}

fn float(text: &[u8]) -> Option<f64> {
    match text {
        b"NaN" => Some(f64::NAN),
        b"Infinity" => Some(f64::INFINITY),
        b"-Infinity" => Some(f64::NEG_INFINITY),
        _ => ascii(text).filter(|s| s.bytes().all(|b| b.is_ascii_digit() || b"+-.e".contains(&b))).and_then(|s| s.parse().ok()),
    }
}

/// float4 parsed through f64 could round twice; parse it as f32 instead and
/// check both agree (they do for every text a server prints, which has at
/// most 9 significant digits).
fn float4_exact(text: &[u8]) -> bool {
    match (float(text), ascii(text).and_then(|s| s.parse::<f32>().ok())) {
        (Some(wide), Some(narrow)) => (wide as f32).to_bits() == narrow.to_bits(),
        (Some(wide), None) => wide.is_nan() || wide.is_infinite(),
        _ => false,
    }
}

/// Unsigned decimal digits, all of them.
fn digits(text: &[u8]) -> Option<i64> {
    if text.is_empty() || text.len() > 18 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0, |n, &d| n * 10 + i64::from(d - b'0')))
}

/// Days from 1970-01-01 of a proleptic Gregorian date (year 0 is 1 BC).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS_FROM_UNIX: i64 = 10_957;
const USECS_PER_DAY: i64 = 86_400_000_000;

/// `YYYY-MM-DD` (four or more year digits) → days since 2000-01-01, for an
/// AD date or, with `bc`, a BC one.
fn ymd(text: &[u8], bc: bool) -> Option<i64> {
    let mut parts = text.rsplitn(3, |&b| b == b'-');
    let (day, month, year) = (digits(parts.next()?)?, digits(parts.next()?)?, digits(parts.next()?)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1 {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day) - PG_EPOCH_DAYS_FROM_UNIX)
}

fn strip_bc(text: &[u8]) -> (&[u8], bool) {
    match text.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

fn date(text: &[u8]) -> Option<i32> {
    match text {
        b"infinity" => Some(i32::MAX),
        b"-infinity" => Some(i32::MIN),
        _ => {
            let (text, bc) = strip_bc(text);
            i32::try_from(ymd(text, bc)?).ok()
        }
    }
}

/// `HH:MM:SS[.ffffff]` → microseconds since midnight.
fn time(text: &[u8]) -> Option<i64> {
    let (whole, frac) = match text.iter().position(|&b| b == b'.') {
        Some(p) => (&text[..p], Some(&text[p + 1..])),
        None => (text, None),
    };
    let mut hms = whole.split(|&b| b == b':');
    let (h, m, s) = (digits(hms.next()?)?, digits(hms.next()?)?, digits(hms.next()?)?);
    if hms.next().is_some() || m > 59 || s > 60 {
        return None;
    }
    let micros = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 6 => digits(f)? * 10_i64.pow(6 - f.len() as u32),
        Some(_) => return None,
    };
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+00][ BC]` → microseconds since
/// 2000-01-01 00:00:00 (UTC when `zoned`, whose text must say `+00`).
fn timestamp(text: &[u8], zoned: bool) -> Option<i64> {
    match text {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let text = if zoned { text.strip_suffix(b"+00")? } else { text };
    let space = text.iter().position(|&b| b == b' ')?;
    let days = ymd(&text[..space], bc)?;
    let usecs = time(&text[space + 1..])?;
    days.checked_mul(USECS_PER_DAY)?.checked_add(usecs)
}

fn uuid(text: &[u8]) -> Option<[u8; 16]> {
    if text.len() != 36 || [8, 13, 18, 23].iter().any(|&i| text[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = text.iter().copied().filter(|&b| b != b'-').collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `\x` + hex → the bytes.
fn bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2).map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compact value survives text and back.
    fn round_trip(type_oid: u32, v: Value<'_>) {
        let text = v.to_pg_text().unwrap().into_owned();
        let back = from_pg_text(type_oid, &text);
        assert_eq!(back.as_value(), v, "{}", String::from_utf8_lossy(&text));
    }

    #[test]
    fn compact_values_come_back_from_their_text() {
        for i in [0, 1, -1, i64::from(i16::MAX), i64::MIN, i64::MAX] {
            round_trip(oid::INT8, Value::Int(i));
        }
        round_trip(oid::BOOL, Value::Bool(true));
        round_trip(oid::BOOL, Value::Bool(false));
        for f in [0.0, -0.0, 1.5, 0.1, 1e-310, 1.7976931348623157e308, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 123456789012345.6] {
            round_trip(oid::FLOAT8, Value::Float8(f.to_bits()));
        }
        for f in [0.0f32, -0.0, 1.1, 3.4028235e38, 1e-45, 100000.0, 1e6, f32::NAN] {
            round_trip(oid::FLOAT4, Value::Float4(f.to_bits()));
        }
        for d in [0, 1, -1, 9_000, -730_120, -2_451_545 + 1, 2_147_483_494 - 2_451_545, i32::MIN, i32::MAX, -800_000] {
            round_trip(oid::DATE, Value::Date(d));
        }
        for t in [0, 1, 999_999, 86_400_000_000, 45_296_500_000] {
            round_trip(oid::TIME, Value::Time(t));
        }
        for ts in [0, -1, 1, 777_123_456_789, -63_000_000_000_000_000, 9_000_000_000_000_000, i64::MIN, i64::MAX] {
            round_trip(oid::TIMESTAMP, Value::Timestamp(ts));
            round_trip(oid::TIMESTAMPTZ, Value::TimestampTz(ts));
        }
        round_trip(oid::UUID, Value::Uuid(*b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x23\x45\x67\x89\xab\xcd\xef"));
        round_trip(oid::BPCHAR, Value::PaddedText(b"ab", 3));
        round_trip(oid::BPCHAR, Value::PaddedText(b"", 2));
        round_trip(oid::TEXT, Value::Text(b"  x "));
        round_trip(oid::BYTEA, Value::Bytes(b"\x00\xffab"));
        round_trip(oid::BYTEA, Value::Bytes(b""));
        let mut packed = [0u8; 8];
        let n = pack_numeric(b"-12.0500", &mut packed).unwrap();
        round_trip(oid::NUMERIC, Value::Numeric(&packed[..n]));
    }

    #[test]
    fn server_texts_parse_to_the_plugins_values() {
        let v = |t: u32, s: &'static str| match from_pg_text(t, s.as_bytes()) {
            TextValue::Value(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(v(oid::DATE, "2000-01-01"), Value::Date(0));
        assert_eq!(v(oid::DATE, "0001-12-31 BC"), Value::Date(-730_120));
        assert_eq!(v(oid::TIMESTAMPTZ, "2000-01-02 00:00:01.5+00"), Value::TimestampTz(86_401_500_000));
        assert_eq!(v(oid::TIME, "24:00:00"), Value::Time(86_400_000_000));
        assert_eq!(v(oid::FLOAT4, "1.1"), Value::Float4(1.1f32.to_bits()));
        assert_eq!(v(oid::BOOL, "true"), Value::Bool(true));
        assert_eq!(v(oid::NUMERIC, "NaN"), Value::Text(b"NaN"));
        // Not what a UTC session prints: kept as text, still right.
        assert_eq!(v(oid::TIMESTAMPTZ, "2000-01-01 01:00:00+01"), Value::Text(b"2000-01-01 01:00:00+01"));
        assert_eq!(v(oid::INT4, "12a"), Value::Text(b"12a"));
        assert_eq!(v(oid::UUID, "not-a-uuid"), Value::Text(b"not-a-uuid"));
    }
}
