//! Real client programs through tidepool: psql and pgbench, 0 errors.

mod common;

use std::process::Command;

use common::Harness;

fn run(h: &Harness, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .envs(h.pg_env())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_runs_clean_in_every_protocol_mode() {
    let h = Harness::start("").await;
    run(&h, "pgbench", &["-i", "-s", "2", "-q"]);
    h.caught_up().await;
    for args in [
        &["-c", "8", "-j", "2", "-T", "3", "-M", "simple"][..],
        &["-c", "8", "-j", "2", "-T", "3", "-M", "extended"][..],
        &["-c", "8", "-j", "2", "-T", "3", "-M", "extended", "-S"][..],
        &["-c", "8", "-j", "2", "-T", "3", "-M", "simple", "-S"][..],
        &["-c", "8", "-j", "2", "-T", "3", "-M", "prepared"][..],
        &["-c", "8", "-j", "2", "-T", "3", "-M", "prepared", "-S"][..],
    ] {
        let out = run(&h, "pgbench", args);
        assert!(
            out.contains("number of failed transactions: 0"),
            "{args:?}\n{out}"
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            // Throughput belongs in the benchmark; here it only has to make progress.
            processed >= 10,
            "{args:?}: only {processed} transactions\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_scripts_work() {
    let h = Harness::start("").await;
    let out = run(
        &h,
        "psql",
        &[
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "create table p (id int primary key, s text)",
            "-c",
            "insert into p select g, 'row ' || g from generate_series(1, 100) g",
            "-c",
            "begin",
            "-c",
            "update p set s = 'changed' where id = 1",
            "-c",
            "select s from p where id = 1",
            "-c",
            "commit",
        ],
    );
    assert!(out.contains("changed"), "{out}");
    h.caught_up().await;
    let out = run(
        &h,
        "psql",
        &[
            "-X",
            "-At",
            "-c",
            "select count(*), pg_is_in_recovery() from p",
            "-c",
            "\\copy p to '/dev/null'",
        ],
    );
    assert_eq!(out.lines().next(), Some("100|t"), "{out}");
}
