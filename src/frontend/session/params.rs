//! Session parameters: settling a client's SET/RESET once it has taken
//! effect, and bringing a server connection in line with the client.

use super::*;

impl Session {
    /// A statement that changed session parameters has finished: outside a
    /// transaction block its change holds now; inside one, only if the block
    /// commits.
    /// A RESET can leave the server short of the client's startup values
    /// (the server's own defaults differ): those are put back at once.
    pub(super) async fn settle_param_changes(
        &mut self,
        status: TxStatus,
    ) -> Result<(), ClientError> {
        if let Some(change) = self.param_change.take() {
            self.txn_param_changes.push(change);
        }
        if status != TxStatus::Idle || self.txn_param_changes.is_empty() {
            return Ok(());
        }
        let ended_by_rollback = self
            .last_command
            .as_deref()
            .is_some_and(|tag| tag.starts_with(b"ROLLBACK"));
        let changes = std::mem::take(&mut self.txn_param_changes);
        if ended_by_rollback {
            return Ok(());
        }
        for change in changes {
            self.apply_param_change(change);
        }
        self.sync_params().await
    }
    /// Brings the attached server's parameters in line with the client's,
    /// ahead of whatever the client sends next.
    pub(super) async fn sync_params(&mut self) -> Result<(), ClientError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        if let Some(sql) = state::sync_sql(&self.params, &server.conn.applied) {
            server.conn.applied = self.params.clone();
            self.send_to_server(&fe::query(&sql)).await?;
            self.pending.push(Kind::Query, false);
        }
        Ok(())
    }
    pub(super) fn apply_param_change(&mut self, change: ParamChange) {
        let server = self.server.as_mut().map(|s| &mut s.conn);
        match change {
            ParamChange::Set { name, value } => {
                if let Some(server) = server {
                    server.applied.insert(name.clone(), value.clone());
                }
                self.params.insert(name, value);
            }
            ParamChange::Reset { name } => {
                if let Some(server) = server {
                    server.applied.remove(&name);
                }
                match self.startup_params.get(&name) {
                    Some(value) => self.params.insert(name, value.clone()),
                    None => self.params.remove(&name),
                };
            }
            ParamChange::ResetAll | ParamChange::DiscardAll => {
                if let Some(server) = server {
                    server.applied.clear();
                    if change == ParamChange::DiscardAll {
                        server.prepared.clear();
                    }
                }
                if change == ParamChange::DiscardAll {
                    self.statements = Statements::default();
                }
                self.params = self.startup_params.clone();
            }
            ParamChange::DeallocateAll => {
                if let Some(server) = server {
                    server.prepared.clear();
                }
                self.statements = Statements::default();
            }
            // Session mode: a protocol-level statement deallocated by SQL.
            ParamChange::Deallocate { name } => self.statements.remove(name.as_bytes()),
        }
    }
}
