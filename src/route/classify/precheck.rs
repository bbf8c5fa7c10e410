//! Keyword-level recognition of the statements whose intent does not come
//! from the parser: transaction control, proxy commands, a few read-only
//! forms sqlparser cannot parse, and writes known by their first word.
//!
//! Transaction control is recognized here because sqlparser rejects or
//! misreads several valid forms and because the routing of everything after
//! it depends on getting it right. Proxy commands are recognized here because
//! their intent depends on literal values, which the cache ignores. Each
//! grammar is matched strictly and only as the sole statement of the text;
//! anything else falls through to the parser, which sends it to the primary.

use std::iter::{Filter, Peekable};

use super::{Intent, ProxyCommand};
use crate::route::fingerprint::{Lexer, Token, TokenKind, unquote_literal};

/// The intent of `sql` if it is one of the statements recognized here.
pub(super) fn quick_intent(sql: &str) -> Option<Intent> {
    // Most statements are decided or rejected on their first word, without
    // the cursor.
    match Lexer::new(sql).find(|t| !is_trivia(t)) {
        None => return Some(Intent::Read),
        Some(t) if t.kind == TokenKind::Word && is_one_of(WRITE_WORDS, t.text) => {
            return Some(Intent::Write);
        }
        Some(t) if t.kind == TokenKind::Word && !is_one_of(LEADING_WORDS, t.text) => {
            return None;
        }
        Some(_) => {}
    }
    let mut s = Statement::new(sql);
    if s.finished() {
        return Some(Intent::Read);
    }
    if s.keyword("begin") {
        let _ = s.keyword("work") || s.keyword("transaction");
        return s.modes().map(|m| Intent::Begin {
            read_only: m.read_only(),
        });
    }
    if s.keyword("start") {
        if !s.keyword("transaction") {
            return None;
        }
        return s.modes().map(|m| Intent::Begin {
            read_only: m.read_only(),
        });
    }
    if s.keyword("commit") || s.keyword("end") || s.keyword("rollback") || s.keyword("abort") {
        let _ = s.keyword("work") || s.keyword("transaction");
        let no_chain = !s.keyword("and") || (s.keyword("no") && s.keyword("chain"));
        return (no_chain && s.finished()).then_some(Intent::End);
    }
    if s.keyword("set") {
        if s.keyword("transaction") {
            return s
                .modes()
                .filter(AccessModes::read_only)
                .map(|_| Intent::SetTransactionReadOnly);
        }
        let name = s.tidepool_name()?;
        if !(s.symbol(b'=') || s.keyword("to")) {
            return None;
        }
        let command = match s.value()? {
            Value::Default => ProxyCommand::Reset { name },
            Value::Text(value) => ProxyCommand::Set { name, value },
        };
        return Some(Intent::Proxy(command));
    }
    if s.keyword("reset") {
        let name = s.tidepool_name()?;
        return s
            .finished()
            .then_some(Intent::Proxy(ProxyCommand::Reset { name }));
    }
    if s.keyword("show") {
        let name = s.tidepool_name()?;
        return s
            .finished()
            .then_some(Intent::Proxy(ProxyCommand::Show { name }));
    }
    if s.keyword("table") {
        return (s.table_name() && s.finished()).then_some(Intent::Read);
    }
    None
}

/// The first words of the statements handled here.
const LEADING_WORDS: &[&str] = &[
    "begin", "start", "commit", "end", "rollback", "abort", "set", "reset", "show", "table",
];

/// First words of statements that are writes whatever follows, and of texts
/// that run one first: the parser could only say so, after costing the
/// proxy's thread 0.2–2 µs a byte, which a batch `INSERT` of a few hundred
/// rows made milliseconds, for every batch of a new size. (`COPY` is not
/// here: `COPY (SELECT …) TO STDOUT` reads.)
const WRITE_WORDS: &[&str] = &[
    "insert", "update", "delete", "merge", "create", "alter", "drop", "truncate", "grant",
    "revoke", "comment", "lock", "vacuum", "analyze", "cluster", "reindex", "refresh", "call",
];

fn is_one_of(words: &[&str], word: &str) -> bool {
    words.iter().any(|w| word.eq_ignore_ascii_case(w))
}

#[derive(Default)]
struct AccessModes {
    read_only: bool,
    read_write: bool,
}

impl AccessModes {
    /// PostgreSQL lets the last access mode win, so `READ ONLY` only counts
    /// when no `READ WRITE` could override it.
    fn read_only(&self) -> bool {
        self.read_only && !self.read_write
    }
}

enum Value {
    Default,
    Text(String),
}

