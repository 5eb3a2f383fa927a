//! PostgreSQL's text form of a [`Value`], for display and for feeding values
//! to a destination as text. Compact values are rendered exactly as the
//! server renders them with `DateStyle = ISO`, `TimeZone = UTC`,
//! `extra_float_digits >= 1` and `bytea_output = hex`; `Text` values are the
//! source's own output (produced under the decoding session's settings, which
//! is why decant's consumers set those same four on their connections).

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::{BufMut, BytesMut};

use crate::record::Value;

impl Value<'_> {
    /// The value's text form, or `None` for NULL and unchanged-TOAST.
    pub fn to_pg_text(&self) -> Option<Cow<'_, [u8]>> {
        match *self {
            Value::Text(b) => Some(Cow::Borrowed(b)),
            _ => {
                let mut out = BytesMut::new();
                self.write_pg_text(&mut out).then(|| Cow::Owned(out.to_vec()))
            }
        }
    }

    /// Appends the value's text form to `out`, without allocating for the
    /// common kinds; false (nothing appended) for NULL and unchanged-TOAST.
    pub fn write_pg_text(&self, out: &mut BytesMut) -> bool {
        match *self {
            Value::Null | Value::UnchangedToast => return false,
            Value::Text(b) => out.extend_from_slice(b),
            Value::PaddedText(b, pad) => {
                out.extend_from_slice(b);
                out.put_bytes(b' ', pad as usize);
            }
            Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
            Value::Bool(b) => out.extend_from_slice(if b { b"t" } else { b"f" }),
            Value::Bytes(b) => {
                out.reserve(2 + 2 * b.len());
                out.extend_from_slice(b"\\x");
                for &byte in b {
                    out.extend_from_slice(&hex(byte));
                }
            }
            Value::Float4(bits) => out.extend_from_slice(float4_text(f32::from_bits(bits)).as_bytes()),
            Value::Float8(bits) => out.extend_from_slice(float8_text(f64::from_bits(bits)).as_bytes()),
            Value::Date(d) => write_date(out, d),
            Value::Time(t) => write_time(out, t),
            Value::Timestamp(t) => write_timestamp(out, t, ""),
            Value::TimestampTz(t) => write_timestamp(out, t, "+00"),
            Value::Uuid(u) => {
                for (i, &byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        out.extend_from_slice(b"-");
                    }
                    out.extend_from_slice(&hex(byte));
                }
            }
            Value::Numeric(packed) => out.extend(numeric_chars(packed)),
        }
        true
    }
}

/// Two lowercase hex digits.
fn hex(byte: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(byte >> 4)], DIGITS[usize::from(byte & 0xF)]]
}

// ---------------------------------------------------------------- numeric

const NUMERIC_POINT: u8 = 0xA;
const NUMERIC_MINUS: u8 = 0xB;
const NUMERIC_PAD: u8 = 0xF;

/// Bytes that [`pack_numeric`] needs for a text of `text_len` characters.
pub fn packed_numeric_len(text_len: usize) -> usize {
    text_len.div_ceil(2)
}

fn is_numeric_text(text: &[u8]) -> bool {
    let body = text.strip_prefix(b"-").unwrap_or(text);
    let (int, frac) = match body.iter().position(|&c| c == b'.') {
        Some(p) => (&body[..p], Some(&body[p + 1..])),
        None => (body, None),
    };
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    digits(int) && frac.is_none_or(digits)
}

/// Packs numeric's text output (`-?[0-9]+(\.[0-9]+)?`) two characters a
/// byte into `out` and returns the bytes used; `None` for any other text
/// (NaN, Infinity), which then travels as text.
pub fn pack_numeric(text: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = packed_numeric_len(text.len());
    if !is_numeric_text(text) || out.len() < n {
        return None;
    }
    let nibble = |c: u8| match c {
        b'.' => NUMERIC_POINT,
        b'-' => NUMERIC_MINUS,
        d => d - b'0',
    };
    for (i, pair) in text.chunks(2).enumerate() {
        let hi = nibble(pair[0]);
        let lo = pair.get(1).map_or(NUMERIC_PAD, |&c| nibble(c));
        out[i] = (hi << 4) | lo;
    }
    Some(n)
}

