//! `weir-cni`, the CNI plugin. Not implemented yet (tracked by the CNI plugin issue): every
//! command answers with a CNI error on stdout, as the spec requires of a plugin that cannot act,
//! so a runtime that calls it fails loudly instead of getting a pod without a network.
fn main() {
    let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
    let err = serde_json::json!({
        "cniVersion": "1.1.0",
        "code": 4,
        "msg": "weir-cni is not implemented yet",
        "details": format!("CNI_COMMAND={cmd}: the weir CNI plugin has not been built yet"),
    });
    println!("{err}");
    std::process::exit(1);
}
