//! What the server gives any one client or upstream at most: forwards waiting at once, error
//! replies per source, TCP connections and the time a message may take.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{atomic::Ordering, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::op::ResponseCode;

use super::Handler;

/// Queries waiting on an upstream at once (each holds a socket of its own, from a random port):
/// past them a query that must be forwarded is answered REFUSED at once, as CoreDNS's
/// `forward` plugin does past `max_concurrent` (1 000 in Kubernetes' default Corefile).
pub const MAX_FORWARDS: usize = 1000;
/// TCP connections served at once; one past them is closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// How long a TCP connection may wait for its next message to start (RFC 7766 leaves it to
/// the server).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a TCP message may take to arrive once its length came, and a reply to be taken.
pub const TCP_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Error replies (FORMERR, NOTIMP) each source address gets: a burst, then so many a second.
/// Past it they are not sent: such replies are what a spoofed packet bounces between servers.
pub const ERROR_BURST: f64 = 20.0;
pub const ERRORS_PER_SECOND: f64 = 10.0;
/// Sources whose error rate is followed at once; when all are busy, a new one gets none.
const ERROR_SOURCES: usize = 4096;
/// The limits above, as `--help` names them.
pub fn limits_help() -> String {
    format!(
        "Limits (each refusal is counted in /metrics, weir_dns_*):\n  \
         - {MAX_FORWARDS} forwarded queries waiting on upstreams at once; past them: REFUSED\n  \
         - {MAX_TCP_CONNECTIONS} TCP connections; past them: closed. Each is closed after {} s idle,\n    \
         or {} s for a message to arrive\n  \
         - error replies (FORMERR, NOTIMP): a burst of {}, then {} a second per source;\n    \
         responses are never answered\n  \
         - an upstream that forwards back to this server (a loop, found by a probe) is not\n    \
         used while it does",
        TCP_IDLE.as_secs(),
        TCP_MESSAGE_TIMEOUT.as_secs(),
        ERROR_BURST,
        ERRORS_PER_SECOND
    )
}

/// A token bucket per source address for error replies, at most `ERROR_SOURCES` followed.
#[derive(Debug, Default)]
pub(super) struct ErrorLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl ErrorLimiter {
    /// Whether `src` may have one more error reply now.
    fn allow(&self, src: IpAddr) -> bool {
        let Ok(mut map) = self.buckets.lock() else {
            return false;
        };
        let now = Instant::now();
        if !map.contains_key(&src) && map.len() >= ERROR_SOURCES {
            // Sources whose bucket has filled up again are as good as new: forget them.
            let full = Duration::from_secs_f64(ERROR_BURST / ERRORS_PER_SECOND);
            map.retain(|_, (_, at)| now.duration_since(*at) < full);
            if map.len() >= ERROR_SOURCES {
                return false;
            }
        }
        let (tokens, at) = map.entry(src).or_insert((ERROR_BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * ERRORS_PER_SECOND).min(ERROR_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A forward slot, given back when dropped. The slots taken are the gauge
/// `forwards_in_flight` itself.
pub(super) struct ForwardSlot<'a>(&'a Handler);

impl Drop for ForwardSlot<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .forwards_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Handler {
    /// One of the `MAX_FORWARDS` slots, or None when all are taken.
    pub(super) fn forward_slot(&self) -> Option<ForwardSlot<'_>> {
        let in_flight = &self.stats.forwards_in_flight;
        if in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_FORWARDS as u64 {
            in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ForwardSlot(self))
    }

    /// Whether `src` may be sent the error reply `reply` now (other replies always may).
    pub(super) fn may_send(&self, reply: &[u8], src: IpAddr) -> bool {
        let rcode = reply.get(3).map(|b| b & 0x0f);
        let error = rcode == Some(u16::from(ResponseCode::FormErr) as u8)
            || rcode == Some(u16::from(ResponseCode::NotImp) as u8);
        if !error || self.errors.allow(src) {
            return true;
        }
        self.stats.errors_limited.fetch_add(1, Ordering::Relaxed);
        false
    }
}
