//! The server's counters: replies by query type and response code, the time from a query's
//! arrival to its reply, and what went where (cache, upstream, truncation). Lock-free, read
//! by the agent's `/metrics`, which this module renders for (Prometheus text).
use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Query types counted by name; the rest as `other`.
const QTYPES: [(u16, &str); 10] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (12, "PTR"),
    (16, "TXT"),
    (5, "CNAME"),
    (6, "SOA"),
    (15, "MX"),
    (2, "NS"),
    (255, "ANY"),
];
const RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];
/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
    1.0, 2.5,
];

#[derive(Debug, Default)]
pub struct Stats {
    /// [qtype index (len = other)][rcode index (len = other)]
    replies: [[AtomicU64; RCODES.len() + 1]; QTYPES.len() + 1],
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    pub cache_hits: AtomicU64,
    pub forwarded: AtomicU64,
    pub truncated: AtomicU64,
    pub malformed: AtomicU64,
    /// Packets not answered at all: responses (QR set), and less than a header.
    pub dropped: AtomicU64,
    /// Error replies (FORMERR, NOTIMP) not sent: their source was past its rate.
    pub errors_limited: AtomicU64,
    /// TCP connections closed at once: past the connection limit.
    pub tcp_refused: AtomicU64,
    /// TCP connections closed for a message that did not arrive (or a reply not read) in time.
    pub tcp_timeouts: AtomicU64,
    /// Failed accepts of TCP connections (out of file descriptors, say); retried.
    pub tcp_accept_errors: AtomicU64,
    /// Queries answered REFUSED: as many forwards as allowed were waiting on upstreams.
    pub forwards_refused: AtomicU64,
    /// Loop probes that came back to this server through an upstream.
    pub upstream_loops: AtomicU64,
    /// Forwards waiting on an upstream now (a gauge).
    pub forwards_in_flight: AtomicU64,
    /// TCP connections open now (a gauge).
    pub tcp_connections: AtomicU64,
    /// Upstreams not used now because they forward back to this server (a gauge).
    pub upstreams_looping: AtomicU64,
}

/// The query type of a DNS message, read from its question (no compression there).
fn qtype_of(msg: &[u8]) -> Option<u16> {
    let mut i = 12;
    loop {
        let len = *msg.get(i)? as usize;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += len + 1;
    }
    Some(u16::from_be_bytes([*msg.get(i + 1)?, *msg.get(i + 2)?]))
}

