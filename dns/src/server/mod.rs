//! Serving the zone over UDP and TCP: one query in, one message out. Names outside the cluster
//! zone (and reverse names the zone does not hold) go to the upstream resolvers, the query
//! relayed as it came.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{LowerName, Name, RData, RecordType},
};
use tokio::{io::Interest, net::UdpSocket};

use crate::{
    stats::Stats,
    zone::{Answer, Zone},
};

/// The UDP payload size this server advertises and answers within at most (the DNS flag day
/// 2020 figure, safe from fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS a UDP answer fits 512 bytes (RFC 1035).
const CLASSIC_UDP: usize = 512;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

mod limits;
mod listen;
mod loops;
#[cfg(test)]
mod tests;

use limits::ErrorLimiter;
pub use limits::{
    limits_help, ERRORS_PER_SECOND, ERROR_BURST, MAX_FORWARDS, MAX_TCP_CONNECTIONS, TCP_IDLE,
    TCP_MESSAGE_TIMEOUT,
};
pub use listen::{serve_tcp, serve_udp};
use loops::Loops;

/// What one query becomes.
pub enum Reply {
    Message(Vec<u8>),
    /// Not ours: relay to the upstream resolvers of this name.
    Forward(LowerName, RecordType),
    /// An answer that ends in a CNAME out of the zone (an ExternalName Service): the target's
    /// records of the type asked come from upstream and are appended.
    Chase(Box<Chase>),
    /// Not even a header: nothing to answer.
    Drop,
}

pub struct Chase {
    resp: Message,
    target: Name,
    qtype: RecordType,
    limit: usize,
}

/// Upstream answers kept for their TTL (at most `CACHE_MAX_TTL`; negative answers at most
/// `CACHE_MAX_NEGATIVE_TTL`), served with the TTLs counted down.
#[derive(Debug, Default)]
struct Cache {
    entries: Mutex<HashMap<CacheKey, Cached>>,
}

type CacheKey = (LowerName, RecordType);
/// When it was stored, for how many seconds, what.
type Cached = (Instant, u32, Message);

const CACHE_MAX_ENTRIES: usize = 10_000;
const CACHE_MAX_TTL: u32 = 3600;
const CACHE_MAX_NEGATIVE_TTL: u32 = 30;

impl Cache {
    fn get(&self, key: &CacheKey) -> Option<Message> {
        let mut map = self.entries.lock().ok()?;
        let (at, ttl, m) = map.get(key)?;
        let age = at.elapsed().as_secs() as u32;
        if age >= *ttl {
            map.remove(key);
            return None;
        }
        let mut m = m.clone();
        for r in m.answers_mut().iter_mut() {
            r.set_ttl(r.ttl().saturating_sub(age));
        }
        for r in m.name_servers_mut().iter_mut() {
            r.set_ttl(r.ttl().saturating_sub(age));
        }
        Some(m)
    }

    fn put(&self, key: CacheKey, m: &Message) {
        if m.truncated()
            || !matches!(
                m.response_code(),
                ResponseCode::NoError | ResponseCode::NXDomain
            )
        {
            return;
        }
        let ttl = if m.answers().is_empty() {
            m.name_servers()
                .iter()
                .map(|r| r.ttl())
                .min()
                .unwrap_or(0)
                .min(CACHE_MAX_NEGATIVE_TTL)
        } else {
            m.answers()
                .iter()
                .map(|r| r.ttl())
                .min()
                .unwrap_or(0)
                .min(CACHE_MAX_TTL)
        };
        if ttl == 0 {
            return;
        }
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= CACHE_MAX_ENTRIES {
                // Full: expired entries go first, else an arbitrary one.
                map.retain(|_, (at, ttl, _)| at.elapsed().as_secs() < *ttl as u64);
                if map.len() >= CACHE_MAX_ENTRIES {
                    if let Some(k) = map.keys().next().cloned() {
                        map.remove(&k);
                    }
                }
            }
            map.insert(key, (Instant::now(), ttl, m.clone()));
        }
    }
}

/// The server's state: the zone (none until the first sync: SERVFAIL meanwhile), the
/// upstream resolvers, and their answers' cache.
#[derive(Debug, Default)]
pub struct Handler {
    zone: ArcSwapOption<Zone>,
    pub upstreams: Vec<SocketAddr>,
    /// Stub domains: names under a suffix go to its own resolvers (the longest suffix wins).
    stubs: Vec<(LowerName, Vec<SocketAddr>)>,
    cache: Cache,
    pub stats: Stats,
    errors: ErrorLimiter,
    loops: Loops,
}

