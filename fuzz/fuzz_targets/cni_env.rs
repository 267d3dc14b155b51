//! Any values of the CNI_* variables: an environment weir-cni accepts has a container id and
//! an interface name of the spec's shapes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_cni::config::{valid_container_id, valid_ifname, Env};

#[derive(arbitrary::Arbitrary, Debug)]
struct Vars {
    command: String,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    path: Option<String>,
    args: Option<String>,
}

fuzz_target!(|v: Vars| {
    let env = Env::from_vars(|k| match k {
        "CNI_COMMAND" => Some(v.command.clone()),
        "CNI_CONTAINERID" => v.container_id.clone(),
        "CNI_NETNS" => v.netns.clone(),
        "CNI_IFNAME" => v.ifname.clone(),
        "CNI_PATH" => v.path.clone(),
        "CNI_ARGS" => v.args.clone(),
        _ => None,
    });
    if let Ok(env) = env {
        if matches!(env.command.as_str(), "ADD" | "CHECK" | "DEL") {
            assert!(valid_container_id(&env.container_id), "{env:?}");
            assert!(valid_ifname(&env.ifname), "{env:?}");
        }
    }
});
