//! The extended protocol: Parse/Bind/Describe/Execute/Close/Sync, with
//! client statement names mapped to the server-side copies.

use super::*;
use crate::pool::server::Prepared;

impl Session {
    pub(super) async fn on_extended(&mut self, frame: Frame) -> Result<(), ClientError> {
        if !self.unsynced && !self.pending.is_empty() && frame.tag() != fe::FLUSH {
            self.waiting = Some(frame);
            return Ok(());
        }
        // What the message that starts a unit of work was classified as, so
        // that its Parse is not classified a second time.
        let mut classified = None;
        if self.server.is_none() {
            match frame.tag() {
                fe::SYNC => return self.ready(self.client_status).await,
                fe::FLUSH => return Ok(()),
                fe::CLOSE => {
                    // Statements live in the proxy between transactions and
                    // portals do not outlive them: nothing to ask a server.
                    let named = Named::decode(&frame)?;
                    if named.target == Target::Statement {
                        self.statements.remove(named.name);
                        if named.name.is_empty() {
                            self.unnamed = None;
                        }
                    }
                    self.client.send(&backend::close_complete()).await?;
                    self.unsynced = true;
                    return Ok(());
                }
                _ => {}
            }
            let intent = self.extended_intent(&frame)?;
            let on_lane = match frame.tag() {
                fe::PARSE => self.batch_on_lane(&frame, &intent).await?,
                fe::BIND => self.bound_on_lane(&frame, &intent).await?,
                _ => false,
            };
            if on_lane {
                return Ok(());
            }
            if !self.start_unit(&intent, None).await? {
                self.skip_to_sync = true;
                return Ok(());
            }
            classified = Some(intent);
        }
        match frame.tag() {
            fe::PARSE => self.forward_parse(&frame, classified).await?,
            fe::BIND => {
                let bind = Bind::decode(&frame)?;
                match self.statements.get(bind.statement).cloned() {
                    Some(statement) if self.outdated(&statement) => self.refuse_outdated(),
                    Some(statement) => {
                        self.unit_writes |= ends_write(&statement.intent, self.client_status);
                        self.unit_copies |= statement.copies;
                        if self.names_verbatim() {
                            self.forward(&frame, Kind::Bind).await?;
                        } else {
                            self.prepare_on_server(&statement, None).await?;
                            let renamed = bind.renamed(&statement.global);
                            self.forward_using(&renamed, Kind::Bind, statement).await?;
                        }
                    }
                    None => {
                        if bind.statement.is_empty() {
                            self.prepare_unnamed().await?;
                        }
                        self.forward(&frame, Kind::Bind).await?
                    }
                }
            }
            fe::DESCRIBE => {
                let named = Named::decode(&frame)?;
                let known = (named.target == Target::Statement && !self.names_verbatim())
                    .then(|| self.statements.get(named.name).cloned())
                    .flatten();
                match known {
                    Some(statement) if self.outdated(&statement) => self.refuse_outdated(),
                    Some(statement) => {
                        self.prepare_on_server(&statement, None).await?;
                        let renamed =
                            Named::encode(fe::DESCRIBE, Target::Statement, &statement.global);
                        self.forward_using(&renamed, Kind::Describe, statement)
                            .await?;
                    }
                    None => {
                        if named.target == Target::Statement && named.name.is_empty() {
                            self.prepare_unnamed().await?;
                        }
                        self.forward(&frame, Kind::Describe).await?
                    }
                }
            }
            fe::CLOSE => {
                let named = Named::decode(&frame)?;
                if named.target == Target::Statement && named.name.is_empty() {
                    self.unnamed = None;
                }
                if named.target == Target::Statement && self.names_verbatim() {
                    self.statements.remove(named.name);
                    self.forward(&frame, Kind::Close).await?;
                } else if named.target == Target::Statement && !named.name.is_empty() {
                    // The server keeps its copy for whoever prepares it next;
                    // its statement cache evicts it when full.
                    self.statements.remove(named.name);
                    self.pending.push_synthetic(backend::close_complete());
                } else {
                    self.forward(&frame, Kind::Close).await?;
                }
            }
            fe::EXECUTE => self.forward(&frame, Kind::Execute).await?,
            fe::SYNC => {
                self.forward(&frame, Kind::Sync).await?;
                self.unsynced = false;
                let wrote = std::mem::take(&mut self.unit_writes);
                let copies = std::mem::take(&mut self.unit_copies);
                return self.capture_after_unit(wrote, copies).await;
            }
            _ => {
                self.send_to_server(&frame).await?;
                return Ok(());
            }
        }
        self.unsynced = true;
        Ok(())
    }
    /// The intent of an extended-protocol message that starts a unit of work.
    pub(super) fn extended_intent(&self, frame: &Frame) -> Result<Intent, ClientError> {
        Ok(match frame.tag() {
            fe::PARSE => match self.same_unnamed(frame) {
                Some(unnamed) => unnamed.intent.clone(),
                None => self.text_intent(Parse::decode(frame)?.query),
            },
            fe::BIND => {
                let bind = Bind::decode(frame)?;
                match self.statements.get(bind.statement) {
                    Some(statement) => statement.intent.clone(),
                    None => self.unnamed_intent(bind.statement),
                }
            }
            fe::DESCRIBE => {
                let named = Named::decode(frame)?;
                match self.statements.get(named.name) {
                    Some(s) if named.target == Target::Statement => s.intent.clone(),
                    _ if named.target == Target::Statement => self.unnamed_intent(named.name),
                    _ => Intent::Write,
                }
            }
            _ => Intent::Write,
        })
    }
    /// The intent of a statement's text; not UTF-8: a write.
    fn text_intent(&self, query: &[u8]) -> Intent {
        std::str::from_utf8(query).map_or(Intent::Write, |sql| self.shared.classifier.classify(sql))
    }
    /// `classified`: the intent of the Parse, when it started the unit of
    /// work and was classified for that.
    pub(super) async fn forward_parse(
        &mut self,
        frame: &Frame,
        classified: Option<Intent>,
    ) -> Result<(), ClientError> {
        let parse = Parse::decode(frame)?;
        let sql = std::str::from_utf8(parse.query).ok();
        let intent_of_text =
            |this: &Self| classified.unwrap_or_else(|| this.text_intent(parse.query));
        if parse.name.is_empty() {
            // A repeat of the unnamed statement: what its text says was
            // learned when it came before (its pins are taken, its intent
            // known), and the copy kept then is this Parse.
            let repeated = self
                .same_unnamed(frame)
                .map(|unnamed| unnamed.intent.clone());
            let fresh = repeated.is_none();
            let intent = match repeated {
                Some(intent) => intent,
                None => {
                    if let Some(sql) = sql {
                        self.pin_if_needed_extended(sql);
                    }
                    intent_of_text(self)
                }
            };
            match sql {
                Some(sql) => {
                    self.unit_writes |= ends_write(&intent, self.client_status);
                    self.unit_copies |= state::starts_copy(sql);
                }
                None => {
                    self.unit_writes = true;
                    self.unit_copies = true;
                }
            }
            if fresh {
                // A copy: the frame shares the client's read buffer, which
                // an idle client must not hold on to.
                let parse = Frame::build(fe::PARSE, |b| b.extend_from_slice(frame.body()));
                self.unnamed = Some(Unnamed { parse, intent });
            }
            self.forward(frame, Kind::Parse).await?;
            self.server.as_mut().expect("attached").unnamed_ready = true;
            return Ok(());
        }
        if self.names_verbatim() {
            // Kept for the intent of its Binds; PostgreSQL itself answers
            // a name in use (42P05) and keeps the first statement.
            if self.statements.get(parse.name).is_none() {
                let intent = intent_of_text(self);
                self.statements.insert(
                    parse.name,
                    Statement::new(&parse, intent, &self.shared.stale_statements),
                );
            }
            return self.forward(frame, Kind::Parse).await;
        }
        if self.statements.get(parse.name).is_some() {
            let message = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(parse.name)
            );
            self.pending.push_synthetic(backend::error_response(
                Severity::Error,
                "42P05",
                &message,
            ));
            self.skip_to_sync = true;
            return Ok(());
        }
        let intent = intent_of_text(self);
        if let Some(sql) = sql {
            self.pin_if_needed_extended(sql);
        }
        let statement = Statement::new(&parse, intent, &self.shared.stale_statements);
        self.statements.insert(parse.name, statement.clone());
        self.prepare_on_server(&statement, Some(parse.name.to_vec()))
            .await
    }
    /// A statement prepared before a DDL changed its result type (see
    /// `StaleStatements`); in session mode the server itself says so.
    pub(super) fn outdated(&self, statement: &Statement) -> bool {
        !self.names_verbatim() && self.shared.stale_statements.outdated(statement)
    }
    /// Answers a Bind or Describe of an outdated statement as PostgreSQL
    /// does, and skips the rest of the batch as after any error.
    fn refuse_outdated(&mut self) {
        self.pending.push_synthetic(backend::error_response(
            Severity::Error,
            "0A000",
            "cached plan must not change result type",
        ));
        self.skip_to_sync = true;
    }
    /// Forwards a Bind or Describe of the client's `statement`, remembered
    /// in case the server says its copy went stale.
    async fn forward_using(
        &mut self,
        frame: &Frame,
        kind: Kind,
        statement: Arc<Statement>,
    ) -> Result<(), ClientError> {
        self.send_to_server(frame).await?;
        self.pending.push_using(kind, statement);
        Ok(())
    }
    /// The unnamed statement, if `parse` makes it again from the same text
    /// and parameter types: drivers without named statements (pgbench
    /// `-M extended`, many ORMs) send the same Parse before every Bind,
    /// and classifying it costs more than the rest of its handling.
    pub(super) fn same_unnamed(&self, parse: &Frame) -> Option<&Unnamed> {
        self.unnamed
            .as_ref()
            .filter(|unnamed| unnamed.parse.body() == parse.body())
    }
    /// Where a Bind or Describe of statement `name` goes when it is no named
    /// statement the proxy knows: the unnamed statement's route.
    fn unnamed_intent(&self, name: &[u8]) -> Intent {
        match &self.unnamed {
            Some(unnamed) if name.is_empty() => unnamed.intent.clone(),
            _ => Intent::Write,
        }
    }
    /// Puts the client's unnamed statement on the attached server if it is
    /// not there (a new transaction on another connection, or a simple
    /// query since), hidden from the client, as named ones are.
    async fn prepare_unnamed(&mut self) -> Result<(), ClientError> {
        let server = self.server.as_mut().expect("attached");
        if server.unnamed_ready {
            return Ok(());
        }
        let Some(unnamed) = &self.unnamed else {
            return Ok(());
        };
        send_quietly(server, &unnamed.parse).await;
        server.unnamed_ready = true;
        self.pending.push(Kind::Parse, false);
        Ok(())
    }
    /// In session mode the client has its server connection for life, so
    /// its statement names go to the server as they are, as on a direct
    /// connection: SQL `EXECUTE name` runs a statement prepared through the
    /// protocol, and `pg_prepared_statements` shows the client's names.
    /// (A client pinned in transaction mode keeps the global names its
    /// statements already have on servers.)
    fn names_verbatim(&self) -> bool {
        self.mode() == PoolMode::Session
    }
    /// Session state changed through the extended protocol is not followed:
    /// such a client keeps its server connection.
    pub(super) fn pin_if_needed_extended(&mut self, sql: &str) {
        let head = state::Head::of(sql);
        if let Some(reason) = head.pin_reason() {
            self.pin(reason);
        } else if !matches!(head.param_change(), Ok(None)) {
            self.pin(PinReason::UntrackedSet);
        }
    }
    pub(super) fn pin(&mut self, reason: PinReason) {
        if self.pinned.is_none() && self.mode() == PoolMode::Transaction {
            tracing::info!(
                parent: &self.span,
                reason = reason.as_str(),
                "client pinned to its server connection"
            );
            self.pinned = Some(reason);
            self.shared.metrics.pinned(reason);
        }
    }
    /// Makes sure the attached server holds `statement`. `client_name` is set
    /// when this answers the client's own Parse: then the client sees a
    /// ParseComplete either way; otherwise the inserted Parse stays hidden.
    pub(super) async fn prepare_on_server(
        &mut self,
        statement: &Statement,
        client_name: Option<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let visible = client_name.is_some();
        let server = self.server.as_mut().expect("attached");
        let (global, metrics) = (&statement.global, &self.shared.metrics);
        match server
            .conn
            .prepare_counted(global, &statement.parse, metrics)
            .await
        {
            Ok(Prepared::Held) => {
                if visible {
                    self.pending.push_synthetic(backend::parse_complete());
                }
                return Ok(());
            }
            Ok(Prepared::Now { evicted: true }) => self.pending.push(Kind::Close, false),
            Ok(Prepared::Now { evicted: false }) => {}
            Err(e) => tracing::debug!(error = %e, "write to server failed"),
        }
        self.pending.push_parse(
            visible,
            ParseUndo {
                global: statement.global.clone(),
                client_name,
            },
        );
        Ok(())
    }
}
