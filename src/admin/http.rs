//! The admin HTTP listener: read-only views of the proxy for Prometheus,
//! load balancers and operators. Endpoints that change anything go through
//! `mutating`, behind the `[admin] token` bearer token.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Secret;
use crate::frontend::Shared;
use crate::ha::HaStatus;
use crate::metrics::{self, ScrapeView};
use crate::topology::{Health, Node, Role, Topology};

/// Serves until the proxy's shutdown signal; open requests are finished first.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        // A dropped sender is a stop too.
        let _ = shutdown.wait_for(|&stop| stop).await;
    };
    if let Err(e) = axum::serve(listener, router(shared))
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "admin HTTP listener failed");
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    let config = shared.config.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/topology", get(topology))
        .merge(guarded(mutating(), move || {
            config.load().admin.token.clone()
        }))
        .with_state(shared)
}

/// Endpoints that change the cluster. Every route here is behind the
/// bearer token by `guarded`.
fn mutating() -> Router<Arc<Shared>> {
    Router::new()
        .route("/switchover", post(switchover))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/reload", post(reload))
}

#[derive(Deserialize)]
struct SwitchoverParams {
    /// The replica to promote (its address as in `[cluster] nodes`); the
    /// most advanced eligible replica when absent.
    to: Option<String>,
}

/// Runs a planned switchover through the controller, wherever it runs, and
/// answers with its history entry once the new primary is published.
async fn switchover(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<SwitchoverParams>,
) -> Response {
    let to = match params.to.as_deref().map(str::parse::<std::net::SocketAddr>) {
        None => None,
        Some(Ok(addr)) => Some(addr),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &format!("to: {e}")),
    };
    match shared.ha.switchover(to).await {
        Ok(entry) => Json(entry).into_response(),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

/// Rereads the configuration file and applies what may change live.
async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    match crate::reload::from_file(&shared) {
        Ok(changed) => Json(json!({ "reloaded": true, "changed": changed })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

async fn pause(State(shared): State<Arc<Shared>>) -> Response {
    match shared.ha.pause().await {
        Ok(()) => Json(json!({ "paused": true })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn resume(State(shared): State<Arc<Shared>>) -> Response {
    match shared.ha.resume().await {
        Ok(()) => Json(json!({ "paused": false })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Where the current token comes from: read at each request, so that a
/// reload can set, change or remove it.
type TokenSource = Arc<dyn Fn() -> Option<Secret> + Send + Sync>;

/// Puts every route of `routes` behind `Authorization: Bearer <token>`.
/// Without a configured token they are disabled (403): an open mutating
/// endpoint is never the default.
pub fn guarded<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    token: impl Fn() -> Option<Secret> + Send + Sync + 'static,
) -> Router<S> {
    if !routes.has_routes() {
        // axum refuses a route layer on an empty router.
        return routes;
    }
    let token: TokenSource = Arc::new(token);
    routes.route_layer(middleware::from_fn_with_state(token, require_token))
}

async fn require_token(State(token): State<TokenSource>, request: Request, next: Next) -> Response {
    let Some(token) = token() else {
        return error(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: set [admin] token",
        );
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| same_secret(given.as_bytes(), token.expose().as_bytes())) {
        return next.run(request).await;
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compares in time independent of where the inputs differ, so that the
/// token cannot be guessed byte by byte from response times.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let topology = shared.topology.load_full();
    let pools = shared.pools.statuses();
    let ha = shared.ha.status();
    let clients = shared.cancels.count_by_state();
    let view = ScrapeView {
        clients: &clients,
        topology: &topology,
        ha: &ha,
        pools: &pools,
        classify: shared.classifier.stats(),
    };
    match shared.metrics.scrape(&view) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed")
        }
    }
}

/// Liveness: the process runs and serves HTTP.
async fn health() -> &'static str {
    "ok"
}

/// Readiness: writes have somewhere to go.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let topology = shared.topology.load();
    if let Some(primary) = topology.primary() {
        let body = json!({
            "ready": true,
            "primary": primary.addr.to_string(),
            "epoch": topology.epoch.0,
        });
        return (StatusCode::OK, Json(body)).into_response();
    }
    let claims = topology
        .nodes
        .iter()
        .filter(|n| n.role == Role::Primary && n.health == Health::Up)
        .count();
    let reason = if claims > 1 {
        "more than one node claims to be primary: writes are refused"
    } else {
        "no primary is up: writes are refused"
    };
    let body = json!({ "ready": false, "reason": reason, "epoch": topology.epoch.0 });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn topology(State(shared): State<Arc<Shared>>) -> Json<TopologyView> {
    Json(TopologyView::new(
        &shared.topology.load(),
        shared.ha.status(),
    ))
}

#[derive(Serialize)]
struct TopologyView {
    epoch: u64,
    /// The epoch's primary, while it is up and out of recovery.
    primary: Option<String>,
    /// The proxy id running the HA controller.
    leader: Option<String>,
    /// Whether this proxy runs it.
    is_leader: bool,
    coordinator_reachable: bool,
    /// Why writes are refused, when they are.
    writes_refused: Option<String>,
    paused: bool,
    nodes: Vec<NodeView>,
}

/// LSNs are PostgreSQL's `X/Y` text, so they can be pasted into SQL.
#[derive(Serialize)]
struct NodeView {
    address: String,
    role: &'static str,
    health: &'static str,
    current_lsn: Option<String>,
    replay_lsn: Option<String>,
    receive_lsn: Option<String>,
    timeline: Option<u32>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    lagging: bool,
    /// A former primary: no traffic until it is a replica again.
    fenced: bool,
}

impl TopologyView {
    fn new(topology: &Topology, ha: HaStatus) -> TopologyView {
        TopologyView {
            epoch: topology.epoch.0,
            primary: topology.primary().map(|p| p.addr.to_string()),
            leader: ha.leader,
            is_leader: ha.is_leader,
            coordinator_reachable: ha.coordinator_reachable,
            writes_refused: topology.writes_refused.clone(),
            paused: topology.is_paused(),
            nodes: topology
                .nodes
                .iter()
                .map(|n| NodeView::new(n, topology.is_fenced(n.id)))
                .collect(),
        }
    }
}

impl NodeView {
    fn new(node: &Node, fenced: bool) -> NodeView {
        let text = |lsn: Option<crate::topology::Lsn>| lsn.map(|l| l.to_string());
        NodeView {
            address: node.addr.to_string(),
            role: node.role.as_str(),
            health: node.health.as_str(),
            current_lsn: text(node.current_lsn),
            replay_lsn: text(node.replay_lsn),
            receive_lsn: text(node.receive_lsn),
            timeline: node.timeline,
            lag_bytes: node.lag_bytes,
            lag_seconds: node.lag.map(|d| d.as_secs_f64()),
            lagging: node.lagging,
            fenced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"", b"token"));
    }
}
