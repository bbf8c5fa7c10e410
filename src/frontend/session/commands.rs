//! `SET`/`RESET`/`SHOW tidepool.*`: the proxy's own session settings.

use super::*;

impl Session {
    /// `SET`/`RESET`/`SHOW tidepool.*`: answered by the proxy, never forwarded.
    pub(super) async fn proxy_command(
        &mut self,
        command: &ProxyCommand,
    ) -> Result<(), ClientError> {
        let reply = match command {
            ProxyCommand::Set { name, value } => self.set_proxy_param(name, Some(value)),
            ProxyCommand::Reset { name } => self.set_proxy_param(name, None),
            ProxyCommand::Show { name } => self
                .show_proxy_param(name)
                .map(|value| backend::text_rows(&format!("tidepool.{name}"), &[&value])),
        };
        match reply {
            Ok(frames) => {
                for frame in frames {
                    self.client.send(&frame).await?;
                }
            }
            Err(error) => self.client.send(&error).await?,
        }
        self.ready(self.client_status).await
    }
    /// Sets (`Some`) or resets (`None`) a session setting of the proxy.
    pub(super) fn set_proxy_param(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<Vec<Frame>, Frame> {
        let invalid = |expected: &str| {
            let message = format!(
                "invalid value for parameter \"tidepool.{name}\": \"{}\" (expected {expected})",
                value.unwrap_or_default()
            );
            backend::error_response(Severity::Error, "22023", &message)
        };
        match name {
            "route" => {
                self.route = match value {
                    None => SessionRoute::Auto,
                    Some(v) => SessionRoute::parse(v).ok_or_else(|| invalid("primary or auto"))?,
                }
            }
            "consistency" => {
                self.consistency.mode = match value {
                    None => self
                        .user
                        .consistency
                        .unwrap_or(self.shared.config.load().routing.consistency),
                    Some(v) => ConsistencyMode::parse(v).ok_or_else(|| {
                        invalid("eventual, read_your_writes, monotonic or strong")
                    })?,
                }
            }
            "report_lsn" => {
                self.report_lsn = match value {
                    None => self.shared.config.load().routing.report_lsn,
                    Some(v) => parse_bool(v).ok_or_else(|| invalid("on or off"))?,
                }
            }
            "min_lsn" => {
                self.consistency.min_lsn = match value {
                    None => None,
                    Some(v) => Some(
                        v.parse::<Lsn>()
                            .map_err(|_| invalid("an LSN such as 0/16B3748"))?,
                    ),
                }
            }
            _ => return Err(unknown_proxy_param(name)),
        }
        let tag = if value.is_some() { "SET" } else { "RESET" };
        Ok(vec![backend::command_complete(tag)])
    }
    pub(super) fn show_proxy_param(&self, name: &str) -> Result<String, Frame> {
        Ok(match name {
            "route" => self.explain_route(),
            "consistency" => self.consistency.mode.as_str().to_owned(),
            "lsn" if self.consistency.last_write_unknown => {
                return Err(backend::error_response(
                    Severity::Error,
                    "55000",
                    "the commit LSN of this session's last write is not known \
                     (tidepool.report_lsn is off, or its server was lost before it answered)",
                ));
            }
            "lsn" => self.consistency.last_write.unwrap_or_default().to_string(),
            "report_lsn" => if self.report_lsn { "on" } else { "off" }.to_owned(),
            "min_lsn" => self.consistency.min_lsn.unwrap_or_default().to_string(),
            _ => return Err(unknown_proxy_param(name)),
        })
    }
    /// Where the next plain read would go, and why: `SHOW tidepool.route`.
    pub(super) fn explain_route(&self) -> String {
        let topology = self.shared.topology.load();
        let floor = self.consistency.floor();
        let mode = self.consistency.mode;
        let (node, why) = if self.route == SessionRoute::Primary {
            (topology.primary(), "tidepool.route = primary".to_owned())
        } else if mode == ConsistencyMode::Strong {
            (
                topology.primary(),
                "consistency strong: reads go to the primary".to_owned(),
            )
        } else if self.consistency.floor_unknown() {
            (
                topology.primary(),
                format!(
                    "{}: the commit LSN of the session's last write is not known: the primary until a later write's is",
                    mode.as_str()
                ),
            )
        } else {
            let fresh = topology.read_replicas(floor).next();
            let floor_text = floor.map_or("none".to_owned(), |f| f.to_string());
            match fresh {
                Some(replica) => (
                    Some(replica),
                    format!("{}: replica at or past floor {floor_text}", mode.as_str()),
                ),
                None if topology.read_replicas(None).next().is_some() => (
                    topology.read_replicas(None).next(),
                    format!(
                        "{}: replica checked against floor {floor_text} before reading, else primary after {:?}",
                        mode.as_str(),
                        self.shared.config.load().routing.ryw_wait
                    ),
                ),
                None => (
                    topology.primary(),
                    "no replica serves reads: primary".to_owned(),
                ),
            }
        };
        let target = node.map_or("none".to_owned(), |n| {
            format!("{} ({} {})", n.id, n.role.as_str(), n.addr)
        });
        format!(
            "mode={} pool={} session={} next read: {target}; {why}",
            mode.as_str(),
            match self.mode() {
                PoolMode::Transaction => "transaction",
                PoolMode::Session => "session",
            },
            self.route.as_str()
        )
    }
}

fn unknown_proxy_param(name: &str) -> Frame {
    backend::error_response(
        Severity::Error,
        "42704",
        &format!("unrecognized configuration parameter \"tidepool.{name}\""),
    )
}

/// A boolean setting's value in the spellings PostgreSQL takes for its own
/// (`on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}