fn numeric_chars(packed: &[u8]) -> impl Iterator<Item = u8> + '_ {
    packed.iter().flat_map(|b| [b >> 4, b & 0xF]).enumerate().filter_map(move |(i, n)| {
        let last = i == packed.len() * 2 - 1;
        match n {
            0..=9 => Some(b'0' + n),
            NUMERIC_POINT => Some(b'.'),
            NUMERIC_MINUS => Some(b'-'),
            NUMERIC_PAD if last => None,
            _ => Some(b'?'),
        }
    })
}

/// True when `packed` unpacks to a well-formed numeric text.
pub fn is_valid_packed_numeric(packed: &[u8]) -> bool {
    let text: Vec<u8> = numeric_chars(packed).collect();
    is_numeric_text(&text)
}

/// The numeric text that [`pack_numeric`] packed.
pub fn unpack_numeric(packed: &[u8]) -> String {
    numeric_chars(packed).map(char::from).collect()
}

// ---------------------------------------------------------------- floats

/// float8 as PostgreSQL 12+ prints it: the shortest exact digits, in fixed
/// notation when the decimal exponent is in -4 ..= 14, else `1.5e+20`.
pub fn float8_text(v: f64) -> String {
    float_text(v.is_nan(), v.is_infinite(), v == 0.0, v.is_sign_negative(), &format!("{v:e}"), 15)
}

/// float4 likewise, fixed notation for exponents in -4 ..= 5.
pub fn float4_text(v: f32) -> String {
    float_text(v.is_nan(), v.is_infinite(), v == 0.0, v.is_sign_negative(), &format!("{v:e}"), 6)
}

fn float_text(nan: bool, inf: bool, zero: bool, negative: bool, sci: &str, fixed_below: i32) -> String {
    let sign = if negative { "-" } else { "" };
    if nan {
        return "NaN".into();
    }
    if inf {
        return format!("{sign}Infinity");
    }
    if zero {
        return format!("{sign}0");
    }
    // `sci` is Rust's shortest round-trip form: `-1.2345e-5`.
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::from(sign);
    if exp < -4 || exp >= fixed_below {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp >= 0 {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', int_len - digits.len()));
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
        out.push_str(&digits);
    }
    out
}

// ---------------------------------------------------------------- date/time

const USECS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_DAYS_FROM_UNIX: i64 = 10_957;

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01;
/// year 0 is 1 BC.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends `v` in decimal, zero-padded to `width` digits.
fn put_padded(out: &mut BytesMut, v: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(v);
    out.put_bytes(b'0', width.saturating_sub(digits.len()));
    out.extend_from_slice(digits.as_bytes());
}

/// Appends `YYYY-MM-DD`; returns whether the date is BC.
fn write_ymd(out: &mut BytesMut, pg_days: i64) -> bool {
    let (y, m, d) = civil_from_days(pg_days + PG_EPOCH_DAYS_FROM_UNIX);
    let (year, bc) = if y <= 0 { (1 - y, true) } else { (y, false) };
    put_padded(out, year as u64, 4);
    out.extend_from_slice(b"-");
    put_padded(out, u64::from(m), 2);
    out.extend_from_slice(b"-");
    put_padded(out, u64::from(d), 2);
    bc
}

fn write_date(out: &mut BytesMut, days: i32) {
    match days {
        i32::MIN => out.extend_from_slice(b"-infinity"),
        i32::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            if write_ymd(out, i64::from(days)) {
                out.extend_from_slice(b" BC");
            }
        }
    }
}

/// `HH:MM:SS` and the fraction without trailing zeros.
fn write_time(out: &mut BytesMut, usecs: i64) {
    let secs = usecs.div_euclid(1_000_000) as u64;
    let mut frac = usecs.rem_euclid(1_000_000) as u64;
    put_padded(out, secs / 3600, 2);
    out.extend_from_slice(b":");
    put_padded(out, secs / 60 % 60, 2);
    out.extend_from_slice(b":");
    put_padded(out, secs % 60, 2);
    if frac != 0 {
        let mut width = 6;
        while frac.is_multiple_of(10) {
            frac /= 10;
            width -= 1;
        }
        out.extend_from_slice(b".");
        put_padded(out, frac, width);
    }
}

