//! Asking what a test or a benchmark runs: an HTTP GET from inside a namespace, a value of
//! Prometheus text, a field of `/proc/PID/status`, a DNS query made by hand.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use weir_proxy::tools::sim::topo::Netns;

/// `GET path` on `addr` from inside `ns`, `Connection: close`: the whole response (status
/// line, headers, body), or None when it could not be had (2 s to connect, 5 s to read).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ns.run(move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        c.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .ok()
    .flatten()
}

/// The value of the sample `name` (its whole name, labels included) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A field of `/proc/PID/status` given in kB (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A DNS message for `name`/A with this id: a recursive query, or (`response`) a response to
/// one (which a server must never answer).
pub fn dns_message(id: u16, name: &str, response: bool) -> Vec<u8> {
    let flags: u16 = if response { 0x8180 } else { 0x0100 };
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}
