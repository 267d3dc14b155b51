//! kube-proxy's proxier health, served on `/healthz` and `/livez`: healthy unless a change has
//! waited longer than the health timeout without being programmed; `/healthz` is also
//! unhealthy while this node is being deleted, so load balancers stop sending to it. 200 or
//! 503 with kube-proxy's JSON body.
use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

use http::StatusCode;

#[derive(Debug, Default)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// kube-proxy's proxier health: queued changes against programmed ones.
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    timeout: Duration,
}

impl Health {
    /// `timeout`: how long a change may wait to be programmed (kube-proxy: twice its sync
    /// period, 60 s by default).
    pub fn new(timeout: Duration) -> Self {
        Health {
            state: Mutex::new(HealthState {
                node_eligible: true,
                ..Default::default()
            }),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self, now: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
    }

    /// Everything queued so far is programmed.
    pub fn updated(&self, now: SystemTime) {
        let mut s = self.lock();
        s.last_updated = Some(now);
        s.oldest_pending = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// (healthy, last update, node eligible) at `now`.
    pub fn check(&self, now: SystemTime) -> (bool, Option<SystemTime>, bool) {
        let s = self.lock();
        let late = s
            .oldest_pending
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= self.timeout);
        (!late, s.last_updated, s.node_eligible)
    }
}

fn rfc3339(t: Option<SystemTime>) -> String {
    use k8s_openapi::jiff::Timestamp;
    match t.and_then(|t| Timestamp::try_from(t).ok()) {
        Some(ts) => ts.to_string(),
        None => "0001-01-01T00:00:00Z".into(),
    }
}

/// The body and status of `/healthz` (with the node's eligibility) or `/livez` (without).
pub fn health_response(h: &Health, with_node: bool, now: SystemTime) -> (StatusCode, String) {
    let (healthy, last, eligible) = h.check(now);
    let healthy = healthy && (eligible || !with_node);
    // kube-proxy reports "now" as the last update while healthy, as its older releases did.
    let last = if healthy { Some(now) } else { last };
    let body = if with_node {
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {eligible}}}",
            rfc3339(last),
            rfc3339(Some(now))
        )
    } else {
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}}}",
            rfc3339(last),
            rfc3339(Some(now))
        )
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_kube_proxy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = Health::new(Duration::from_secs(60));
        // Starting: nothing queued, healthy.
        assert_eq!(health_response(&h, true, t0).0, StatusCode::OK);
        h.queued(t0);
        // A queued change that is not late yet.
        assert_eq!(
            health_response(&h, true, t0 + Duration::from_secs(59)).0,
            StatusCode::OK
        );
        // Late: unhealthy, and it says when the last update was.
        let (code, body) = health_response(&h, true, t0 + Duration::from_secs(60));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"0001-01-01T00:00:00Z\",\"currentTime\": \"2027-01-15T08:01:00Z\", \"nodeEligible\": true}"
        );
        h.updated(t0 + Duration::from_secs(61));
        assert_eq!(
            health_response(&h, true, t0 + Duration::from_secs(62)).0,
            StatusCode::OK
        );
        // The node is being deleted: /healthz fails, /livez does not.
        h.set_node_eligible(false);
        let now = t0 + Duration::from_secs(63);
        let (code, body) = health_response(&h, true, now);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.ends_with("\"nodeEligible\": false}"), "{body}");
        let (code, body) = health_response(&h, false, now);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2027-01-15T08:01:03Z\",\"currentTime\": \"2027-01-15T08:01:03Z\"}"
        );
    }
}
