//! One connection in set-up on a worker, top-down:
//!
//! ```text
//! accept ─┬─ public TLS ── Hello: read the ClientHello into the replay buffer (parser boxed at
//!         │                the first byte) ── root host → tokio's root-host task
//!         │                                └─ lease by SNI ─┐
//!         ├─ TCP lease port ── lease by port ───────────────┴─ admit (caps) ── claim (claim.rs)
//!         └─ reverse ── preamble ── nonce + proof ── MAC ── verified → idle session (claim.rs: offer)
//! ```
//!
//! The first bytes decide between the two handshakes on either port (agents allowed only one
//! TCP port, issue 22): `ORRS` on the public TLS port becomes a reverse handshake (the
//! reverse port's bounds, deadline and drop reasons; counted `reverse_via_tls_port`), and
//! `0x16` (a TLS record) on the reverse port becomes a ClientHello read (the public pending
//! bounds), handed to the TCP fallback acceptor when its SNI is the root host and it offers
//! ALPN `orp/1`, refused (`reverse_port_tls`) otherwise.
//!
//! Every phase waits on the worker's ring (one-shot readiness under the connection's key) and
//! is bounded by a timer of its kind (timers.rs); every refusal is a named drop reason.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use outrelay_io::Interest;
use outrelay_proto::client_hello::{ClientHelloParser, HelloError, Progress};
use outrelay_proto::hostname::HostName;
use outrelay_proto::reverse::{self, LeaseId, MAC_BYTES, Marker, NONCE_BYTES, PREAMBLE_BYTES};

use super::Worker;
use super::listen::{ListenerKind, reset};
use super::timers::TimerKind;
use crate::ingress::limits::{ConnSlot, GaugeSlot, KeyedSlot, PendingSlot, SourceKey};
use crate::ingress::stats::Drop;

/// Bytes the ClientHello buffer grows by per read: what a pending connection holds is what
/// it sent plus less than this (R2).
const HELLO_READ_STEP_BYTES: usize = 512;

/// A connection in set-up, and the descriptor interest armed for it under its key.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) socket: TcpStream,
    pub(crate) armed: Interest,
    pub(crate) state: State,
}

/// Where a connection is in its set-up.
#[derive(Debug)]
pub(crate) enum State {
    /// Public TLS: reading the ClientHello.
    Hello(Box<Hello>),
    /// TLS on the reverse-session port: reading the ClientHello (only an agent's fallback
    /// tunnel may pass). A variant, not a flag in [`Hello`]: a silent pending connection
    /// stays within its size.
    ReverseHello(Box<Hello>),
    /// Admitted to a lease; waiting for an idle session (not polled).
    Waiting(Box<Waiting>),
    /// No route yet, but its lease is expected (inherited at an upgrade, issue 20): waiting
    /// for the lease to be routed (not polled; re-checked at each publish and tick).
    AwaitLease(Box<AwaitLease>),
    /// Writing the marker and replayed bytes to the claimed `session` (polled for writing).
    Marker(Box<MarkerWrite>),
    /// Reverse session: reading the preamble, then (nonce and proof sent) the MAC.
    Reverse(Box<Reverse>),
}

/// What a public TLS connection holds before its hello is complete.
#[derive(Debug)]
pub(crate) struct Hello {
    pub(crate) source: SourceKey,
    pub(crate) _pending: PendingSlot,
    /// Allocated at the first byte: a silent connection holds none.
    pub(crate) parser: Option<Box<ClientHelloParser>>,
    pub(crate) replay: Vec<u8>,
    /// Set when the hello is complete.
    pub(crate) server_name: Option<HostName>,
}

/// A connection admitted to a lease, waiting for a session.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) lease: LeaseId,
    pub(crate) slot: ConnSlot,
    pub(crate) marker: Marker,
    pub(crate) replay: Vec<u8>,
}

