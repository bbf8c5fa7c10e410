//! Literal-insensitive statement fingerprints, the key of the classification
//! cache.
//!
//! Applications send the same few statement shapes over and over with
//! different constants (`... WHERE aid = 48213`, `... WHERE aid = 7`).
//! Parsing each one costs more than the proxy's whole per-query budget, so the
//! classifier caches its verdict per shape, and this module computes the shape
//! in one allocation-free pass over the bytes.
//!
//! The lexer follows PostgreSQL's own scanner (`scan.l`, with
//! `standard_conforming_strings = on`, the default since 9.1) rather than
//! sqlparser's: the cache is sound because two statements with the same
//! fingerprint are the same PostgreSQL token sequence up to the values of
//! constants, whitespace and comments, none of which can turn a read into a
//! write. A lexer that disagreed with the server on where a string or comment
//! ends could hide a token from the hash, so every boundary rule here mirrors
//! the server's.

use std::hash::{BuildHasher, DefaultHasher, Hasher, RandomState};
use std::sync::OnceLock;

/// Stands in for a string constant. Never valid UTF-8, so it cannot collide
/// with statement text.
const STRING_MARK: u8 = 0xFE;
/// Stands in for a numeric constant (same reasoning as [`STRING_MARK`]).
const NUMBER_MARK: u8 = 0xFF;

/// The content of a plain `'...'` constant, or `None` if it is not one
/// (unterminated, or a lone quote inside: the server would reject it).
pub fn unquote_literal(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.replace("''", "").contains('\'')).then(|| inner.replace("''", "'"))
}

/// Hashes the statement with constants, whitespace amounts and comments
/// removed.
///
/// Numeric constants, string constants of every form (`'..'`, `E'..'`,
/// `B'..'`, `X'..'`, `N'..'`, `U&'..'`, `$tag$..$tag$`) each become one
/// placeholder byte; `$1`-style parameters, identifiers, quoted identifiers,
/// keywords and operators are hashed verbatim. Comments are skipped (treated
/// as whitespace) so that per-request comments such as sqlcommenter trace ids
/// do not defeat the cache; runs of whitespace hash as one space. A string
/// or comment that never ends is hashed verbatim: the statement is broken,
/// and must not share a cached verdict with a complete one (`select ' `
/// with `select '\n'`).
///
/// The hash is SipHash keyed once per process with random keys, so values
/// differ between runs. Keying matters because the cache is shared by all
/// clients: with a public hash function one client could craft a read that
/// collides with another client's write and make that write go to a replica.
/// Even then the replica rejects it (SQLSTATE 25006, read-only transaction),
/// and with 64 bits an accidental collision among the few thousand statement
/// shapes of an application has a probability around 2^-40.
pub fn fingerprint(sql: &str) -> u64 {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    let mut out = HashSink {
        hasher: KEYS.get_or_init(RandomState::new).build_hasher(),
        buf: [0; 128],
        len: 0,
    };
    let mut started = false;
    let mut gap = false;
    let mut after_symbol = false;
    for token in Lexer::new(sql) {
        gap |= started && token.after_space;
        // A comment glued to an operator (`@--x`) ends the operator in
        // PostgreSQL but not in sqlparser, whose verdict on the text then
        // depends on the comment: such a comment is hashed.
        let glued = after_symbol && !token.after_space;
        after_symbol = token.kind == TokenKind::Symbol;
        if token.kind == TokenKind::Comment && !glued {
            gap = started;
            continue;
        }
        if gap {
            out.write(b" ");
        }
        match token.kind {
            TokenKind::String => out.write(&[STRING_MARK]),
            TokenKind::Number => out.write(&[NUMBER_MARK]),
            _ => out.write(token.text.as_bytes()),
        }
        started = true;
        gap = false;
    }
    out.finish()
}

/// Batches the normalized text so that SipHash sees one or two large writes
/// instead of one call per token.
struct HashSink {
    hasher: DefaultHasher,
    buf: [u8; 128],
    len: usize,
}

