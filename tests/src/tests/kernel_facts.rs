//! Every packet fixture again with the object loaded as for a kernel of which the loader knows
//! nothing: checksums and the clock through helper calls, the same frames out.

use crate::{fixture::*, *};

/// Every case of `fixtures!` again with the object loaded as for a kernel of which the loader
/// knows nothing (`kernel_facts`): L4 checksums then go through `bpf_l4_csum_replace`, the
/// clock through `bpf_ktime_get_coarse_ns`, and the frames must come out the same.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_case_with_helper_calls_only() {
    let cases = [
        super::tc_path::cases(),
        super::no_endpoints::cases(),
        super::hairpin::cases(),
        super::flow_cache::cases(),
        super::nodeport::cases(),
        super::traffic_policy::cases(),
        super::parsing::cases(),
    ]
    .concat();
    assert!(cases.len() >= 19);
    for (name, case) in cases {
        let (desired, steps) = case();
        let mut h = Harness::without_kernel_facts().expect("load the production object");
        h.program(&desired);
        run_steps(&mut h, &format!("{name} (helpers)"), steps);
    }
}
