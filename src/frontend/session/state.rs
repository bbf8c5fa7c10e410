//! Session state that must follow a client from one pooled server connection
//! to the next: parameters it SET, and the statements whose state cannot
//! move at all (which pin the client to its server connection).
//!
//! Only what a client's simple-protocol statement says plainly is tracked;
//! anything that touches session state in a way this cannot follow pins.

use std::collections::BTreeMap;

/// Parameter name → value as SQL text (`'UTC'`, `5s`, `public, app`), what a
/// client has SET beyond the server's defaults.
pub type Params = BTreeMap<String, String>;

/// A statement's effect on session parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamChange {
    Set {
        name: String,
        value: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    /// DISCARD ALL: parameters, prepared statements, everything.
    DiscardAll,
    /// DEALLOCATE ALL: every prepared statement.
    DeallocateAll,
    /// DEALLOCATE name: one prepared statement.
    Deallocate {
        name: String,
    },
}

/// Why a client is held on one server connection for the rest of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    Listen,
    AdvisoryLock,
    TempObject,
    HoldCursor,
    SessionAuthorization,
    Load,
    SqlPrepare,
    /// A SET this module cannot follow (extended protocol, several statements).
    UntrackedSet,
}

impl PinReason {
    pub const ALL: [PinReason; 8] = [
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::TempObject,
        PinReason::HoldCursor,
        PinReason::SessionAuthorization,
        PinReason::Load,
        PinReason::SqlPrepare,
        PinReason::UntrackedSet,
    ];

    /// Position in `ALL`, for tables indexed by reason.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::TempObject => "temp_object",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::SessionAuthorization => "session_authorization",
            PinReason::Load => "load",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::UntrackedSet => "untracked_set",
        }
    }
}

