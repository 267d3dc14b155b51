//! What the model is built from: Services, EndpointSlices, Nodes (and Pods, for DNS), as the
//! Kubernetes watches hold them or a YAML stream gives them, and the well-known labels the model
//! reads.
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use serde::Deserialize;

use super::Problem;

/// Cloning shares the objects (`Arc`s).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<super::Slice>>,
    pub nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>>,
    /// Pods, for cluster DNS's `pods verified` only (the data path does not read them). Read
    /// from the file source when it has them, watched from the API only in that mode.
    pub pods: Vec<Arc<k8s_openapi::api::core::v1::Pod>>,
}

/// Label that hands a Service (or its EndpointSlices) to another proxy: kube-proxy ignores
/// every object that carries it, and so does weir.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the objects of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub(super) fn labelled(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(key))
}

#[derive(Deserialize)]
struct Kind {
    kind: Option<String>,
}

/// Parses a multi-document YAML stream of Services, EndpointSlices and Nodes, and reports a
/// stream that is not YAML as a problem (see [`parse_stream`]).
pub fn parse_yaml(text: &str) -> (Objects, Vec<Problem>) {
    match parse_stream(text) {
        Ok(r) => r,
        Err(p) => (Objects::default(), vec![p]),
    }
}

/// Parses a multi-document YAML stream of Services, EndpointSlices, Nodes and Pods. Other kinds are
/// ignored; an object that does not deserialize is a problem, not a failure of the whole
/// stream. A stream that is not YAML is an error: what follows the error cannot be read, so
/// the stream says nothing reliable about the objects, and nothing of it must be applied (it
/// would remove every service after the error).
pub fn parse_stream(text: &str) -> Result<(Objects, Vec<Problem>), Problem> {
    let mut objs = Objects::default();
    let mut problems = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                return Err(Problem {
                    object: format!("document {}", i + 1),
                    message: format!("not YAML: {e}"),
                })
            }
        };
        // Read from the document in place (no copy of it): its kind, then the object.
        let kind = Kind::deserialize(&value).ok().and_then(|k| k.kind);
        let res = match kind.as_deref() {
            Some("Service") => {
                Service::deserialize(&value).map(|s| objs.services.push(Arc::new(s)))
            }
            Some("EndpointSlice") => {
                super::Slice::deserialize(&value).map(|s| objs.slices.push(Arc::new(s)))
            }
            Some("Node") => k8s_openapi::api::core::v1::Node::deserialize(&value)
                .map(|n| objs.nodes.push(Arc::new(n))),
            Some("Pod") => k8s_openapi::api::core::v1::Pod::deserialize(&value)
                .map(|p| objs.pods.push(Arc::new(p))),
            _ => Ok(()),
        };
        if let Err(e) = res {
            problems.push(Problem {
                object: named(&value, kind.as_deref()).unwrap_or_else(|| {
                    format!("document {} ({})", i + 1, kind.unwrap_or_default())
                }),
                message: format!("document {}: {e}", i + 1),
            });
        }
    }
    Ok((objs, problems))
}

/// The name a problem gives an object that did not deserialize, read from its metadata where
/// that can be read: `Service ns/name`, `EndpointSlice ns/name of Service ns/svc`,
/// `Node name` (the forms `service_of` reads a problem's Service from).
fn named(doc: &serde_yaml::Value, kind: Option<&str>) -> Option<String> {
    let meta = doc.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta
        .get("namespace")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or("default");
    match kind? {
        "Node" => Some(format!("Node {name}")),
        "EndpointSlice" => {
            let svc = meta
                .get("labels")
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .and_then(serde_yaml::Value::as_str);
            Some(match svc {
                Some(svc) => format!("EndpointSlice {ns}/{name} of Service {ns}/{svc}"),
                None => format!("EndpointSlice {ns}/{name}"),
            })
        }
        k => Some(format!("{k} {ns}/{name}")),
    }
}
