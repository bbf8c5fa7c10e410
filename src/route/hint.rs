//! Per-statement routing hints written as a leading SQL comment.
//!
//! A comment is the one annotation every driver and ORM passes through to
//! the server untouched, so it lets an application pin a single statement
//! without a proxy-specific API: `/* tidepool: primary */ SELECT ...` for a
//! read that must see its own writes, `/* tidepool: replica */ SELECT
//! my_cached_fn()` for a call the classifier cannot prove read-only.

use crate::route::fingerprint::{Lexer, TokenKind};

/// Where a hinted statement must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Run on the primary even if the statement looks read-only.
    Primary,
    /// Run on a replica even if the statement is not provably read-only;
    /// if it does write, the replica rejects it.
    Replica,
}

/// The hint in the comments before the statement's first token, if any.
///
/// Any block comment ahead of the statement may carry it, so tools that
/// prepend their own comments do not hide it; the first hint wins. Only the
/// leading comments count: a hint further in could be part of a string the
/// application builds from user input. Spelling is case-insensitive and
/// whitespace-tolerant (`/*TidePool:REPLICA*/`); a comment that names
/// tidepool with an unknown target is not a hint.
pub fn leading_hint(sql: &str) -> Option<Hint> {
    Lexer::new(sql)
        .take_while(|token| token.kind == TokenKind::Comment)
        .find_map(|comment| parse_hint(comment.text))
}

fn parse_hint(comment: &str) -> Option<Hint> {
    let body = comment.strip_prefix("/*")?.strip_suffix("*/")?;
    let (key, target) = body.split_once(':')?;
    if !key.trim().eq_ignore_ascii_case("tidepool") {
        return None;
    }
    let target = target.trim();
    if target.eq_ignore_ascii_case("primary") {
        Some(Hint::Primary)
    } else if target.eq_ignore_ascii_case("replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_hints() {
        let cases = [
            (
                "/* tidepool: replica */ insert into t values (1)",
                Some(Hint::Replica),
            ),
            ("  /*tidepool:primary*/ select 1", Some(Hint::Primary)),
            ("/* TidePool :  PRIMARY */select 1", Some(Hint::Primary)),
            (
                "\n/* app=web */ -- x\n/* tidepool: replica */ /* more */ select 1",
                Some(Hint::Replica),
            ),
            ("/* tidepool: primary */", Some(Hint::Primary)),
            ("select /* tidepool: replica */ 1", None),
            ("-- tidepool: replica\nselect 1", None),
            ("/* tidepool: elsewhere */ select 1", None),
            ("/* tidepool: replica select 1", None),
            ("/* not tidepool: replica */ select 1", None),
            ("", None),
        ];
        for (sql, hint) in cases {
            assert_eq!(leading_hint(sql), hint, "{sql:?}");
        }
    }
}