fn write_timestamp(out: &mut BytesMut, usecs: i64, zone: &str) {
    match usecs {
        i64::MIN => out.extend_from_slice(b"-infinity"),
        i64::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            let bc = write_ymd(out, usecs.div_euclid(USECS_PER_DAY));
            out.extend_from_slice(b" ");
            write_time(out, usecs.rem_euclid(USECS_PER_DAY));
            out.extend_from_slice(zone.as_bytes());
            if bc {
                out.extend_from_slice(b" BC");
            }
        }
    }
}

/// What a writer above appends, as a String (they write ASCII only).
fn written(write: impl FnOnce(&mut BytesMut)) -> String {
    let mut out = BytesMut::new();
    write(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn date_text(days: i32) -> String {
    written(|out| write_date(out, days))
}

pub fn time_text(usecs: i64) -> String {
    written(|out| write_time(out, usecs))
}

/// A timestamp (microseconds since 2000-01-01 UTC) as text, for logs.
pub fn timestamptz_text(usecs: i64) -> String {
    written(|out| write_timestamp(out, usecs, "+00"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: Value<'_>) -> String {
        String::from_utf8(v.to_pg_text().unwrap().into_owned()).unwrap()
    }

    #[test]
    fn floats_print_like_postgres() {
        let cases: &[(f64, &str)] = &[
            (1.0, "1"),
            (-0.0, "-0"),
            (0.1, "0.1"),
            (1e15, "1e+15"),
            (123456789012345.0, "123456789012345"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e300, "1.5e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (-3.25, "-3.25"),
            (1e-310, "1e-310"),
        ];
        for (v, want) in cases {
            assert_eq!(float8_text(*v), *want, "{v:e}");
        }
        assert_eq!(float4_text(1e6), "1e+06");
        assert_eq!(float4_text(100000.0), "100000");
        assert_eq!(float4_text(1.1), "1.1");
    }

    #[test]
    fn dates_and_times_print_like_postgres() {
        assert_eq!(date_text(0), "2000-01-01");
        assert_eq!(date_text(-1), "1999-12-31");
        assert_eq!(date_text(i32::MAX), "infinity");
        // 0001-01-01 is 730,119 days before 2000-01-01; 1 BC was a leap year.
        assert_eq!(date_text(-730_119), "0001-01-01");
        assert_eq!(date_text(-730_119 - 366), "0001-01-01 BC");
        assert_eq!(time_text(0), "00:00:00");
        assert_eq!(time_text(86_400_000_000), "24:00:00");
        assert_eq!(time_text(3_723_450_000), "01:02:03.45");
        assert_eq!(text(Value::Timestamp(-1)), "1999-12-31 23:59:59.999999");
        assert_eq!(text(Value::TimestampTz(0)), "2000-01-01 00:00:00+00");
        assert_eq!(text(Value::Timestamp(i64::MIN)), "-infinity");
    }

    #[test]
    fn numeric_packs_and_unpacks() {
        for t in ["0", "-1", "123.456", "-0.000001", "99999999999999999999.5"] {
            let mut buf = vec![0; packed_numeric_len(t.len())];
            let n = pack_numeric(t.as_bytes(), &mut buf).unwrap();
            assert!(is_valid_packed_numeric(&buf[..n]));
            assert_eq!(unpack_numeric(&buf[..n]), t);
        }
        for t in ["NaN", "Infinity", "-Infinity", "", "1.", ".5", "1e5", "--1"] {
            let mut buf = vec![0; 8];
            assert_eq!(pack_numeric(t.as_bytes(), &mut buf), None, "{t}");
        }
        assert!(!is_valid_packed_numeric(&[0xCC]));
        assert!(!is_valid_packed_numeric(&[0xF1]));
    }

    #[test]
    fn other_values() {
        assert_eq!(text(Value::Bytes(&[0, 0xAB])), "\\x00ab");
        assert_eq!(text(Value::PaddedText(b"ab", 3)), "ab   ");
        assert_eq!(
            text(Value::Uuid([0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a, 0x11])),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        assert_eq!(Value::Null.to_pg_text(), None);
        assert_eq!(Value::UnchangedToast.to_pg_text(), None);
    }
}
