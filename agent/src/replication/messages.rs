//! The streaming replication sub-protocol carried inside CopyData messages
//! during `START_REPLICATION`: a pure codec, no I/O. Parsing never panics;
//! malformed input is a [`MessageError`].

use decant_proto::Lsn;

/// A message from the walsender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// `w`: a piece of the plugin's output.
    XLogData { wal_start: Lsn, wal_end: Lsn, send_time: i64, data: &'a [u8] },
    /// `k`: the server's WAL end and whether it wants a status update now.
    Keepalive { wal_end: Lsn, send_time: i64, reply_requested: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("empty replication message")]
    Empty,
    #[error("replication message '{kind}' is {len} bytes long, it needs at least {needed}")]
    TooShort { kind: char, len: usize, needed: usize },
    #[error("unknown replication message type {0:#04x}")]
    UnknownType(u8),
    #[error("keepalive message has {0} bytes after its fields")]
    TrailingBytes(usize),
}

const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parses the payload of one CopyData message from the walsender.
pub fn parse_server_message(buf: &[u8]) -> Result<ServerMessage<'_>, MessageError> {
    let kind = *buf.first().ok_or(MessageError::Empty)?;
    match kind {
        b'w' => {
            if buf.len() < XLOG_DATA_HEADER {
                return Err(MessageError::TooShort { kind: 'w', len: buf.len(), needed: XLOG_DATA_HEADER });
            }
            Ok(ServerMessage::XLogData {
                wal_start: Lsn(be_u64(buf, 1)),
                wal_end: Lsn(be_u64(buf, 9)),
                send_time: be_u64(buf, 17) as i64,
                data: &buf[XLOG_DATA_HEADER..],
            })
        }
        b'k' => {
            if buf.len() < KEEPALIVE_LEN {
                return Err(MessageError::TooShort { kind: 'k', len: buf.len(), needed: KEEPALIVE_LEN });
            }
            if buf.len() > KEEPALIVE_LEN {
                return Err(MessageError::TrailingBytes(buf.len() - KEEPALIVE_LEN));
            }
            Ok(ServerMessage::Keepalive { wal_end: Lsn(be_u64(buf, 1)), send_time: be_u64(buf, 9) as i64, reply_requested: buf[17] != 0 })
        }
        other => Err(MessageError::UnknownType(other)),
    }
}

/// A standby status update (`r`): what the destination has durably applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub written: Lsn,
    pub flushed: Lsn,
    pub applied: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub clock: i64,
    pub reply_requested: bool,
}

impl StatusUpdate {
    pub fn encode(&self) -> [u8; STATUS_UPDATE_LEN] {
        let mut b = [0u8; STATUS_UPDATE_LEN];
        b[0] = b'r';
        b[1..9].copy_from_slice(&self.written.0.to_be_bytes());
        b[9..17].copy_from_slice(&self.flushed.0.to_be_bytes());
        b[17..25].copy_from_slice(&self.applied.0.to_be_bytes());
        b[25..33].copy_from_slice(&self.clock.to_be_bytes());
        b[33] = u8::from(self.reply_requested);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3i64.to_be_bytes());
        w.extend_from_slice(b"payload");
        assert_eq!(
            parse_server_message(&w),
            Ok(ServerMessage::XLogData { wal_start: Lsn(1), wal_end: Lsn(2), send_time: 3, data: b"payload" })
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&(-1i64).to_be_bytes());
        k.push(1);
        assert_eq!(parse_server_message(&k), Ok(ServerMessage::Keepalive { wal_end: Lsn(9), send_time: -1, reply_requested: true }));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(parse_server_message(&[]), Err(MessageError::Empty));
        assert!(matches!(parse_server_message(b"w123"), Err(MessageError::TooShort { .. })));
        assert!(matches!(parse_server_message(b"k1"), Err(MessageError::TooShort { .. })));
        assert!(matches!(parse_server_message(&[b'k'; 40]), Err(MessageError::TrailingBytes(_))));
        assert_eq!(parse_server_message(b"x"), Err(MessageError::UnknownType(b'x')));
        for len in 0..64 {
            let _ = parse_server_message(&vec![b'w'; len]);
        }
    }

    #[test]
    fn status_update_layout() {
        let b = StatusUpdate { written: Lsn(1), flushed: Lsn(2), applied: Lsn(3), clock: 4, reply_requested: false }.encode();
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(be_u64(&b, 9), 2);
        assert_eq!(b[33], 0);
    }
}
