//! Any bytes as weir-cni's stdin (the network configuration): parsed, its ranges read, never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_cni::config::NetConf;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        let _ = conf.range_sets();
    }
});
