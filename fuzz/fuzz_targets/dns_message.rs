//! Any bytes as a DNS query over UDP and TCP: never a panic; never an answer to a response or
//! to less than a header; every answer a response that parses, with the query's id, within the
//! UDP size the transport allows.
#![no_main]
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use weir_dns::{server::Reply, Config, Handler, Zone};

fn handler() -> &'static Handler {
    static H: OnceLock<Handler> = OnceLock::new();
    H.get_or_init(|| {
        let h = Handler::new(vec!["198.18.0.55:53".parse().expect("address")]);
        h.set_zone(Zone::build(Config::default(), &[]));
        h
    })
}

fuzz_target!(|data: &[u8]| {
    for udp in [true, false] {
        let reply = handler().respond(data, udp);
        let response = data.len() < 12 || data[2] & 0x80 != 0;
        match reply {
            Reply::Message(m) => {
                assert!(!response, "answered a response or a fragment");
                assert!(!udp || m.len() <= 1232, "{} bytes over UDP", m.len());
                let parsed = Message::from_vec(&m).expect("the answer parses");
                assert_eq!(parsed.message_type(), MessageType::Response);
                assert_eq!(m[..2], data[..2], "the query's id");
            }
            Reply::Drop => {}
            Reply::Forward(..) | Reply::Chase(..) => assert!(!response),
        }
    }
});
