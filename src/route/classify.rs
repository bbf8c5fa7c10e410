//! What a statement needs from the cluster: a replica, the primary, or the
//! proxy itself.
//!
//! Classification fails closed: whatever is not recognized as read-only,
//! including everything sqlparser cannot parse, goes to the primary. A read
//! sent to the primary only costs load; a write sent to a replica fails.
//!
//! Verdicts of the parser are cached by [`fingerprint`] because parsing
//! costs more than the rest of the proxy's per-query work. That is sound
//! because the parser-based verdict never looks at the values of constants;
//! the statements whose intent does depend on them (proxy commands) or that
//! sqlparser mishandles (transaction control) are recognized before the
//! cache by a keyword pre-check.

use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use lru::LruCache;
use sqlparser::ast::{
    CopyTarget, Expr, ObjectName, Query, Select, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::route::fingerprint::fingerprint;

mod precheck;
#[cfg(test)]
mod tests;

/// What a statement needs from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Read-only: any replica fresh enough may serve it.
    Read,
    /// Must run on the primary: writes, side effects, DDL, session state,
    /// anything unknown or unparsable.
    Write,
    /// `BEGIN` / `START TRANSACTION`, read-only when it says `READ ONLY`.
    Begin { read_only: bool },
    /// `SET TRANSACTION ... READ ONLY` inside a transaction.
    SetTransactionReadOnly,
    /// `COMMIT` / `END` / `ROLLBACK` / `ABORT` (not `ROLLBACK TO SAVEPOINT`,
    /// `COMMIT AND CHAIN` or the two-phase forms, which are [`Intent::Write`]).
    End,
    /// A command for the proxy itself, never forwarded.
    Proxy(ProxyCommand),
}

/// `SET` / `RESET` / `SHOW` of a `tidepool.<name>` setting, recognized only
/// as the sole statement of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyCommand {
    /// `SET tidepool.<name> = <value>` or `TO <value>`. The value is
    /// unquoted or case-folded as PostgreSQL would; the proxy validates it.
    Set { name: String, value: String },
    /// `RESET tidepool.<name>` or `SET tidepool.<name> TO DEFAULT`.
    Reset { name: String },
    /// `SHOW tidepool.<name>`.
    Show { name: String },
}

/// What the classifier did, for metrics: a low hit rate means the
/// application sends many distinct statement shapes and the cache is too
/// small; statements left unparsed mean reads that could have gone to a
/// replica went to the primary for their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassifyStats {
    pub hits: u64,
    pub misses: u64,
    /// Longer than the limit: sent to the primary without a parse.
    pub too_long: u64,
}

/// Classifies statements, caching the parser's verdicts per statement shape.
pub struct Classifier {
    /// `None` when built with capacity 0, which disables caching.
    cache: Option<Mutex<LruCache<u64, Access>>>,
    /// Longer statements go to the primary unparsed (see [`Classifier::new`]).
    max_parsed: usize,
    extra_write_functions: Vec<String>,
    hits: AtomicU64,
    misses: AtomicU64,
    too_long: AtomicU64,
}

