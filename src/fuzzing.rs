//! Entry points for the fuzz targets in `fuzz/` and for the stable test that
//! replays their corpus and crash reproducers (`tests/fuzz_regressions.rs`).
//!
//! Each takes arbitrary bytes, runs on them exactly the decoding the proxy
//! runs on what a client sends, and asserts what the proxy relies on
//! (re-encoded messages decode to the same fields, a cached verdict equals a
//! fresh one). A panic here is a panic a client could cause in a session.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};

use crate::config::{Secret, UserConfig};
use crate::frontend::error::ClientError;
use crate::frontend::handshake;
use crate::frontend::session::{self, Head, Params, Statement, startup_params, sync_sql};
use crate::frontend::users::{self, UserEntry};
use crate::protocol::frontend::{self as fe, Bind, Named, Parse};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{Frame, frame};
use crate::route::classify::{Classifier, Intent, classify_uncached};
use crate::route::hint::leading_hint;

/// Small enough that the fuzzer reaches the limit, as a client reaches
/// `max_message_size`.
const MAX_MESSAGE: usize = 64 * 1024;

/// A stream of bytes a logged-in client sends: split into messages as the
/// session splits them, each decoded as far as the session decodes it.
pub fn frontend_messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    // The session closes the connection at the first framing error.
    while let Ok(Some(frame)) = frame::try_split(&mut buf, MAX_MESSAGE) {
        inspect(&frame);
    }
}

fn inspect(frame: &Frame) {
    match frame.tag() {
        fe::QUERY => {
            if let Ok(Some(sql)) = fe::query_text(frame) {
                inspect_sql(sql);
            }
        }
        fe::PARSE => {
            let Ok(parse) = Parse::decode(frame) else {
                return;
            };
            let intent = match std::str::from_utf8(parse.query) {
                Ok(sql) => inspect_sql(sql),
                Err(_) => Intent::Write,
            };
            let statement = Statement::new(&parse, intent, &Default::default());
            let global = Parse::decode(&statement.parse).expect("the proxy's Parse decodes");
            assert_eq!(global.name, &statement.global[..]);
            assert_eq!(global.query, parse.query);
            assert_eq!(global.param_types, parse.param_types);
        }
        fe::BIND => {
            let Ok(bind) = Bind::decode(frame) else {
                return;
            };
            let renamed = bind.renamed(b"_tp_0123456789abcdef");
            let again = Bind::decode(&renamed).expect("the proxy's Bind decodes");
            assert_eq!(again.portal, bind.portal);
            assert_eq!(again.statement, b"_tp_0123456789abcdef");
            let tail =
                |f: &Frame, name_len| f.body()[bind.portal.len() + 1 + name_len + 1..].to_vec();
            assert_eq!(tail(&renamed, 20), tail(frame, bind.statement.len()));
        }
        fe::DESCRIBE | fe::CLOSE => {
            let Ok(named) = Named::decode(frame) else {
                return;
            };
            let encoded = Named::encode(frame.tag(), named.target, named.name);
            let again = Named::decode(&encoded).expect("the proxy's Describe/Close decodes");
            assert_eq!((again.target, again.name), (named.target, named.name));
        }
        fe::PASSWORD => {
            let _ = fe::decode_sasl_initial(frame);
        }
        _ => {}
    }
}

/// What the session asks of a statement's text before routing it.
fn inspect_sql(sql: &str) -> Intent {
    let head = Head::of(sql);
    let _ = head.pin_reason();
    let _ = head.param_change();
    let _ = head.starts_copy();
    let _ = leading_hint(sql);
    classifier().classify(sql)
}

fn classifier() -> &'static Classifier {
    static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();
    CLASSIFIER.get_or_init(|| Classifier::new(1024, usize::MAX, &[]))
}

/// The first bytes of a connection: a startup-phase packet read as the
/// handshake reads it, and the parameters a session takes from it.
pub fn startup_packet(data: &[u8]) {
    let packet = match startup::packet_len(data) {
        Ok(Some(len)) => match data.get(..len) {
            Some(packet) => packet,
            None => return,
        },
        Ok(None) => return,
        Err(e) => {
            refusal(e.into());
            return;
        }
    };
    match startup::decode(packet) {
        Ok(StartupPacket::Startup(message)) => {
            let options: Vec<&str> = message
                .params
                .iter()
                .filter(|(k, _)| k.starts_with("_pq_."))
                .map(|(k, _)| k.as_str())
                .collect();
            startup::negotiate_protocol_version(&options);
            let _ = message.get("user");
            let wanted = startup_params(&message.params);
            let _ = sync_sql(&wanted, &Params::new());
            let _ = sync_sql(&Params::new(), &wanted);
        }
        Ok(_) => {}
        Err(e) => refusal(e.into()),
    }
}