/// What a public connection waits for when its lease is only expected.
// Inline (no allocation): it lives inside the boxed `AwaitLease` and as a count key, and only
// while an upgrade's expectations last.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LeaseTarget {
    /// A TLS lease, by the SNI host name.
    Host(HostName),
    /// A TCP lease port.
    Tcp(u16),
}

/// A public connection waiting for an expected lease: it keeps its pending place (the global
/// and per-source budgets) until it is admitted to the lease or refused.
#[derive(Debug)]
pub(crate) struct AwaitLease {
    pub(crate) source: SourceKey,
    pub(crate) _pending: PendingSlot,
    pub(crate) target: LeaseTarget,
    pub(crate) marker: Marker,
    pub(crate) replay: Vec<u8>,
}

/// A marker write that did not complete at once.
#[derive(Debug)]
pub(crate) struct MarkerWrite {
    pub(crate) session: TcpStream,
    pub(crate) slot: ConnSlot,
    /// Marker and replay bytes not written yet.
    pub(crate) rest: Vec<u8>,
}

/// The places a reverse handshake holds until it ends.
#[derive(Debug)]
pub(crate) struct ReversePlaces {
    pub(crate) _global: GaugeSlot,
    pub(crate) _source: KeyedSlot<SourceKey>,
}

/// A reverse session's handshake: preamble, then (after the nonce and proof) the MAC.
#[derive(Debug)]
pub(crate) struct Reverse {
    pub(crate) _places: ReversePlaces,
    pub(crate) preamble: [u8; PREAMBLE_BYTES],
    pub(crate) mac: [u8; MAC_BYTES],
    /// Bytes of the current phase's buffer read so far.
    pub(crate) have: usize,
    /// After the preamble: what the MAC must prove.
    pub(crate) challenge: Option<Challenge>,
    /// Arrived on the public TLS port (counted apart).
    pub(crate) via_tls_port: bool,
}

/// The nonce sent for a lease, and the key its MAC must use.
#[derive(Debug)]
pub(crate) struct Challenge {
    /// Held until the MAC verifies: a flood of preambles for one lease id cannot take the
    /// handshake places of other leases.
    pub(crate) _unauth: KeyedSlot<LeaseId>,
    pub(crate) lease: LeaseId,
    pub(crate) key: [u8; reverse::EXPORTER_KEY_BYTES],
    pub(crate) nonce: [u8; NONCE_BYTES],
    /// The agent's nonce (version 2); `None`: a version 1 session.
    pub(crate) agent_nonce: Option<[u8; NONCE_BYTES]>,
}