impl Classifier {
    /// `extra_write_functions` names site-specific functions with side
    /// effects, matched like the built-in list: case-insensitively on the
    /// last dotted component, whatever the schema.
    ///
    /// Statements longer than `max_parsed` bytes are not parsed: sqlparser
    /// takes 0.2–2 µs a byte in a release build (27 KB of `select 1;` held
    /// the proxy's thread for 48 ms, 64 KB of `1+1+…` for 55 ms), and every
    /// session that thread serves waits meanwhile. Failing closed costs such a statement a
    /// replica, nothing else.
    pub fn new(
        cache_capacity: usize,
        max_parsed: usize,
        extra_write_functions: &[String],
    ) -> Classifier {
        Classifier {
            cache: NonZeroUsize::new(cache_capacity).map(|cap| Mutex::new(LruCache::new(cap))),
            max_parsed,
            extra_write_functions: extra_write_functions.to_vec(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            too_long: AtomicU64::new(0),
        }
    }

    /// Safe to call from any thread; the cache lock is held only for one
    /// map lookup or insert, never while parsing.
    pub fn classify(&self, sql: &str) -> Intent {
        if let Some(intent) = precheck::quick_intent(sql) {
            return intent;
        }
        if sql.len() > self.max_parsed {
            self.too_long.fetch_add(1, Ordering::Relaxed);
            return Intent::Write;
        }
        let Some(cache) = &self.cache else {
            return parse_access(sql, &self.extra_write_functions).into();
        };
        let key = fingerprint(sql);
        let cached = lock(cache).get(&key).copied();
        if let Some(access) = cached {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return access.into();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let access = parse_access(sql, &self.extra_write_functions);
        lock(cache).put(key, access);
        access.into()
    }

    /// The intent of `sql` inside a transaction block, whose route its BEGIN
    /// (or a SET TRANSACTION READ ONLY right after it) decides: read and
    /// write go to the same connection there, and the statement's commit
    /// LSN waits for COMMIT, so only what the recognizer of transaction
    /// control and proxy commands tells matters, and the fingerprint and
    /// the cache are skipped (every statement of a transaction but its
    /// BEGIN: callgrind counted 2.6K of 77.7K instructions a pgbench TPC-B
    /// transaction for the first one after a held BEGIN).
    pub fn classify_in_transaction(&self, sql: &str) -> Intent {
        precheck::quick_intent(sql).unwrap_or(Intent::Write)
    }

    /// Hits and misses count only statements that reached the cache: proxy
    /// commands, transaction control, statements that are writes by their
    /// first word, empty and over-long ones bypass it.
    pub fn stats(&self) -> ClassifyStats {
        ClassifyStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            too_long: self.too_long.load(Ordering::Relaxed),
        }
    }
}

/// The lock is only held for a map operation that cannot leave the cache
/// inconsistent, so a panic elsewhere while holding it is no reason to stop
/// classifying.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Classification without a cache, for tests and one-off use.
pub fn classify_uncached(sql: &str, extra_write_functions: &[String]) -> Intent {
    precheck::quick_intent(sql).unwrap_or_else(|| parse_access(sql, extra_write_functions).into())
}

/// The only outcomes the cache may hold: they depend on the statement's
/// shape alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl From<Access> for Intent {
    fn from(access: Access) -> Intent {
        match access {
            Access::Read => Intent::Read,
            Access::Write => Intent::Write,
        }
    }
}

/// Stack that dropping a parsed statement may need, per byte of its text.
/// sqlparser guards its own recursion (nesting is capped, and parsing and
/// visiting move to a fresh stack when theirs runs low), but the drop of
/// the tree is the compiler's, one call per level, and a chain of operators
/// (`1+1+…`, `x::int::int…`, `a[1][1]…`) is one level per operator however
/// flat its text: a statement of 200 KB of `+1` overflowed a 2 MiB thread
/// and took the whole proxy down. A level costs 50–70 bytes of stack in a
/// release build, more in a debug one, and takes at least two bytes of text.
const DROP_STACK_PER_BYTE: usize = 128;

/// What the parse, visit and drop need besides the chain itself.
const PARSE_STACK_BASE: usize = 128 << 10;

/// Read only if every statement in the text is; transaction control and
/// proxy commands mixed with other statements make it a write, so the whole
/// text runs on the primary. Runs on a stack of its own when what is left
/// of the caller's might not hold the tree's drop (long statements only).
fn parse_access(sql: &str, extra_write_functions: &[String]) -> Access {
    let stack = PARSE_STACK_BASE + sql.len().saturating_mul(DROP_STACK_PER_BYTE);
    stacker::maybe_grow(stack, stack, || {
        parse_access_here(sql, extra_write_functions)
    })
}

fn parse_access_here(sql: &str, extra_write_functions: &[String]) -> Access {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return Access::Write;
    };
    let mut guard = ReadOnlyGuard {
        extra_write_functions,
    };
    match statements.visit(&mut guard) {
        ControlFlow::Continue(()) => Access::Read,
        ControlFlow::Break(()) => Access::Write,
    }
}

/// Walks every node of the parsed text, including nested statements,
/// subqueries and function arguments, and breaks at the first one that may
/// write or depend on session state.
struct ReadOnlyGuard<'a> {
    extra_write_functions: &'a [String],
}

fn check(read_only: bool) -> ControlFlow<()> {
    if read_only {
        ControlFlow::Continue(())
    } else {
        ControlFlow::Break(())
    }
}

impl ReadOnlyGuard<'_> {
    fn is_write_function(&self, name: &ObjectName) -> bool {
        let Some(last) = name.0.last() else {
            return true;
        };
        let Some(ident) = last.as_ident() else {
            return true;
        };
        let name = ident.value.as_str();
        WRITE_FUNCTIONS.iter().any(|f| name.eq_ignore_ascii_case(f))
            || WRITE_FUNCTION_PREFIXES.iter().any(|p| {
                name.as_bytes()
                    .get(..p.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes()))
            })
            || self.extra_write_functions.iter().any(|f| {
                let configured = f.rsplit('.').next().unwrap_or(f);
                name.eq_ignore_ascii_case(configured.trim())
            })
    }
}

