//! LEB128 varints (7 bits a byte, least significant group first) and zigzag
//! mapping for signed values, as protobuf uses them.

pub(crate) fn len_u64(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` to `out`, returning the bytes written into `scratch`.
pub(crate) fn encode_u64(mut v: u64, scratch: &mut [u8; 10]) -> &[u8] {
    let mut i = 0;
    while v >= 0x80 {
        scratch[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    scratch[i] = v as u8;
    &scratch[..=i]
}

/// Reads a varint from the front of `buf`: `Ok(Some((value, length)))`,
/// `Ok(None)` when `buf` ends inside the varint, `Err(())` when it is longer
/// than ten bytes or overflows 64 bits.
pub(crate) fn decode_u64(buf: &[u8]) -> Result<Option<(u64, usize)>, ()> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i == 9 && b > 1 {
            return Err(());
        }
        v |= u64::from(b & 0x7F) << (7 * i);
        if b < 0x80 {
            return Ok(Some((v, i + 1)));
        }
    }
    if buf.len() >= 10 {
        Err(())
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_edges() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut s = [0; 10];
            let bytes = encode_u64(v, &mut s).to_vec();
            assert_eq!(bytes.len(), len_u64(v));
            assert_eq!(decode_u64(&bytes), Ok(Some((v, bytes.len()))));
            assert_eq!(decode_u64(&bytes[..bytes.len() - 1]), Ok(None));
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX, 63, -64] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn overlong_is_an_error() {
        assert_eq!(decode_u64(&[0xFF; 11]), Err(()));
        assert_eq!(decode_u64(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02]), Err(()));
    }
}
