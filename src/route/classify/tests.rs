use super::*;

fn set(name: &str, value: &str) -> Intent {
    Intent::Proxy(ProxyCommand::Set {
        name: name.into(),
        value: value.into(),
    })
}

fn proxy_name(command: fn(String) -> ProxyCommand, name: &str) -> Intent {
    Intent::Proxy(command(name.into()))
}

fn reset(name: String) -> ProxyCommand {
    ProxyCommand::Reset { name }
}

fn show(name: String) -> ProxyCommand {
    ProxyCommand::Show { name }
}

#[test]
fn classification_table() {
    use Intent::*;
    let begin = Begin { read_only: false };
    let begin_ro = Begin { read_only: true };
    let cases = [
        // Reads.
        ("select 1", Read),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            Read,
        ),
        ("with x as (select 1) select * from x", Read),
        (
            "select * from t where a in (select b from u) order by 1 limit 5",
            Read,
        ),
        ("select * from generate_series(1, 3)", Read),
        (
            "select now(), current_setting('work_mem'), pg_sleep(0)",
            Read,
        ),
        ("show work_mem", Read),
        ("show all", Read),
        // What a standby answers differently: the primary's answer.
        ("SHOW transaction_read_only", Write),
        ("show IN_HOT_STANDBY", Write),
        ("explain select 1", Read),
        ("explain (costs off) select * from t", Read),
        ("values (1)", Read),
        ("table t", Read),
        ("TABLE ONLY public.\"T\";", Read),
        ("copy t to stdout", Read),
        ("copy (select 1) to stdout", Read),
        ("select 1; select 2", Read),
        ("", Read),
        ("-- c", Read),
        ("  /* only */ ; ", Read),
        ("select $1 from t where a = $2", Read),
        (
            "select ';delete from t', $$; delete from t$$ /* ; delete from t */",
            Read,
        ),
        ("select 1 -- ; delete from t", Read),
        // Row locks, including forms sqlparser cannot parse.
        ("select * from t for update", Write),
        ("select * from t for share", Write),
        ("select * from t for no key update", Write),
        ("select * from t for key share", Write),
        ("select * from (select * from t for update) s", Write),
        ("select (select 1 from t for update skip locked)", Write),
        // Functions with side effects, anywhere in the statement.
        ("select nextval('s')", Write),
        ("select pg_catalog.nextval('s')", Write),
        ("SELECT NEXTVAL('s')", Write),
        ("select 1 where exists (select setval('s', 1))", Write),
        ("select pg_advisory_lock(1)", Write),
        ("select pg_try_advisory_xact_lock(1)", Write),
        ("select lo_import('x')", Write),
        ("select dblink_exec('x')", Write),
        ("select * from dblink('c', 'select 1') as t(a int)", Write),
        ("select * from nextval('s')", Write),
        ("select pg_notify('c','p')", Write),
        ("select set_config('a','b',false)", Write),
        ("select txid_current()", Write),
        ("select coalesce(null, currval('s'))", Write),
        ("select * from t order by nextval('s')", Write),
        ("values (nextval('s'))", Write),
        ("copy (select nextval('s')) to stdout", Write),
        ("select * into t2 from t", Write),
        // Data-modifying CTEs.
        (
            "with x as (insert into t values (1) returning *) select * from x",
            Write,
        ),
        (
            "with x as (delete from t returning *) select * from x",
            Write,
        ),
        (
            "with x as (update t set a = 1 returning *) select * from x",
            Write,
        ),
        // Writes, DDL, session state, and what sqlparser cannot parse.
        ("insert into t values (1)", Write),
        ("update t set a = 1", Write),
        ("delete from t", Write),
        (
            "merge into t using u on t.a = u.a when matched then delete",
            Write,
        ),
        ("create table t (a int)", Write),
        ("drop table t", Write),
        ("alter table t add column b int", Write),
        ("truncate t", Write),
        ("vacuum t", Write),
        ("vacuum analyze t", Write),
        ("analyze t", Write),
        ("checkpoint", Write),
        ("do $$begin end$$", Write),
        ("refresh materialized view v", Write),
        ("lock t", Write),
        ("listen c", Write),
        ("notify c", Write),
        ("copy t from stdin", Write),
        ("copy t to '/tmp/x'", Write),
        ("copy t to program 'cat'", Write),
        ("explain analyze select 1", Write),
        ("explain (analyze) select 1", Write),
        ("explain (analyze false) select 1", Write),
        ("explain insert into t values (1)", Write),
        ("explain analyze insert into t values (1)", Write),
        ("explain select nextval('s')", Write),
        ("set search_path = x", Write),
        ("reset search_path", Write),
        (
            "set session characteristics as transaction read only",
            Write,
        ),
        ("set transaction isolation level serializable", Write),
        ("set transaction read write", Write),
        ("prepare p as select 1", Write),
        ("execute p", Write),
        ("deallocate p", Write),
        ("declare c cursor for select 1", Write),
        ("fetch 10 from c", Write),
        ("call p()", Write),
        ("discard all", Write),
        ("selec 1 frm", Write),
        ("select 1; insert into t values(1)", Write),
        ("select 'unterminated", Write),
        // Transaction control.
        ("begin", begin.clone()),
        ("BEGIN;", begin.clone()),
        ("begin work", begin.clone()),
        ("start transaction", begin.clone()),
        ("begin isolation level serializable", begin.clone()),
        (
            "begin isolation level read committed, read write",
            begin.clone(),
        ),
        ("begin read only, read write", begin.clone()),
        ("begin read only", begin_ro.clone()),
        (
            "start transaction isolation level repeatable read, read only",
            begin_ro.clone(),
        ),
        ("BEGIN TRANSACTION READ ONLY", begin_ro.clone()),
        ("/* x */ begin read only not deferrable;", begin_ro.clone()),
        ("begin read", Write),
        ("begin; select 1", Write),
        ("begin; read only", Write),
        ("set transaction read only", SetTransactionReadOnly),
        (
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY;",
            SetTransactionReadOnly,
        ),
        ("commit", End),
        ("end", End),
        ("rollback", End),
        ("abort", End),
        ("COMMIT;", End),
        ("commit work and no chain", End),
        ("rollback transaction", End),
        ("rollback to savepoint a", Write),
        ("rollback to a", Write),
        ("savepoint a", Write),
        ("release savepoint a", Write),
        ("commit and chain", Write),
        ("commit prepared 'x'", Write),
        ("rollback prepared 'x'", Write),
        ("prepare transaction 'x'", Write),
        ("commit; select 1", Write),
        // Proxy commands, only as the sole statement.
        ("SET tidepool.route = primary", set("route", "primary")),
        ("set tidepool.route to 'auto'", set("route", "auto")),
        ("set TidePool.Route = Replica;", set("route", "replica")),
        ("set tidepool.note = 'it''s'", set("note", "it's")),
        ("set tidepool.max_lag = 10", set("max_lag", "10")),
        ("set tidepool.max_lag = '5 s'", set("max_lag", "5 s")),
        ("set tidepool.max_lag = 5 s", set("max_lag", "5 s")),
        ("set tidepool.route to default", proxy_name(reset, "route")),
        ("reset tidepool.route", proxy_name(reset, "route")),
        ("show tidepool.route", proxy_name(show, "route")),
        ("set tidepool.route = 'unterminated", Write),
        ("set tidepool.route", Write),
        ("set tidepool.route = primary; select 1", Write),
        ("show tidepool.route; select 1", Write),
    ];
    for (sql, expected) in cases {
        assert_eq!(classify_uncached(sql, &[]), expected, "{sql:?}");
    }
}