impl Handler {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Handler {
            upstreams,
            ..Default::default()
        }
    }

    /// Sends names under `suffix` to `resolvers` instead of the upstreams.
    pub fn with_stub(mut self, suffix: Name, resolvers: Vec<SocketAddr>) -> Self {
        self.stubs.push((LowerName::new(&suffix), resolvers));
        self.stubs
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.num_labels()));
        self
    }

    fn resolvers_of(&self, name: &LowerName) -> &[SocketAddr] {
        self.stubs
            .iter()
            .find(|(suffix, _)| suffix.zone_of(name))
            .map(|(_, r)| r.as_slice())
            .unwrap_or(&self.upstreams)
    }

    /// Serves `zone` from now on (the first call makes the server ready).
    pub fn set_zone(&self, zone: Zone) {
        self.zone.store(Some(Arc::new(zone)));
    }

    pub fn ready(&self) -> bool {
        self.zone.load().is_some()
    }

    /// The reply to one query; `udp` limits its size (truncation).
    pub fn respond(&self, query: &[u8], udp: bool) -> Reply {
        // A response (QR set) is never answered, whatever else it holds: two servers that
        // answered each other's replies would bounce one spoofed packet forever. Nor is less
        // than a header.
        if query.len() < 12 || query[2] & 0x80 != 0 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Reply::Drop;
        }
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return Reply::Message(error_reply(
                    u16::from_be_bytes([query[0], query[1]]),
                    ResponseCode::FormErr,
                ));
            }
        };
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(true);
        if let Some(e) = req.extensions() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_PAYLOAD);
            edns.set_dnssec_ok(e.flags().dnssec_ok);
            resp.set_edns(edns);
        }
        if req.op_code() != OpCode::Query {
            resp.set_response_code(ResponseCode::NotImp);
            return Reply::Message(encode(resp));
        }
        if req.queries().len() != 1 {
            resp.set_response_code(ResponseCode::FormErr);
            return Reply::Message(encode(resp));
        }
        let q = req.queries()[0].clone();
        resp.add_query(q.clone());
        let qname = LowerName::new(q.name());
        if self.probe_came_back(&qname) {
            // Our own loop probe, back through an upstream: answered here, never forwarded
            // (also before the zone is ready: the first probe goes out at start).
            resp.set_response_code(ResponseCode::NXDomain);
            return Reply::Message(encode(resp));
        }
        let Some(zone) = self.zone.load_full() else {
            resp.set_response_code(ResponseCode::ServFail);
            return Reply::Message(encode(resp));
        };
        let answer = zone.lookup(&qname, q.query_type());
        let limit = if !udp {
            u16::MAX as usize
        } else if let Some(e) = req.extensions() {
            (e.max_payload() as usize).clamp(CLASSIC_UDP, MAX_UDP_PAYLOAD as usize)
        } else {
            CLASSIC_UDP
        };
        match answer {
            Answer::NotOurs => return Reply::Forward(qname, q.query_type()),
            Answer::Records(mut records) => {
                // A CNAME (ExternalName) is followed: inside the zone here, outside upstream.
                let mut hops = 0;
                while let Some(RData::CNAME(t)) = records.last().map(|r| r.data().clone()) {
                    if q.query_type() == RecordType::CNAME || hops == 8 {
                        break;
                    }
                    hops += 1;
                    match zone.lookup(&LowerName::new(&t.0), q.query_type()) {
                        Answer::Records(more) => records.extend(more),
                        Answer::NotOurs => {
                            resp.add_answers(records);
                            resp.set_authoritative(true);
                            return Reply::Chase(Box::new(Chase {
                                resp,
                                target: t.0.clone(),
                                qtype: q.query_type(),
                                limit,
                            }));
                        }
                        _ => break,
                    }
                }
                // SRV targets' addresses in the additional section (the specification's "may").
                let mut extra = Vec::new();
                for r in &records {
                    if let RData::SRV(srv) = r.data() {
                        let target = LowerName::new(srv.target());
                        for t in [RecordType::A, RecordType::AAAA] {
                            if let Answer::Records(a) = zone.lookup(&target, t) {
                                extra.extend(a);
                            }
                        }
                    }
                }
                resp.add_answers(records);
                resp.add_additionals(extra);
            }
            Answer::NoData => {
                resp.add_name_server(zone.soa().clone());
            }
            Answer::NxDomain => {
                resp.set_response_code(ResponseCode::NXDomain);
                resp.add_name_server(zone.soa().clone());
            }
        }
        resp.set_authoritative(true);
        Reply::Message(self.fit(resp, limit))
    }

    /// Encodes `resp` within `limit` bytes: whole, or, too big for this transport, the header
    /// and question only with TC set, so that the client asks again over TCP.
    fn fit(&self, mut resp: Message, limit: usize) -> Vec<u8> {
        let bytes = encode(resp.clone());
        if bytes.len() <= limit {
            return bytes;
        }
        self.stats.truncated.fetch_add(1, Ordering::Relaxed);
        resp.take_answers();
        resp.take_name_servers();
        resp.take_additionals();
        resp.set_truncated(true);
        encode(resp)
    }

    /// Relays `query` (about `name`) to its resolvers, one after the other, over UDP, or
    /// answers it from the cache; SERVFAIL when no resolver answers.
    pub async fn forward(&self, query: &[u8], name: LowerName, qtype: RecordType) -> Vec<u8> {
        let id = u16::from_be_bytes([query[0], query[1]]);
        let key = (name, qtype);
        if let Some(mut m) = self.cache.get(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            m.set_id(id);
            return encode(m);
        }
        let Some(_slot) = self.forward_slot() else {
            self.stats.forwards_refused.fetch_add(1, Ordering::Relaxed);
            return error_reply(id, ResponseCode::Refused);
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        for up in self.resolvers_of(&key.0) {
            if self.is_looping(up) {
                continue;
            }
            if let Ok(Ok(reply)) = tokio::time::timeout(UPSTREAM_TIMEOUT, relay(*up, query)).await {
                if let Ok(m) = Message::from_vec(&reply) {
                    self.cache.put(key, &m);
                }
                return reply;
            }
        }
        error_reply(id, ResponseCode::ServFail)
    }

    /// Completes a chased CNAME: the target's records from upstream (or the cache), appended
    /// with the upstream's response code.
    pub async fn chase(&self, c: Chase) -> Vec<u8> {
        let Chase {
            mut resp,
            target,
            qtype,
            limit,
        } = c;
        let bytes = query(&target, qtype);
        let reply = self.forward(&bytes, LowerName::new(&target), qtype).await;
        match Message::from_vec(&reply) {
            Ok(m) => {
                resp.set_response_code(m.response_code());
                resp.add_answers(m.answers().iter().cloned());
            }
            Err(_) => {
                resp.set_response_code(ResponseCode::ServFail);
            }
        }
        self.fit(resp, limit)
    }

    async fn reply_to(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        match self.respond(query, udp) {
            Reply::Message(m) => Some(m),
            Reply::Forward(name, t) => Some(self.forward(query, name, t).await),
            Reply::Chase(c) => Some(self.chase(*c).await),
            Reply::Drop => None,
        }
    }
}