impl Visitor for ReadOnlyGuard<'_> {
    type Break = ();

    /// Statements are allow-listed; nested ones matter too, e.g. the
    /// `INSERT` of a data-modifying CTE or the statement under `EXPLAIN`.
    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        check(match statement {
            Statement::Query(_) => true,
            Statement::Explain {
                analyze, options, ..
            } => {
                // `EXPLAIN (ANALYZE false)` is rare enough not to look at
                // the argument, which keeps the verdict literal-independent.
                !analyze
                    && !options.iter().flatten().any(|o| {
                        o.name.value.eq_ignore_ascii_case("analyze")
                            || o.name.value.eq_ignore_ascii_case("analyse")
                    })
            }
            Statement::Copy { to, target, .. } => *to && matches!(target, CopyTarget::Stdout),
            // `SHOW tidepool.x` is answered by the proxy only as the sole
            // statement; the proxy cannot splice its answer into the
            // results of a longer text, so that text goes to the primary.
            // Settings that tell a primary from a standby are the primary's:
            // through the proxy the database is writable, and drivers ask
            // (tokio-postgres' and older libpq's `target_session_attrs =
            // read-write` send `SHOW transaction_read_only` and refuse a
            // server that answers `on`).
            Statement::ShowVariable { variable } => variable.first().is_none_or(|v| {
                !["tidepool", "transaction_read_only", "in_hot_standby"]
                    .iter()
                    .any(|name| v.value.eq_ignore_ascii_case(name))
            }),
            _ => false,
        })
    }

    /// Row locks take the lock on the primary only; the other clauses are
    /// other dialects' syntax the PostgreSQL server would reject anyway.
    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        check(
            query.locks.is_empty()
                && query.for_clause.is_none()
                && query.settings.is_none()
                && query.format_clause.is_none()
                && query.pipe_operators.is_empty(),
        )
    }

    /// `SELECT ... INTO` creates a table.
    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        check(select.into.is_none())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) => check(!self.is_write_function(&function.name)),
            _ => ControlFlow::Continue(()),
        }
    }

    /// Set-returning functions in `FROM` are not expressions in the AST;
    /// plain table names (`args: None`) are not calls, but a few views
    /// answer only on the primary.
    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => check(!self.is_write_function(name)),
            TableFactor::Table {
                name, args: None, ..
            } => check(!is_primary_only_view(name)),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Views whose rows exist only on the primary: a replica answers them
/// empty (prepared transactions, replication senders and slots).
const PRIMARY_ONLY_VIEWS: &[&str] = &[
    "pg_prepared_xacts",
    "pg_stat_replication",
    "pg_replication_slots",
    "pg_stat_replication_slots",
];

fn is_primary_only_view(name: &ObjectName) -> bool {
    name.0
        .last()
        .and_then(|part| part.as_ident())
        .is_some_and(|ident| {
            PRIMARY_ONLY_VIEWS
                .iter()
                .any(|v| ident.value.eq_ignore_ascii_case(v))
        })
}

/// Functions that write, take locks, or read or change state that lives
/// only on the primary or only in this session, so that calling them on a
/// replica fails or answers for the wrong server. Matched on the last name
/// component, so `pg_catalog.nextval` counts too.
const WRITE_FUNCTIONS: &[&str] = &[
    // Sequences: writes, and currval/lastval read session state.
    "nextval",
    "setval",
    "currval",
    "lastval",
    // Transaction ids are assigned on the primary only.
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_export_snapshot",
    // Session state and notifications.
    "pg_notify",
    "set_config",
    "setseed",
    // Server administration: acts on the server that runs it.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_walfile_name",
    "pg_walfile_name_offset",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_promote",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_logical_emit_message",
    "pg_stat_statements_reset",
    // Large objects by descriptor.
    "loread",
    "lowrite",
];

/// Function families matched by prefix, see [`WRITE_FUNCTIONS`].
const WRITE_FUNCTION_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "lo_",
    "dblink",
    "pg_current_wal_",
    "pg_create_",
    "pg_copy_",
    "pg_replication_origin_",
    "pg_logical_slot_",
    "pg_stat_reset",
    "pg_wal_replay_",
    "pg_file_",
];
