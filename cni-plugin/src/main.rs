//! `weir-cni`, the CNI plugin the container runtime calls for every pod of a weir node.
use std::io::Read;

use weir_cni::{cmd, config::Env, error::CniError};

const HELP: &str = "\
weir-cni: the weir CNI plugin (CNI 0.3.0 to 1.1.0: ADD, DEL, CHECK, STATUS, GC, VERSION)

The container runtime runs it with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and
CNI_PATH in the environment and the network configuration on stdin. The result, or an error
as CNI error JSON, goes to stdout; logs go to stderr or the configuration's logFile.

Refused with code 4 (invalid environment): a CNI_CONTAINERID outside the spec's pattern
(letters, digits, '_', '.', '-', starting with a letter or digit), a CNI_IFNAME the kernel
would not take, a CNI_NETNS that is not a network namespace or is the plugin's own (the
node's). A configuration on stdin is at most 1 MiB.

Example, by hand:
  echo '{\"cniVersion\":\"1.1.0\",\"name\":\"weir\",\"type\":\"weir-cni\",\"agentSocket\":\"\",
        \"ipam\":{\"ranges\":[[{\"subnet\":\"198.18.1.0/24\"}]],\"dataDir\":\"/tmp/ipam\"}}' |
    CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_NETNS=/run/netns/weir-p1 CNI_IFNAME=eth0 \\
    CNI_PATH=/opt/cni/bin weir-cni

Configuration fields: cniVersion, name, type, mtu, agentSocket (\"\" for none), logFile,
ipam.{ranges | subnet, rangeStart, rangeEnd, gateway}, ipam.routes, ipam.dataDir,
ipam.podCIDRsFile (used when no range is configured).
";

/// The most a network configuration on stdin may hold (with its prevResult).
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h")
    {
        print!("{HELP}");
        return;
    }
    let mut stdin = Vec::new();
    let env = Env::from_vars(|k| std::env::var(k).ok());
    let out = env.and_then(|env| {
        if env.command != "VERSION" || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            std::io::stdin()
                .take(MAX_STDIN + 1)
                .read_to_end(&mut stdin)
                .map_err(|e| {
                    CniError::new(weir_cni::error::code::IO, format!("read stdin: {e}"))
                })?;
            if stdin.len() as u64 > MAX_STDIN {
                return Err(CniError::new(
                    weir_cni::error::code::DECODE,
                    format!("the configuration on stdin is over {MAX_STDIN} bytes"),
                ));
            }
        }
        cmd::run(&env, &stdin)
    });
    match out {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(e) => {
            // To the configured log file if one was opened, else to stderr.
            weir_cni::log::init(None);
            tracing::error!(code = e.code, "{e}");
            let version = cmd::requested_version(&stdin).unwrap_or_else(|| "1.1.0".into());
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}
