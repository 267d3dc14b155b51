//! Any line as a request to the agent's weir-cni socket: parsed or refused, never a panic; a
//! request that parses writes back to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_cni_proto::Request;

fuzz_target!(|line: &str| {
    if let Ok(req) = Request::from_line(line) {
        let line = serde_json::to_string(&req).expect("a request serializes");
        let again = Request::from_line(&line).expect("its own line parses");
        assert_eq!(again, req);
    }
});