impl Stats {
    /// Counts one reply sent, `took` after its query arrived.
    pub fn replied(&self, reply: &[u8], took: Duration) {
        let t = qtype_of(reply)
            .and_then(|t| QTYPES.iter().position(|(q, _)| *q == t))
            .unwrap_or(QTYPES.len());
        let r = reply
            .get(3)
            .map(|b| (b & 0x0f) as usize)
            .filter(|r| *r < RCODES.len())
            .unwrap_or(RCODES.len());
        self.replies[t][r].fetch_add(1, Ordering::Relaxed);
        let s = took.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|le| s <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[b].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Replies of this query type and response code so far.
    pub fn replies(&self, qtype: &str, rcode: &str) -> u64 {
        let t = QTYPES
            .iter()
            .position(|(_, n)| *n == qtype)
            .unwrap_or(QTYPES.len());
        let r = RCODES
            .iter()
            .position(|n| *n == rcode)
            .unwrap_or(RCODES.len());
        self.replies[t][r].load(Ordering::Relaxed)
    }

    /// Prometheus text of every counter, `weir_dns_` names.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP weir_dns_replies Replies sent, by query type and response code.\n# TYPE weir_dns_replies counter"
        );
        for (t, row) in self.replies.iter().enumerate() {
            let tn = QTYPES.get(t).map(|(_, n)| *n).unwrap_or("other");
            for (r, c) in row.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let rn = RCODES.get(r).copied().unwrap_or("other");
                    let _ = writeln!(
                        o,
                        "weir_dns_replies_total{{type=\"{tn}\",rcode=\"{rn}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            o,
            "# HELP weir_dns_reply_duration_seconds From a query's arrival to its reply (upstream time included).\n# TYPE weir_dns_reply_duration_seconds histogram"
        );
        let mut cum = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cum += self.latency[i].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "weir_dns_reply_duration_seconds_bucket{{le=\"{le}\"}} {cum}"
            );
        }
        cum += self.latency[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "weir_dns_reply_duration_seconds_bucket{{le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            o,
            "weir_dns_reply_duration_seconds_sum {}\nweir_dns_reply_duration_seconds_count {cum}",
            self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        for (name, help, c) in [
            (
                "cache_hits",
                "Upstream answers served from the cache.",
                &self.cache_hits,
            ),
            (
                "forwarded",
                "Queries relayed to an upstream resolver.",
                &self.forwarded,
            ),
            (
                "truncated",
                "UDP replies truncated (TC) for size.",
                &self.truncated,
            ),
            (
                "malformed",
                "Queries that could not be parsed.",
                &self.malformed,
            ),
            (
                "dropped",
                "Packets not answered: responses, and packets shorter than a header.",
                &self.dropped,
            ),
            (
                "errors_limited",
                "Error replies (FORMERR, NOTIMP) not sent: their source was past its rate.",
                &self.errors_limited,
            ),
            (
                "tcp_refused",
                "TCP connections closed at once: past the connection limit.",
                &self.tcp_refused,
            ),
            (
                "tcp_timeouts",
                "TCP connections closed for a message or reply not moved in time.",
                &self.tcp_timeouts,
            ),
            (
                "tcp_accept_errors",
                "Failed accepts of TCP connections (retried).",
                &self.tcp_accept_errors,
            ),
            (
                "forwards_refused",
                "Queries answered REFUSED: the forwards allowed at once were all waiting.",
                &self.forwards_refused,
            ),
            (
                "upstream_loops",
                "Loop probes that came back to this server through an upstream.",
                &self.upstream_loops,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP weir_dns_{name} {help}\n# TYPE weir_dns_{name} counter\nweir_dns_{name}_total {}",
                c.load(Ordering::Relaxed)
            );
        }
        for (name, help, g) in [
            (
                "forwards_in_flight",
                "Forwarded queries waiting on an upstream now.",
                &self.forwards_in_flight,
            ),
            (
                "tcp_connections",
                "TCP connections open now.",
                &self.tcp_connections,
            ),
            (
                "upstreams_looping",
                "Upstreams not used because they forward back to this server.",
                &self.upstreams_looping,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP weir_dns_{name} {help}\n# TYPE weir_dns_{name} gauge\nweir_dns_{name} {}",
                g.load(Ordering::Relaxed)
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use hickory_proto::{
        op::{Message, MessageType, Query, ResponseCode},
        rr::{Name, RecordType},
    };

    use super::*;

    fn reply(t: RecordType, rcode: ResponseCode) -> Vec<u8> {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response)
            .set_response_code(rcode)
            .add_query(Query::query(
                Name::from_ascii("web.demo.svc.cluster.local.").unwrap(),
                t,
            ));
        m.to_vec().unwrap()
    }

    #[test]
    fn replies_are_counted_by_type_and_rcode_with_their_latency() {
        let s = Stats::default();
        s.replied(
            &reply(RecordType::A, ResponseCode::NoError),
            Duration::from_micros(20),
        );
        s.replied(
            &reply(RecordType::A, ResponseCode::NXDomain),
            Duration::from_micros(20),
        );
        s.replied(
            &reply(RecordType::AAAA, ResponseCode::NXDomain),
            Duration::from_millis(3),
        );
        s.replied(
            &reply(RecordType::HINFO, ResponseCode::Refused),
            Duration::from_secs(9),
        );
        assert_eq!(s.replies("A", "NOERROR"), 1);
        assert_eq!(s.replies("A", "NXDOMAIN"), 1);
        assert_eq!(s.replies("AAAA", "NXDOMAIN"), 1);
        assert_eq!(s.replies("other", "REFUSED"), 1);
        let text = s.render();
        for line in [
            "weir_dns_replies_total{type=\"AAAA\",rcode=\"NXDOMAIN\"} 1",
            "weir_dns_reply_duration_seconds_bucket{le=\"0.000025\"} 2",
            "weir_dns_reply_duration_seconds_bucket{le=\"0.005\"} 3",
            "weir_dns_reply_duration_seconds_bucket{le=\"+Inf\"} 4",
            "weir_dns_reply_duration_seconds_count 4",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
