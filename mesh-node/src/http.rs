//! The HTTP endpoint: Prometheus `/metrics` and `/health/{live,ready,status}`.

use crate::service::Service;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ctx {
    service: Service,
    prometheus: PrometheusHandle,
}

/// Serve until shutdown.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    prometheus: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/health/status", get(status))
        .with_state(Ctx {
            service,
            prometheus,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "http endpoint failed");
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    ctx.prometheus.render()
}

/// Ready when the node knows a leader and has a GPU adapter (storage is open by the
/// time the endpoint starts).
async fn ready(State(ctx): State<Ctx>) -> impl IntoResponse {
    let s = ctx.service.status();
    let mut missing = Vec::new();
    if s.leader.is_none() {
        missing.push("no Raft leader known");
    } else if ctx.service.cut_off() {
        missing.push("cut off from the leader (no heartbeat acknowledged within the node timeout)");
    }
    if s.adapter.is_none() {
        missing.push("no GPU adapter");
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

async fn status(State(ctx): State<Ctx>) -> impl IntoResponse {
    Json(ctx.service.status())
}
