//! Hostile input: garbage bytes, truncated and mis-sized messages, unknown
//! message types, other protocol versions, extended messages out of order,
//! floods of Syncs and of startup parameters. Each gets PostgreSQL's answer
//! (08P01 where PostgreSQL has none to give) and, where the protocol leaves
//! no way on, a closed connection. Every case runs beside a bystander session
//! that is in the middle of a transaction: it must not notice, and the
//! proxy's panic counter must stay at 0.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::raw::{self, RawClient};
use common::{Harness, simple_value};
use tidepool::demo::cluster::ClusterSpec;
use tidepool::protocol::backend::{self, Auth, ErrorFields};
use tidepool::protocol::frontend as fe;
use tidepool::protocol::{Frame, frame, startup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;

/// A primary alone (no replica is needed to be attacked) behind tidepool, and
/// a bystander with a transaction open through it.
async fn start() -> (Harness, Client) {
    let spec = ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    };
    let h = Harness::start_spec(
        spec,
        |_| String::new(),
        |c| {
            c.users[0].allow_md5 = true;
            // The classifier parses all it may be configured to.
            c.routing.classify_max_bytes = 1 << 20;
        },
    )
    .await;
    let bystander = h.connect().await;
    bystander
        .batch_execute("begin; create temp table mine (x int); insert into mine values (1)")
        .await
        .unwrap();
    (h, bystander)
}

/// The bystander's transaction goes on as if nothing happened, and no
/// session of the proxy panicked.
async fn nobody_else_noticed(h: &Harness, bystander: &Client) {
    assert_eq!(
        simple_value(bystander, "select count(*) from mine").await,
        "1"
    );
    bystander.batch_execute("commit").await.unwrap();
    let panics = h.metric("tidepool_session_panics_total").await;
    assert_eq!(
        panics,
        Some(0),
        "a session panicked (None: the counter is not exported)"
    );
}

/// Opens a connection, sends `bytes` as its first bytes, and returns what
/// the proxy sent before it closed the connection.
async fn first_bytes(h: &Harness, bytes: &[u8]) -> Vec<Frame> {
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    until_closed(&mut tcp).await
}

/// Every message until the proxy closes the connection (within 10 s).
async fn until_closed(tcp: &mut TcpStream) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let read = async {
        // A reset after the last bytes (the proxy closed with input unread)
        // ends the stream as a close does.
        while matches!(tcp.read_buf(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the proxy closes the connection");
    let mut frames = Vec::new();
    while let Some(f) = frame::try_split(&mut buf, 1 << 20).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "only whole messages: {buf:?}");
    frames
}

/// The one message before the close: a FATAL error.
fn fatal(frames: &[Frame]) -> ErrorFields {
    let [reply] = frames else {
        panic!("one message, then the close: {frames:?}");
    };
    assert_eq!(reply.tag(), backend::ERROR_RESPONSE);
    let fields = ErrorFields::decode(reply).unwrap();
    assert_eq!(fields.severity, "FATAL", "{}", fields.message);
    fields
}

/// A logged-in client is sent `bytes`: it gets a FATAL error with `code`,
/// then its connection is closed.
async fn fatal_after_login(h: &Harness, bytes: &[u8], code: &str) {
    let mut raw = RawClient::connect(h.port()).await;
    raw.send_bytes(bytes).await;
    let reply = raw.read().await;
    assert_eq!(reply.tag(), backend::ERROR_RESPONSE, "{reply:?}");
    let fields = ErrorFields::decode(&reply).unwrap();
    assert_eq!(
        (fields.severity.as_str(), fields.code.as_str()),
        ("FATAL", code),
        "{}",
        fields.message
    );
    assert!(raw.closed().await, "closed after {}", fields.message);
}

/// A message with the right length.
fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    message(tag, body.len() as i32 + 4, body)
}

