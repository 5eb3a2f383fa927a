//! Captured DDL as text, read by PostgreSQL's lexical rules: where its
//! statements end, and the one keyword an index statement must lose to be
//! replayed inside a transaction. Pure text, std only.
//!
//! Why a lexer: on an old source the captured text is the client's whole
//! query string (`ALTER TABLE t ADD c int; INSERT INTO t VALUES (1)`), and
//! the replay must never run the DML in it, so semicolons inside strings,
//! quoted names, dollar quotes, comments and SQL-standard function bodies
//! must not be taken for statement ends. The rules followed are those of
//! the server's and psql's scanners (`scan.l`, `psqlscan.l`), with
//! standard_conforming_strings on (the default since PostgreSQL 9.1).
//! The scan works on bytes: every byte that matters is ASCII, and a
//! multi-byte character is always inside one token, so the text is only
//! ever cut at character boundaries.

use std::borrow::Cow;

/// The statements of `sql`, in order, each without its terminating
/// semicolon and without the whitespace and comments around it (so that it
/// never ends in a `--` comment that would swallow what is appended to it);
/// statements that are empty or only comments are left out.
///
/// A semicolon ends a statement unless it is inside parentheses (the
/// actions of `CREATE RULE … DO (…; …)`) or inside the `BEGIN ATOMIC … END`
/// body of a CREATE [OR REPLACE] FUNCTION/PROCEDURE, counted as psql counts
/// it: in such a statement, outside parentheses, BEGIN raises a depth, CASE
/// raises it within a body (it ends with END too), END lowers it. Two
/// refinements keep a name from being taken for a keyword, which would
/// hide the statements after it in this one: only BEGIN ATOMIC opens a body
/// (`CREATE FUNCTION begin() …; DELETE …` is two statements), and a word
/// after `.` or AS (`x.end`, `1 AS case`) is a name.
pub fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    // Byte span from the statement's first token to the end of its last.
    let mut span: Option<(usize, usize)> = None;
    let mut parens = 0usize;
    let mut body = RoutineBody::default();
    for token in Lexer::new(sql) {
        match token.kind {
            Kind::LineComment | Kind::BlockComment => continue,
            Kind::Punct(b';') if parens == 0 && body.depth == 0 => {
                out.extend(span.take().map(|(start, end)| slice(sql, start, end)));
                body = RoutineBody::default();
                continue;
            }
            Kind::Punct(b'(') => parens += 1,
            Kind::Punct(b')') => parens = parens.saturating_sub(1),
            _ => {}
        }
        body.token(token, sql, parens == 0);
        span = Some((span.map_or(token.start, |(start, _)| start), token.end));
    }
    out.extend(span.map(|(start, end)| slice(sql, start, end)));
    out
}

/// `statement` (one statement) without the keyword CONCURRENTLY when it is
/// CREATE [UNIQUE] INDEX CONCURRENTLY … or DROP INDEX CONCURRENTLY …: those
/// cannot run inside a transaction block, and the replay runs every
/// statement in one with its bookkeeping; without the keyword they can.
/// Any other statement is returned unchanged.
///
/// After CREATE [UNIQUE] INDEX or DROP INDEX an unquoted CONCURRENTLY is
/// always the keyword (it is reserved as a name there: `CREATE INDEX
/// CONCURRENTLY ON t (a)` builds an unnamed index concurrently), while
/// `"concurrently"` is a name. Only the keyword and one run of whitespace
/// next to it are removed, so the rest of the text, comments included,
/// stays as written.
pub fn without_concurrently(statement: &str) -> Cow<'_, str> {
    let tokens: Vec<Token> = Lexer::new(statement).collect();
    let significant: Vec<usize> = tokens.iter().enumerate().filter(|(_, t)| !t.kind.is_comment()).map(|(i, _)| i).collect();
    let is_word = |n: usize, word: &str| {
        significant
            .get(n)
            .and_then(|&i| tokens.get(i))
            .is_some_and(|t| t.kind == Kind::Word && t.bytes(statement).eq_ignore_ascii_case(word.as_bytes()))
    };
    let keyword_at = if is_word(0, "create") {
        let index = if is_word(1, "unique") { 2 } else { 1 };
        (is_word(index, "index") && is_word(index + 1, "concurrently")).then_some(index + 1)
    } else {
        (is_word(0, "drop") && is_word(1, "index") && is_word(2, "concurrently")).then_some(2)
    };
    let Some((i, keyword)) = keyword_at.and_then(|n| significant.get(n)).and_then(|&i| Some((i, *tokens.get(i)?))) else {
        return Cow::Borrowed(statement);
    };
    // Whatever follows the keyword directly is whitespace up to the next
    // token: remove it with the keyword. If nothing does, remove the
    // whitespace before it, unless that ends a `--` comment (the next token
    // would join the comment).
    let next_start = tokens.get(i + 1).map_or(statement.len(), |t| t.start);
    let (cut_start, cut_end) = if next_start > keyword.end {
        (keyword.start, next_start)
    } else {
        let before = i.checked_sub(1).and_then(|p| tokens.get(p)).filter(|t| t.kind != Kind::LineComment);
        (before.map_or(keyword.start, |t| t.end), keyword.end)
    };
    let mut out = String::with_capacity(statement.len());
    out.push_str(slice(statement, 0, cut_start));
    out.push_str(slice(statement, cut_end, statement.len()));
    Cow::Owned(out)
}

