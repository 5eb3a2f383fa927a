//! Where translated records go: the same sequence the decant plugin writes
//! (BEGIN only before a transaction's first selected change, a table's
//! RELATION before its first change in a session, nothing for a
//! transaction with no selected change), handed out in chunks of whole
//! records.
//!
//! With [`Hold::UntilCommit`] a transaction's records are held until its
//! COMMIT (in memory up to `MEMORY_BYTES`, then in an unlinked temporary
//! file, so memory stays bounded): for decoders that tell the commit's
//! position only at the end (test_decoding), whose BEGIN must carry it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use decant_proto::{encode, frame_len, Begin, Commit, Lsn, Record};

/// Output handed to the session at a time (whole records, so a little
/// more when a record is larger).
const CHUNK_BYTES: usize = 256 * 1024;
/// A held transaction's records kept in memory before they go to a file.
const MEMORY_BYTES: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Records go out as they are translated.
    Nothing,
    /// A transaction's records go out at its COMMIT, with a BEGIN whose
    /// `final_lsn` is the commit's end less one (see [`Output::commit`]).
    UntilCommit,
}

pub struct Output {
    hold: Hold,
    /// The open transaction's BEGIN, not yet written.
    pending_begin: Option<Begin>,
    /// The open transaction has written a record.
    began: bool,
    /// Held records of the open transaction.
    held: Vec<u8>,
    spill: Option<File>,
    /// Records ready for the session.
    ready: VecDeque<Vec<u8>>,
    /// A spilled transaction being handed out: the file, and the bytes of
    /// an incomplete record read past the last chunk.
    replay: Option<(File, Vec<u8>)>,
    /// What goes after the replayed file: the held tail and the COMMIT.
    after_replay: Vec<u8>,
}

impl Output {
    pub fn new(hold: Hold) -> Output {
        Output {
            hold,
            pending_begin: None,
            began: false,
            held: Vec::new(),
            spill: None,
            ready: VecDeque::new(),
            replay: None,
            after_replay: Vec::new(),
        }
    }

    pub fn begin(&mut self, begin: Begin) {
        self.pending_begin = Some(begin);
        self.began = false;
    }

    pub fn in_transaction(&self) -> bool {
        self.pending_begin.is_some() || self.began
    }

    /// A record of the open transaction (RELATION, a change, a
    /// transactional message); writes the BEGIN first if needed.
    pub fn change(&mut self, record: &Record<'_>) -> std::io::Result<()> {
        if let Some(begin) = self.pending_begin.take() {
            self.began = true;
            if self.hold == Hold::Nothing {
                self.push_ready(&Record::Begin(begin));
            } else {
                // Written at COMMIT, with the commit's position.
                self.pending_begin = Some(begin);
            }
        }
        self.began = true;
        match self.hold {
            Hold::Nothing => self.push_ready(record),
            Hold::UntilCommit => {
                encode(record, &mut self.held);
                if self.held.len() >= MEMORY_BYTES {
                    self.spill_held()?;
                }
            }
        }
        Ok(())
    }

    /// A record outside any transaction (a non-transactional message).
    pub fn outside(&mut self, record: &Record<'_>) {
        self.push_ready(record);
    }

