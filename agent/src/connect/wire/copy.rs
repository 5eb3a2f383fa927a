//! COPY data passed through as the servers frame it. A source's
//! `COPY … TO STDOUT` is read as whole CopyData messages, which go into a
//! destination's `COPY … FROM STDIN` as they are: a CopyData message is the
//! same bytes in both directions (`d`, a length, the data). Between the two
//! sockets nothing is copied, parsed or framed again; each chunk is only
//! walked from length to length.

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{server_error, WireError, WireSession};

/// What [`scan`] found: whole CopyData messages, their bytes with the
/// framing, and the COPY data in them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub bytes: usize,
    pub messages: u64,
    pub payload: u64,
}

/// The whole CopyData messages at the start of `buf`, up to the first
/// message that is incomplete or of another kind.
pub fn scan(buf: &[u8]) -> Scan {
    let mut s = Scan::default();
    while let Some(len) = whole_message(&buf[s.bytes..]) {
        if buf[s.bytes] != b'd' || len < 5 {
            break;
        }
        s.bytes += len;
        s.messages += 1;
        s.payload += (len - 5) as u64;
    }
    s
}

/// Checks that `chunk` is whole CopyData messages and nothing else, as
/// what goes into a destination session must be.
pub fn check(chunk: &[u8]) -> Result<Scan, String> {
    let s = scan(chunk);
    if s.bytes != chunk.len() {
        return Err(format!(
            "copy data is not whole CopyData messages: {} bytes of {} are, then {:?}",
            s.bytes,
            chunk.len(),
            &chunk[s.bytes..chunk.len().min(s.bytes + 8)]
        ));
    }
    Ok(s)
}

/// The length of the whole message at the start of `buf`, type byte
/// included; `None` while it is incomplete. A length field below its own
/// 4 bytes gives less than 5: the message is malformed, and the parser
/// refuses it.
fn whole_message(buf: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
    (buf.len() > len).then_some(1 + len)
}

impl WireSession {
    /// Starts `sql`, a `COPY … TO STDOUT`.
    pub async fn copy_out(&mut self, sql: &str, chunk_bytes: usize) -> Result<CopyOut<'_>, WireError> {
        self.start_copy(sql, true).await?;
        let mut out = CopyOut { session: self, held: Scan::default(), ended: false, chunk_bytes };
        out.absorb().await?;
        Ok(out)
    }

    /// Starts `sql`, a `COPY … FROM STDIN`.
    pub async fn copy_in(&mut self, sql: &str) -> Result<CopyIn<'_>, WireError> {
        self.start_copy(sql, false).await?;
        Ok(CopyIn { session: self })
    }

    async fn start_copy(&mut self, sql: &str, out: bool) -> Result<(), WireError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        loop {
            match self.message().await? {
                Message::CopyOutResponse(_) if out => return Ok(()),
                Message::CopyInResponse(_) if !out => return Ok(()),
                Message::ErrorResponse(body) => return Err(self.drain_error(server_error(&body)).await),
                Message::NoticeResponse(_) | Message::ParameterStatus(_) | Message::NotificationResponse(_) => {}
                _ => return Err(WireError::Protocol(format!("{sql:?} did not start a copy"))),
            }
        }
    }

    /// Reads on to ReadyForQuery after `error`, so the session can run
    /// its next command (a ROLLBACK), and returns `error`.
    async fn drain_error(&mut self, error: WireError) -> WireError {
        loop {
            match self.message().await {
                Ok(Message::ReadyForQuery(_)) => return error,
                Ok(_) => {}
                Err(e) => return if e.is_connection_loss() { e } else { error },
            }
        }
    }
}

/// A `COPY … TO STDOUT` being read.
pub struct CopyOut<'a> {
    session: &'a mut WireSession,
    /// Whole CopyData messages at the start of the read buffer.
    held: Scan,
    /// ReadyForQuery came: the COPY is over.
    ended: bool,
    /// About how much a chunk holds: the buffer has room for this much.
    chunk_bytes: usize,
}