/// What a refused client is told must be a well-formed ErrorResponse.
fn refusal(error: ClientError) {
    let frame = error.to_frame().expect("a protocol error is told");
    let fields = crate::protocol::backend::ErrorFields::decode(&frame).expect("it decodes");
    assert_eq!(fields.code.len(), 5);
}

/// A SCRAM-SHA-256 login, server side: the first two bytes say how much of
/// the rest is the SASLInitialResponse body; what follows is the SASLResponse
/// body. When the first byte is 1, a real client logs in instead (with the
/// right password when the second is even) and the rest of the input is
/// XORed into its final message: the exchange must succeed exactly when the
/// message is the client's own with the right password. (Rare, because the
/// client derives its key with 4096 rounds of PBKDF2 every time.)
pub fn scram_exchange(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let user = scram_user();
    if head[0] == 1 {
        return real_client(user, head[1] % 2 == 0, rest);
    }
    let split = (usize::from(u16::from_be_bytes(*head)) / 2).min(rest.len());
    let (initial, response) = rest.split_at(split);
    let initial = Frame::build(fe::PASSWORD, |b| b.put_slice(initial));
    let Ok((server_first, waiting)) = handshake::scram_first(user, &initial) else {
        return;
    };
    assert!(server_first.starts_with("r="), "{server_first}");
    let response = fe::sasl_response(response);
    // Without the server's random nonce, no proof can be right.
    assert!(handshake::scram_final(user, &waiting, &response).is_err());
}

fn real_client(user: &UserEntry, right_password: bool, noise: &[u8]) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
    let password: &[u8] = if right_password {
        SCRAM_PASSWORD.as_bytes()
    } else {
        b"wrong"
    };
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let initial = fe::sasl_initial_response(SCRAM_SHA_256, client.message());
    let (server_first, waiting) =
        handshake::scram_first(user, &initial).expect("a real client's first message is accepted");
    client
        .update(server_first.as_bytes())
        .expect("the client accepts the server-first-message");
    let mut last = client.message().to_vec();
    let untouched = noise.iter().all(|&b| b == 0);
    for (byte, x) in last.iter_mut().zip(noise) {
        *byte ^= x;
    }
    let result = handshake::scram_final(user, &waiting, &fe::sasl_response(&last));
    if untouched && right_password {
        let server_final = result.expect("the right password logs in");
        client
            .finish(server_final.as_bytes())
            .expect("the client accepts the server's signature");
    } else if !right_password {
        assert!(result.is_err(), "a wrong password logged in");
    }
}

const SCRAM_PASSWORD: &str = "fuzz-password";

fn scram_user() -> &'static UserEntry {
    static USER: OnceLock<Arc<UserEntry>> = OnceLock::new();
    USER.get_or_init(|| {
        let user = UserConfig {
            name: "fuzz".into(),
            password: Secret::new(SCRAM_PASSWORD),
            allow_md5: false,
            consistency: None,
            max_connections: None,
        };
        users::build(&[user])
            .into_values()
            .next()
            .expect("one user")
    })
}

/// Statement text as the classifier sees it. Texts are separated by NUL
/// (which no query can contain); all go through one cached classifier, and
/// every verdict must equal a fresh parse's: the cache is keyed by
/// fingerprint, so two texts with one fingerprint and different verdicts
/// would route one of them by the other's.
pub fn classify(data: &[u8]) {
    let classifier = Classifier::new(64, usize::MAX, &[]);
    for text in data.split(|&b| b == 0) {
        let Ok(sql) = std::str::from_utf8(text) else {
            continue;
        };
        let cached = classifier.classify(sql);
        assert_eq!(cached, classify_uncached(sql, &[]), "{sql:?}");
        let _ = leading_hint(sql);
        let _ = session::starts_copy(sql);
    }
}
