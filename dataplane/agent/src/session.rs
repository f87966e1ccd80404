//! Reverse sessions on a splice engine thread, from connect to splice, off tokio.
//!
//! A pool asks an engine thread to open a session (`Splicer::open`); the
//! thread runs it top-down on its own ring (`Engine::arm_user`), never blocking:
//!
//! 1. `Connecting`: non-blocking connect to the relay's reverse address (resolved by the pool
//!    on tokio, never here; the next address on failure); on writability the preamble is
//!    written (a failed connect shows as the write's error);
//! 2. `Challenge`: the relay's nonce and proof are read (exactly `CHALLENGE_BYTES`, however
//!    they are split, never a byte more) and the proof checked in constant time: a peer that
//!    does not know `K` gets no MAC and no chance to send a marker (closed, counted
//!    `relay_proof`); then the exporter-keyed MAC over both nonces is written and the session
//!    is idle (counted in the pool's `idle`);
//! 3. `Idle`: on readability, ONE byte at a time: `0x00` keep-alives are skipped (a surplus
//!    session closes on one), a marker claims the session (counted out of the pool, whose
//!    replacements this thread opens at once), anything else or
//!    an EOF ends it; no byte for `pool.dead_session_ms` ends it as dead;
//! 4. `Local`: non-blocking connect to the local target; on writability `SO_ERROR` says how it
//!    went: connected → `Engine::add(session, local)` on this same thread; refused (after every
//!    resolved address), timed out or any error → the session is reset (SO_LINGER 0) so the
//!    relay closes the public client at once, counted by [`LocalFail`] reason.
//!
//! Timers are four FIFO deadline queues (relay connect, handshake, dead session, local
//! connect): each has one duration for the whole agent, so entries are pushed in deadline
//! order and expiry only looks at the heads; a session whose deadline moved (a keep-alive)
//! leaves a stale entry behind, recognised by its generation and deadline, and stale entries
//! are compacted away when they outnumber the live sessions. No syscall or task per timer.
//!
//! The pool's accounting stays exact and never blocks: idle, open and claims are atomics in
//! the `PoolLink`, and only an unclaimed end (rare: dead, surplus, failed) is sent to the pool
//! task, with a `try_send` on a channel sized for one event per session the pool counts open.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outrelay_io::{Engine, Interest};
use outrelay_proto::client_addr::{ClientAddr, MAX_BLOCK_BYTES, block_len};
use outrelay_proto::reverse::{self, Marker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{LocalConfig, PoolConfig};
use crate::pool::{PoolLink, Target, decrement};
use crate::stats::{LocalFail, SessionFail, Stats};

/// Key layout: `index << KEY_INDEX_SHIFT | generation << 1 | side` (side 1: the local socket);
/// 32 + 26 + 1 bits, below `outrelay_io::USER_KEY_LIMIT` (2^60).
const GENERATION_BITS: u32 = 26;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;
const KEY_INDEX_SHIFT: u32 = GENERATION_BITS + 1;
const _: () = assert!(1u64 << (32 + KEY_INDEX_SHIFT) <= outrelay_io::USER_KEY_LIMIT);

fn key(index: u32, generation: u32, local: bool) -> u64 {
    (u64::from(index) << KEY_INDEX_SHIFT)
        | (u64::from(generation & GENERATION_MASK) << 1)
        | u64::from(local)
}

fn unkey(key: u64) -> (u32, u32, bool) {
    let index = u32::try_from(key >> KEY_INDEX_SHIFT).unwrap_or(u32::MAX);
    let generation = u32::try_from((key >> 1) & u64::from(GENERATION_MASK)).unwrap_or(0);
    (index, generation, key & 1 == 1)
}

/// The deadline queues, one per timed state.
const RELAY_CONNECT: usize = 0;
const HANDSHAKE: usize = 1;
const DEAD: usize = 2;
const LOCAL_CONNECT: usize = 3;

/// Where a session is.
enum State {
    /// TCP connect to the relay's `reverse[addr]` in progress (waiting for writability).
    Connecting {
        addrs: Arc<[SocketAddr]>,
        addr: usize,
    },
    /// Preamble with `agent_nonce` sent; `got` bytes of the relay's nonce and proof read.
    Challenge {
        got: usize,
        agent_nonce: reverse::Nonce,
        challenge: [u8; reverse::CHALLENGE_BYTES],
    },
    /// Authenticated, waiting for a marker.
    Idle,
    /// Marker 0x03/0x04 read: `got` bytes of the client's address block so far.
    ClientAddr {
        marker: Marker,
        got: usize,
        block: [u8; MAX_BLOCK_BYTES],
    },
    /// Claimed: connecting the local target `addrs[addr]` (waiting for writability).
    Local {
        local: Socket,
        armed: Interest,
        addrs: Arc<[SocketAddr]>,
        addr: usize,
        name: Arc<str>,
        /// The PROXY protocol header to write once connected (empty: none).
        header: Vec<u8>,
    },
}

impl State {
    fn queue(&self) -> usize {
        match self {
            State::Connecting { .. } => RELAY_CONNECT,
            State::Challenge { .. } => HANDSHAKE,
            // The block comes with its marker; a relay that stops inside it is dead.
            State::Idle | State::ClientAddr { .. } => DEAD,
            State::Local { .. } => LOCAL_CONNECT,
        }
    }
}

struct Session {
    pool: Arc<PoolLink>,
    fd: Socket,
    armed: Interest,
    state: State,
    /// The pending deadline (in the state's queue).
    deadline: Instant,
}

struct Slot {
    generation: u32,
    session: Option<Session>,
}

/// How a session ends (what is counted and what the pool hears).
enum End {
    /// Before the handshake completed.
    Setup(SessionFail),
    /// An idle session: failed (`Some`), or dead / surplus (`None`, not a failure).
    Idle(Option<SessionFail>),
    /// An idle session whose pool is gone: nothing to tell.
    PoolGone,
    /// A claimed session whose local target could not be joined (the target's name when the
    /// session did not get as far as connecting it).
    Local(LocalFail, Option<std::io::Error>, Option<Arc<str>>),
}

/// The reverse sessions of one engine thread.
pub(crate) struct Sessions {
    local: LocalConfig,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicUsize>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    queues: [VecDeque<(Instant, u32, u32)>; 4],
    durations: [Duration; 4],
}

impl Sessions {
    pub(crate) fn new(
        pool: &PoolConfig,
        local: LocalConfig,
        stats: Arc<Stats>,
        in_flight: Arc<AtomicUsize>,
    ) -> Sessions {
        Sessions {
            durations: [
                pool.connect_timeout,
                pool.handshake_timeout,
                pool.dead_session,
                local.connect_timeout,
            ],
            local,
            stats,
            in_flight,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            queues: Default::default(),
        }
    }

    /// Starts a new session of `pool` (one `open` already reserved for it): the non-blocking
    /// connect to the relay. False when it could not even start.
    pub(crate) fn open(&mut self, engine: &mut Engine, pool: Arc<PoolLink>, now: Instant) -> bool {
        if pool.closed.load(Ordering::Relaxed) {
            decrement(&pool.open); // queued before its pool stopped
            return false;
        }
        let addrs = pool.resolved.load().reverse.clone();
        let Some(fd) = addrs.first().and_then(|a| stream_socket(*a).ok()) else {
            self.stats.session_failed(SessionFail::Connect);
            pool.ended(false, true);
            return false;
        };
        let (index, generation) = self.insert(Session {
            fd,
            pool,
            armed: Interest::NONE,
            state: State::Connecting { addrs, addr: 0 },
            deadline: now,
        });
        self.set_timer(index, generation, now);
        if let Err(end) = self.connect_relay(engine, index, generation) {
            self.end(engine, index, end);
            return false;
        }
        true
    }

    /// Opens, on this thread, every session `pool` is short of (after a claim).
    fn replenish(&mut self, engine: &mut Engine, pool: &Arc<PoolLink>, now: Instant) {
        while pool.reserve() {
            if !self.open(engine, pool.clone(), now) {
                break; // the failure holds the pool; do not spin on it
            }
        }
    }

    /// A key armed with [`Engine::arm_user`] fired.
    pub(crate) fn ready(&mut self, engine: &mut Engine, key: u64, fired: Interest, now: Instant) {
        let (index, generation, local) = unkey(key);
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return; // stale: the session ended and its slot moved on
        };
        if local {
            if let State::Local { armed, .. } = &mut s.state {
                *armed = armed.minus(fired);
            }
        } else {
            s.armed = s.armed.minus(fired);
        }
        let step = match (s.state.queue(), local) {
            (RELAY_CONNECT, false) => self.on_relay_writable(engine, index, generation, now),
            (HANDSHAKE, false) => self.on_challenge(engine, index, generation, now),
            (DEAD, false) => self.on_idle_readable(engine, index, generation, now),
            (LOCAL_CONNECT, true) => self.on_local_writable(engine, index, generation, now),
            _ => Ok(()),
        };
        if let Err(end) = step {
            self.end(engine, index, end);
        }
    }

    /// Ends every session of a stopped pool that is not claimed (claimed ones go on).
    pub(crate) fn close_stopped_pools(&mut self, engine: &mut Engine) {
        for index in 0..self.slots.len() {
            let stopped = self.slots[index].session.as_ref().is_some_and(|s| {
                s.pool.closed.load(Ordering::Relaxed) && !matches!(s.state, State::Local { .. })
            });
            if stopped {
                self.end(
                    engine,
                    u32::try_from(index).unwrap_or(u32::MAX),
                    End::PoolGone,
                );
            }
        }
    }

    /// Ends sessions whose deadline passed; returns how long until the next deadline (at
    /// most `max_wait`).
    pub(crate) fn expire(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        max_wait: Duration,
    ) -> Duration {
        let mut wait = max_wait;
        for q in 0..self.queues.len() {
            while let Some(&(deadline, index, generation)) = self.queues[q].front() {
                let current = slot(&mut self.slots, index, generation)
                    .is_some_and(|s| s.state.queue() == q && s.deadline == deadline);
                if !current {
                    self.queues[q].pop_front(); // stale
                    continue;
                }
                if deadline > now {
                    wait = wait.min(deadline - now);
                    break;
                }
                self.queues[q].pop_front();
                let end = match q {
                    RELAY_CONNECT => End::Setup(SessionFail::Connect),
                    HANDSHAKE => End::Setup(SessionFail::Handshake),
                    DEAD => {
                        self.stats.sessions_dead.fetch_add(1, Ordering::Relaxed);
                        End::Idle(None)
                    }
                    _ => End::Local(LocalFail::Timeout, None, None),
                };
                self.end(engine, index, end);
            }
            if self.queues[q].len() > 2 * self.live + 64 {
                let slots = &self.slots;
                self.queues[q].retain(|&(deadline, index, generation)| {
                    slots.get(index as usize).is_some_and(|slot| {
                        slot.generation == generation
                            && slot
                                .session
                                .as_ref()
                                .is_some_and(|s| s.state.queue() == q && s.deadline == deadline)
                    })
                });
            }
        }
        wait
    }

    /// Connects the session's socket to the relay's `addrs[addr]` (state `Connecting`).
    fn connect_relay(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Connecting { addrs, addr } = &s.state else {
            return Ok(());
        };
        let Some(&to) = addrs.get(*addr) else {
            return Err(End::Setup(SessionFail::Connect));
        };
        let _ = s.fd.set_keepalive(true);
        match s.fd.connect(&to.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(_) => return self.next_relay(engine, index, generation),
        }
        self.arm(engine, index, generation, false, Interest::WRITE)
    }

    /// The relay address failed: a fresh socket for the next one, if any.
    fn next_relay(&mut self, engine: &mut Engine, index: u32, generation: u32) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Connecting { addrs, addr } = &mut s.state else {
            return Ok(());
        };
        *addr += 1;
        let Some(&to) = addrs.get(*addr) else {
            return Err(End::Setup(SessionFail::Connect));
        };
        let fresh = stream_socket(to).map_err(|_| End::Setup(SessionFail::Connect))?;
        engine.forget_user(s.fd.as_fd(), key(index, generation, false), s.armed);
        s.armed = Interest::NONE;
        s.fd = fresh;
        self.connect_relay(engine, index, generation)
    }

    fn on_relay_writable(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        // A fresh nonce per attempt (a retry after WouldBlock writes a new one: nothing of the
        // last was sent).
        let mut agent_nonce = [0u8; reverse::NONCE_BYTES];
        if getrandom::fill(&mut agent_nonce).is_err() {
            return Err(End::Setup(SessionFail::Handshake));
        }
        let preamble = reverse::encode_preamble(&s.pool.params.lease_id, &agent_nonce);
        match (&s.fd).write(&preamble) {
            Ok(n) if n == preamble.len() => {}
            Ok(_) => return Err(End::Setup(SessionFail::Handshake)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return self.arm(engine, index, generation, false, Interest::WRITE);
            }
            Err(_) => return self.next_relay(engine, index, generation),
        }
        s.state = State::Challenge {
            got: 0,
            agent_nonce,
            challenge: [0; reverse::CHALLENGE_BYTES],
        };
        self.set_timer(index, generation, now);
        self.arm(engine, index, generation, false, Interest::READ)
    }

    fn on_challenge(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Challenge {
            got,
            agent_nonce,
            challenge,
        } = &mut s.state
        else {
            return Ok(());
        };
        // Exactly the relay's nonce and proof: nothing after them may be consumed here.
        match (&s.fd).read(&mut challenge[*got..]) {
            Ok(0) => return Err(End::Setup(SessionFail::Handshake)),
            Ok(n) => *got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(End::Setup(SessionFail::Handshake)),
        }
        if *got < reverse::CHALLENGE_BYTES {
            return self.arm(engine, index, generation, false, Interest::READ);
        }
        let params = &s.pool.params;
        // The relay proves K before the agent answers anything (no MAC oracle, no marker from
        // a peer that is not the relay).
        let Ok(relay_nonce) =
            reverse::verify_challenge(&params.key, &params.lease_id, agent_nonce, challenge)
        else {
            return Err(End::Setup(SessionFail::RelayProof));
        };
        let mac = reverse::agent_mac(&params.key, &params.lease_id, agent_nonce, &relay_nonce);
        match (&s.fd).write(&mac) {
            Ok(n) if n == mac.len() => {}
            _ => return Err(End::Setup(SessionFail::Handshake)),
        }
        s.state = State::Idle;
        s.pool.became_idle();
        self.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
        self.set_timer(index, generation, now);
        self.arm(engine, index, generation, false, Interest::READ)
    }

    fn on_idle_readable(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        if matches!(s.state, State::ClientAddr { .. }) {
            return self.read_client_addr(engine, index, generation, now);
        }
        // ONE byte at a time: the bytes after a marker are the public client's, for the splice.
        let mut alive = false;
        let marker = loop {
            let mut byte = [0u8; 1];
            match (&s.fd).read(&mut byte) {
                Ok(0) => return Err(End::Idle(Some(SessionFail::ClosedByRelay))),
                Ok(_) => match Marker::from_byte(byte[0]) {
                    Some(Marker::KeepAlive) => {
                        if decrement(&s.pool.surplus) {
                            return Err(End::Idle(None));
                        }
                        alive = true;
                    }
                    Some(m) => break m,
                    None => return Err(End::Idle(Some(SessionFail::BadByte))),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if alive {
                        self.set_timer(index, generation, now);
                    }
                    return self.arm(engine, index, generation, false, Interest::READ);
                }
                Err(_) => return Err(End::Idle(Some(SessionFail::ClosedByRelay))),
            }
        };
        if marker.carries_client_addr() {
            s.state = State::ClientAddr {
                marker,
                got: 0,
                block: [0; MAX_BLOCK_BYTES],
            };
            return self.read_client_addr(engine, index, generation, now);
        }
        self.claim(engine, index, generation, marker, None, now)
    }

    /// Reads the client's address block after marker 0x03/0x04, in as many pieces as it
    /// comes, never a byte past it (the client's bytes follow, for the splice). A bad family
    /// or an end inside the block closes the session (`bad_client_addr`).
    fn read_client_addr(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::ClientAddr { marker, got, block } = &mut s.state else {
            return Ok(());
        };
        loop {
            let want = match ClientAddr::decode_partial(&block[..*got]) {
                Err(_) => return Err(End::Idle(Some(SessionFail::BadClientAddr))),
                Ok(Some((addr, _))) => {
                    let marker = *marker;
                    return self.claim(engine, index, generation, marker, Some(addr), now);
                }
                Ok(None) if *got == 0 => 1,
                Ok(None) => block_len(block[0]).unwrap_or(1),
            };
            match (&s.fd).read(&mut block[*got..want]) {
                Ok(0) => return Err(End::Idle(Some(SessionFail::BadClientAddr))),
                Ok(n) => *got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return self.arm(engine, index, generation, false, Interest::READ);
                }
                Err(_) => return Err(End::Idle(Some(SessionFail::ClosedByRelay))),
            }
        }
    }

    /// A marker arrived: the session is the public client's from here on; its replacements
    /// start on this ring right after its local connect (or its failure).
    fn claim(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        marker: Marker,
        client: Option<ClientAddr>,
        now: Instant,
    ) -> Result<(), End> {
        let Some(pool) = slot(&mut self.slots, index, generation).map(|s| s.pool.clone()) else {
            return Ok(());
        };
        let joining = self.join_target(engine, index, generation, marker, client, now);
        self.replenish(engine, &pool, now);
        joining
    }

    /// Counts the claim and starts the local connect.
    fn join_target(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        marker: Marker,
        client: Option<ClientAddr>,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let resolved = s.pool.resolved.load();
        let (counter, target) = match marker {
            Marker::Tls | Marker::TlsAddr => (&self.stats.sessions_claimed_tls, &resolved.tls),
            _ => (&self.stats.sessions_claimed_tcp, &resolved.tcp),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        s.pool.claimed();
        // Counted from the claim: the SIGTERM drain waits for claimed sessions not yet spliced.
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let (name, addrs) = match target {
            Target::None => return Err(End::Local(LocalFail::NoTarget, None, None)),
            Target::Failed(name, why) => {
                let e = std::io::Error::other(why.clone());
                return Err(End::Local(LocalFail::Resolve, Some(e), Some(name.clone())));
            }
            Target::Addrs(name, addrs) => (name.clone(), addrs.clone()),
        };
        drop(resolved);
        let Some(&first) = addrs.first() else {
            return Err(End::Local(LocalFail::Resolve, None, Some(name)));
        };
        let local = stream_socket(first)
            .map_err(|e| End::Local(LocalFail::Other, Some(e), Some(name.clone())))?;
        let header = match s.pool.params.proxy_protocol {
            None => Vec::new(),
            Some(version) => {
                if client.is_none() {
                    self.stats
                        .client_addr_missing
                        .fetch_add(1, Ordering::Relaxed);
                }
                crate::proxy::stream_header(version, client.as_ref())
            }
        };
        s.state = State::Local {
            local,
            armed: Interest::NONE,
            addrs,
            addr: 0,
            name,
            header,
        };
        self.set_timer(index, generation, now);
        self.connect_local(engine, index, generation, now)
    }

    /// Connects the local socket to the target's `addrs[addr]` (state `Local`).
    fn connect_local(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Local {
            local, addrs, addr, ..
        } = &s.state
        else {
            return Ok(());
        };
        let Some(&to) = addrs.get(*addr) else {
            return Err(End::Local(LocalFail::Other, None, None));
        };
        match local.connect(&to.into()) {
            Ok(()) => self.join(engine, index, generation, now),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                self.arm(engine, index, generation, true, Interest::WRITE)
            }
            Err(e) => self.local_error(engine, index, generation, e, now),
        }
    }

    fn on_local_writable(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Local { local, .. } = &s.state else {
            return Ok(());
        };
        match local.take_error() {
            Ok(None) => self.join(engine, index, generation, now),
            Ok(Some(e)) | Err(e) => self.local_error(engine, index, generation, e, now),
        }
    }

    /// A local connect failed: the next resolved address, or the end of the claim.
    fn local_error(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        e: std::io::Error,
        now: Instant,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let State::Local {
            local,
            armed,
            addrs,
            addr,
            ..
        } = &mut s.state
        else {
            return Ok(());
        };
        if let Some(&to) = addrs.get(*addr + 1) {
            // The next resolved address (`localhost` → ::1, then 127.0.0.1), like
            // `TcpStream::connect`; the connect deadline covers them all.
            *addr += 1;
            let fresh =
                stream_socket(to).map_err(|e| End::Local(LocalFail::Other, Some(e), None))?;
            engine.forget_user(local.as_fd(), key(index, generation, true), *armed);
            *armed = Interest::NONE;
            *local = fresh;
            return self.connect_local(engine, index, generation, now);
        }
        let reason = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => LocalFail::Refused,
            std::io::ErrorKind::TimedOut => LocalFail::Timeout,
            _ => LocalFail::Other,
        };
        Err(End::Local(reason, Some(e), None))
    }

    /// The local target is connected: splice the pair on this thread's engine.
    fn join(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        now: Instant,
    ) -> Result<(), End> {
        // The PROXY protocol header goes first, before any byte of the client's (for TLS
        // passthrough: before the ClientHello). A fresh connection's send buffer takes it whole;
        // anything less fails the claim (`proxy_header`) rather than blocking the thread.
        if let Some(Session {
            state: State::Local { local, header, .. },
            ..
        }) = slot(&mut self.slots, index, generation)
            && !header.is_empty()
        {
            match local.send(header) {
                Ok(n) if n == header.len() => {
                    self.stats.proxy_headers.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => return Err(End::Local(LocalFail::ProxyHeader, None, None)),
                Err(e) => return Err(End::Local(LocalFail::ProxyHeader, Some(e), None)),
            }
        }
        // The keys are not forgotten: the engine re-arms both descriptors under its own tokens
        // (an epoll MOD, a new ring poll), which saves two epoll_ctl calls per connection.
        let Some(s) = self.take(index, generation) else {
            return Ok(());
        };
        let State::Local { local, name, .. } = s.state else {
            return Ok(());
        };
        let _ = local.set_keepalive(true);
        let tag = self.stats.splices.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = engine.add(OwnedFd::from(s.fd), OwnedFd::from(local), tag, now) {
            // The engine closed both sockets; the relay sees the session close.
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.stats.local_failed(LocalFail::EngineRefused);
            let p = &s.pool.params;
            p.fail_log.note(
                &p.name,
                &name,
                LocalFail::EngineRefused,
                &e,
                self.local.failure_log_interval,
            );
        }
        Ok(())
    }

    /// Removes a session, counts and reports how it ended, closes its sockets.
    fn end(&mut self, engine: &mut Engine, index: u32, end: End) {
        let Some(generation) = self.slots.get(index as usize).map(|slot| slot.generation) else {
            return;
        };
        let Some(s) = self.take(index, generation) else {
            return;
        };
        engine.forget_user(s.fd.as_fd(), key(index, generation, false), s.armed);
        if let State::Local { local, armed, .. } = &s.state {
            engine.forget_user(local.as_fd(), key(index, generation, true), *armed);
        }
        match end {
            End::Setup(reason) => {
                self.stats.session_failed(reason);
                s.pool.ended(false, true);
            }
            End::Idle(reason) => {
                if let Some(reason) = reason {
                    self.stats.session_failed(reason);
                }
                s.pool.ended(true, reason.is_some());
            }
            End::PoolGone => {}
            End::Local(reason, error, name) => {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.stats.local_failed(reason);
                let target = match (&s.state, name) {
                    (_, Some(name)) => name,
                    (State::Local { name, .. }, None) => name.clone(),
                    _ => Arc::from("-"),
                };
                let text: &dyn std::fmt::Display = match (&error, reason) {
                    (Some(e), _) => e,
                    (None, LocalFail::NoTarget) => &"no target for this marker",
                    (None, LocalFail::Timeout) => &"connect timed out",
                    (None, _) => &"connect failed",
                };
                let p = &s.pool.params;
                p.fail_log.note(
                    &p.name,
                    &target,
                    reason,
                    text,
                    self.local.failure_log_interval,
                );
                // RST instead of FIN: the relay's splice sees an error and closes both sides
                // at once, rather than half-closing towards the client and waiting for it.
                let _ = s.fd.set_linger(Some(Duration::ZERO));
            }
        }
    }

    /// Takes a session out of its slot, leaving the slot free for the next generation.
    fn take(&mut self, index: u32, generation: u32) -> Option<Session> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let s = slot.session.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(index);
        self.live -= 1;
        Some(s)
    }

    fn insert(&mut self, s: Session) -> (u32, u32) {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.session = Some(s);
            return (index, slot.generation);
        }
        self.slots.push(Slot {
            generation: 0,
            session: Some(s),
        });
        (u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX), 0)
    }

    /// Starts the deadline of the session's current state, counted from `now`.
    fn set_timer(&mut self, index: u32, generation: u32, now: Instant) {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return;
        };
        let q = s.state.queue();
        s.deadline = now + self.durations[q];
        self.queues[q].push_back((s.deadline, index, generation));
    }

    /// Arms `want` on the session's socket (or its local socket).
    fn arm(
        &mut self,
        engine: &mut Engine,
        index: u32,
        generation: u32,
        local: bool,
        want: Interest,
    ) -> Result<(), End> {
        let Some(s) = slot(&mut self.slots, index, generation) else {
            return Ok(());
        };
        let k = key(index, generation, local);
        let armed = match (&mut s.state, local) {
            (State::Local { local, armed, .. }, true) => engine
                .arm_user(local.as_fd(), k, *armed, want)
                .map(|a| *armed = a),
            _ => engine
                .arm_user(s.fd.as_fd(), k, s.armed, want)
                .map(|a| s.armed = a),
        };
        armed.map_err(|e| match s.state {
            State::Connecting { .. } => End::Setup(SessionFail::Connect),
            State::Challenge { .. } => End::Setup(SessionFail::Handshake),
            State::Idle | State::ClientAddr { .. } => End::Idle(Some(SessionFail::ClosedByRelay)),
            State::Local { .. } => End::Local(LocalFail::Other, Some(e), None),
        })
    }
}