impl CopyOut<'_> {
    /// Reads once from the server, at most `max` bytes. False once the
    /// COPY has ended (what is still held is its last data).
    pub async fn read(&mut self, max: usize) -> Result<bool, WireError> {
        if self.ended {
            return Ok(false);
        }
        let s = &mut *self.session;
        if s.read.capacity() - s.read.len() < max {
            // Room for a whole chunk at once: a buffer grown step by step
            // would copy what it holds at each step.
            s.read.reserve(self.chunk_bytes + max);
        }
        let n = (&mut s.stream).take(max as u64).read_buf(&mut s.read).await?;
        if n == 0 {
            return Err(super::closed());
        }
        self.absorb().await?;
        Ok(!self.ended)
    }

    /// The whole CopyData messages read and not yet taken.
    pub fn held(&self) -> Scan {
        self.held
    }

    /// Takes the whole CopyData messages held, framed as the server sent them.
    pub fn take(&mut self) -> Bytes {
        let chunk = self.session.read.split_to(self.held.bytes).freeze();
        self.held = Scan::default();
        chunk
    }

    /// Counts the CopyData messages newly whole, and acts on the other
    /// messages between them (which leave the buffer): the end of the
    /// COPY, an error, notices.
    async fn absorb(&mut self) -> Result<(), WireError> {
        loop {
            let s = &mut *self.session;
            let more = scan(&s.read[self.held.bytes..]);
            self.held.bytes += more.bytes;
            self.held.messages += more.messages;
            self.held.payload += more.payload;
            if whole_message(&s.read[self.held.bytes..]).is_none() {
                return Ok(());
            }
            // Another kind of message: taken out of the buffer.
            let mut rest = s.read.split_off(self.held.bytes);
            let message = Message::parse(&mut rest)?;
            s.read.unsplit(rest);
            match message {
                Some(Message::CopyDone) | Some(Message::CommandComplete(_)) => {}
                Some(Message::ReadyForQuery(_)) => {
                    self.ended = true;
                    return Ok(());
                }
                Some(Message::ErrorResponse(body)) => {
                    // The range fails: what was held goes with it.
                    s.read.advance(self.held.bytes);
                    self.held = Scan::default();
                    return Err(s.drain_error(server_error(&body)).await);
                }
                Some(Message::NoticeResponse(_) | Message::ParameterStatus(_) | Message::NotificationResponse(_)) => {}
                _ => return Err(WireError::Protocol("unexpected message in COPY TO STDOUT".into())),
            }
        }
    }
}

/// A `COPY … FROM STDIN` being written.
pub struct CopyIn<'a> {
    session: &'a mut WireSession,
}

impl CopyIn<'_> {
    /// Sends `framed`, whole CopyData messages (see [`check`]). Fails
    /// early when the server has already refused the data.
    pub async fn send(&mut self, framed: &[u8]) -> Result<(), WireError> {
        self.refused()?;
        self.session.stream.write_all(framed).await?;
        Ok(())
    }

    /// Ends the data; returns the rows the server loaded.
    pub async fn finish(self) -> Result<u64, WireError> {
        let s = self.session;
        frontend::copy_done(&mut s.write);
        s.flush().await?;
        let (mut rows, mut error) = (0, None);
        loop {
            match s.message().await? {
                // "COPY n"
                Message::CommandComplete(body) => rows = body.tag()?.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0),
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// The server's error, when one has already come: after refusing
    /// COPY data the server reads the rest only to throw it away.
    fn refused(&mut self) -> Result<(), WireError> {
        let s = &mut *self.session;
        match s.stream.read_buf(&mut s.read).now_or_never() {
            None => {}
            Some(Ok(0)) => return Err(super::closed()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
        while let Some(message) = Message::parse(&mut s.read)? {
            if let Message::ErrorResponse(body) = message {
                return Err(server_error(&body));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(payload.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn scan_counts_whole_copy_data_messages_only() {
        let mut buf = [copy_data(b"1\ta\n"), copy_data(b""), copy_data(b"22\tbb\n")].concat();
        let whole = buf.len();
        assert_eq!(scan(&buf), Scan { bytes: whole, messages: 3, payload: 10 });
        // A partial message is not counted, at any cut.
        let next = copy_data(b"333\tccc\n");
        for cut in 0..next.len() {
            let mut partial = buf.clone();
            partial.extend_from_slice(&next[..cut]);
            assert_eq!(scan(&partial), Scan { bytes: whole, messages: 3, payload: 10 }, "cut at {cut}");
        }
        // Another message kind stops the scan: CopyDone here.
        buf.extend_from_slice(&[b'c', 0, 0, 0, 4]);
        buf.extend_from_slice(&next);
        assert_eq!(scan(&buf).bytes, whole);
        assert_eq!(scan(&[]), Scan::default());
    }

    #[test]
    fn check_refuses_anything_but_whole_copy_data() {
        let good = [copy_data(b"x"), copy_data(&[0u8; 300])].concat();
        assert_eq!(check(&good), Ok(Scan { bytes: good.len(), messages: 2, payload: 301 }));
        assert!(check(&good[..good.len() - 1]).is_err(), "cut short");
        // A query smuggled after the data must never reach the session.
        let mut query = good.clone();
        query.extend_from_slice(b"Q\0\0\0\x0dDROP x;\0");
        let e = check(&query).unwrap_err();
        assert!(e.contains(&format!("{} bytes of {}", good.len(), query.len())), "{e}");
        // A length below the header's own 4 bytes.
        assert!(check(&[b'd', 0, 0, 0, 2]).is_err());
    }
}
