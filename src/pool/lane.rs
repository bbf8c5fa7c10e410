//! Pipelined reads: autocommit one-statement reads of different clients
//! share a server connection at once, written back to back and answered in
//! order, so a CPU-bound server keeps a few busy backends instead of one
//! per client (`pool.pipeline_depth`).
//!
//! PostgreSQL runs simple-protocol Query messages one after another and
//! answers each with its own ReadyForQuery; a read outside a transaction
//! block leaves nothing behind, so the next one may be anybody's. What does
//! not survive sharing stays off lanes: transactions, writes (their commit
//! LSN is learned on their own connection), session state, COPY. A
//! client's named statement runs under its global name (see
//! `frontend::session::statements`), which any client preparing the same
//! text shares: the lane's connection prepares it the first time a read
//! needs it and keeps it, as any pooled connection does.
//!
//! A cancel must never reach another client's statement. A read cancelled
//! before it runs is answered "cancelled" at once and its answer dropped
//! when it comes (a read changes nothing). For the read running, the lane
//! takes no more work, the reads queued behind it are handed back to their
//! sessions to run elsewhere (they have answered nothing yet: answers come
//! in order), and only then does the server's cancel go out; the
//! connection is closed at the end rather than pooled, so a late cancel
//! cannot hit a later statement.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Checkout;
use super::registry::{CheckoutError, PoolHandle};
use super::server::{Loss, Prepared};
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::session::{Params, Statement, sync_sql};
use crate::metrics::Metrics;
use crate::protocol::backend::{
    CLOSE_COMPLETE, ERROR_RESPONSE, ErrorFields, PARSE_COMPLETE, READY_FOR_QUERY, is_fatal,
};
use crate::protocol::{frame, frontend};

/// An idle lane keeps its connection this long before handing it back to
/// the pool: under load a lane drains between bursts, and reopening it
/// each time would cost a checkout.
const LINGER: Duration = Duration::from_millis(10);

/// What a lane tells the session whose read it carries.
#[derive(Debug)]
pub struct LaneReply {
    pub id: u64,
    pub event: LaneEvent,
}

#[derive(Debug)]
pub enum LaneEvent {
    /// Whole messages of the answer; more follow.
    Data(Bytes),
    /// The rest of the answer, ending with its ReadyForQuery.
    Done(Bytes),
    /// Not run here and nothing answered: the session runs it itself.
    Redo,
    /// The connection failed after part of the answer went to the
    /// client: why, when known.
    Lost(Option<String>),
    /// Cancelled before it ran: its answer goes to nobody.
    Cancelled,
}

/// Where a session hears about its reads on lanes.
pub type Replies = (mpsc::Sender<LaneReply>, mpsc::Receiver<LaneReply>);

/// A read on its way, and how to cancel it.
pub struct Ticket {
    pub id: u64,
    lane: mpsc::UnboundedSender<LaneMsg>,
}

impl Ticket {
    pub fn cancel(&self) {
        let _ = self.lane.send(LaneMsg::Cancel(self.id));
    }

    /// Resolves once the lane takes no more messages (its task ending, or
    /// panicking). By then it has answered, or is handing back, every read
    /// it took: a session that hears nothing more takes its read as handed
    /// back (lost, if partly answered) instead of waiting forever.
    pub async fn lane_gone(&self) {
        self.lane.closed().await
    }
}

enum LaneMsg {
    Run(Request),
    Cancel(u64),
}

struct Request {
    id: u64,
    /// Whole messages, ending where the server answers ReadyForQuery.
    messages: Bytes,
    /// The client's prepared statement the messages use under its global
    /// name: the lane's connection prepares it first when it lacks it.
    statement: Option<Arc<Statement>>,
    reply: mpsc::Sender<LaneReply>,
}

/// The open lanes of one pool (node, user, database).
pub struct Lanes {
    open: Mutex<Vec<Lane>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

struct Lane {
    serial: u64,
    /// Session parameters its connection has: only clients with exactly
    /// these share it.
    params: Params,
    tx: mpsc::UnboundedSender<LaneMsg>,
    /// Reads sent to the lane and not yet answered in full.
    in_flight: Arc<AtomicUsize>,
}

impl Lanes {
    pub fn new(metrics: Arc<Metrics>) -> Lanes {
        Lanes {
            open: Mutex::default(),
            next_id: AtomicU64::default(),
            metrics,
        }
    }