type Significant<'a> = Filter<Lexer<'a>, fn(&Token<'a>) -> bool>;

/// Cursor over the tokens of a statement, whitespace and comments skipped.
struct Statement<'a> {
    sql: &'a str,
    tokens: Peekable<Significant<'a>>,
}

impl<'a> Statement<'a> {
    fn new(sql: &'a str) -> Self {
        let significant: fn(&Token<'a>) -> bool = |t| !is_trivia(t);
        Statement {
            sql,
            tokens: Lexer::new(sql).filter(significant).peekable(),
        }
    }

    /// Consumes the next token if it is the keyword `word` (lower case).
    fn keyword(&mut self, word: &str) -> bool {
        self.tokens
            .next_if(|t| t.kind == TokenKind::Word && t.text.eq_ignore_ascii_case(word))
            .is_some()
    }

    fn symbol(&mut self, symbol: u8) -> bool {
        self.tokens
            .next_if(|t| t.kind == TokenKind::Symbol && t.text.as_bytes() == [symbol])
            .is_some()
    }

    fn at_statement_end(&mut self) -> bool {
        self.tokens.peek().is_none_or(is_semicolon)
    }

    /// True when only semicolons remain, i.e. this was the only statement.
    fn finished(&mut self) -> bool {
        while self.symbol(b';') {}
        self.tokens.peek().is_none()
    }

    /// `[ISOLATION LEVEL ...] [READ ONLY | READ WRITE] [[NOT] DEFERRABLE]`,
    /// in any order, optionally comma-separated, up to the end.
    fn modes(&mut self) -> Option<AccessModes> {
        let mut modes = AccessModes::default();
        let mut first = true;
        while !self.at_statement_end() {
            if !first {
                self.symbol(b',');
            }
            first = false;
            if self.keyword("isolation") {
                if !(self.keyword("level") && self.isolation_level()) {
                    return None;
                }
            } else if self.keyword("read") {
                if self.keyword("only") {
                    modes.read_only = true;
                } else if self.keyword("write") {
                    modes.read_write = true;
                } else {
                    return None;
                }
            } else {
                let _ = self.keyword("not");
                if !self.keyword("deferrable") {
                    return None;
                }
            }
        }
        self.finished().then_some(modes)
    }

    fn isolation_level(&mut self) -> bool {
        self.keyword("serializable")
            || (self.keyword("repeatable") && self.keyword("read"))
            || (self.keyword("read") && (self.keyword("committed") || self.keyword("uncommitted")))
    }

    /// `tidepool.<name>`, returning the name as PostgreSQL folds it.
    fn tidepool_name(&mut self) -> Option<String> {
        if !(self.keyword("tidepool") && self.symbol(b'.')) {
            return None;
        }
        self.tokens
            .next_if(|t| t.kind == TokenKind::Word)
            .map(|t| t.text.to_ascii_lowercase())
    }

    /// The rest of the statement as a setting value: an unquoted word is
    /// folded to lower case and a plain string constant unquoted, as the
    /// server would; anything longer is passed on verbatim for the proxy to
    /// validate.
    fn value(&mut self) -> Option<Value> {
        let first = self.tokens.next_if(|t| !is_semicolon(t))?;
        let mut last = first;
        while let Some(t) = self.tokens.next_if(|t| !is_semicolon(t)) {
            last = t;
        }
        // An unterminated string: the server rejects the statement, so it
        // is no proxy command.
        if !self.finished() || last.kind == TokenKind::Unterminated {
            return None;
        }
        if first.start != last.start {
            return Some(Value::Text(
                self.sql[first.start..last.start + last.text.len()].to_owned(),
            ));
        }
        let value = match first.kind {
            TokenKind::Word if first.text.eq_ignore_ascii_case("default") => {
                return Some(Value::Default);
            }
            TokenKind::Word => first.text.to_ascii_lowercase(),
            TokenKind::String if first.text.starts_with('\'') => unquote_literal(first.text)?,
            _ => first.text.to_owned(),
        };
        Some(Value::Text(value))
    }

    /// `[ONLY] name[.name...] [*]`
    fn table_name(&mut self) -> bool {
        let _ = self.keyword("only");
        loop {
            if self
                .tokens
                .next_if(|t| matches!(t.kind, TokenKind::Word | TokenKind::QuotedIdent))
                .is_none()
            {
                return false;
            }
            if !self.symbol(b'.') {
                break;
            }
        }
        let _ = self.symbol(b'*');
        true
    }
}

fn is_trivia(token: &Token) -> bool {
    token.kind == TokenKind::Comment
}

fn is_semicolon(token: &Token) -> bool {
    token.kind == TokenKind::Symbol && token.text == ";"
}
