//! Any text as a file source, and what reads: the stream parsed, the model built for a node,
//! and its reports. Never a panic, whatever the objects hold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_proxy::model::{self, NodeContext};

fuzz_target!(|text: &str| {
    let Ok((objs, problems)) = model::parse_stream(text) else {
        return;
    };
    let ctx = NodeContext::of(&objs, Some("node-a"));
    let m = model::build(&objs, &ctx);
    let mut reports = m.reports(&[]);
    model::add_unread(&mut reports, &problems);
    let _ = model::pod_cidrs(&objs, "node-a");
    let _ = model::node_eligible(&objs, "node-a");
    for n in &objs.nodes {
        let _ = model::node_view(n);
    }
});