    /// Puts `messages` on the least busy lane of clients with `params`, or on
    /// a new one while every lane has `depth` reads and lanes hold less than
    /// `max_lanes` connections.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        self: &Arc<Self>,
        pool: &PoolHandle,
        depth: usize,
        max_lanes: usize,
        params: &Params,
        messages: Bytes,
        statement: Option<Arc<Statement>>,
        reply: mpsc::Sender<LaneReply>,
        cancels: &CancelRegistry,
    ) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let request = LaneMsg::Run(Request {
            id,
            messages,
            statement,
            reply,
        });
        let mut open = self.open.lock().expect("lanes lock");
        let least_busy = (0..open.len())
            .filter(|&i| open[i].params == *params)
            .min_by_key(|&i| open[i].in_flight.load(Ordering::Relaxed));
        let room = open.len() < max_lanes;
        let at = match least_busy {
            Some(i) if open[i].in_flight.load(Ordering::Relaxed) < depth || !room => i,
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                let in_flight = Arc::<AtomicUsize>::default();
                let task = LaneTask {
                    serial: id,
                    lanes: self.clone(),
                    params: params.clone(),
                    rx,
                    in_flight: in_flight.clone(),
                    cancels: cancels.clone(),
                    queue: VecDeque::new(),
                    waiting: VecDeque::new(),
                    retired: false,
                    cancelled: false,
                };
                tokio::spawn(task.run(pool.clone()));
                open.push(Lane {
                    serial: id,
                    params: params.clone(),
                    tx,
                    in_flight,
                });
                open.len() - 1
            }
        };
        let lane = &open[at];
        lane.in_flight.fetch_add(1, Ordering::Relaxed);
        // A lane leaves this list, under this lock, before its task stops
        // taking messages (and hands back what it will not run): the send
        // fails only if the runtime is going down.
        let _ = lane.tx.send(request);
        Ticket {
            id,
            lane: lane.tx.clone(),
        }
    }

    fn remove(&self, serial: u64) {
        self.open
            .lock()
            .expect("lanes lock")
            .retain(|lane| lane.serial != serial);
    }

    /// Removes an idle lane, unless a read came in meanwhile.
    fn remove_if_idle(&self, serial: u64, in_flight: &AtomicUsize) -> bool {
        let mut open = self.open.lock().expect("lanes lock");
        if in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        open.retain(|lane| lane.serial != serial);
        true
    }
}

/// A read written to the server, in answer order.
struct InFlight {
    id: u64,
    /// `None`: answered to nobody (the proxy's own SET, a read handed back).
    reply: Option<mpsc::Sender<LaneReply>>,
    /// Part of the answer went to the client.
    answered: bool,
    /// The proxy's own statement: an error in it leaves the connection's
    /// settings unknown.
    own: bool,
    /// Replies to the Close (of a statement evicted for room) and Parse the
    /// lane put before the read's own messages: they lead its answer and
    /// the client never sees them.
    hidden: u8,
    /// The statement that Parse prepared: forgotten if the Parse fails.
    prepared: Option<Arc<Statement>>,
}

impl InFlight {
    fn new(id: u64, reply: Option<mpsc::Sender<LaneReply>>, own: bool) -> InFlight {
        InFlight {
            id,
            reply,
            answered: false,
            own,
            hidden: 0,
            prepared: None,
        }
    }
}

/// Why a lane stops: its connection is not reused. `why` is what the
/// server said as it went, or how its connection failed, when it did: a
/// client whose read was partly answered is told.
#[derive(Debug, Default)]
struct Broken {
    why: Option<String>,
}

impl Broken {
    fn because(why: impl std::fmt::Display) -> Broken {
        Broken {
            why: Some(why.to_string()),
        }
    }
}

struct LaneTask {
    serial: u64,
    lanes: Arc<Lanes>,
    params: Params,
    rx: mpsc::UnboundedReceiver<LaneMsg>,
    in_flight: Arc<AtomicUsize>,
    cancels: CancelRegistry,
    queue: VecDeque<InFlight>,
    /// Reads that came while the lane waited for its connection.
    waiting: VecDeque<Request>,
    /// No longer among the open lanes: takes no more reads.
    retired: bool,
    /// A server cancel went out: the connection is closed at the end.
    cancelled: bool,
}