#[test]
fn extra_write_functions_are_configurable() {
    let extra = ["app.my_writer".to_string()];
    assert_eq!(classify_uncached("select my_writer()", &[]), Intent::Read);
    assert_eq!(
        classify_uncached("select my_writer()", &extra),
        Intent::Write
    );
    assert_eq!(
        classify_uncached("select APP.My_Writer(1)", &extra),
        Intent::Write
    );
    assert_eq!(
        classify_uncached("select * from my_writer(1)", &extra),
        Intent::Write
    );
    let classifier = Classifier::new(16, usize::MAX, &extra);
    assert_eq!(classifier.classify("select my_writer()"), Intent::Write);
    assert_eq!(classifier.classify("select my_reader()"), Intent::Read);
}

#[test]
fn cache_hits_on_statements_differing_only_in_constants() {
    let classifier = Classifier::new(64, usize::MAX, &[]);
    for aid in 1..=1000 {
        let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
        assert_eq!(classifier.classify(&sql), Intent::Read);
    }
    assert_eq!(
        classifier.stats(),
        ClassifyStats {
            hits: 999,
            misses: 1,
            too_long: 0,
        }
    );
}

#[test]
fn cache_keeps_shapes_apart() {
    let classifier = Classifier::new(64, usize::MAX, &[]);
    assert_eq!(classifier.classify("select currval('a')"), Intent::Write);
    assert_eq!(classifier.classify("select 'currval(a)'"), Intent::Read);
    assert_eq!(classifier.classify("select * from t1"), Intent::Read);
    assert_eq!(
        classifier.classify("select * from t1 for update"),
        Intent::Write
    );
    assert_eq!(
        classifier.classify("set tidepool.route = 'primary'"),
        set("route", "primary")
    );
    assert_eq!(
        classifier.classify("set tidepool.route = 'auto'"),
        set("route", "auto")
    );
    assert_eq!(
        classifier.classify("begin read only"),
        Intent::Begin { read_only: true }
    );
    assert_eq!(
        classifier.classify("begin"),
        Intent::Begin { read_only: false }
    );
    assert_eq!(classifier.stats().hits, 0);
}