/// The statement's first keyword in upper case (`ALTER`), comments
/// skipped; `None` when it does not start with one.
pub fn first_keyword(statement: &str) -> Option<String> {
    let first = Lexer::new(statement).find(|t| !t.kind.is_comment())?;
    (first.kind == Kind::Word).then(|| String::from_utf8_lossy(first.bytes(statement)).to_ascii_uppercase())
}

/// Whether the statement only gives an object another owner: `ALTER …
/// name OWNER TO role`, with no other action beside it (ALTER TABLE takes
/// several, separated by commas). `RENAME [COLUMN] owner TO …` renames a
/// column called owner.
pub fn changes_owner(statement: &str) -> bool {
    let tokens: Vec<Token> = Lexer::new(statement).filter(|t| !t.kind.is_comment()).collect();
    let word =
        |i: usize, w: &str| tokens.get(i).is_some_and(|t| t.kind == Kind::Word && t.bytes(statement).eq_ignore_ascii_case(w.as_bytes()));
    if !word(0, "alter") || tokens.iter().any(|t| t.kind == Kind::Punct(b',')) {
        return false;
    }
    (2..tokens.len()).any(|i| {
        word(i, "owner") && word(i + 1, "to") && !["rename", "column", "constraint", "attribute", "value"].iter().any(|w| word(i - 1, w))
    })
}

/// `text[start..end]`, for token boundaries.
fn slice(text: &str, start: usize, end: usize) -> &str {
    text.get(start..end).expect("token boundaries are ASCII bytes or the text's end, so character boundaries")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An unquoted identifier or keyword.
    Word,
    /// A `"…"` identifier.
    Quoted,
    /// A string, dollar-quoted string, number or `$n` parameter.
    Literal,
    LineComment,
    BlockComment,
    /// Any other byte, alone: operators, punctuation, `;`, parentheses.
    Punct(u8),
}