/// A recursive query for `name`/`qtype`, with an id nobody can guess from the previous one
/// (each `RandomState` is seeded afresh).
pub fn query(name: &Name, qtype: RecordType) -> Vec<u8> {
    let id = random_u64() as u16;
    let mut q = Message::new();
    q.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(hickory_proto::op::Query::query(name.clone(), qtype));
    encode(q)
}

/// Whether the server at `addr` answers `name`/`qtype` with NOERROR within `within`.
pub async fn probe(addr: SocketAddr, name: &Name, qtype: RecordType, within: Duration) -> bool {
    let q = query(name, qtype);
    match tokio::time::timeout(within, relay(addr, &q)).await {
        Ok(Ok(reply)) => Message::from_vec(&reply).is_ok_and(|m| {
            m.message_type() == MessageType::Response && m.response_code() == ResponseCode::NoError
        }),
        _ => false,
    }
}

/// 64 random bits (a `RandomState` is seeded afresh each time).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

/// Sends `query` to `up` from a socket of its own (a random port) and waits for the reply with
/// its id. While it waits it holds no buffer: a datagram is read into one on the stack
/// (`take_reply`) only once the socket has one, so that a thousand waiting forwards cost their
/// sockets and little else.
async fn relay(up: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    loop {
        // An upstream that is not there answers with an ICMP error, which the socket reports
        // as an error, not as something to read: waited for too, so that a dead upstream costs
        // no `UPSTREAM_TIMEOUT`.
        sock.ready(Interest::READABLE | Interest::ERROR).await?;
        if let Some(e) = sock.take_error()? {
            return Err(e);
        }
        match take_reply(&sock, query) {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One datagram off `sock`: the reply to `query` (same id), or None for another one.
fn take_reply(sock: &UdpSocket, query: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 65535];
    let n = sock.try_recv(&mut buf)?;
    Ok((n >= 2 && buf[..2] == query[..2]).then(|| buf[..n].to_vec()))
}

fn encode(m: Message) -> Vec<u8> {
    m.to_vec()
        .unwrap_or_else(|_| error_reply(m.id(), ResponseCode::ServFail))
}

/// A bare reply: the id and a response code.
fn error_reply(id: u16, rcode: ResponseCode) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Response)
        .set_response_code(rcode);
    m.to_vec().unwrap_or_default()
}