    /// Ends the open transaction. With [`Hold::UntilCommit`], its BEGIN
    /// gets `final_lsn` = `commit.end_lsn - 1` and `commit_time` of the
    /// commit: the commit record starts before its end and after every
    /// other record's end, so that value orders against every COMMIT end
    /// and snapshot position exactly as the commit record's start does
    /// (which is all the applier compares it with).
    pub fn commit(&mut self, xid: u32, commit: Commit) -> std::io::Result<()> {
        let began = std::mem::take(&mut self.began);
        let pending = self.pending_begin.take();
        if !began {
            return Ok(());
        }
        match self.hold {
            Hold::Nothing => self.push_ready(&Record::Commit(commit)),
            Hold::UntilCommit => {
                let xid = pending.map_or(xid, |b| b.xid);
                let begin = Begin { xid, final_lsn: Lsn(commit.end_lsn.0.saturating_sub(1)), commit_time: commit.commit_time };
                self.push_ready(&Record::Begin(begin));
                let mut tail = std::mem::take(&mut self.held);
                encode(&Record::Commit(commit), &mut tail);
                match self.spill.take() {
                    None => self.ready.push_back(tail),
                    Some(mut file) => {
                        file.seek(SeekFrom::Start(0))?;
                        self.after_replay = tail;
                        self.replay = Some((file, Vec::new()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The next chunk of whole records, if any.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(chunk) = self.ready.pop_front() {
            return Ok(Some(chunk));
        }
        let Some((file, carry)) = &mut self.replay else { return Ok(None) };
        let mut buf = std::mem::take(carry);
        let start = buf.len();
        buf.resize(start + CHUNK_BYTES, 0);
        let n = file.read(&mut buf[start..])?;
        buf.truncate(start + n);
        if n == 0 {
            if !buf.is_empty() {
                return Err(std::io::Error::other("a held transaction's file ends inside a record"));
            }
            self.replay = None;
            return Ok(Some(std::mem::take(&mut self.after_replay)));
        }
        let whole = whole_records(&buf);
        if whole == 0 {
            // A record larger than a chunk: read on until it is whole.
            *carry = buf;
            return self.next_chunk();
        }
        *carry = buf.split_off(whole);
        Ok(Some(buf))
    }

    pub fn has_output(&self) -> bool {
        !self.ready.is_empty() || self.replay.is_some()
    }

    fn push_ready(&mut self, record: &Record<'_>) {
        match self.ready.back_mut() {
            Some(last) if last.len() < CHUNK_BYTES => encode(record, last),
            _ => {
                let mut chunk = Vec::new();
                encode(record, &mut chunk);
                self.ready.push_back(chunk);
            }
        }
    }

    fn spill_held(&mut self) -> std::io::Result<()> {
        if self.spill.is_none() {
            self.spill = Some(unlinked_file()?);
        }
        if let Some(file) = &mut self.spill {
            file.write_all(&self.held)?;
        }
        self.held.clear();
        Ok(())
    }
}

/// Bytes of `buf` that are whole records.
fn whole_records(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Ok(Some(len)) = frame_len(&buf[at..]) {
        if at + len > buf.len() {
            break;
        }
        at += len;
    }
    at
}

/// A file in the temporary directory that only this process can see
/// (removed from the directory at once).
fn unlinked_file() -> std::io::Result<File> {
    let dir = std::env::temp_dir();
    for n in 0..100u32 {
        let path = dir.join(format!("decant-held-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("cannot create a temporary file for a held transaction"))
}

#[cfg(test)]
mod tests {
    use decant_proto::{decode, Insert, Tuple, Value};

    use super::*;

    fn records(out: &mut Output) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(chunk) = out.next_chunk().unwrap() {
            let mut at = 0;
            while at < chunk.len() {
                let (r, used) = decode(&chunk[at..]).unwrap();
                all.push(match r {
                    Record::Begin(b) => format!("B{} {}", b.xid, b.final_lsn.0),
                    Record::Commit(c) => format!("C{}", c.end_lsn.0),
                    Record::Insert(i) => format!("I{}", i.new.0.len()),
                    other => format!("{:?}", other.kind()),
                });
                at += used;
            }
        }
        all
    }

    #[test]
    fn empty_transactions_vanish_and_held_ones_get_their_commit_position() {
        let big = vec![b'x'; 100_000];
        let insert = Record::Insert(Insert { relation: 1, new: Tuple(vec![Value::Text(&big)]) });
        for hold in [Hold::Nothing, Hold::UntilCommit] {
            let mut out = Output::new(hold);
            out.begin(Begin { xid: 7, final_lsn: Lsn(90), commit_time: 1 });
            out.commit(7, Commit { end_lsn: Lsn(100), commit_time: 1 }).unwrap();
            assert!(records(&mut out).is_empty());
            out.begin(Begin { xid: 8, final_lsn: Lsn(190), commit_time: 1 });
            // Over MEMORY_BYTES: held transactions go through the file.
            for _ in 0..100 {
                out.change(&insert).unwrap();
            }
            out.commit(8, Commit { end_lsn: Lsn(200), commit_time: 1 }).unwrap();
            let got = records(&mut out);
            let final_lsn = if hold == Hold::Nothing { 190 } else { 199 };
            assert_eq!(got.len(), 102, "{hold:?}");
            assert_eq!(got[0], format!("B8 {final_lsn}"));
            assert!(got[1..101].iter().all(|r| r == "I1"));
            assert_eq!(got[101], "C200");
        }
    }
}
