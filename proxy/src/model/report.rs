//! What could not be used, and why: per object ([`Problem`]) and per Service
//! ([`ServiceReport`], what `weir status` shows).
use std::collections::BTreeMap;

use super::Model;

/// One object that could not be used, and why. The others are still programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Why a service is not programmed, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub service: String,
    pub reason: String,
}

/// Whether one Service is programmed, and why not, for `weir status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceReport {
    /// `namespace/name`.
    pub service: String,
    /// `programmed`, `partly programmed` or `not programmed`.
    pub state: String,
    pub frontends: Vec<String>,
    /// Why it is not programmed, or what of it could not be.
    pub problems: Vec<String>,
}

/// The Service a problem's object belongs to: `Service ns/name[ port p]` or
/// `EndpointSlice s of Service ns/name`.
pub fn service_of(object: &str) -> Option<&str> {
    let rest = object.split("Service ").nth(1)?;
    Some(rest.split(' ').next().unwrap_or(rest))
}

impl Model {
    /// One report per Service seen: its frontends, and why any of it is not programmed.
    /// `failed` are frontends the map writer could not program, by service port name
    /// (`ns/name:port`), with the error.
    pub fn reports(&self, failed: &[(String, String)]) -> Vec<ServiceReport> {
        let mut by: BTreeMap<String, (Vec<String>, Vec<String>, bool)> = BTreeMap::new();
        let svc = |name: &str| service_of_port(name).to_string();
        for (fe, spec) in &self.desired {
            by.entry(svc(&spec.name))
                .or_default()
                .0
                .push(fe.to_string());
        }
        for s in &self.skipped {
            let e = by.entry(s.service.clone()).or_default();
            e.1.push(s.reason.clone());
            e.2 = true;
        }
        for p in &self.problems {
            if let Some(s) = service_of(&p.object) {
                by.entry(s.to_string()).or_default().1.push(p.to_string());
            }
        }
        for (name, e) in failed {
            by.entry(svc(name)).or_default().1.push(e.clone());
        }
        by.into_iter()
            .map(|(service, (frontends, problems, skipped))| ServiceReport {
                state: if skipped || frontends.is_empty() {
                    "not programmed"
                } else if problems.is_empty() {
                    "programmed"
                } else {
                    "partly programmed"
                }
                .into(),
                service,
                frontends,
                problems,
            })
            .collect()
    }
}

/// Adds the objects of the source that could not be read (`parse_stream`'s problems) to the
/// reports: to their Service's report where they name one (a Service not read is not
/// programmed; one whose slice was not read is only partly), else as a report of their own,
/// `not read`, under the object's name.
pub fn add_unread(reports: &mut Vec<ServiceReport>, unread: &[Problem]) {
    for p in unread {
        let (key, own) = match service_of(&p.object) {
            Some(s) => (s.to_string(), false),
            None => (p.object.clone(), true),
        };
        match reports.iter_mut().find(|r| r.service == key) {
            Some(r) => {
                r.problems.push(p.to_string());
                if r.state == "programmed" {
                    r.state = "partly programmed".into();
                }
            }
            None => reports.push(ServiceReport {
                service: key,
                state: if own { "not read" } else { "not programmed" }.into(),
                frontends: Vec::new(),
                problems: vec![p.to_string()],
            }),
        }
    }
    reports.sort_by(|a, b| a.service.cmp(&b.service));
}

/// The Service (`namespace/name`) of a service port name (`namespace/name:port`).
pub fn service_of_port(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(s, _)| s)
}