/// Lower-cased words of `sql` up to the first `;`, skipping leading comments.
fn words(sql: &str, max: usize) -> Vec<String> {
    skip_comments(sql)
        .split(|c: char| c.is_whitespace() || c == ';' || c == '=' || c == '(')
        .filter(|w| !w.is_empty())
        .take(max)
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether `sql` holds more than one statement (a `;` with more after it,
/// outside quotes). Cheap and conservative: used only on SET-like text.
fn is_multi_statement(sql: &str) -> bool {
    let mut in_quote = None;
    for (i, c) in sql.char_indices() {
        match (in_quote, c) {
            (None, '\'' | '"') => in_quote = Some(c),
            (Some(q), c) if c == q => in_quote = None,
            (None, ';') => return !sql[i + 1..].trim().is_empty(),
            _ => {}
        }
    }
    false
}

/// The statement's first keyword, without allocating: most statements are
/// ruled out by it alone, on the hot path.
fn first_word(sql: &str) -> &str {
    let rest = skip_comments(sql);
    let end = rest
        .bytes()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    &rest[..end]
}

/// A statement with its first keyword found once: the checks below each
/// start from it, and a simple query gets all of them (finding it once per
/// check cost 0.6K of tidepool's 80.6K instructions per TPC-B transaction).
#[derive(Clone, Copy)]
pub struct Head<'a> {
    sql: &'a str,
    word: &'a str,
}

impl<'a> Head<'a> {
    pub fn of(sql: &'a str) -> Head<'a> {
        Head {
            sql,
            word: first_word(sql),
        }
    }

    fn is(&self, candidates: &[&str]) -> bool {
        candidates.iter().any(|c| self.word.eq_ignore_ascii_case(c))
    }

    /// COPY puts the server in copy mode until the data has passed: nothing
    /// may be pipelined behind it.
    pub fn starts_copy(&self) -> bool {
        self.is(&["copy"])
    }

    /// The session-parameter effect of a simple-protocol statement, if any.
    /// `Err` when it changes session state in a way that cannot be followed.
    pub fn param_change(&self) -> Result<Option<ParamChange>, PinReason> {
        if !self.is(&["set", "reset", "discard", "deallocate"]) {
            return Ok(None);
        }
        param_change_of(self.sql)
    }

    /// Why a statement must keep the client on its server connection, if it must.
    pub fn pin_reason(&self) -> Option<PinReason> {
        let sql = self.sql;
        if !self.is(&["listen", "load", "prepare", "declare", "create"]) {
            return takes_session_advisory_lock(sql).then_some(PinReason::AdvisoryLock);
        }
        pin_reason_of(sql)
    }
}

/// `Head::starts_copy`, for a statement nothing else is checked of.
pub fn starts_copy(sql: &str) -> bool {
    Head::of(sql).starts_copy()
}

/// `param_change` of a statement whose first word may change parameters.
fn param_change_of(sql: &str) -> Result<Option<ParamChange>, PinReason> {
    let w = words(sql, 4);
    let first = w.first().map(String::as_str).unwrap_or("");
    if !matches!(first, "set" | "reset" | "discard" | "deallocate") {
        return Ok(None);
    }
    if is_multi_statement(sql) {
        return Err(PinReason::UntrackedSet);
    }
    let word = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    Ok(match first {
        "discard" if word(1) == "all" => Some(ParamChange::DiscardAll),
        "discard" => None,
        "deallocate" => {
            let name = if word(1) == "prepare" {
                word(2)
            } else {
                word(1)
            };
            match name {
                "all" => Some(ParamChange::DeallocateAll),
                "" => None,
                _ => Some(ParamChange::Deallocate {
                    name: unquote_ident(statement_body(sql, name)),
                }),
            }
        }
        "reset" => match word(1) {
            "all" => Some(ParamChange::ResetAll),
            "session" if word(2) == "authorization" => return Err(PinReason::SessionAuthorization),
            "time" if word(2) == "zone" => Some(ParamChange::Reset {
                name: "timezone".into(),
            }),
            "" => None,
            name => Some(ParamChange::Reset {
                name: normalize_name(name),
            }),
        },
        _ => set_change(sql, &w)?,
    })
}

/// SET [SESSION | LOCAL] name {= | TO} value, and PostgreSQL's special forms.
fn set_change(sql: &str, w: &[String]) -> Result<Option<ParamChange>, PinReason> {
    let mut i = 1;
    match w.get(1).map(String::as_str) {
        Some("local") => return Ok(None),
        Some("session") => match w.get(2).map(String::as_str) {
            Some("authorization") => return Err(PinReason::SessionAuthorization),
            Some("characteristics") => return Err(PinReason::UntrackedSet),
            _ => i = 2,
        },
        Some("transaction") => return Ok(None),
        _ => {}
    }
    let word = w.get(i).map(String::as_str).unwrap_or("");
    let (name, value) = match word {
        "time" if w.get(i + 1).map(String::as_str) == Some("zone") => {
            ("timezone".to_owned(), after_words(sql, i + 2))
        }
        "names" => ("client_encoding".to_owned(), after_words(sql, i + 1)),
        "schema" => ("search_path".to_owned(), after_words(sql, i + 1)),
        "role" => ("role".to_owned(), after_words(sql, i + 1)),
        "" => return Ok(None),
        _ => {
            let rest = after_words(sql, i);
            let rest = rest.trim_start();
            let (raw_name, value) = split_name(rest).ok_or(PinReason::UntrackedSet)?;
            (normalize_name(raw_name), value.to_owned())
        }
    };
    let value = value.trim().trim_end_matches(';').trim().to_owned();
    if value.is_empty() {
        return Err(PinReason::UntrackedSet);
    }
    Ok(Some(if value.eq_ignore_ascii_case("default") {
        ParamChange::Reset { name }
    } else {
        ParamChange::Set { name, value }
    }))
}

/// Splits `name = value` / `name TO value`.
fn split_name(rest: &str) -> Option<(&str, &str)> {
    let end = rest.find(|c: char| c.is_whitespace() || c == '=')?;
    let (name, after) = rest.split_at(end);
    let after = after.trim_start();
    let value = if let Some(v) = after.strip_prefix('=') {
        v
    } else if after
        .as_bytes()
        .get(..2)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"to"))
    {
        // Compared as bytes: `after` may start with a multi-byte character,
        // and slicing it as a str at byte 2 would panic.
        &after[2..]
    } else {
        return None;
    };
    Some((name, value))
}