fn slot(slots: &mut [Slot], index: u32, generation: u32) -> Option<&mut Session> {
    let slot = slots.get_mut(index as usize)?;
    if slot.generation != generation {
        return None;
    }
    slot.session.as_mut()
}

/// A non-blocking TCP socket for `addr`, with no delay.
fn stream_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    // Non-blocking from the start (socket2 adds CLOEXEC): two fcntl calls fewer per socket.
    let kind = Type::from(libc::SOCK_STREAM | libc::SOCK_NONBLOCK);
    let s = Socket::new(Domain::for_address(addr), kind, Some(Protocol::TCP))?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use outrelay_io::{Backend, EngineConfig};
    use outrelay_proto::reverse::{self, LeaseId};
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::SpliceConfig;
    use crate::pool::{Event, FailLog, PoolParams, Resolved};
    use crate::splice::Splicer;
    use crate::stats::PoolGauge;

    const BOUND: Duration = Duration::from_secs(5);

    fn backends() -> Vec<Backend> {
        let mut b = vec![Backend::Epoll];
        if Backend::probe() == Backend::Uring {
            b.push(Backend::Uring);
        } else {
            eprintln!("SKIP io_uring backend: not available here");
        }
        b
    }

    struct Rig {
        splicer: Splicer,
        stats: Arc<Stats>,
        link: Arc<PoolLink>,
        events: mpsc::Receiver<Event>,
        relay: TcpListener,
        lease_id: LeaseId,
        key: [u8; reverse::EXPORTER_KEY_BYTES],
    }

    /// One engine thread, a fake relay listener and a pool link whose TCP target is `tcp`
    /// (its target 0 and `max` as given: a claim grows it to at most `max`).
    fn rig(backend: Backend, pool: PoolConfig, tcp: Target, max: usize) -> Rig {
        rig_with(backend, pool, tcp, max, None)
    }

    /// [`rig`] whose lease writes `proxy_protocol` headers.
    fn rig_with(
        backend: Backend,
        pool: PoolConfig,
        tcp: Target,
        max: usize,
        proxy_protocol: Option<crate::config::ProxyProtocol>,
    ) -> Rig {
        let relay = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        let stats = Arc::new(Stats::default());
        let splice = SpliceConfig {
            workers: 1,
            io_backend: backend,
            engine: EngineConfig {
                backend,
                ..EngineConfig::default()
            },
        };
        let splicer =
            Splicer::start(&splice, &pool, &LocalConfig::default(), stats.clone()).expect("engine");
        let lease_id = LeaseId([7; 16]);
        let key = [9u8; reverse::EXPORTER_KEY_BYTES];
        let (tx, events) = mpsc::channel(16);
        let link = Arc::new(PoolLink::new(
            Arc::new(PoolParams {
                name: Arc::from("demo"),
                reverse_addr: relay.local_addr().expect("addr").to_string(),
                lease_id,
                key,
                tls_to: None,
                tcp_to: None,
                proxy_protocol,
                gauge: Arc::new(PoolGauge::default()),
                fail_log: Arc::new(FailLog::default()),
            }),
            Resolved {
                reverse: Arc::from(vec![relay.local_addr().expect("addr")]),
                tls: Target::None,
                tcp,
            },
            tx,
            max,
        ));
        Rig {
            splicer,
            stats,
            link,
            events,
            relay,
            lease_id,
            key,
        }
    }

    impl Rig {
        /// Opens a session and plays the relay's side of the handshake, the nonce in two
        /// pieces; returns the relay's end once the agent reported it idle.
        fn handshake(&mut self) -> TcpStream {
            let idle = self.link.idle.load(Ordering::Relaxed);
            assert!(self.splicer.open(self.link.clone()), "open queued");
            let (mut s, _) = self.relay.accept().expect("accept");
            s.set_read_timeout(Some(BOUND)).expect("timeout");
            let agent_nonce = self.preamble(&mut s);
            let nonce = [3u8; reverse::NONCE_BYTES];
            let challenge =
                reverse::encode_challenge(&self.key, &self.lease_id, &agent_nonce, &nonce);
            s.write_all(&challenge[..5]).expect("nonce");
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(&challenge[5..30]).expect("nonce and proof");
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(&challenge[30..]).expect("proof");
            let mut mac = [0u8; reverse::MAC_BYTES];
            s.read_exact(&mut mac).expect("mac");
            assert_eq!(
                mac,
                reverse::agent_mac(&self.key, &self.lease_id, &agent_nonce, &nonce)
            );
            self.wait_for(
                || self.link.idle.load(Ordering::Relaxed) == idle + 1,
                "idle",
            );
            s
        }

        /// Reads and checks the agent's preamble; its nonce.
        fn preamble(&self, s: &mut TcpStream) -> reverse::Nonce {
            let mut preamble = [0u8; reverse::PREAMBLE_BYTES];
            s.read_exact(&mut preamble).expect("preamble");
            match reverse::decode_preamble(&preamble) {
                Ok(Some(reverse::Preamble::V2 {
                    lease_id,
                    agent_nonce,
                })) if lease_id == self.lease_id => agent_nonce,
                other => panic!("not this lease's version 2 preamble: {other:?}"),
            }
        }

        fn next_event(&mut self) -> Event {
            let start = Instant::now();
            loop {
                if let Ok(e) = self.events.try_recv() {
                    return e;
                }
                assert!(start.elapsed() < BOUND, "no event from the engine");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn wait_for(&self, done: impl Fn() -> bool, what: &str) {
            let start = Instant::now();
            while !done() {
                assert!(start.elapsed() < BOUND, "never: {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn wait_in_flight(&self, want: usize) {
            let start = Instant::now();
            while self.splicer.in_flight.load(Ordering::Relaxed) != want {
                assert!(start.elapsed() < BOUND, "in_flight never reached {want}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// True when the peer closed (EOF) or reset the connection within the bound.
    fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        // A signal to the test process interrupts the blocking read (EINTR): that is not a
        // close (the test once failed on it under load).
        let r = loop {
            match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[test]
    fn keys_round_trip_below_the_user_key_limit() {
        for (i, g, l) in [
            (0, 0, false),
            (7, 12345, true),
            (u32::MAX, GENERATION_MASK, true),
        ] {
            let k = key(i, g, l);
            assert!(k < outrelay_io::USER_KEY_LIMIT);
            assert_eq!(unkey(k), (i, g, l));
        }
    }

    /// Handshake with a split nonce, keep-alives skipped, and the bytes written with the
    /// marker in one segment reach the local target: the engine consumed the marker only. The
    /// claim's replacements open at once on the engine.
    #[test]
    fn a_session_splices_exactly_the_bytes_after_its_marker() {
        for backend in backends() {
            let target = TcpListener::bind("127.0.0.1:0").expect("target");
            let addr = target.local_addr().expect("addr");
            let mut rig = rig(
                backend,
                PoolConfig::default(),
                Target::Addrs(Arc::from("t"), Arc::from(vec![addr])),
                3,
            );
            let mut relay = rig.handshake();
            // The pool's view: this one session open, a target of 2, `max` 3.
            rig.link.open.store(1, Ordering::Relaxed);
            rig.link.target.store(2, Ordering::Relaxed);
            relay.write_all(&[0, 0]).expect("keep-alives");
            std::thread::sleep(Duration::from_millis(20));
            relay.write_all(b"\x01hello").expect("marker + bytes");
            let (mut local, _) = target.accept().expect("local connect");
            local.set_read_timeout(Some(BOUND)).expect("timeout");
            let mut got = [0u8; 5];
            local.read_exact(&mut got).expect("spliced bytes");
            assert_eq!(&got, b"hello", "{backend:?}");
            local.write_all(b"back").expect("reply");
            let mut back = [0u8; 4];
            relay.read_exact(&mut back).expect("reply spliced");
            assert_eq!(&back, b"back");
            assert_eq!(rig.link.claims.load(Ordering::Relaxed), 1);
            assert_eq!(rig.link.idle.load(Ordering::Relaxed), 0);
            assert_eq!(rig.splicer.in_flight.load(Ordering::Relaxed), 1);
            // The claim raised the target to 3 and the engine opened all three sessions the pool
            // was then short of at once, itself: no pool task runs here.
            let replacements: Vec<TcpStream> = (0..3)
                .map(|_| rig.relay.accept().expect("replacement session").0)
                .collect();
            assert_eq!(rig.link.open.load(Ordering::Relaxed), 3);
            assert_eq!(rig.link.target.load(Ordering::Relaxed), 3);
            drop(replacements);
            assert_eq!(rig.stats.sessions_opened.load(Ordering::Relaxed), 1);
            assert_eq!(rig.stats.sessions_claimed_tcp.load(Ordering::Relaxed), 1);
            drop(local);
            drop(relay);
            rig.wait_in_flight(0);
        }
    }

    /// Marker 0x03 and the client's address block arriving in pieces: the local target gets
    /// the v2 header naming the client, then exactly the client's bytes. A session whose
    /// block has a bad family, or ends inside the block, is closed and counted.
    #[test]
    fn a_client_addr_block_in_pieces_becomes_a_proxy_header_and_a_bad_one_closes() {
        use outrelay_proto::client_addr::ClientAddr;
        for backend in backends() {
            let target = TcpListener::bind("127.0.0.1:0").expect("target");
            let addr = target.local_addr().expect("addr");
            let mut rig = rig_with(
                backend,
                PoolConfig::default(),
                Target::Addrs(Arc::from("t"), Arc::from(vec![addr])),
                1,
                Some(crate::config::ProxyProtocol::V2),
            );
            let mut relay = rig.handshake();
            let client = ClientAddr::new(
                "203.0.113.9:40123".parse().expect("addr"),
                "198.51.100.1:443".parse().expect("addr"),
            );
            let (block, n) = client.to_bytes();
            relay
                .write_all(&[0x03, block[0], block[1]])
                .expect("marker");
            std::thread::sleep(Duration::from_millis(20));
            relay.write_all(&block[2..7]).expect("block piece");
            std::thread::sleep(Duration::from_millis(20));
            relay.write_all(&block[7..n]).expect("block rest");
            relay.write_all(b"hello").expect("client bytes");
            let (mut local, _) = target.accept().expect("local connect");
            local.set_read_timeout(Some(BOUND)).expect("timeout");
            let want = crate::proxy::stream_header(crate::config::ProxyProtocol::V2, Some(&client));
            let mut got = vec![0u8; want.len() + 5];
            local.read_exact(&mut got).expect("header and bytes");
            assert_eq!(
                &got[..want.len()],
                &want[..],
                "{backend:?}: the v2 header first"
            );
            assert_eq!(&got[want.len()..], b"hello", "{backend:?}");
            let parsed = ppp::v2::Header::try_from(&got[..want.len()]).expect("ppp parses it");
            assert_eq!(
                parsed.addresses,
                ppp::v2::Addresses::from((client.source, client.destination))
            );
            assert_eq!(rig.stats.proxy_headers.load(Ordering::Relaxed), 1);
            drop(local);
            drop(relay);
            rig.wait_in_flight(0);

            for (round, bad) in [&[0x03u8, 5][..], &[0x04, 4, 1, 2]].into_iter().enumerate() {
                let mut relay = rig.handshake();
                relay.write_all(bad).expect("bad block");
                if round == 1 {
                    relay
                        .shutdown(std::net::Shutdown::Write)
                        .expect("fin inside the block");
                }
                assert!(
                    closed(&mut relay),
                    "{backend:?}: a bad block closes the session"
                );
                let want = u64::try_from(round + 1).expect("small");
                rig.wait_for(
                    || rig.stats.session_failures(SessionFail::BadClientAddr) == want,
                    "bad_client_addr counted",
                );
            }
        }
    }

    /// A refused local target resets the session at once and is counted; a second session
    /// with a target of two addresses, the first refusing, reaches the second.
    #[test]
    fn a_refused_target_resets_the_session_and_the_next_address_is_tried() {
        for backend in backends() {
            let dead = TcpListener::bind("127.0.0.1:0").expect("port");
            let dead_addr = dead.local_addr().expect("addr");
            drop(dead);
            let mut rig = rig(
                backend,
                PoolConfig::default(),
                Target::Addrs(Arc::from("t"), Arc::from(vec![dead_addr])),
                0,
            );
            let mut relay = rig.handshake();
            relay.write_all(&[1]).expect("marker");
            let mut buf = [0u8; 8];
            let got = relay.read(&mut buf);
            assert!(
                matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{backend:?}: session reset, got {got:?}"
            );
            assert_eq!(rig.link.claims.load(Ordering::Relaxed), 1);
            rig.wait_in_flight(0);
            assert_eq!(rig.stats.local_failures(LocalFail::Refused), 1);

            let live = TcpListener::bind("127.0.0.1:0").expect("target");
            let addrs = vec![dead_addr, live.local_addr().expect("addr")];
            rig.link.resolved.store(Arc::new(Resolved {
                reverse: rig.link.resolved.load().reverse.clone(),
                tls: Target::None,
                tcp: Target::Addrs(Arc::from("t"), Arc::from(addrs)),
            }));
            let mut relay = rig.handshake();
            relay.write_all(b"\x01x").expect("marker");
            let (mut local, _) = live.accept().expect("second address");
            local.set_read_timeout(Some(BOUND)).expect("timeout");
            let mut x = [0u8; 1];
            local.read_exact(&mut x).expect("byte");
            assert_eq!(&x, b"x");
            assert_eq!(rig.stats.local_failures(LocalFail::Refused), 1);
        }
    }

    /// A silent idle session is dead after `dead_session`, and a stopped pool closes its idle
    /// sessions; both reach the relay as a close.
    #[test]
    fn dead_and_stopped_sessions_close() {
        for backend in backends() {
            let pool = PoolConfig {
                dead_session: Duration::from_millis(200),
                ..PoolConfig::default()
            };
            let mut rig = rig(backend, pool, Target::None, 0);
            // Before the handshake: the session's dead deadline starts when it turns idle,
            // which is after this however late the test thread runs.
            let start = Instant::now();
            let mut relay = rig.handshake();
            assert!(closed(&mut relay), "{backend:?}: dead session closed");
            let after = start.elapsed();
            assert!(
                after >= Duration::from_millis(150),
                "{backend:?}: closed {after:?} after the start, before its deadline",
            );
            assert!(matches!(rig.next_event(), Event::Ended { failed: false }));
            assert_eq!(rig.link.idle.load(Ordering::Relaxed), 0);
            assert_eq!(rig.stats.sessions_dead.load(Ordering::Relaxed), 1);

            let mut relay = rig.handshake();
            rig.link.closed.store(true, Ordering::Relaxed);
            rig.splicer.pool_stopped();
            assert!(
                closed(&mut relay),
                "{backend:?}: stopped pool's session closed"
            );
            assert_eq!(rig.stats.sessions_dead.load(Ordering::Relaxed), 1);
        }
    }

    /// Review M9: a peer that does not know `K` (a DNS-spoofed or on-path "relay", here with a
    /// wrong key, and one that replays a genuine answer made for another agent nonce) gets no
    /// MAC and no marker is acted on: the agent closes after the proof without sending a
    /// byte, counted `relay_proof`, and the target is never connected.
    #[test]
    fn a_relay_that_does_not_prove_k_gets_no_mac_and_no_claim() {
        for backend in backends() {
            let target = TcpListener::bind("127.0.0.1:0").expect("target");
            target.set_nonblocking(true).expect("nonblocking");
            let addr = target.local_addr().expect("addr");
            let mut rig = rig(
                backend,
                PoolConfig::default(),
                Target::Addrs(Arc::from("t"), Arc::from(vec![addr])),
                1,
            );
            type Forge = fn(&Rig, &reverse::Nonce) -> [u8; reverse::CHALLENGE_BYTES];
            let forgeries: [Forge; 2] = [
                // Without K.
                |_, na| reverse::encode_challenge(&[1; 32], &LeaseId([7; 16]), na, &[3; 16]),
                // A genuine answer recorded for another agent nonce.
                |rig, _| reverse::encode_challenge(&rig.key, &rig.lease_id, &[0x55; 16], &[3; 16]),
            ];
            for (round, forged) in (1u64..).zip(forgeries) {
                assert!(rig.splicer.open(rig.link.clone()), "open queued");
                let (mut s, _) = rig.relay.accept().expect("accept");
                s.set_read_timeout(Some(BOUND)).expect("timeout");
                let agent_nonce = rig.preamble(&mut s);
                let mut bytes = forged(&rig, &agent_nonce).to_vec();
                // A marker and "payload" right behind the proof: never read, never acted on.
                bytes.extend_from_slice(b"\x01secret");
                s.write_all(&bytes).expect("forged answer");
                // Closed (or reset: the forged bytes stay unread) with nothing sent.
                let mut rest = Vec::new();
                let read = s.read_to_end(&mut rest);
                assert!(
                    rest.is_empty(),
                    "{backend:?} round {round}: the agent sent {rest:?}"
                );
                assert!(
                    !read.as_ref().is_err_and(|e| matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )),
                    "{backend:?} round {round}: not closed within {BOUND:?}"
                );
                rig.wait_for(
                    || rig.stats.session_failures(SessionFail::RelayProof) == round,
                    "relay_proof counted",
                );
                assert!(matches!(rig.next_event(), Event::Ended { failed: true }));
            }
            assert_eq!(rig.stats.sessions_opened.load(Ordering::Relaxed), 0);
            assert_eq!(rig.link.claims.load(Ordering::Relaxed), 0);
            assert!(
                target.accept().is_err(),
                "{backend:?}: the target was connected"
            );
        }
    }
}
