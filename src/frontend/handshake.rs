//! Everything before a session: TLS negotiation, the startup packet, cancel
//! requests, and client authentication.

use std::sync::Arc;

use bytes::BytesMut;
use pgwire::api::auth::sasl::scram::ScramServerAuthWaitingForClientFinal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::ClientError;
use super::cancel::CancelRegistry;
use super::client::{ClientConn, ClientIo};
use super::users::{UserEntry, Users};
use crate::metrics::ClientErrors;
use crate::protocol::backend;
use crate::protocol::frontend::{PASSWORD, decode_sasl_initial};
use crate::protocol::startup::{self, StartupMessage, StartupPacket};
use crate::protocol::{Frame, ProtocolError};

pub enum Opened {
    /// A client that wants a session, not yet authenticated.
    Startup {
        client: ClientConn,
        startup: StartupMessage,
        tls: bool,
    },
    /// A cancel request: answered (by closing) once forwarded.
    Cancelled,
}

/// Reads packets until a StartupMessage or CancelRequest, upgrading to TLS
/// when asked and configured.
pub async fn open(
    mut tcp: TcpStream,
    tls: Option<&TlsAcceptor>,
    cancels: &CancelRegistry,
    max_message: usize,
    errors: ClientErrors,
) -> Result<Opened, ClientError> {
    loop {
        let packet = next_packet(&mut tcp).await?;
        if let (StartupPacket::SslRequest, Some(acceptor)) = (&packet, tls) {
            tcp.write_all(b"S").await?;
            let mut io = acceptor.accept(tcp).await?;
            loop {
                let packet = next_packet(&mut io).await?;
                if let Some(opened) = answer(packet, &mut io, cancels).await? {
                    return finish(opened, Box::new(io), true, max_message, errors).await;
                }
            }
        }
        if let Some(opened) = answer(packet, &mut tcp, cancels).await? {
            return finish(opened, Box::new(tcp), false, max_message, errors).await;
        }
    }
}

enum Answered {
    Cancelled,
    Startup(StartupMessage),
}

/// Answers one startup-phase packet; `None` when another packet should follow.
async fn answer(
    packet: StartupPacket,
    io: &mut (impl AsyncWrite + Unpin),
    cancels: &CancelRegistry,
) -> Result<Option<Answered>, ClientError> {
    match packet {
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            io.write_all(b"N").await?;
            Ok(None)
        }
        StartupPacket::Cancel(key) => {
            cancels.cancel(key).await;
            Ok(Some(Answered::Cancelled))
        }
        StartupPacket::Startup(startup) => Ok(Some(Answered::Startup(startup))),
    }
}

async fn finish(
    answered: Answered,
    io: Box<dyn ClientIo>,
    tls: bool,
    max_message: usize,
    errors: ClientErrors,
) -> Result<Opened, ClientError> {
    let startup = match answered {
        Answered::Cancelled => return Ok(Opened::Cancelled),
        Answered::Startup(startup) => startup,
    };
    let mut client = ClientConn::new(io, max_message, errors);
    if startup.minor_version > 0 {
        let options: Vec<&str> = startup
            .params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        client
            .send(&startup::negotiate_protocol_version(&options))
            .await?;
    }
    Ok(Opened::Startup {
        client,
        startup,
        tls,
    })
}

