#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use hickory_proto::op::Query;

use std::net::IpAddr;

use super::*;
use crate::zone::Config;

fn handler() -> Handler {
    let h = Handler::new(vec!["198.18.0.55:53".parse().unwrap()]);
    h.set_zone(Zone::build(Config::default(), &[]));
    h
}

fn message(name: &str, kind: MessageType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(7)
        .set_message_type(kind)
        .set_op_code(OpCode::Query)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn rcode(r: Reply) -> Option<ResponseCode> {
    match r {
        Reply::Message(m) => Some(Message::from_vec(&m).unwrap().response_code()),
        _ => None,
    }
}

#[test]
fn a_response_or_less_than_a_header_is_never_answered() {
    let h = handler();
    assert!(matches!(
        h.respond(
            &message("web.demo.svc.cluster.local.", MessageType::Response),
            true
        ),
        Reply::Drop
    ));
    // A response's header with garbage after it: still a response.
    assert!(matches!(
        h.respond(&[0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9], true),
        Reply::Drop
    ));
    assert!(matches!(h.respond(&[0, 1, 0, 0, 0], true), Reply::Drop));
    assert_eq!(h.stats.dropped.load(Ordering::Relaxed), 3);
    // A query's header with garbage after it: FORMERR.
    assert_eq!(
        rcode(h.respond(&[0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9], true)),
        Some(ResponseCode::FormErr)
    );
}

#[test]
fn error_replies_are_limited_per_source_and_answers_are_not() {
    let h = handler();
    let formerr = error_reply(1, ResponseCode::FormErr);
    let answer = encode(Message::new());
    let (a, b): (IpAddr, IpAddr) = (
        "198.18.1.10".parse().unwrap(),
        "198.18.1.11".parse().unwrap(),
    );
    let sent = (0..100).filter(|_| h.may_send(&formerr, a)).count();
    // The burst, and what the bucket refilled in the meantime (microseconds: none).
    assert!(
        (ERROR_BURST as usize..=ERROR_BURST as usize + 1).contains(&sent),
        "{sent}"
    );
    assert!(h.may_send(&answer, a), "answers are not limited");
    assert!(h.may_send(&formerr, b), "another source has its own bucket");
    assert!(h.stats.errors_limited.load(Ordering::Relaxed) >= 78);
}

#[test]
fn forwards_past_the_limit_are_refused() {
    let h = handler();
    let slots: Vec<_> = (0..MAX_FORWARDS)
        .map(|_| h.forward_slot().unwrap())
        .collect();
    assert!(h.forward_slot().is_none());
    assert_eq!(
        h.stats.forwards_in_flight.load(Ordering::Relaxed),
        MAX_FORWARDS as u64
    );
    drop(slots);
    assert!(h.forward_slot().is_some());
    assert_eq!(h.stats.forwards_in_flight.load(Ordering::Relaxed), 0);
}

#[test]
fn a_loop_probe_that_comes_back_marks_its_upstream_and_is_not_forwarded() {
    let h = handler();
    let up: SocketAddr = "198.18.0.55:53".parse().unwrap();
    let name = Name::from_ascii("abc.def.weir-loop-check.").unwrap();
    h.loops
        .probes
        .lock()
        .unwrap()
        .insert(LowerName::new(&name), (up, false));
    h.loops.pending.store(1, Ordering::Relaxed);
    assert_eq!(
        rcode(h.respond(
            &message("abc.def.weir-loop-check.", MessageType::Query),
            true
        )),
        Some(ResponseCode::NXDomain)
    );
    assert!(h.is_looping(&up));
    assert_eq!(h.stats.upstreams_looping.load(Ordering::Relaxed), 1);
    // Any other name outside the zone still goes upstream (to be skipped there).
    assert!(matches!(
        h.respond(&message("example.org.", MessageType::Query), true),
        Reply::Forward(..)
    ));
}

#[test]
fn the_limits_in_the_help_are_the_limits() {
    let text = limits_help();
    for n in [
        MAX_FORWARDS.to_string(),
        MAX_TCP_CONNECTIONS.to_string(),
        TCP_IDLE.as_secs().to_string(),
        TCP_MESSAGE_TIMEOUT.as_secs().to_string(),
    ] {
        assert!(text.contains(&n), "{n} missing from {text}");
    }
}
