//! `manifests/weir.yaml` holds the Kubernetes objects it claims to, the DaemonSet gives the
//! agent only flags `weir agent` has, its probes and mounts are consistent, and the CNI
//! configuration it installs is one weir-cni accepts.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

const MANIFESTS: &str = include_str!("../../manifests/weir.yaml");

#[test]
fn the_manifests_are_objects_the_agent_and_weir_cni_accept() {
    let (mut ds, mut cm, mut kinds) = (None, None, Vec::new());
    for doc in serde_yaml::Deserializer::from_str(MANIFESTS) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "DaemonSet" => ds = Some(serde_yaml::from_value::<DaemonSet>(v).unwrap()),
            "ConfigMap" => cm = Some(serde_yaml::from_value::<ConfigMap>(v).unwrap()),
            "ServiceAccount" => drop(serde_yaml::from_value::<ServiceAccount>(v).unwrap()),
            "ClusterRole" => {
                let r = serde_yaml::from_value::<ClusterRole>(v).unwrap();
                let rules = r.rules.unwrap();
                for (group, res) in [
                    ("", "services"),
                    ("", "nodes"),
                    ("discovery.k8s.io", "endpointslices"),
                ] {
                    assert!(
                        rules.iter().any(|rule| {
                            rule.api_groups.iter().flatten().any(|g| g == group)
                                && rule.resources.iter().flatten().any(|r| r == res)
                                && ["list", "watch"]
                                    .iter()
                                    .all(|v| rule.verbs.iter().any(|x| x == v))
                        }),
                        "the agent may list and watch {res}"
                    );
                }
            }
            "ClusterRoleBinding" => drop(serde_yaml::from_value::<ClusterRoleBinding>(v).unwrap()),
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 5, "{kinds:?}");

    let ds = ds.unwrap();
    let pod = ds.spec.template.spec.unwrap();
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    // Every flag is one of `weir agent`'s.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "agent");
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "weir agent has no {flag}");
    }
    // The probes ask the agent's health port.
    for probe in [&agent.liveness_probe, &agent.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
        );
    }
    // Every mount names a volume.
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&m.name.as_str()),
                "{}: no volume {}",
                c.name,
                m.name
            );
        }
    }
    // The CNI configuration: each plugin of the list, as the runtime hands it to weir-cni.
    let data = cm.unwrap().data.unwrap();
    let list: serde_json::Value = serde_json::from_str(&data["10-weir.conflist"]).unwrap();
    for p in list["plugins"].as_array().unwrap() {
        let mut p = p.clone();
        p["cniVersion"] = list["cniVersion"].clone();
        p["name"] = list["name"].clone();
        weir_cni::config::NetConf::parse(p.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("weir-cni refuses {p}: {e:?}"));
    }
}