/// A message with whatever length field it is given.
fn message(tag: u8, len: i32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn startup_packet(version: i32, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(0);
    body.put_i32(version);
    for (k, v) in params {
        body.put_slice(k);
        body.put_u8(0);
        body.put_slice(v);
        body.put_u8(0);
    }
    body.put_u8(0);
    let len = body.len() as i32;
    body[..4].copy_from_slice(&len.to_be_bytes());
    body.to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_bytes_are_refused_with_08p01() {
    let (h, bystander) = start().await;
    // A TLS ClientHello, an HTTP request and line noise where a startup
    // packet belongs: their first four bytes are no valid length.
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\nHost: tidepool\r\n\r\n",
        b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
    ] {
        let fields = fatal(&first_bytes(&h, garbage).await);
        assert_eq!(fields.code, "08P01", "{}", fields.message);
    }
    // After login: a message type no frontend sends.
    fatal_after_login(&h, &framed(0x01, b"\xde\xad\xbe\xef"), "08P01").await;
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_messages_end_the_connection() {
    let (h, bystander) = start().await;
    // A startup packet cut short by the client's close: nothing to answer.
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(&startup_packet(196608, &[(b"user", b"app")])[..10])
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    assert_eq!(until_closed(&mut tcp).await, Vec::<Frame>::new());

    // A Query cut short the same way, after login.
    let mut raw = RawClient::connect(h.port()).await;
    raw.send_bytes(&message(fe::QUERY, 100, b"select 1")).await;
    drop(raw);

    // Whole messages whose fields are cut short: a Parse without its query,
    // a Bind without its statement name, a Describe without a name.
    for (tag, body) in [
        (fe::PARSE, &b"s"[..]),
        (fe::PARSE, b"s\0select 1"),
        (fe::PARSE, b"s\0select 1\0\0\x02\0\0\0\x17"),
        (fe::BIND, b"\0"),
        (fe::DESCRIBE, b""),
        (fe::CLOSE, b"X\0"),
        (fe::QUERY, b"select 1"),
    ] {
        fatal_after_login(&h, &framed(tag, body), "08P01").await;
    }
    // A startup packet whose parameter list is not terminated.
    let mut cut = startup_packet(196608, &[(b"user", b"app")]);
    cut.pop();
    cut.pop();
    let len = cut.len() as i32;
    cut[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(fatal(&first_bytes(&h, &cut).await).code, "08P01");
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_lengths_are_refused_with_08p01() {
    let (h, bystander) = start().await;
    // Startup packets: negative, too short, larger than PostgreSQL accepts.
    for len in [-1i32, i32::MIN, 0, 3, 7, 10_001, i32::MAX] {
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&196608i32.to_be_bytes());
        let fields = fatal(&first_bytes(&h, &packet).await);
        assert_eq!(fields.code, "08P01", "length {len}: {}", fields.message);
    }
    // After login: negative, shorter than the length field, and over
    // max_message_size (answered at once, not after 2 GB arrive).
    for len in [-1i32, i32::MIN, 0, 3, i32::MAX] {
        fatal_after_login(&h, &message(fe::QUERY, len, b""), "08P01").await;
    }
    // During authentication the limit is PostgreSQL's 64 kB for a password.
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(&startup::encode_startup(&[("user", "app")]))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let challenge = loop {
        if let Some(f) = frame::try_split(&mut buf, 1 << 20).unwrap() {
            break f;
        }
        assert!(tcp.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert!(matches!(Auth::decode(&challenge), Ok(Auth::Md5 { .. })));
    tcp.write_all(&message(fe::PASSWORD, 1 << 20, b"md5"))
        .await
        .unwrap();
    let fields = fatal(&until_closed(&mut tcp).await);
    assert_eq!(fields.code, "08P01");
    assert!(
        fields.message.contains("exceeds the limit"),
        "{}",
        fields.message
    );

    // A length that covers more than the message's fields: PostgreSQL
    // itself says "invalid message format", and the session goes on.
    let mut raw = RawClient::connect(h.port()).await;
    raw.send_bytes(&framed(fe::QUERY, b"select 1\0xyz")).await;
    assert_eq!(raw.until_ready().await, ("EZ".into(), Some("08P01".into())));
    raw.send(&[fe::query("select 2")]).await;
    assert_eq!(raw.until_ready().await, ("TDCZ".into(), None));
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_message_types_are_refused_with_08p01() {
    let (h, bystander) = start().await;
    // Backend message types, and bytes that are no message type at all.
    for tag in [b'Z', b'T', b'?', b'z', 0] {
        fatal_after_login(&h, &framed(tag, b""), "08P01").await;
    }
    // Anything but a password while one is expected.
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(&startup::encode_startup(&[("user", "app")]))
        .await
        .unwrap();
    tcp.write_all(fe::query("select 1").raw()).await.unwrap();
    let frames = until_closed(&mut tcp).await;
    assert_eq!(frames[0].tag(), backend::AUTHENTICATION);
    assert_eq!(fatal(&frames[1..]).code, "08P01");
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_versions_2_and_4_are_refused_with_0a000() {
    let (h, bystander) = start().await;
    for (version, name) in [
        (2 << 16, "2.0"),
        (4 << 16, "4.0"),
        ((1234 << 16) | 5677, "1234.5677"),
    ] {
        let fields = fatal(&first_bytes(&h, &startup_packet(version, &[(b"user", b"app")])).await);
        assert_eq!(fields.code, "0A000", "{}", fields.message);
        assert!(
            fields
                .message
                .starts_with(&format!("unsupported frontend protocol {name}")),
            "{}",
            fields.message
        );
    }
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bind_before_any_parse_is_26000_and_the_session_goes_on() {
    let (h, bystander) = start().await;
    let mut raw = RawClient::connect(h.port()).await;
    raw.send(&[raw::bind(""), raw::execute(), fe::sync()]).await;
    assert_eq!(raw.until_ready().await, ("EZ".into(), Some("26000".into())));
    raw.send(&[raw::bind("never_parsed"), raw::execute(), fe::sync()])
        .await;
    assert_eq!(raw.until_ready().await, ("EZ".into(), Some("26000".into())));
    // The error can reach the client before the rest of its batch has
    // reached the proxy (here: after a Flush); the rest is skipped up to
    // the Sync, as PostgreSQL skips it.
    let flush = Frame::build(fe::FLUSH, |_| {});
    raw.send(&[raw::bind("never_parsed"), flush]).await;
    let error = raw.read().await;
    assert_eq!(ErrorFields::decode(&error).unwrap().code, "26000");
    raw.send(&[raw::execute(), raw::bind(""), fe::sync()]).await;
    assert_eq!(raw.until_ready().await, ("Z".into(), None));
    // Describe and Execute of things that do not exist either.
    let describe = fe::Named::encode(fe::DESCRIBE, fe::Target::Statement, b"nope");
    raw.send(&[describe, fe::sync()]).await;
    assert_eq!(raw.until_ready().await, ("EZ".into(), Some("26000".into())));
    raw.send(&[raw::execute(), fe::sync()]).await;
    assert_eq!(raw.until_ready().await, ("EZ".into(), Some("34000".into())));
    raw.send(&[
        raw::parse("", "select 42"),
        raw::bind(""),
        raw::execute(),
        fe::sync(),
    ])
    .await;
    assert_eq!(raw.until_ready().await, ("12DCZ".into(), None));
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_storm_gets_one_ready_for_query_each() {
    let (h, bystander) = start().await;
    const STORM: usize = 20_000;
    let mut raw = RawClient::connect(h.port()).await;
    let mut storm = Vec::new();
    for f in [raw::parse("", "select 1"), raw::bind(""), raw::execute()] {
        storm.extend_from_slice(f.raw());
    }
    for _ in 0..STORM {
        storm.extend_from_slice(fe::sync().raw());
    }
    raw.send_bytes(&storm).await;
    let (mut tags, mut ready) = (String::new(), 0);
    while ready < STORM {
        let tag = raw.read().await.tag();
        ready += usize::from(tag == backend::READY_FOR_QUERY);
        tags.push(tag as char);
    }
    assert_eq!(tags, format!("12DC{}", "Z".repeat(STORM)));
    raw.send(&[fe::query("select 'after the storm'")]).await;
    assert_eq!(raw.until_ready().await, ("TDCZ".into(), None));
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_startup_parameters_is_refused_with_08p01() {
    let (h, bystander) = start().await;
    for params in [
        &[
            (&b"user"[..], &b"app"[..]),
            (b"application_name", b"\xff\xfe"),
        ][..],
        &[(b"user", b"\xc3\x28")],
        &[(b"user", b"app"), (b"\xe2\x82", b"x")],
    ] {
        let fields = fatal(&first_bytes(&h, &startup_packet(196608, params)).await);
        assert_eq!(fields.code, "08P01", "{}", fields.message);
    }
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_startup_parameters_are_refused() {
    let (h, bystander) = start().await;
    // 10,000 parameters do not fit in PostgreSQL's 10,000-byte startup packet.
    let names: Vec<String> = (0..10_000).map(|i| format!("p{i}")).collect();
    let mut params: Vec<(&[u8], &[u8])> = vec![(b"user", b"app"), (b"database", b"postgres")];
    params.extend(names.iter().map(|n| (n.as_bytes(), &b"x"[..])));
    let fields = fatal(&first_bytes(&h, &startup_packet(196608, &params)).await);
    assert_eq!(fields.code, "08P01", "{}", fields.message);

    // As many as fit are passed on to the server, which says what
    // PostgreSQL says of a parameter it does not know.
    let fitting = &params[..1000];
    let packet = startup_packet(196608, fitting);
    assert!(packet.len() <= startup::MAX_STARTUP_LEN);
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(&packet).await.unwrap();
    let mut buf = BytesMut::new();
    let challenge = loop {
        if let Some(f) = frame::try_split(&mut buf, 1 << 20).unwrap() {
            break f;
        }
        assert!(tcp.read_buf(&mut buf).await.unwrap() > 0);
    };
    let Ok(Auth::Md5 { salt }) = Auth::decode(&challenge) else {
        panic!("md5 challenge expected: {challenge:?}");
    };
    let hash = postgres_protocol::authentication::md5_hash(b"app", b"app", salt);
    tcp.write_all(fe::password(hash.as_bytes()).raw())
        .await
        .unwrap();
    let frames = until_closed(&mut tcp).await;
    let (last, before) = frames.split_last().expect("a reply");
    assert!(
        before.iter().all(|f| f.tag() == backend::AUTHENTICATION),
        "{frames:?}"
    );
    let fields = fatal(std::slice::from_ref(last));
    assert_eq!(fields.code, "42704", "{}", fields.message);
    nobody_else_noticed(&h, &bystander).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_that_trip_the_proxys_parsers_get_the_servers_answer() {
    let (h, bystander) = start().await;
    let mut raw = RawClient::connect(h.port()).await;
    // A multi-byte character right after a SET's name (the proxy's own SET
    // parser once sliced it in half), and nesting deeper than the classifier's parser goes.
    raw.send(&[fe::query("SET a €")]).await;
    let (tags, code) = raw.until_ready().await;
    // (A ParameterStatus may carry the session's commit LSN token.)
    assert_eq!(
        (tags.replace('S', ""), code),
        ("EZ".into(), Some("42601".into()))
    );
    let deep = format!("select {}1{}", "(".repeat(5000), ")".repeat(5000));
    raw.send(&[fe::query(&deep)]).await;
    let (tags, _) = raw.until_ready().await;
    assert!(tags.ends_with('Z'), "{tags}");
    // A chain of operators is one tree level each: the drop of this one's
    // tree once overflowed the proxy's stack and took every session down.
    let chain = format!("select {}", vec!["1"; 200_000].join("+"));
    raw.send(&[fe::query(&chain)]).await;
    let (tags, code) = raw.until_ready().await;
    assert_eq!((tags, code), ("EZ".into(), Some("54001".into())));
    raw.send(&[fe::query("select 'still here'")]).await;
    assert_eq!(raw.until_ready().await, ("TDCZ".into(), None));
    nobody_else_noticed(&h, &bystander).await;
}