/// The text of `sql` after its first `n` whitespace-separated words.
fn after_words(sql: &str, n: usize) -> String {
    let mut rest = skip_comments(sql);
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest = &rest[end..];
    }
    rest.to_owned()
}

fn skip_comments(sql: &str) -> &str {
    // Most statements start with their keyword: nothing to skip.
    if sql.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
        return sql;
    }
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            return rest;
        }
    }
}

/// The original-case text of the word that lowercases to `word`.
fn statement_body<'a>(sql: &'a str, word: &'a str) -> &'a str {
    skip_comments(sql)
        .split(|c: char| c.is_whitespace() || c == ';')
        .find(|w| w.eq_ignore_ascii_case(word))
        .unwrap_or(word)
}

fn unquote_ident(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    }
}

fn normalize_name(name: &str) -> String {
    unquote_ident(name).to_ascii_lowercase()
}

/// `pin_reason` of a statement whose first word may pin.
fn pin_reason_of(sql: &str) -> Option<PinReason> {
    let w = words(sql, 4);
    let word = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    let reason = match word(0) {
        "listen" => Some(PinReason::Listen),
        "load" => Some(PinReason::Load),
        "prepare" if word(1) != "transaction" => Some(PinReason::SqlPrepare),
        "declare" => contains_words(sql, "with hold").then_some(PinReason::HoldCursor),
        "create" => {
            let temp = |s: &str| matches!(s, "temp" | "temporary");
            let temporary = temp(word(1))
                || (matches!(word(1), "local" | "global") && temp(word(2)))
                || (word(1) == "or" && word(2) == "replace" && temp(word(3)));
            (temporary || names_temp_schema(sql)).then_some(PinReason::TempObject)
        }
        _ => None,
    };
    reason.or_else(|| takes_session_advisory_lock(sql).then_some(PinReason::AdvisoryLock))
}

/// `CREATE TABLE pg_temp.t`, `CREATE TYPE pg_temp.mood`, `CREATE FUNCTION
/// pg_temp.f()`: an object created in the session's temporary schema is as
/// temporary as one made with `TEMP`, for every kind of object.
fn names_temp_schema(sql: &str) -> bool {
    use crate::route::fingerprint::{Lexer, TokenKind};
    let mut tokens = Lexer::new(sql).filter(|t| t.kind != TokenKind::Comment);
    let mut schema = false;
    tokens.any(|t| {
        let dot = schema && t.kind == TokenKind::Symbol && t.text == ".";
        schema = match t.kind {
            TokenKind::Word => t.text.eq_ignore_ascii_case("pg_temp"),
            TokenKind::QuotedIdent => t.text == "\"pg_temp\"",
            _ => false,
        };
        dot
    })
}

fn contains_words(sql: &str, phrase: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let normalized: String = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    normalized.contains(phrase)
}

/// `pg_advisory_lock*` and `pg_try_advisory_lock*` hold until unlocked or the
/// session ends. The `_xact_` variants (`advisory_xact_lock`) end with the
/// transaction and do not match, nor does `advisory_unlock`.
fn takes_session_advisory_lock(sql: &str) -> bool {
    // Every query is checked: look only around its underscores.
    let bytes = sql.as_bytes();
    memchr::memchr_iter(b'_', bytes).any(|at| {
        let before = at
            .checked_sub(b"advisory".len())
            .map(|from| &bytes[from..at]);
        let after = bytes.get(at + 1..at + 1 + b"lock".len());
        before.is_some_and(|w| w.eq_ignore_ascii_case(b"advisory"))
            && after.is_some_and(|w| w.eq_ignore_ascii_case(b"lock"))
    })
}

