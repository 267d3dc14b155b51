//! The same services written as kube-proxy writes them, for the baselines: iptables mode
//! (KUBE-SERVICES → KUBE-SVC-… → KUBE-SEP-…, as in `shared/reference/kube-proxy-1.28-iptables-save.txt`)
//! and nftables mode (the `service-ips` verdict map, a chain per service with `numgen random`,
//! a chain per endpoint). One-line chains end their last rule with `;`: nft 1.0.6 (Debian 12)
//! needs it.
use std::{fmt::Write, net::Ipv4Addr};

/// One service port and its endpoints: what the service-path and programming benchmarks
/// program N of.
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<Ipv4Addr>,
    pub target_port: u16,
}

pub const CLUSTER_CIDR: &str = "198.18.0.0/15";

fn hash16(s: &str) -> String {
    // kube-proxy uses base32(sha256) truncated to 16 characters; any stable 16-character name
    // of the same length gives the same rule walk.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// An `iptables-restore` input for the filter and nat tables.
pub fn iptables(svcs: &[Svc]) -> String {
    let mut o = String::with_capacity(svcs.len() * 900);
    o.push_str(
        "*filter\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n\
-A INPUT -j KUBE-FIREWALL\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A OUTPUT -j KUBE-FIREWALL\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
COMMIT\n*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    for s in svcs {
        let h = hash16(&s.name);
        let _ = writeln!(o, ":KUBE-SVC-{h} - [0:0]");
        for ep in &s.endpoints {
            let _ = writeln!(
                o,
                ":KUBE-SEP-{} - [0:0]",
                hash16(&format!("{}{ep}", s.name))
            );
        }
    }
    o.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for s in svcs {
        let h = hash16(&s.name);
        let (n, vip, p, tp) = (&s.name, s.vip, s.port, s.target_port);
        let _ = writeln!(
            o,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{n} cluster IP\" -m tcp --dport {p} -j KUBE-SVC-{h}\n\
-A KUBE-SVC-{h} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{n} cluster IP\" -m tcp --dport {p} -j KUBE-MARK-MASQ"
        );
        // Endpoint i of k is taken with probability 1/(k-i), the last always: kube-proxy's
        // statistic-mode random walk.
        let k = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep = hash16(&format!("{n}{ep}"));
            let stat = if i + 1 < k {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (k - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "-A KUBE-SVC-{h} -m comment --comment \"{n} -> {ep}:{tp}\"{stat} -j KUBE-SEP-{sep}"
            );
        }
        for ep in &s.endpoints {
            let sep = hash16(&format!("{n}{ep}"));
            let _ = writeln!(
                o,
                "-A KUBE-SEP-{sep} -s {ep}/32 -m comment --comment \"{n}\" -j KUBE-MARK-MASQ\n\
-A KUBE-SEP-{sep} -p tcp -m comment --comment \"{n}\" -m tcp -j DNAT --to-destination {ep}:{tp}"
            );
        }
    }
    o.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    o
}

/// kube-proxy's base chains: what hooks the table into the packet path.
const NFT_BASE_CHAINS: &str = "\
  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n\
  chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n\
  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }\n\
  chain filter-forward { type filter hook forward priority -110; policy accept; ct state new jump firewall-check; }\n";

/// The `nft -f` input that removes kube-proxy's table (and with it, conntrack from the node
/// namespace, which its NAT chains keep on even with the base chains gone).
pub const NFTABLES_DELETE: &str = "delete table ip kube-proxy\n";

/// An `nft -f` input in kube-proxy's nftables shape (KEP-3866).
pub fn nftables(svcs: &[Svc]) -> String {
    let mut o = String::with_capacity(svcs.len() * 600);
    o.push_str(
        "table ip kube-proxy {\n\
  chain mark-for-masquerade { mark set mark or 0x4000; }\n\
  chain masquerading { mark and 0x4000 == 0 return; mark set mark xor 0x4000; masquerade fully-random; }\n",
    );
    o.push_str(NFT_BASE_CHAINS);
    o.push_str("  chain firewall-check { }\n");
    for s in svcs {
        let h = hash16(&s.name);
        let (vip, p, tp) = (s.vip, s.port, s.target_port);
        let eps: Vec<String> = s
            .endpoints
            .iter()
            .map(|ep| hash16(&format!("{}{ep}", s.name)))
            .collect();
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : goto endpoint-{e}-tcp"))
            .collect();
        let _ = writeln!(
            o,
            "  chain service-{h}-tcp {{ ip daddr {vip} tcp dport {p} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade; numgen random mod {} vmap {{ {} }}; }}",
            eps.len(),
            vmap.join(", ")
        );
        for (ep, e) in s.endpoints.iter().zip(&eps) {
            let _ = writeln!(
                o,
                "  chain endpoint-{e}-tcp {{ ip saddr {ep} jump mark-for-masquerade; meta l4proto tcp dnat to {ep}:{tp}; }}"
            );
        }
    }
    o.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if !svcs.is_empty() {
        o.push_str("    elements = {\n");
        for (i, s) in svcs.iter().enumerate() {
            let sep = if i + 1 == svcs.len() { "" } else { "," };
            let _ = writeln!(
                o,
                "      {} . tcp . {} : goto service-{}-tcp{sep}",
                s.vip,
                s.port,
                hash16(&s.name)
            );
        }
        o.push_str("    }\n");
    }
    o.push_str(
        "  }\n  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n}\n",
    );
    o
}
