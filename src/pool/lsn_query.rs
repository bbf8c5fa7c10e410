//! The two WAL positions the proxy asks servers for: the commit LSN after
//! every write, and how far a replica has replayed before a read that must
//! be fresh. They run on most units of work, so neither is a simple query,
//! which the server parses and plans every time at about the cost of a
//! client's short statement (pgbench on a replica here: 81 µs a round trip
//! as a simple query, 42 µs prepared).

use std::sync::LazyLock;

use crate::protocol::Frame;
use crate::protocol::{backend, frontend as fe};
use crate::topology::Lsn;

/// A statement a server connection prepares once and afterwards only binds
/// and executes.
pub struct LsnQuery {
    /// Under the proxy's `_tp_` prefix, which client statements never get
    /// on a server (theirs are `_tp_` and a 32-digit hash).
    pub name: &'static [u8],
    pub close: Frame,
    pub parse: Frame,
    /// Bind (text result) and Execute of the unnamed portal, then Sync.
    pub run: [Frame; 3],
}

impl LsnQuery {
    fn new(name: &'static [u8], sql: &str) -> LsnQuery {
        LsnQuery {
            name,
            close: fe::Named::encode(fe::CLOSE, fe::Target::Statement, name),
            parse: fe::parse(name, sql),
            run: [fe::bind_no_params(name), fe::execute_all(), fe::sync()],
        }
    }
}

/// Where WAL has been written: a COMMIT that waited for its WAL is before
/// it, and other sessions' records not yet written are not (a replica can
/// reach it at once). With `synchronous_commit = off` the COMMIT returns
/// before its WAL is written, so where WAL has been inserted instead; the
/// setting is read after the COMMIT, so a `SET LOCAL` of it inside the
/// transaction is not seen.
pub static COMMIT_LSN: LazyLock<LsnQuery> = LazyLock::new(|| {
    LsnQuery::new(
        b"_tp_commit_lsn",
        "select case current_setting('synchronous_commit') \
         when 'off' then pg_current_wal_insert_lsn() else pg_current_wal_lsn() end",
    )
});

/// `pg_last_wal_replay_lsn()`, whose OID is fixed in PostgreSQL's catalog
/// (`pg_proc.dat`) since the function got its name in PostgreSQL 10.
const PG_LAST_WAL_REPLAY_LSN: u32 = 3821;

/// How far a replica has replayed, asked as a FunctionCall: one message,
/// nothing to prepare, and no portal or executor on the server. Called
/// directly, this cost a replica's backend 31 µs of CPU a round trip
/// against 35–39 µs for the prepared statement's Bind/Execute/Sync
/// (libpq's `PQfn` against `PQexecPrepared` here).
pub static REPLAY_LSN: LazyLock<Frame> =
    LazyLock::new(|| fe::function_call_no_args(PG_LAST_WAL_REPLAY_LSN));

/// The LSN an answer to either question carries (a one-column DataRow, or
/// a FunctionCallResponse), `None` when it is NULL or not an LSN.
pub fn lsn_value(frame: &Frame) -> Option<Lsn> {
    let text = match frame.tag() {
        backend::FUNCTION_CALL_RESPONSE => backend::function_result_text(frame),
        _ => backend::single_text_value(frame),
    };
    text?.parse().ok()
}
