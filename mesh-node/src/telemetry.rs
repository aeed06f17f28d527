//! Logs (tracing, text or JSON) and the Prometheus recorder with the gauges derived
//! from Raft and the state machine.

use crate::service::Service;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often derived gauges are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// Install the tracing subscriber (`RUST_LOG` filters; default `info`).
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,openraft=warn,russh=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Install the process-wide Prometheus recorder.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// Refresh the Raft and task gauges until shutdown.
pub async fn refresh_gauges(service: Service, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = service.status();
        metrics::gauge!("mesh_raft_term").set(s.term as f64);
        metrics::gauge!("mesh_raft_leader").set(s.leader.map_or(-1.0, |l| l.0 as f64));
        metrics::gauge!("mesh_raft_last_log_index").set(s.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("mesh_raft_applied_index").set(s.applied_index.unwrap_or(0) as f64);
        for state in [
            "pending",
            "assigned",
            "running",
            "succeeded",
            "failed",
            "cancelled",
        ] {
            metrics::gauge!("mesh_tasks", "state" => state)
                .set(*s.tasks.get(state).unwrap_or(&0) as f64);
        }
    }
}

/// How often the runtime-lag probe wakes.
const LAG_PROBE: Duration = Duration::from_millis(10);
/// Lag worth a log line: a third of the default shortest election timeout (150 ms).
const LAG_WARN: Duration = Duration::from_millis(50);

/// Measure how late the async runtime wakes a timer (`mesh_runtime_lag_seconds`): a
/// runtime whose workers are all blocked (a sync lock held long, CPU starvation) runs
/// no Raft heartbeats either, and shows here first. Long lags are logged.
pub async fn probe_runtime_lag(shutdown: CancellationToken) {
    loop {
        let due = tokio::time::Instant::now() + LAG_PROBE;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        let lag = due.elapsed();
        metrics::histogram!("mesh_runtime_lag_seconds").record(lag.as_secs_f64());
        if lag > LAG_WARN {
            tracing::warn!(
                lag_ms = lag.as_millis() as u64,
                "the async runtime woke a timer late"
            );
        }
    }
}