/// The next startup-phase packet; a bad one is answered with the error
/// (08P01) before the connection closes.
async fn next_packet(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
) -> Result<StartupPacket, ClientError> {
    let result = match read_packet(io).await {
        Ok(packet) => startup::decode(&packet).map_err(ClientError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = &result
        && let Some(frame) = e.to_frame()
    {
        let _ = io.write_all(frame.raw()).await;
        let _ = io.shutdown().await;
    }
    result
}

async fn read_packet(io: &mut (impl AsyncRead + Unpin)) -> Result<BytesMut, ClientError> {
    let mut packet = BytesMut::zeroed(4);
    io.read_exact(&mut packet).await?;
    let len = startup::packet_len(&packet)?.expect("four bytes read");
    packet.resize(len, 0);
    io.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// Authenticates the client as `user`: SCRAM-SHA-256, or md5 where allowed.
pub async fn authenticate(client: &mut ClientConn, user: &UserEntry) -> Result<(), ClientError> {
    if user.allow_md5 {
        let salt: [u8; 4] = rand::random();
        client.send(&backend::auth_md5(salt)).await?;
        client.flush().await?;
        let frame = expect_password(client).await?;
        let expected = postgres_protocol::authentication::md5_hash(
            user.name.as_bytes(),
            user.password.expose().as_bytes(),
            salt,
        );
        let given = frame.body().strip_suffix(b"\0").unwrap_or(frame.body());
        if given != expected.as_bytes() {
            return Err(ClientError::AuthFailed(user.name.clone()));
        }
    } else {
        client.send(&backend::auth_sasl(&["SCRAM-SHA-256"])).await?;
        client.flush().await?;
        let initial = expect_password(client).await?;
        let (server_first, waiting) = scram_first(user, &initial)?;
        client
            .send(&backend::auth_sasl_continue(server_first.as_bytes()))
            .await?;
        client.flush().await?;
        let response = expect_password(client).await?;
        let server_final = scram_final(user, &waiting, &response)?;
        client
            .send(&backend::auth_sasl_final(server_final.as_bytes()))
            .await?;
    }
    client.authenticated();
    client.send(&backend::auth_ok()).await?;
    Ok(())
}

/// The server's half of a SCRAM exchange waiting for the client's final message.
pub type ScramWaiting = ScramServerAuthWaitingForClientFinal;

/// SCRAM step one, without I/O (so that it can be fuzzed): the client's
/// SASLInitialResponse in, the server-first-message out.
pub fn scram_first(
    user: &UserEntry,
    initial: &Frame,
) -> Result<(String, ScramWaiting), ClientError> {
    let (mechanism, first) = decode_sasl_initial(initial)?;
    if mechanism != b"SCRAM-SHA-256" {
        return Err(ClientError::Protocol(ProtocolError::Malformed(
            "SASL mechanism not offered",
        )));
    }
    user.scram
        .on_client_first_message_with_secret(first, user.scram_secret())
        .map_err(|_| ClientError::AuthFailed(user.name.clone()))
}

/// SCRAM step two, without I/O: the client's SASLResponse (its proof) in,
/// the server-final-message out when the proof is right.
pub fn scram_final(
    user: &UserEntry,
    waiting: &ScramWaiting,
    response: &Frame,
) -> Result<String, ClientError> {
    waiting
        .on_client_final_message(response.body())
        .map_err(|_| ClientError::AuthFailed(user.name.clone()))
}

async fn expect_password(client: &mut ClientConn) -> Result<Frame, ClientError> {
    match client.read_frame().await? {
        Some(frame) if frame.tag() == PASSWORD => Ok(frame),
        Some(frame) => Err(ProtocolError::Unexpected(frame.tag() as char).into()),
        None => Err(ClientError::Gone),
    }
}

/// Looks up the user a StartupMessage names.
pub fn find_user<'a>(
    users: &'a Users,
    startup: &StartupMessage,
) -> Result<(&'a Arc<UserEntry>, String), ClientError> {
    let name = startup
        .get("user")
        .ok_or(ClientError::Protocol(ProtocolError::Malformed(
            "StartupMessage without user",
        )))?;
    let user = users
        .get(name)
        .ok_or_else(|| ClientError::UnknownUser(name.to_owned()))?;
    let database = startup.get("database").unwrap_or(name).to_owned();
    Ok((user, database))
}

/// The notice PostgreSQL sends at startup when it cuts a name-typed setting
/// (`application_name`) to `NAMEDATALEN - 1` bytes. The proxy applies the
/// client's settings on server connections later, out of the client's
/// sight, so it says it itself, where PostgreSQL would: after
/// AuthenticationOk, before the ParameterStatus messages.
pub fn truncation_notice(startup: &StartupMessage) -> Option<Frame> {
    const NAME_MAX: usize = 63;
    let name = startup.get("application_name")?;
    if name.len() <= NAME_MAX {
        return None;
    }
    let mut end = NAME_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Some(backend::notice(
        "42622",
        &format!(
            "identifier \"{name}\" will be truncated to \"{}\"",
            &name[..end]
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::ErrorFields;

    fn startup(application_name: &str) -> StartupMessage {
        StartupMessage {
            minor_version: 0,
            params: vec![
                ("user".into(), "app".into()),
                ("application_name".into(), application_name.into()),
            ],
        }
    }

    #[test]
    fn a_long_application_name_is_announced_cut_at_a_character() {
        assert!(truncation_notice(&startup(&"x".repeat(63))).is_none());
        let long = format!("{}é", "x".repeat(62));
        let notice = truncation_notice(&startup(&long)).expect("64 bytes are cut");
        let fields = ErrorFields::decode(&notice).unwrap();
        assert_eq!(
            (fields.severity.as_str(), fields.code.as_str()),
            ("NOTICE", "42622")
        );
        let cut = "x".repeat(62);
        assert_eq!(
            fields.message,
            format!("identifier \"{long}\" will be truncated to \"{cut}\"")
        );
    }
}