impl HashSink {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.hasher.write(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.hasher.write(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finish(mut self) -> u64 {
        self.hasher.write(&self.buf[..self.len]);
        self.hasher.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// `-- ...` up to the line end, or a nested `/* ... */`, delimiters
    /// included.
    Comment,
    /// Unquoted identifier or keyword.
    Word,
    /// `"..."` or `U&"..."`.
    QuotedIdent,
    /// Any string constant, prefix and quotes included.
    String,
    /// Numeric constant.
    Number,
    /// Positional parameter such as `$1`.
    Param,
    /// Any other single byte: operators and punctuation.
    Symbol,
    /// A string, quoted identifier or block comment that never ends: it runs
    /// to the end of the text, and the server rejects the statement.
    Unterminated,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Token<'a> {
    pub(crate) kind: TokenKind,
    pub(crate) text: &'a str,
    /// Byte offset of `text` in the statement.
    pub(crate) start: usize,
    /// Whitespace precedes the token. Whitespace is not a token of its own
    /// because that would double the work per statement on the cache-hit
    /// path, which runs for every query.
    pub(crate) after_space: bool,
}

/// PostgreSQL-compatible tokenizer that never fails: an unterminated string
/// or comment is one [`TokenKind::Unterminated`] token to the end of the
/// text, which the server would reject.
pub(crate) struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }

    fn dollar(&self, start: usize) -> (TokenKind, usize) {
        let bytes = self.sql.as_bytes();
        if bytes.get(start + 1).is_some_and(u8::is_ascii_digit) {
            return (
                TokenKind::Param,
                skip_while(bytes, start + 1, |b| b.is_ascii_digit()),
            );
        }
        let mut tag_end = start + 1;
        if bytes.get(tag_end).copied().is_some_and(is_ident_start) {
            tag_end = skip_while(bytes, tag_end + 1, |b| is_ident_cont(b) && b != b'$');
        }
        if bytes.get(tag_end) != Some(&b'$') {
            return (TokenKind::Symbol, start + 1);
        }
        let body = tag_end + 1;
        let delimiter = &self.sql[start..body];
        let end = self.sql[body..]
            .find(delimiter)
            .map(|at| body + at + delimiter.len());
        closed(TokenKind::String, end, bytes.len())
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let bytes = self.sql.as_bytes();
        let start = skip_while(bytes, self.pos, is_space);
        let after_space = start > self.pos;
        self.pos = start;
        let &first = bytes.get(start)?;
        let second = bytes.get(start + 1).copied();
        let (kind, end) = match first {
            b'-' if second == Some(b'-') => (
                TokenKind::Comment,
                skip_while(bytes, start, |b| b != b'\n' && b != b'\r'),
            ),
            b'/' if second == Some(b'*') => closed(
                TokenKind::Comment,
                block_comment_end(bytes, start),
                bytes.len(),
            ),
            b'\'' => closed(
                TokenKind::String,
                quoted_end(bytes, start + 1, b'\'', false),
                bytes.len(),
            ),
            b'"' => closed(
                TokenKind::QuotedIdent,
                quoted_end(bytes, start + 1, b'"', false),
                bytes.len(),
            ),
            b'e' | b'E' if second == Some(b'\'') => closed(
                TokenKind::String,
                quoted_end(bytes, start + 2, b'\'', true),
                bytes.len(),
            ),
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if second == Some(b'\'') => closed(
                TokenKind::String,
                quoted_end(bytes, start + 2, b'\'', false),
                bytes.len(),
            ),
            b'u' | b'U' if second == Some(b'&') && bytes.get(start + 2) == Some(&b'\'') => closed(
                TokenKind::String,
                quoted_end(bytes, start + 3, b'\'', false),
                bytes.len(),
            ),
            b'u' | b'U' if second == Some(b'&') && bytes.get(start + 2) == Some(&b'"') => closed(
                TokenKind::QuotedIdent,
                quoted_end(bytes, start + 3, b'"', false),
                bytes.len(),
            ),
            b'$' => self.dollar(start),
            b'0'..=b'9' => (TokenKind::Number, number_end(bytes, start)),
            b'.' if second.is_some_and(|b| b.is_ascii_digit()) => {
                (TokenKind::Number, number_end(bytes, start))
            }
            _ if is_ident_start(first) => {
                (TokenKind::Word, skip_while(bytes, start + 1, is_ident_cont))
            }
            _ => (TokenKind::Symbol, start + 1),
        };
        self.pos = end;
        Some(Token {
            kind,
            text: &self.sql[start..end],
            start,
            after_space,
        })
    }
}

const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT_CONT: u8 = 4;

/// The classes of every byte, looked up once per byte: the lexer runs over
/// every query the cache sees, and chains of comparisons per byte were
/// most of its cost.
static CLASSES: [u8; 256] = {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        // PostgreSQL's whitespace set; other Unicode spaces are identifier
        // bytes to the server.
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C) {
            classes[b] = SPACE;
        }
        // Every non-ASCII byte may appear in identifiers, as in PostgreSQL.
        if byte.is_ascii_alphabetic() || byte == b'_' || !byte.is_ascii() {
            classes[b] = IDENT_START | IDENT_CONT;
        }
        if byte.is_ascii_digit() || byte == b'$' {
            classes[b] = IDENT_CONT;
        }
        b += 1;
    }
    classes
};

fn is_space(b: u8) -> bool {
    CLASSES[b as usize] & SPACE != 0
}

fn is_ident_start(b: u8) -> bool {
    CLASSES[b as usize] & IDENT_START != 0
}

fn is_ident_cont(b: u8) -> bool {
    CLASSES[b as usize] & IDENT_CONT != 0
}

fn skip_while(bytes: &[u8], mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
    while bytes.get(i).is_some_and(|&b| keep(b)) {
        i += 1;
    }
    i
}

/// A token of `kind` ending at `end`, or an unterminated one to `len`.
fn closed(kind: TokenKind, end: Option<usize>, len: usize) -> (TokenKind, usize) {
    match end {
        Some(end) => (kind, end),
        None => (TokenKind::Unterminated, len),
    }
}