impl LaneTask {
    async fn run(mut self, pool: PoolHandle) {
        let mut conn = match self.connect(&pool).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::debug!(error = %e, "no connection for a lane");
                None
            }
        };
        let (reusable, why) = match &mut conn {
            Some(conn) => match self.serve(conn).await {
                Ok(()) => (!self.cancelled, None),
                Err(broken) => (false, broken.why),
            },
            None => (false, None),
        };
        self.retire();
        for read in std::mem::take(&mut self.queue) {
            self.done(&read);
            if let Some(reply) = read.reply {
                let event = match read.answered {
                    true => LaneEvent::Lost(why.clone()),
                    false => LaneEvent::Redo,
                };
                let _ = reply.send(LaneReply { id: read.id, event }).await;
            }
        }
        for request in std::mem::take(&mut self.waiting) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            redo(request).await;
        }
        self.hand_back_queued().await;
        match conn {
            Some(mut conn) if reusable => conn.clean = true,
            Some(conn) => super::discard(conn),
            None => {}
        }
    }

    /// A server connection for the lane. The reads that come meanwhile
    /// wait (a cancel of one answers it at once).
    async fn connect(&mut self, pool: &PoolHandle) -> Result<Checkout, CheckoutError> {
        let checkout = pool.checkout();
        tokio::pin!(checkout);
        loop {
            tokio::select! {
                checkout = &mut checkout => return checkout,
                Some(msg) = self.rx.recv() => match msg {
                    LaneMsg::Run(request) => self.waiting.push_back(request),
                    LaneMsg::Cancel(id) => {
                        if let Some(at) = self.waiting.iter().position(|r| r.id == id) {
                            let request = self.waiting.remove(at).expect("found");
                            self.in_flight.fetch_sub(1, Ordering::Relaxed);
                            let event = LaneEvent::Cancelled;
                            let _ = request.reply.send(LaneReply { id, event }).await;
                        }
                    }
                },
            }
        }
    }

    /// Writes reads as they come (those that waited for the connection
    /// first) and hands each its answer, until the lane sits idle past
    /// `LINGER`, or breaks.
    async fn serve(&mut self, conn: &mut Checkout) -> Result<(), Broken> {
        conn.clean = false;
        if let Some(sql) = sync_sql(&self.params, &conn.applied) {
            conn.queue(&frontend::query(&sql))
                .await
                .map_err(Broken::because)?;
            conn.applied = self.params.clone();
            self.queue.push_back(InFlight::new(0, None, true));
        }
        while let Some(request) = self.waiting.pop_front() {
            self.take(conn, LaneMsg::Run(request)).await?;
        }
        conn.flush().await.map_err(Broken::because)?;
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        loop {
            if self.queue.is_empty() {
                if self.retired {
                    return Ok(());
                }
                linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
            }
            tokio::select! {
                biased;
                read = conn.read_more() => match read {
                    Ok(n) if n > 0 => self.answer(conn).await?,
                    read => return Err(Broken { why: Loss::of_read(&read).map(|loss| loss.to_string()) }),
                },
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return Err(Broken::default()) };
                    self.take(conn, msg).await?;
                    // Behind the sessions woken with this one: their reads
                    // leave in the same write, and wake the server once.
                    tokio::task::yield_now().await;
                    while let Ok(msg) = self.rx.try_recv() {
                        self.take(conn, msg).await?;
                    }
                    conn.flush().await.map_err(Broken::because)?;
                }
                _ = &mut linger, if self.queue.is_empty() => {
                    if self.lanes.remove_if_idle(self.serial, &self.in_flight) {
                        self.retired = true;
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn take(&mut self, conn: &mut Checkout, msg: LaneMsg) -> Result<(), Broken> {
        match msg {
            LaneMsg::Run(request) if self.retired => {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                redo(request).await;
            }
            LaneMsg::Run(request) => {
                // In the queue first: if the write fails, the read is
                // handed back with the others.
                let read = InFlight::new(request.id, Some(request.reply), false);
                self.queue.push_back(read);
                if let Some(statement) = request.statement {
                    self.prepare(conn, statement).await?;
                }
                conn.queue_bytes(&request.messages)
                    .await
                    .map_err(Broken::because)?;
            }
            LaneMsg::Cancel(id) => {
                let Some(at) = self.queue.iter().position(|r| r.id == id) else {
                    return Ok(());
                };
                if at > 0 {
                    // Not running yet: its client is told now, and its
                    // answer, when it comes, goes to nobody.
                    if let Some(reply) = self.queue[at].reply.take() {
                        let event = LaneEvent::Cancelled;
                        let _ = reply.send(LaneReply { id, event }).await;
                    }
                    return Ok(());
                }
                self.retire();
                for read in self.queue.iter_mut().skip(1) {
                    if let Some(reply) = read.reply.take() {
                        let event = LaneEvent::Redo;
                        let _ = reply.send(LaneReply { id: read.id, event }).await;
                    }
                }
                self.cancelled = true;
                let (cancels, addr, key) = (self.cancels.clone(), conn.addr, conn.key);
                tokio::spawn(async move { cancels.send_cancel(addr, key).await });
            }
        }
        Ok(())
    }

    /// Puts `statement` on the connection ahead of the last read queued,
    /// unless the connection holds it already.
    async fn prepare(
        &mut self,
        conn: &mut Checkout,
        statement: Arc<Statement>,
    ) -> Result<(), Broken> {
        let metrics = &self.lanes.metrics;
        let prepared = conn.prepare_counted(&statement.global, &statement.parse, metrics);
        let Prepared::Now { evicted } = prepared.await.map_err(Broken::because)? else {
            return Ok(());
        };
        let read = self.queue.back_mut().expect("queued by the caller");
        read.hidden = 1 + u8::from(evicted);
        read.prepared = Some(statement);
        Ok(())
    }

    /// Hands every whole message read so far to the read it answers.
    async fn answer(&mut self, conn: &mut Checkout) -> Result<(), Broken> {
        let mut end = 0;
        loop {
            let buf = &conn.read_buf[end..];
            let Some((tag, total)) = frame::peek_header(buf).map_err(Broken::because)? else {
                break;
            };
            if buf.len() < total {
                break;
            }
            let head = self.queue.front_mut().ok_or_else(Broken::default)?;
            if tag == ERROR_RESPONSE && (head.own || is_fatal(&buf[..total])) {
                // The server is going away, or the connection's settings
                // are not what the lane says: the reads not yet answered
                // run elsewhere.
                let said = ErrorFields::decode_message(&buf[..total]);
                return Err(said.map_or_else(Broken::because, |f| Broken::because(f.message)));
            }
            if head.hidden > 0 {
                // Nothing of this read's answer came before them.
                debug_assert_eq!(end, 0);
                if tag == PARSE_COMPLETE || tag == CLOSE_COMPLETE {
                    head.hidden -= 1;
                    bytes::Buf::advance(&mut conn.read_buf, total);
                    continue;
                }
                // The Parse failed (the error is the client's, as its Bind
                // would have met it): the connection does not hold the
                // statement.
                head.hidden = 0;
                if let Some(statement) = head.prepared.take() {
                    conn.prepared.pop(&statement.global);
                }
            }
            end += total;
            if tag != READY_FOR_QUERY {
                continue;
            }
            let idle = conn.read_buf[end - 1] == b'I';
            let bytes = conn.read_buf.split_to(end).freeze();
            end = 0;
            let read = self.queue.pop_front().expect("head checked");
            self.done(&read);
            if let Some(reply) = read.reply {
                let event = LaneEvent::Done(bytes);
                let _ = reply.send(LaneReply { id: read.id, event }).await;
            }
            if !idle {
                // A read left a transaction open: nothing else may follow it.
                return Err(Broken::default());
            }
        }
        if end > 0 {
            let bytes = conn.read_buf.split_to(end).freeze();
            let head = self.queue.front_mut().expect("answered above");
            if let Some(reply) = &head.reply {
                head.answered = true;
                let event = LaneEvent::Data(bytes);
                if reply.send(LaneReply { id: head.id, event }).await.is_err() {
                    // The client went away: the rest of its answer is dropped.
                    head.reply = None;
                }
            }
        }
        Ok(())
    }

    /// A client's read leaves the lane (answered, handed back or lost).
    fn done(&self, read: &InFlight) {
        if !read.own {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn retire(&mut self) {
        if !self.retired {
            self.retired = true;
            self.lanes.remove(self.serial);
        }
    }

    /// Reads submitted but never written, after the lane retired.
    async fn hand_back_queued(&mut self) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            if let LaneMsg::Run(request) = msg {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                redo(request).await;
            }
        }
    }
}

async fn redo(request: Request) {
    let event = LaneEvent::Redo;
    let id = request.id;
    let _ = request.reply.send(LaneReply { id, event }).await;
}