impl Kind {
    fn is_comment(self) -> bool {
        matches!(self, Kind::LineComment | Kind::BlockComment)
    }
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

impl Token {
    fn bytes(self, text: &str) -> &[u8] {
        text.as_bytes().get(self.start..self.end).unwrap_or_default()
    }
}

/// psql's count of a SQL-standard routine body's nesting, for one
/// statement: whether it began CREATE [OR REPLACE] FUNCTION|PROCEDURE, and
/// how deep in BEGIN ATOMIC/CASE … END it is.
#[derive(Default)]
struct RoutineBody {
    /// Words seen so far in the statement.
    words: usize,
    /// First letters of the first four words, where they are one of
    /// CREATE, OR, REPLACE, FUNCTION, PROCEDURE (0 for any other word).
    head: [u8; 4],
    depth: usize,
    /// What the previous token was, as far as the count cares.
    previous: Previous,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Previous {
    #[default]
    Other,
    /// `.` or AS: a name follows.
    NameAhead,
    /// BEGIN, where a keyword may be.
    Begin,
}

impl RoutineBody {
    /// Counts `token`, a token of the statement other than a comment.
    fn token(&mut self, token: Token, text: &str, outside_parens: bool) {
        let word = (token.kind == Kind::Word).then(|| token.bytes(text));
        let is = |w: &str| word.is_some_and(|word| word.eq_ignore_ascii_case(w.as_bytes()));
        let name = self.previous == Previous::NameAhead;
        let previous = std::mem::replace(
            &mut self.previous,
            if token.kind == Kind::Punct(b'.') || is("as") {
                Previous::NameAhead
            } else if is("begin") && !name {
                Previous::Begin
            } else {
                Previous::Other
            },
        );
        let Some(word) = word else { return };
        const HEAD: [&[u8]; 5] = [b"create", b"or", b"replace", b"function", b"procedure"];
        if let Some(letter) = self.head.get_mut(self.words) {
            if HEAD.iter().any(|h| word.eq_ignore_ascii_case(h)) {
                *letter = word.first().map_or(0, u8::to_ascii_lowercase);
            }
        }
        self.words += 1;
        let routine = matches!(self.head, [b'c', b'f' | b'p', ..] | [b'c', b'o', b'r', b'f' | b'p']);
        if !routine || !outside_parens || name {
            return;
        }
        if is("atomic") && previous == Previous::Begin {
            self.depth += 1;
        } else if is("case") {
            // CASE ends with END too; it only matters inside a body.
            if self.depth > 0 {
                self.depth += 1;
            }
        } else if is("end") {
            self.depth = self.depth.saturating_sub(1);
        }
    }
}

/// Letters, `_` and every byte of a multi-byte character (scan.l's
/// `ident_start`).
fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// An identifier's later bytes may also be digits and `$` (`a$b$` is one
/// identifier).
fn ident_cont(b: u8) -> bool {
    ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// A dollar quote's tag has no `$`, and does not start with a digit.
fn tag_cont(b: u8) -> bool {
    ident_start(b) || b.is_ascii_digit()
}

fn space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// The tokens of a text, whitespace left out. Unterminated strings and
/// comments run to the end of the text.
struct Lexer<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer { text: text.as_bytes(), at: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.text.get(self.at + ahead).copied()
    }

    fn advance(&mut self, n: usize) {
        self.at = (self.at + n).min(self.text.len());
    }

    fn skip_while(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek(0).is_some_and(&f) {
            self.at += 1;
        }
    }

    /// After the opening quote: up to and past the closing `close`, a
    /// doubled `close` standing for itself; with `backslash`, a backslash
    /// escapes the next byte (E'…': `E'\''` is one quote).
    fn quoted(&mut self, close: u8, backslash: bool) {
        while let Some(b) = self.peek(0) {
            if (b == b'\\' && backslash) || (b == close && self.peek(1) == Some(close)) {
                self.advance(2);
            } else {
                self.advance(1);
                if b == close {
                    return;
                }
            }
        }
    }

    /// After `/*`: past the matching `*/`; block comments nest.
    fn block_comment(&mut self) {
        let mut depth = 1usize;
        while let Some(b) = self.peek(0) {
            match (b, self.peek(1)) {
                (b'/', Some(b'*')) => {
                    depth += 1;
                    self.advance(2);
                }
                (b'*', Some(b'/')) => {
                    depth -= 1;
                    self.advance(2);
                    if depth == 0 {
                        return;
                    }
                }
                _ => self.advance(1),
            }
        }
    }

    /// The length of the `$tag$` (or `$$`) delimiter starting here, if one
    /// does.
    fn dollar_delimiter(&self) -> Option<usize> {
        let rest = self.text.get(self.at..)?;
        let mut len = 1;
        if rest.get(1).copied().is_some_and(ident_start) {
            len += 1;
            while rest.get(len).copied().is_some_and(tag_cont) {
                len += 1;
            }
        }
        (rest.get(len) == Some(&b'$')).then_some(len + 1)
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.skip_while(space);
        let start = self.at;
        let first = self.peek(0)?;
        let kind = match (first, self.peek(1)) {
            (b'-', Some(b'-')) => {
                self.skip_while(|b| b != b'\n' && b != b'\r');
                Kind::LineComment
            }
            (b'/', Some(b'*')) => {
                self.advance(2);
                self.block_comment();
                Kind::BlockComment
            }
            (b'\'', _) => {
                self.advance(1);
                self.quoted(b'\'', false);
                Kind::Literal
            }
            (b'e' | b'E', Some(b'\'')) => {
                self.advance(2);
                self.quoted(b'\'', true);
                Kind::Literal
            }
            (b'"', _) => {
                self.advance(1);
                self.quoted(b'"', false);
                Kind::Quoted
            }
            // `$1` is a parameter, not a dollar quote.
            (b'$', Some(d)) if d.is_ascii_digit() => {
                self.advance(1);
                self.skip_while(|b| b.is_ascii_digit());
                Kind::Literal
            }
            (b'$', _) => match self.dollar_delimiter() {
                Some(len) => {
                    let body = start + len;
                    let delimiter = self.text.get(start..body).unwrap_or_default();
                    let rest = self.text.get(body..).unwrap_or_default();
                    let close = rest.windows(len).position(|w| w == delimiter);
                    self.at = close.map_or(self.text.len(), |at| body + at + len);
                    Kind::Literal
                }
                // A lone `$`: the scanners return it alone, and read what
                // follows as a new token.
                None => {
                    self.advance(1);
                    Kind::Punct(b'$')
                }
            },
            // A number, with whatever letters are glued to it (`1e5`,
            // `0x1F`): nothing in it can end a statement.
            (b, _) if b.is_ascii_digit() => {
                self.skip_while(|b| b.is_ascii_digit() || b == b'.' || b == b'_');
                if self.peek(0).is_some_and(ident_start) {
                    self.skip_while(ident_cont);
                }
                Kind::Literal
            }
            (b, _) if ident_start(b) => {
                self.skip_while(ident_cont);
                Kind::Word
            }
            (b, _) => {
                self.advance(1);
                Kind::Punct(b)
            }
        };
        Some(Token { kind, start, end: self.at })
    }
}

#[cfg(test)]
mod tests;