/// SQL that makes a server connection's parameters match `wanted`, given
/// what it has now, or `None` when they already match.
pub fn sync_sql(wanted: &Params, applied: &Params) -> Option<String> {
    let mut sql = String::new();
    for (name, value) in wanted {
        if applied.get(name) != Some(value) {
            sql.push_str(&format!("SET {} = {value};", quote_ident(name)));
        }
    }
    for name in applied.keys() {
        if !wanted.contains_key(name) {
            sql.push_str(&format!("RESET {};", quote_ident(name)));
        }
    }
    (!sql.is_empty()).then_some(sql)
}

fn quote_ident(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Parameters a client asked for in its StartupMessage, as SQL values.
/// `options` may carry `-c name=value` / `--name=value` pairs.
pub fn startup_params(params: &[(String, String)]) -> Params {
    let mut out = Params::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = value.split_whitespace();
                while let Some(word) = words.next() {
                    let pair = match word {
                        "-c" => words.next(),
                        w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")),
                    };
                    if let Some((k, v)) = pair.and_then(|p| p.split_once('=')) {
                        out.insert(k.to_ascii_lowercase().replace('-', "_"), quote_literal(v));
                    }
                }
            }
            _ if name.starts_with("_pq_.") => {}
            _ => {
                out.insert(name.to_ascii_lowercase(), quote_literal(value));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_change(sql: &str) -> Result<Option<ParamChange>, PinReason> {
        Head::of(sql).param_change()
    }

    fn pin_reason(sql: &str) -> Option<PinReason> {
        Head::of(sql).pin_reason()
    }

    fn set(name: &str, value: &str) -> Option<ParamChange> {
        Some(ParamChange::Set {
            name: name.into(),
            value: value.into(),
        })
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            param_change("SET search_path = app, public").unwrap(),
            set("search_path", "app, public")
        );
        assert_eq!(
            param_change("set TimeZone to 'UTC';").unwrap(),
            set("timezone", "'UTC'")
        );
        assert_eq!(
            param_change("SET SESSION statement_timeout = '5s'").unwrap(),
            set("statement_timeout", "'5s'")
        );
        assert_eq!(
            param_change("set time zone 'Europe/Paris'").unwrap(),
            set("timezone", "'Europe/Paris'")
        );
        assert_eq!(
            param_change("SET NAMES 'LATIN1'").unwrap(),
            set("client_encoding", "'LATIN1'")
        );
        assert_eq!(
            param_change("set schema 'app'").unwrap(),
            set("search_path", "'app'")
        );
        assert_eq!(
            param_change("set my.custom=42").unwrap(),
            set("my.custom", "42")
        );
        assert_eq!(
            param_change("set work_mem to default").unwrap(),
            Some(ParamChange::Reset {
                name: "work_mem".into()
            })
        );
        assert_eq!(param_change("SET LOCAL work_mem = '1MB'").unwrap(), None);
        assert_eq!(param_change("set transaction read only").unwrap(), None);
        assert_eq!(param_change("select 1").unwrap(), None);
        assert_eq!(
            param_change("set session authorization bob"),
            Err(PinReason::SessionAuthorization)
        );
        assert_eq!(
            param_change("set a = 1; set b = 2"),
            Err(PinReason::UntrackedSet)
        );
        assert_eq!(param_change("set a = 'x;y'").unwrap(), set("a", "'x;y'"));
        assert_eq!(param_change("set a €"), Err(PinReason::UntrackedSet));
    }

    #[test]
    fn reset_discard_deallocate() {
        assert_eq!(
            param_change("RESET ALL").unwrap(),
            Some(ParamChange::ResetAll)
        );
        assert_eq!(
            param_change("reset search_path").unwrap(),
            Some(ParamChange::Reset {
                name: "search_path".into()
            })
        );
        assert_eq!(
            param_change("discard all").unwrap(),
            Some(ParamChange::DiscardAll)
        );
        assert_eq!(
            param_change("DEALLOCATE ALL").unwrap(),
            Some(ParamChange::DeallocateAll)
        );
        assert_eq!(
            param_change("deallocate prepare S_1").unwrap(),
            Some(ParamChange::Deallocate { name: "s_1".into() })
        );
        assert_eq!(
            param_change("deallocate \"S_1\"").unwrap(),
            Some(ParamChange::Deallocate { name: "S_1".into() })
        );
    }

    #[test]
    fn pins() {
        assert_eq!(pin_reason("LISTEN chan"), Some(PinReason::Listen));
        assert_eq!(
            pin_reason("create temp table t (x int)"),
            Some(PinReason::TempObject)
        );
        assert_eq!(
            pin_reason("CREATE LOCAL TEMPORARY TABLE t (x int)"),
            Some(PinReason::TempObject)
        );
        assert_eq!(
            pin_reason("create or replace temp view v as select 1"),
            Some(PinReason::TempObject)
        );
        assert_eq!(pin_reason("create table t (x int)"), None);
        for sql in [
            "CREATE TYPE pg_temp.mood AS ENUM ('sad', 'ok')",
            "create domain PG_TEMP.session_id as bytea",
            "create table \"pg_temp\" . foo (id int)",
            "create function pg_temp.f() returns int language sql as 'select 1'",
        ] {
            assert_eq!(pin_reason(sql), Some(PinReason::TempObject), "{sql}");
        }
        for sql in [
            "create table pg_temporary.t (x int)",
            "create table t (x text default 'pg_temp.x')",
            "create table \"PG_TEMP\".t (x int)",
        ] {
            assert_eq!(pin_reason(sql), None, "{sql}");
        }
        assert_eq!(
            pin_reason("declare c cursor with hold for select 1"),
            Some(PinReason::HoldCursor)
        );
        assert_eq!(pin_reason("declare c cursor for select 1"), None);
        assert_eq!(
            pin_reason("select pg_advisory_lock(1)"),
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(
            pin_reason("select pg_try_advisory_lock_shared(1)"),
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(pin_reason("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(pin_reason("select pg_advisory_unlock(1)"), None);
        assert_eq!(
            pin_reason("SELECT PG_ADVISORY_LOCK(1)"),
            Some(PinReason::AdvisoryLock)
        );
        for sql in ["select _lock", "select x_lock", "advisory_", "_"] {
            assert_eq!(pin_reason(sql), None, "{sql}");
        }
        assert_eq!(pin_reason("advisory_lock"), Some(PinReason::AdvisoryLock));
        assert_eq!(
            pin_reason("prepare p as select 1"),
            Some(PinReason::SqlPrepare)
        );
        assert_eq!(pin_reason("prepare transaction 'x'"), None);
        assert_eq!(pin_reason("load 'auto_explain'"), Some(PinReason::Load));
        assert_eq!(pin_reason("/* hi */ listen x"), Some(PinReason::Listen));
    }

    #[test]
    fn pin_reason_table_matches_indexes() {
        for (i, reason) in PinReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
    }

    #[test]
    fn sync_sets_and_resets_the_difference() {
        let mut wanted = Params::new();
        wanted.insert("timezone".into(), "'UTC'".into());
        wanted.insert("search_path".into(), "app".into());
        let mut applied = Params::new();
        applied.insert("search_path".into(), "app".into());
        applied.insert("work_mem".into(), "'8MB'".into());
        assert_eq!(
            sync_sql(&wanted, &applied).unwrap(),
            "SET timezone = 'UTC';RESET work_mem;"
        );
        assert_eq!(sync_sql(&wanted, &wanted), None);
    }

    #[test]
    fn startup_options() {
        let params = startup_params(&[
            ("user".into(), "app".into()),
            ("application_name".into(), "psql".into()),
            (
                "options".into(),
                "-c search_path=app --statement-timeout=5s -cwork_mem=4MB".into(),
            ),
        ]);
        assert_eq!(params.get("application_name").unwrap(), "'psql'");
        assert_eq!(params.get("search_path").unwrap(), "'app'");
        assert_eq!(params.get("statement_timeout").unwrap(), "'5s'");
        assert_eq!(params.get("work_mem").unwrap(), "'4MB'");
        assert!(!params.contains_key("user"));
    }
}