#[test]
fn cache_is_bounded_and_optional() {
    let classifier = Classifier::new(1, usize::MAX, &[]);
    classifier.classify("select 1");
    classifier.classify("select * from t");
    classifier.classify("select 2");
    assert_eq!(classifier.stats().misses, 3);

    let uncached = Classifier::new(0, usize::MAX, &[]);
    assert_eq!(uncached.classify("select 1"), Intent::Read);
    assert_eq!(uncached.classify("select 1"), Intent::Read);
    assert_eq!(uncached.stats(), ClassifyStats::default());
}

#[test]
fn primary_only_views_go_to_the_primary() {
    for sql in [
        "select gid from pg_prepared_xacts",
        "select count(*) from pg_catalog.pg_stat_replication",
        "select * from pg_replication_slots",
    ] {
        assert_eq!(classify_uncached(sql, &[]), Intent::Write, "{sql}");
    }
    assert_eq!(
        classify_uncached("select * from pg_class", &[]),
        Intent::Read
    );
}

#[test]
fn writes_are_known_by_their_first_word_without_a_parse() {
    let classifier = Classifier::new(64, usize::MAX, &[]);
    for sql in [
        "insert into t values (1)",
        "/* tidepool: primary */ INSERT INTO t SELECT * FROM u",
        "  Update t set a = 1",
        "delete from t",
        "create table x (a int)",
        "drop table x; select 1",
        "vacuum",
        "analyze t",
        "call p()",
        "lock table t",
        "truncate t",
    ] {
        assert_eq!(classifier.classify(sql), Intent::Write, "{sql}");
    }
    assert_eq!(classifier.stats(), ClassifyStats::default());
    // Reads that merely look like them still reach the parser.
    assert_eq!(
        classifier.classify("copy (select 1) to stdout"),
        Intent::Read
    );
    assert_eq!(
        classifier.classify("select \"insert\" from t"),
        Intent::Read
    );
}

#[test]
fn statements_longer_than_the_limit_go_to_the_primary_unparsed() {
    let classifier = Classifier::new(64, 1024, &[]);
    let read = |len: usize| format!("select '{}'", "x".repeat(len - 9));
    assert_eq!(classifier.classify(&read(1024)), Intent::Read);
    assert_eq!(classifier.classify(&read(1025)), Intent::Write);
    // Transaction control and proxy commands are known at any length.
    let begin = format!("begin /* {} */", "x".repeat(2000));
    assert_eq!(
        classifier.classify(&begin),
        Intent::Begin { read_only: false }
    );
    assert_eq!(
        classifier.stats(),
        ClassifyStats {
            hits: 0,
            misses: 1,
            too_long: 1,
        }
    );
}

/// An operator chain is one tree level per operator: its drop once
/// overflowed a 2 MiB thread (a tokio worker's) and aborted the proxy.
#[test]
fn operator_chains_of_any_depth_are_classified_on_a_worker_sized_stack() {
    let chains = [
        (
            format!("select {}", vec!["1"; 100_000].join("+")),
            Intent::Read,
        ),
        (format!("select a{}", "[1]".repeat(60_000)), Intent::Read),
        (
            format!(
                "select 1 from t where {} or nextval('s') = 1",
                vec!["a = 1"; 30_000].join(" or ")
            ),
            Intent::Write,
        ),
    ];
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            for (sql, intent) in chains {
                assert_eq!(classify_uncached(&sql, &[]), intent, "{}", &sql[..40]);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
