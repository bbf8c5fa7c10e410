//! Large and odd traffic: oversized messages, COPY that fails midway, binary
//! COPY, empty queries, NULL parameters, FunctionCall.

mod common;

use bytes::{BufMut, Bytes};
use common::raw::RawClient;
use common::{Harness, simple_value, sqlstate};
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tidepool::protocol::Frame;
use tidepool::protocol::backend::ErrorFields;
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread")]
async fn odd_but_legal_traffic_passes() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let c = h.connect().await;
    c.batch_execute("create table o (id int, b bytea)")
        .await
        .unwrap();

    // Empty queries, alone and between statements.
    let messages = c.simple_query("").await.unwrap();
    assert!(
        messages
            .iter()
            .all(|m| !matches!(m, SimpleQueryMessage::Row(_)))
    );
    assert_eq!(
        simple_value(&c, ";;select 'after empties'").await,
        "after empties"
    );

    // NULL parameters and binary results (tokio-postgres asks for binary).
    let row = c
        .query_one(
            "select $1::int is null, $2::bytea",
            &[&None::<i32>, &vec![0u8, 255, 7]],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Vec<u8>>(1), vec![0u8, 255, 7]);

    // COPY FROM STDIN abandoned midway (CopyFail): an error, and the session goes on.
    {
        let sink = c
            .copy_in::<_, Bytes>("copy o (id) from stdin")
            .await
            .unwrap();
        pin_mut!(sink);
        sink.send(Bytes::from_static(b"1\n2\n")).await.unwrap();
        // Dropped without finish(): tokio-postgres sends CopyFail.
    }
    assert_eq!(
        simple_value(&c, "/* tidepool: primary */ select count(*) from o").await,
        "0"
    );

    // Binary COPY out and back in.
    c.batch_execute("insert into o values (1, '\\x00ff'), (2, null)")
        .await
        .unwrap();
    let out: Vec<Bytes> = c
        .copy_out("/* tidepool: primary */ copy o to stdout (format binary)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let out = out.concat();
    assert!(out.starts_with(b"PGCOPY\n\xff\r\n\0"), "binary COPY header");
    let sink = c
        .copy_in::<_, Bytes>("copy o from stdin (format binary)")
        .await
        .unwrap();
    pin_mut!(sink);
    sink.send(Bytes::from(out)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);

    // FunctionCall (protocol-level fast path): pg_backend_pid() is OID 2026.
    let mut raw = RawClient::connect(h.port()).await;
    let call = Frame::build(b'F', |b| {
        b.put_i32(2026);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    raw.send(&[call]).await;
    assert_eq!(raw.until_ready().await, ("VZ".into(), None));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_message_is_refused_and_nobody_else_notices() {
    let h = Harness::start_with("", |c| {
        c.users[0].allow_md5 = true;
        c.listen.max_message_size = 4096;
    })
    .await;
    let bystander = h.connect().await;
    let mut raw = RawClient::connect(h.port()).await;
    let huge = tidepool::protocol::frontend::query(&format!("select '{}'", "x".repeat(8192)));
    raw.send(&[huge]).await;
    let reply = raw.read().await;
    assert_eq!(reply.tag(), b'E');
    let fields = ErrorFields::decode(&reply).unwrap();
    assert_eq!(
        (fields.severity.as_str(), fields.code.as_str()),
        ("FATAL", "08P01")
    );
    assert!(
        raw.closed().await,
        "the connection is closed after a protocol violation"
    );
    // Messages just under the limit are fine, and the other session never noticed.
    let fits = format!("select '{}'", "y".repeat(3000));
    assert_eq!(simple_value(&bystander, &fits).await.len(), 3000);
    let err = bystander
        .simple_query(&format!("select '{}'", "z".repeat(8192)))
        .await
        .unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "08P01", "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn encryption_requests_are_declined_without_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start("").await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.port()))
        .await
        .unwrap();
    for request in [
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30],
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
    ] {
        tcp.write_all(&request).await.unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N", "GSSENCRequest and SSLRequest are declined");
    }
    // Protocol 2 is refused as PostgreSQL refuses it: 0A000.
    tcp.write_all(&[0, 0, 0, 8, 0, 2, 0, 0]).await.unwrap();
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'E');
    assert!(String::from_utf8_lossy(&reply).contains("0A000"));
}