/// What a read step decided.
enum Step {
    /// Wait for more bytes.
    Wait,
    /// Refused: count and close.
    Drop(Drop),
    /// Done reading: the caller moves the connection on.
    Done,
    /// The public TLS port saw `ORRS` (or its start): a reverse session.
    ToReverse,
    /// The reverse port saw a TLS record: maybe an agent's fallback tunnel.
    ToTls,
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

impl Worker {
    /// A connection `kind`'s listener accepted from `peer`.
    pub(crate) fn accepted(&mut self, kind: ListenerKind, stream: TcpStream, peer: SocketAddr) {
        self.stats.accepts[usize::from(kind == ListenerKind::Reverse)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.ingress.fd_exhausted_recently(self.now) {
            return self.refuse(stream, Drop::FdExhausted);
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let source = SourceKey::of(peer.ip());
        match kind {
            ListenerKind::Sni => match self.ingress.admit_public(source) {
                Ok(pending) => {
                    let state = State::Hello(Box::new(Hello {
                        source,
                        _pending: pending,
                        parser: None,
                        replay: Vec::new(),
                        server_name: None,
                    }));
                    self.start(stream, state, TimerKind::Hello, self.timeouts.hello);
                }
                Err(reason) => self.refuse(stream, reason),
            },
            ListenerKind::Tcp(_) | ListenerKind::TcpRange => {
                match self.ingress.admit_public(source) {
                    Ok(pending) => {
                        let port = match kind {
                            ListenerKind::Tcp(port) => port,
                            // getsockname: the port the client dialled (the lookup program
                            // steered it here without changing the destination).
                            _ => stream.local_addr().map_or(0, |local| local.port()),
                        };
                        let admitted = {
                            let snapshot = self.ingress.shared.load();
                            match snapshot.routes.lookup_tcp(port) {
                                Some(route) => self
                                    .ingress
                                    .admit_live(route.lease_id, &route.tenant, source)
                                    .map(|slot| (route.lease_id, slot, route.client_addr)),
                                None if self.ingress.shared.expected().tcp(port, self.now) => {
                                    let _ = stream.set_nodelay(true);
                                    let wait = AwaitLease {
                                        source,
                                        _pending: pending,
                                        target: LeaseTarget::Tcp(port),
                                        marker: Marker::Tcp,
                                        replay: Vec::new(),
                                    };
                                    return self.await_lease(stream, wait);
                                }
                                None => Err(Drop::NoTcpRoute),
                            }
                        };
                        drop(pending);
                        match admitted {
                            Ok((lease, slot, client_addr)) => {
                                let _ = stream.set_nodelay(true);
                                let marker = Marker::claim(false, client_addr);
                                self.wait_for_session(stream, lease, slot, marker, Vec::new());
                            }
                            Err(reason) => self.refuse(stream, reason),
                        }
                    }
                    Err(reason) => self.refuse(stream, reason),
                }
            }
            ListenerKind::Reverse => match self.ingress.admit_reverse(source) {
                Ok((global, per_source)) => {
                    let state = State::Reverse(Box::new(Reverse {
                        _places: ReversePlaces {
                            _global: global,
                            _source: per_source,
                        },
                        preamble: [0; PREAMBLE_BYTES],
                        mac: [0; MAC_BYTES],
                        have: 0,
                        challenge: None,
                        via_tls_port: false,
                    }));
                    self.start(stream, state, TimerKind::Handshake, self.timeouts.handshake);
                }
                Err(reason) => self.refuse(stream, reason),
            },
        }
    }

    /// Counts `reason` and closes `stream`: reset at a cap, a plain close otherwise
    /// ([`Drop::resets`]).
    pub(crate) fn refuse(&self, stream: TcpStream, reason: Drop) {
        self.ingress.stats.drop(reason);
        if reason.resets() {
            reset(stream);
        }
    }

    /// Stores a new connection, reads what already arrived, and waits for the rest.
    fn start(
        &mut self,
        socket: TcpStream,
        state: State,
        kind: TimerKind,
        after: std::time::Duration,
    ) {
        let conn = Conn {
            socket,
            armed: Interest::NONE,
            state,
        };
        let Some(key) = self.conns.insert(conn) else {
            return; // slab full: dropped (closed)
        };
        self.timers.arm(kind, key, self.now + after);
        // Most clients send with their first segment: try before waiting.
        self.readable(key);
    }

    /// The connection `key` is readable (or was just accepted).
    pub(crate) fn readable(&mut self, key: u64) {
        let max_hello = self.ingress.config().max_hello_bytes;
        let accept_v1 = self.ingress.config().reverse_accept_v1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let step = match &mut conn.state {
            State::Hello(h) => read_hello(&mut conn.socket, h, max_hello, false),
            State::ReverseHello(h) => read_hello(&mut conn.socket, h, max_hello, true),
            State::Reverse(r) if r.challenge.is_none() => read_preamble(
                &mut conn.socket,
                &mut r.preamble,
                &mut r.have,
                accept_v1,
                !r.via_tls_port,
            ),
            State::Reverse(r) => {
                read_exact_into(&mut conn.socket, &mut r.mac, &mut r.have, Drop::BadMac)
            }
            // Not waiting for reads.
            State::Waiting(_) | State::AwaitLease(_) | State::Marker(_) => return,
        };
        match step {
            Step::Wait => self.arm(key, Interest::READ),
            Step::Drop(reason) => self.close(key, reason),
            Step::Done => self.advance(key),
            Step::ToReverse => self.hello_to_reverse(key),
            Step::ToTls => self.reverse_to_hello(key),
        }
    }

    /// The public TLS port's connection `key` began with `ORRS`'s first byte: it becomes a
    /// reverse handshake with the reverse port's places (its public pending place given back),
    /// deadline and drop reasons.
    fn hello_to_reverse(&mut self, key: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let State::Hello(h) = &mut conn.state else {
            return;
        };
        self.ingress
            .stats
            .reverse_via_tls_port
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seen = std::mem::take(&mut h.replay);
        // The agent sends nothing past its preamble before the relay's nonce.
        if seen.len() > reverse::preamble_len(&seen) {
            return self.close(key, Drop::BadPreamble);
        }
        let source = h.source;
        let places = match self.ingress.admit_reverse(source) {
            Ok((global, per_source)) => ReversePlaces {
                _global: global,
                _source: per_source,
            },
            Err(reason) => return self.close(key, reason),
        };
        let mut preamble = [0; PREAMBLE_BYTES];
        preamble[..seen.len()].copy_from_slice(&seen);
        // Replacing the hello gives its pending place back.
        conn.state = State::Reverse(Box::new(Reverse {
            _places: places,
            preamble,
            mac: [0; MAC_BYTES],
            have: seen.len(),
            challenge: None,
            via_tls_port: true,
        }));
        self.timers.arm(
            TimerKind::Handshake,
            key,
            self.now + self.timeouts.handshake,
        );
        self.readable(key);
    }

    /// The reverse port's connection `key` began with a TLS record: it becomes a ClientHello
    /// read with the public pending places (its reverse places given back) and deadline.
    fn reverse_to_hello(&mut self, key: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let State::Reverse(r) = &mut conn.state else {
            return;
        };
        let source = r._places._source.key();
        let seen = r.preamble[..r.have].to_vec();
        let pending = match self.ingress.admit_public(source) {
            Ok(p) => p,
            Err(reason) => return self.close(key, reason),
        };
        conn.state = State::ReverseHello(Box::new(Hello {
            source,
            _pending: pending,
            parser: None,
            replay: seen,
            server_name: None,
        }));
        self.timers
            .arm(TimerKind::Hello, key, self.now + self.timeouts.hello);
        self.readable(key);
    }

    /// A read phase finished: route the hello, answer the preamble, or check the MAC.
    fn advance(&mut self, key: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match &mut conn.state {
            State::Hello(_) | State::ReverseHello(_) => self.route_hello(key),
            State::Reverse(r) if r.challenge.is_none() => {
                let Ok(Some(preamble)) = reverse::decode_preamble(&r.preamble[..r.have]) else {
                    return self.close(key, Drop::BadPreamble);
                };
                match self.ingress.answer_preamble(preamble, &conn.socket) {
                    Ok(challenge) => {
                        r.challenge = Some(challenge);
                        r.have = 0;
                        self.arm(key, Interest::READ);
                    }
                    Err(reason) => self.close(key, reason),
                }
            }
            State::Reverse(r) => {
                let Some(c) = &r.challenge else { return };
                let verified = match &c.agent_nonce {
                    Some(agent_nonce) => {
                        reverse::verify_agent_mac(&c.key, &c.lease, agent_nonce, &c.nonce, &r.mac)
                    }
                    None => reverse::verify_mac_v1(&c.key, &c.nonce, &c.lease, &r.mac),
                };
                if verified.is_err() {
                    return self.close(key, Drop::BadMac);
                }
                let lease = c.lease;
                if r.via_tls_port {
                    self.ingress
                        .stats
                        .sessions_via_tls_port
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let Some(conn) = self.take(key) else { return };
                let _ = conn.socket.set_nodelay(true);
                self.ingress
                    .stats
                    .sessions_authenticated
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.offer(
                    lease,
                    super::pool::IdleSession {
                        stream: conn.socket,
                        last_write: self.now,
                    },
                    None,
                );
            }
            State::Waiting(_) | State::AwaitLease(_) | State::Marker(_) => {}
        }
    }

    /// The ClientHello is complete: the root host, or the lease its SNI names.
    fn route_hello(&mut self, key: u64) {
        let Some(conn) = self.take(key) else { return };
        let (hello, via_reverse_port) = match conn.state {
            State::Hello(h) => (h, false),
            State::ReverseHello(h) => (h, true),
            _ => return,
        };
        let Hello {
            source,
            _pending: pending,
            parser,
            replay,
            server_name,
        } = *hello;
        drop(parser);
        if via_reverse_port {
            // The reverse port serves agents only: their fallback tunnel, nothing public.
            drop(pending);
            let root = self.ingress.config().root_host.clone();
            let tunnel = self.ingress.fallback().is_some()
                && server_name.is_some_and(|n| n.as_str() == root)
                && offers_orp_alpn(&replay);
            if !tunnel {
                return self.refuse(conn.socket, Drop::ReversePortTls);
            }
            self.ingress
                .stats
                .fallback_via_reverse_port
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.spawn_fallback(conn.socket, replay);
        }
        let Some(server_name) = server_name else {
            return self.refuse(conn.socket, Drop::NoSni);
        };
        if server_name.as_str() == self.ingress.config().root_host {
            drop(pending);
            if self.ingress.fallback().is_some() && offers_orp_alpn(&replay) {
                // An agent's TCP fallback tunnel: its own bounds, not the root host's pool.
                return self.spawn_fallback(conn.socket, replay);
            }
            // Handed off: the root host's own pool holds it from here.
            return self.spawn_root(conn.socket, replay, source);
        }
        let admitted = {
            let snapshot = self.ingress.shared.load();
            match snapshot.routes.lookup_sni(&server_name) {
                Some(route) => self
                    .ingress
                    .admit_live(route.lease_id, &route.tenant, source)
                    .map(|slot| (route.lease_id, slot, route.client_addr)),
                None if self.ingress.shared.expected().host(&server_name, self.now) => {
                    let wait = AwaitLease {
                        source,
                        _pending: pending,
                        target: LeaseTarget::Host(server_name),
                        marker: Marker::Tls,
                        replay,
                    };
                    return self.await_lease(conn.socket, wait);
                }
                None => Err(Drop::UnknownHost),
            }
        };
        drop(pending);
        match admitted {
            Ok((lease, slot, client_addr)) => {
                let _ = conn.socket.set_nodelay(true);
                let marker = Marker::claim(true, client_addr);
                self.wait_for_session(conn.socket, lease, slot, marker, replay);
            }
            Err(reason) => self.refuse(conn.socket, reason),
        }
    }

    /// Arms `want` for connection `key`'s socket.
    pub(crate) fn arm(&mut self, key: u64, want: Interest) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let fd = match &conn.state {
            State::Marker(m) => m.session.as_fd(),
            _ => conn.socket.as_fd(),
        };
        match self.engine.arm_user(fd, key, conn.armed, want) {
            Ok(armed) => conn.armed = armed,
            Err(_) => self.close(key, Drop::EngineFull),
        }
    }

    /// Takes connection `key` out of the worker (its readiness forgotten).
    pub(crate) fn take(&mut self, key: u64) -> Option<Conn> {
        let conn = self.conns.remove(key)?;
        if conn.armed != Interest::NONE {
            let fd = match &conn.state {
                State::Marker(m) => m.session.as_fd(),
                _ => conn.socket.as_fd(),
            };
            self.engine.forget_user(fd, key, conn.armed);
        }
        Some(conn)
    }

    /// Refuses connection `key` with `reason` (its places given back on drop).
    pub(crate) fn close(&mut self, key: u64, reason: Drop) {
        if let Some(conn) = self.take(key) {
            match &conn.state {
                State::Waiting(w) => {
                    self.pool.waiter_left(&w.lease);
                    self.ingress.board.waiting_changed(&w.lease, self.id, -1);
                }
                State::AwaitLease(w) => self.lease_waits.left(&w.target),
                _ => {}
            }
            self.refuse(conn.socket, reason);
        }
    }

    /// A timer of `kind` came up for `key`: close it if it is still in that phase.
    pub(crate) fn expired(&mut self, kind: TimerKind, key: u64) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let reason = match (&conn.state, kind) {
            (State::Hello(_) | State::ReverseHello(_), TimerKind::Hello) => Drop::HelloTimeout,
            (State::Reverse(_), TimerKind::Handshake) => Drop::HandshakeTimeout,
            (State::Waiting(_), TimerKind::Claim) => Drop::ClaimTimeout,
            (State::Marker(_), TimerKind::Marker) => Drop::MarkerWriteFailed,
            _ => return,
        };
        self.close(key, reason);
    }
}

/// Whether the buffered ClientHello (`replay`, complete) offers ALPN `orp/1`: an agent's TCP
/// fallback when the SNI is the root host. Parsed again here, only for root-host connections,
/// so a pending connection carries no flag for it (a silent one stays small).
fn offers_orp_alpn(replay: &[u8]) -> bool {
    matches!(
        outrelay_proto::client_hello::parse_client_hello(replay, replay.len().max(1)),
        Ok(Some(hello)) if hello.alpn().any(|p| p == crate::quic::fallback::FALLBACK_ALPN)
    )
}

/// Reads what is there of the ClientHello into `h.replay` and feeds it to the parser (first
/// the bytes already there when it came from the reverse port). On the public TLS port,
/// first bytes `ORRS` are a reverse session's preamble ([`Step::ToReverse`]).
fn read_hello(socket: &mut TcpStream, h: &mut Hello, max: usize, via_reverse_port: bool) -> Step {
    if h.parser.is_none() && !h.replay.is_empty() {
        let parser = h.parser.insert(Box::new(ClientHelloParser::new(max)));
        if let Some(step) = hello_progress(parser.feed(&h.replay), h) {
            return step;
        }
    }
    loop {
        let start = h.replay.len();
        let step = max.saturating_sub(start).clamp(1, HELLO_READ_STEP_BYTES);
        h.replay.resize(start + step, 0);
        let n = match socket.read(&mut h.replay[start..]) {
            Ok(0) => return Step::Drop(Drop::BadHello),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                h.replay.truncate(start);
                return Step::Wait;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                h.replay.truncate(start);
                continue;
            }
            Err(_) => return Step::Drop(Drop::BadHello),
        };
        h.replay.truncate(start + n);
        if start == 0 && !via_reverse_port && starts_like_preamble(&h.replay) {
            return Step::ToReverse;
        }
        let parser = h
            .parser
            .get_or_insert_with(|| Box::new(ClientHelloParser::new(max)));
        let progress = parser.feed(&h.replay[start..]);
        if let Some(step) = hello_progress(progress, h) {
            return step;
        }
    }
}

/// Whether the first bytes read on the public TLS port are `ORRS` (or as much of it as came):
/// a reverse session. Plain HTTP such as `OPTIONS` still counts as `plain_http` (only a
/// first segment of exactly `O` is taken for a preamble, and then refused as one).
fn starts_like_preamble(first: &[u8]) -> bool {
    let n = first.len().min(reverse::PREAMBLE_MAGIC.len());
    n > 0 && first[..n] == reverse::PREAMBLE_MAGIC[..n]
}

/// What the parser's answer means: `None` to read on.
fn hello_progress(progress: Result<Progress, HelloError>, h: &mut Hello) -> Option<Step> {
    match progress {
        Ok(Progress::NeedMore) => None,
        Ok(Progress::Done { hello, .. }) => {
            h.server_name = hello.server_name;
            Some(Step::Done)
        }
        Err(HelloError::PlainHttp) => Some(Step::Drop(Drop::PlainHttp)),
        Err(HelloError::IpLiteral) => Some(Step::Drop(Drop::IpLiteralSni)),
        Err(_) => Some(Step::Drop(Drop::BadHello)),
    }
}

/// Reads into `buf[*have..]` until it is full (`Done`); a failure is `refusal`.
fn read_exact_into(
    socket: &mut TcpStream,
    buf: &mut [u8],
    have: &mut usize,
    refusal: Drop,
) -> Step {
    while *have < buf.len() {
        match socket.read(&mut buf[*have..]) {
            Ok(0) => return Step::Drop(refusal),
            Ok(n) => *have += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Drop(refusal),
        }
    }
    Step::Done
}

/// Reads the preamble into `buf[*have..]`, never past its end (its version byte says how long
/// it is), and refuses it at its first wrong byte (a scanner on the reverse port is not kept
/// waiting for 37 bytes), a version 1 preamble as soon as its version byte when `accept_v1`
/// is off. With `tls_allowed` (the reverse port), a first byte `0x16` is a TLS record
/// ([`Step::ToTls`]).
fn read_preamble(
    socket: &mut TcpStream,
    buf: &mut [u8; PREAMBLE_BYTES],
    have: &mut usize,
    accept_v1: bool,
    tls_allowed: bool,
) -> Step {
    loop {
        let seen = &buf[..*have];
        if tls_allowed && seen.first() == Some(&TLS_HANDSHAKE_RECORD) {
            return Step::ToTls;
        }
        if reverse::decode_preamble(seen).is_err() {
            return Step::Drop(Drop::BadPreamble);
        }
        if !accept_v1 && seen.get(4) == Some(&reverse::PREAMBLE_VERSION_V1) {
            return Step::Drop(Drop::ReverseV1Refused);
        }
        let want = reverse::preamble_len(seen).min(PREAMBLE_BYTES);
        if *have >= want {
            return Step::Done;
        }
        match socket.read(&mut buf[*have..want]) {
            Ok(0) => return Step::Drop(Drop::BadPreamble),
            Ok(n) => *have += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Drop(Drop::BadPreamble),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `ORRS` (and its prefixes) on the TLS port is a reverse session; TLS and plain HTTP
    /// starting with `O` are not.
    #[test]
    fn only_the_preamble_magic_turns_a_tls_port_connection_into_a_reverse_session() {
        let preamble = reverse::encode_preamble(&LeaseId([1; 16]), &[2; NONCE_BYTES]);
        for n in 1..=preamble.len() {
            assert!(starts_like_preamble(&preamble[..n]), "prefix of {n} bytes");
        }
        assert!(starts_like_preamble(b"ORRS\x7f garbage version"));
        for other in [
            &b"OPTIONS * HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"GET /",
            b"ORS",
            b"",
        ] {
            assert!(!starts_like_preamble(other), "{other:?}");
        }
    }

    /// L1 / R2: a silent pending public connection holds its slab entry, its boxed hello state
    /// without a parser (allocated at the first byte) and one timer entry.
    #[test]
    fn a_silent_pending_connection_is_small() {
        let slot = std::mem::size_of::<Option<Conn>>() + std::mem::size_of::<u32>();
        let hello = std::mem::size_of::<Hello>();
        let timer = std::mem::size_of::<(u64, std::time::Instant)>();
        let total = slot + hello + timer;
        eprintln!(
            "silent pending connection: slab {slot} + hello {hello} + timer {timer} = {total} bytes \
             (parser {} allocated at the first byte)",
            std::mem::size_of::<ClientHelloParser>()
        );
        assert!(total <= 384, "{total} bytes");
    }
}