/// Position after the closing quote, if there is one; a doubled quote is an
/// escaped quote, and in `E'...'` so is anything after a backslash.
fn quoted_end(bytes: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> Option<usize> {
    while let Some(&b) = bytes.get(i) {
        if b == b'\\' && backslash_escapes {
            i += 2;
        } else if b != quote {
            i += 1;
        } else if bytes.get(i + 1) == Some(&quote) {
            i += 2;
        } else {
            return Some(i + 1);
        }
    }
    None
}

/// Block comments nest in PostgreSQL, unlike in the SQL standard.
fn block_comment_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// `123`, `1_000`, `1.5`, `.5`, `1.`, `1e-3`; stops before `..` (PL/pgSQL
/// ranges) and before an `e` not followed by an exponent, so `1e'x'` stays a
/// number followed by an escape string, as in the server.
fn number_end(bytes: &[u8], start: usize) -> usize {
    let mut i = digits_end(bytes, start);
    if bytes.get(i) == Some(&b'.') && bytes.get(i + 1) != Some(&b'.') {
        i = digits_end(bytes, i + 1);
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        let mut exponent = i + 1;
        if matches!(bytes.get(exponent), Some(b'+' | b'-')) {
            exponent += 1;
        }
        if bytes.get(exponent).is_some_and(u8::is_ascii_digit) {
            i = digits_end(bytes, exponent);
        }
    }
    i
}

/// Digits with single underscores between them (PostgreSQL 16 syntax).
fn digits_end(bytes: &[u8], mut i: usize) -> usize {
    loop {
        match bytes.get(i) {
            Some(b) if b.is_ascii_digit() => i += 1,
            Some(b'_')
                if i > 0
                    && bytes[i - 1].is_ascii_digit()
                    && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) =>
            {
                i += 1
            }
            _ => return i,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, &str)> {
        Lexer::new(sql).map(|t| (t.kind, t.text)).collect()
    }

    #[test]
    fn literal_only_differences_hash_equal() {
        let same = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
            ),
            ("select 'a'", "select 'it''s'"),
            ("select E'a\\'b'", "select E'c'"),
            ("select $$x$$", "select $f$ $$ ' $f$"),
            ("select -5", "select -1.5e10"),
            ("select .5", "select 1_000"),
            ("select x'1f'", "select x'ff'"),
            ("select 1  from\n\tt", "select 2 from t"),
            ("select 1 /* a */ from t -- x", "select 1 from t"),
            ("/* trace='1' */ select 1", "select 1"),
        ];
        for (a, b) in same {
            assert_eq!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn structural_differences_hash_differently() {
        let different = [
            ("select nextval('a')", "select currval('a')"),
            ("select * from t1", "select * from t2"),
            ("select $1", "select $2"),
            ("select 1", "select '1'"),
            ("select \"a\"", "select \"b\""),
            ("select a b", "select ab"),
            ("select 1; select 2", "select 1"),
            ("select a$1", "select a$2"),
            // A broken statement never shares a verdict with a complete one.
            ("select ' \n'", "select ' "),
            ("select 1 /* x */", "select 1 /* x"),
            ("select $$x$$", "select $$x"),
            ("select 1 @--x\n", "select 1 @--y\n"),
        ];
        for (a, b) in different {
            assert_ne!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn strings_and_comments_end_where_postgres_ends_them() {
        use TokenKind::*;
        assert_eq!(kinds("'a\\' x"), [(String, "'a\\'"), (Word, "x")]);
        assert_eq!(kinds("e'a\\'b' x")[0], (String, "e'a\\'b'"));
        assert_eq!(
            kinds("/* a /* b */ c */d"),
            [(Comment, "/* a /* b */ c */"), (Word, "d")]
        );
        assert_eq!(kinds("-- a\r1"), [(Comment, "-- a"), (Number, "1")]);
        assert_eq!(kinds("$a$ $b$ ' $a$x")[0], (String, "$a$ $b$ ' $a$"));
        assert_eq!(kinds("$1$")[0], (Param, "$1"));
        assert_eq!(kinds("x$y$ 'z'")[0], (Word, "x$y$"));
        assert_eq!(kinds("U&\"a\" u&'b'")[0], (QuotedIdent, "U&\"a\""));
        assert_eq!(kinds("1e'x'")[..2], [(Number, "1"), (String, "e'x'")]);
        assert_eq!(kinds("1..2")[..2], [(Number, "1"), (Symbol, ".")]);
        assert_eq!(kinds("t1.c2"), [(Word, "t1"), (Symbol, "."), (Word, "c2")]);
        assert_eq!(kinds("'open"), [(Unterminated, "'open")]);
        assert_eq!(
            kinds("x /* a /* b */"),
            [(Word, "x"), (Unterminated, "/* a /* b */")]
        );
        assert_eq!(kinds("e'a\\'"), [(Unterminated, "e'a\\'")]);
        assert_eq!(kinds("<--x"), [(Symbol, "<"), (Comment, "--x")]);
        assert_eq!(kinds("é1"), [(Word, "é1")]);
    }
}
