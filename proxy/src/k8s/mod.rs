//! Where Services, EndpointSlices and Nodes come from, and how their changes reach the data
//! path: the Kubernetes API's watches and stores (`watch`, with the slice index), or a YAML
//! file (`file`); `reconcile` builds the model from them and programs it.
use std::path::PathBuf;

pub mod client;
pub mod file;
pub mod reconcile;
mod slice_index;
pub mod watch;

pub use reconcile::{program_objects, Reconciler, StepStats, Synced};
pub use watch::{KubeSource, PROXY_LABEL_SELECTOR};

/// Where Services, EndpointSlices and the Node come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Multi-document YAML, reloaded when it changes.
    File(PathBuf),
    /// The Kubernetes API: in-cluster config, or this kubeconfig (else `KUBECONFIG` or
    /// `~/.kube/config`).
    Kube { kubeconfig: Option<PathBuf> },
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("file:") {
            return Ok(Source::File(p.into()));
        }
        if s == "kube" {
            return Ok(Source::Kube { kubeconfig: None });
        }
        if let Some(p) = s.strip_prefix("kube:") {
            return Ok(Source::Kube {
                kubeconfig: Some(p.into()),
            });
        }
        Err(format!(
            "{s:?}: expected file:PATH, kube (in-cluster or default kubeconfig) or kube:KUBECONFIG"
        ))
    }
}
