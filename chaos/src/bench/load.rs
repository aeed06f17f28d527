//! A closed-loop load generator: `clients` tasks, each sending its next request as
//! soon as the previous one is answered, for a fixed time after a warm-up. The same
//! driver measures Mesh submits and etcd puts, so both see the same client behaviour.

use futures::future::BoxFuture;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long requests run before measuring starts (connections warm, caches filled).
pub const WARM_UP: Duration = Duration::from_secs(2);

/// One request of client `client`, its `seq`-th; `Ok(n)`: it carried `n` operations
/// (a batch of tasks counts each task).
pub type Op<C> =
    Arc<dyn Fn(Arc<C>, usize, u64) -> BoxFuture<'static, anyhow::Result<u64>> + Send + Sync>;

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadStats {
    /// Concurrent clients.
    pub clients: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Operations acknowledged in the measured window.
    pub ops: u64,
    /// Requests that failed in the measured window.
    pub errors: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Request latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest request.
    pub max_ms: f64,
    /// Raft elections (terms begun) while the load ran, where the scenario counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elections: Option<u64>,
    /// The first error seen, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

struct ClientTally {
    ops: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    first_error: Option<String>,
}

/// Run `op` from each of `clients` for `WARM_UP + duration`; only the last
/// `duration` is measured.
pub async fn drive<C: Send + Sync + 'static>(
    clients: Vec<Arc<C>>,
    duration: Duration,
    op: Op<C>,
) -> LoadStats {
    let n = clients.len();
    let start = Instant::now();
    let measure_from = start + WARM_UP;
    let end = measure_from + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut tally = ClientTally {
                    ops: 0,
                    errors: 0,
                    latencies_us: Vec::new(),
                    first_error: None,
                };
                let mut seq = 0u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let result = op(c.clone(), i, seq).await;
                    seq += 1;
                    let done = Instant::now();
                    if sent < measure_from || done > end {
                        continue;
                    }
                    match result {
                        Ok(k) => {
                            tally.ops += k;
                            tally
                                .latencies_us
                                .push((done - sent).as_micros().min(u64::MAX as u128) as u64);
                        }
                        Err(e) => {
                            tally.errors += 1;
                            if tally.first_error.is_none() {
                                tally.first_error = Some(format!("{e:#}"));
                            }
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Vec::new();
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        let tally = t.await.expect("load client panicked");
        ops += tally.ops;
        errors += tally.errors;
        all.extend(tally.latencies_us);
        first_error = first_error.or(tally.first_error);
    }
    all.sort_unstable();
    let seconds = duration.as_secs_f64();
    LoadStats {
        clients: n,
        seconds,
        ops,
        errors,
        ops_per_sec: ops as f64 / seconds,
        p50_ms: percentile_ms(&all, 0.50),
        p99_ms: percentile_ms(&all, 0.99),
        p999_ms: percentile_ms(&all, 0.999),
        max_ms: all.last().map_or(0.0, |v| *v as f64 / 1000.0),
        elections: None,
        first_error,
    }
}

/// The `q` quantile of sorted microsecond samples, in milliseconds (nearest rank).
pub fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 500.0);
        assert_eq!(percentile_ms(&v, 0.99), 990.0);
        assert_eq!(percentile_ms(&v, 0.999), 999.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&[7000], 0.999), 7.0);
    }

    #[tokio::test]
    async fn the_driver_counts_ops_and_errors_of_every_client() {
        let clients: Vec<Arc<()>> = (0..4).map(|_| Arc::new(())).collect();
        let op: Op<()> = Arc::new(|_, i, seq| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if i == 0 && seq % 2 == 0 {
                    anyhow::bail!("even request of client 0");
                }
                Ok(2)
            })
        });
        let s = drive(clients, Duration::from_millis(500), op).await;
        assert_eq!(s.clients, 4);
        assert!(s.ops > 0 && s.ops % 2 == 0, "{s:?}");
        assert!(s.errors > 0, "{s:?}");
        assert_eq!(s.first_error.as_deref(), Some("even request of client 0"));
        assert!(s.p50_ms >= 5.0, "{s:?}");
    }
}
