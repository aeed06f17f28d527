//! Abuse limits on the SSH endpoint: failed authentications per source address and
//! per offered key, and submits per user key. An address that keeps failing is shut
//! out for a cool-down (its connections are closed at accept), so a flood of bad
//! logins costs the node almost nothing while other clients keep working.

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use mesh_core::Fingerprint;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed authentications an address may make in a burst before it is shut out.
const AUTH_FAILURE_BURST: u32 = 10;
/// Failed authentications per minute an address may make in the long run.
const AUTH_FAILURES_PER_MINUTE: u32 = 20;
/// How long an address that exceeded its failures is shut out.
const AUTH_COOL_DOWN: Duration = Duration::from_secs(30);
/// Submits a key may make per second in the long run: above what one client waiting
/// for each commit reaches (one node: ~2,200 a second by exec, more by submit-stream),
/// so the limit only stops a key that floods; batches count once.
const SUBMITS_PER_SECOND: u32 = 5000;
/// Submits a key may make in a burst.
const SUBMIT_BURST: u32 = 10000;

/// The endpoint's limits, shared by every connection.
#[derive(Clone)]
pub struct Limits {
    auth_by_addr: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    auth_by_key: Arc<DefaultKeyedRateLimiter<Fingerprint>>,
    submits: Arc<DefaultKeyedRateLimiter<Fingerprint>>,
    shut_out: Arc<Mutex<HashMap<IpAddr, Instant>>>,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("limits are positive constants")
}

impl Default for Limits {
    fn default() -> Self {
        let auth =
            Quota::per_minute(nz(AUTH_FAILURES_PER_MINUTE)).allow_burst(nz(AUTH_FAILURE_BURST));
        Limits {
            auth_by_addr: Arc::new(RateLimiter::keyed(auth)),
            auth_by_key: Arc::new(RateLimiter::keyed(auth)),
            submits: Arc::new(RateLimiter::keyed(
                Quota::per_second(nz(SUBMITS_PER_SECOND)).allow_burst(nz(SUBMIT_BURST)),
            )),
            shut_out: Arc::default(),
        }
    }
}

impl Limits {
    /// Whether connections from `addr` are refused now.
    pub fn is_shut_out(&self, addr: IpAddr) -> bool {
        let mut map = self.shut_out.lock().expect("not poisoned");
        match map.get(&addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                map.remove(&addr);
                false
            }
            None => false,
        }
    }

    /// Count a failed authentication; returns true when the address or key is now
    /// over its limit (the address is then shut out for the cool-down).
    pub fn auth_failed(&self, addr: IpAddr, key: Option<&Fingerprint>) -> bool {
        let by_addr = self.auth_by_addr.check_key(&addr).is_err();
        let by_key = key.is_some_and(|k| self.auth_by_key.check_key(k).is_err());
        if by_addr || by_key {
            self.shut_out
                .lock()
                .expect("not poisoned")
                .insert(addr, Instant::now() + AUTH_COOL_DOWN);
            metrics::counter!("mesh_ssh_rate_limited_total", "what" => "auth").increment(1);
        }
        by_addr || by_key
    }

    /// Whether `key` may submit now.
    pub fn allow_submit(&self, key: &Fingerprint) -> Result<(), String> {
        self.submits.check_key(key).map_err(|_| {
            metrics::counter!("mesh_ssh_rate_limited_total", "what" => "submit").increment(1);
            format!("rate limited: key {key} submits more than {SUBMITS_PER_SECOND} tasks per second; slow down and retry, or submit a batch")
        })
    }

    /// Forget old entries (called now and then so the maps stay small).
    pub fn prune(&self) {
        self.auth_by_addr.retain_recent();
        self.auth_by_key.retain_recent();
        self.submits.retain_recent();
        let now = Instant::now();
        self.shut_out
            .lock()
            .expect("not poisoned")
            .retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_shut_out_after_its_burst_and_others_are_not() {
        let limits = Limits::default();
        let bad: IpAddr = "127.0.0.3".parse().unwrap();
        let good: IpAddr = "127.0.0.1".parse().unwrap();
        let over = (0..AUTH_FAILURE_BURST + 1)
            .map(|_| limits.auth_failed(bad, None))
            .filter(|x| *x)
            .count();
        assert_eq!(over, 1);
        assert!(limits.is_shut_out(bad));
        assert!(!limits.is_shut_out(good));
        let key = Fingerprint::of_key_blob(b"k");
        assert!(limits.allow_submit(&key).is_ok());
    }
}
