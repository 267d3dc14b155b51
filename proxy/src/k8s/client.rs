//! The Kubernetes API client the watches use.
use std::path::Path;

use crate::error::{Context, Result};

/// A client from this kubeconfig, else from the pod's service account (in-cluster), else from
/// `KUBECONFIG` or `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("read kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("use kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("find the Kubernetes API: no in-cluster config and no kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the Kubernetes client")
}
