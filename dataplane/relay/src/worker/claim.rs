//! Claims: a public connection admitted to a lease takes an idle reverse session, the marker
//! and replayed bytes go to it, and the two sockets become a spliced pair on this worker's
//! engine.
//!
//! ```text
//! wait_for_session ─ idle here? ─ yes ─────────────────────────────┐
//!                  └ no: wait (claim timer), steal from a worker    │
//!                       with idle ones (Msg::Steal → Msg::Session)  │
//! offer(session) ─ a claim waits here? ─ yes ──────────────────────┤
//!                └ a claim waits on another worker? → hand it over  ├─ write marker + replay
//!                └ else park it idle (ready_queue_max per worker)   │  (writev; rest when the
//!                                                                   │  session is writable)
//!                                                                   └─ Engine::add → spliced
//! ```

use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use outrelay_io::Interest;
use outrelay_proto::reverse::{LeaseId, Marker};

use super::conn::{Conn, MarkerWrite, State, Waiting};
use super::pool::IdleSession;
use super::timers::TimerKind;
use super::{Msg, Worker};
use crate::ingress::limits::ConnSlot;
use crate::ingress::stats::Drop;

impl Worker {
    /// `client` is admitted to `lease`: claim an idle session for it, here or from another
    /// worker, or wait for one.
    pub(crate) fn wait_for_session(
        &mut self,
        client: TcpStream,
        lease: LeaseId,
        slot: ConnSlot,
        marker: Marker,
        replay: Vec<u8>,
    ) {
        if let Some(session) = self.take_idle(&lease) {
            self.stats.claims.fetch_add(1, Ordering::Relaxed);
            return self.write_marker(client, session.stream, slot, marker, &replay);
        }
        if self.pool.waiting(&lease) >= self.waiters_max {
            return self.refuse(client, Drop::ClaimWaitersFull);
        }
        let conn = Conn {
            socket: client,
            armed: Interest::NONE,
            state: State::Waiting(Box::new(Waiting {
                lease,
                slot,
                marker,
                replay,
            })),
        };
        let Some(key) = self.conns.insert(conn) else {
            return;
        };
        self.timers
            .arm(TimerKind::Claim, key, self.now + self.timeouts.claim);
        self.pool.add_waiter(lease, key);
        self.ingress.board.waiting_changed(&lease, self.id, 1);
        if let Some(w) = self.ingress.board.worker_with_idle(&lease, self.id) {
            let sent = self.ingress.send_to(w, Msg::Steal { lease, to: self.id });
            if sent.is_err() {
                self.stats.inbox_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An authenticated session of `lease` (from this worker's handshake, or handed over by
    /// worker `from`): to the oldest claim waiting here, to another worker's waiting claim,
    /// or parked idle.
    pub(crate) fn offer(&mut self, lease: LeaseId, session: IdleSession, from: Option<usize>) {
        while let Some(key) = self.pool.pop_waiter(&lease) {
            let waiting = matches!(
                self.conns.get(key).map(|c| &c.state),
                Some(State::Waiting(w)) if w.lease == lease
            );
            if !waiting {
                continue; // stale key: that claim already left
            }
            let Some(conn) = self.take(key) else { continue };
            let State::Waiting(w) = conn.state else {
                continue;
            };
            self.pool.waiter_left(&lease);
            self.ingress.board.waiting_changed(&lease, self.id, -1);
            self.stats.claims.fetch_add(1, Ordering::Relaxed);
            if from.is_some() {
                self.stats.cross_claims.fetch_add(1, Ordering::Relaxed);
            }
            let Waiting {
                slot,
                marker,
                replay,
                ..
            } = *w;
            return self.write_marker(conn.socket, session.stream, slot, marker, &replay);
        }
        // Nobody waits here. A session authenticated here goes to a worker whose claims wait
        // (one hop at most: a handed-over session stays where it lands).
        let mut session = session;
        if from.is_none()
            && let Some(w) = self.ingress.board.worker_waiting(&lease, self.id)
        {
            match self.ingress.send_to(
                w,
                Msg::Session {
                    lease,
                    session,
                    from: self.id,
                },
            ) {
                Ok(()) => {
                    self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(Msg::Session { session: back, .. }) => {
                    self.stats.inbox_full.fetch_add(1, Ordering::Relaxed);
                    session = back;
                }
                Err(_) => return,
            }
        }
        match self.pool.park(lease, session, self.ready_max) {
            Ok(()) => self.ingress.board.idle_changed(&lease, self.id, 1),
            // Dropped: closed.
            Err(_) => self.ingress.stats.drop(Drop::ReadyQueueFull),
        }
    }

    /// Worker `to` has a claim of `lease` waiting and nothing idle: give it our oldest idle
    /// session, if we still have one.
    pub(crate) fn steal(&mut self, lease: LeaseId, to: usize) {
        let Some(session) = self.take_idle(&lease) else {
            return;
        };
        match self.ingress.send_to(
            to,
            Msg::Session {
                lease,
                session,
                from: self.id,
            },
        ) {
            Ok(()) => {
                self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
            }
            Err(Msg::Session { session, .. }) => {
                self.stats.inbox_full.fetch_add(1, Ordering::Relaxed);
                self.pool.unpark(lease, session);
                self.ingress.board.idle_changed(&lease, self.id, 1);
            }
            Err(_) => {}
        }
    }

    /// Takes the oldest live idle session of `lease` on this worker, counting the sessions
    /// found closed on the way (`dead_session`), and keeps the board in step.
    fn take_idle(&mut self, lease: &LeaseId) -> Option<IdleSession> {
        let mut dead = 0u64;
        let session = self.pool.take_idle(lease, &mut dead);
        for _ in 0..dead {
            self.ingress.stats.drop(Drop::DeadSession);
        }
        let taken = dead + u64::from(session.is_some());
        let delta = i32::try_from(taken).unwrap_or(i32::MAX);
        self.ingress.board.idle_changed(lease, self.id, -delta);
        session
    }

    /// Writes the marker and `replay` to the claimed `session` (one writev; the rest when it
    /// is writable), then splices.
    fn write_marker(
        &mut self,
        client: TcpStream,
        session: TcpStream,
        slot: ConnSlot,
        marker: Marker,
        replay: &[u8],
    ) {
        let head = [marker as u8];
        let total = 1 + replay.len();
        let mut written = 0;
        let mut s = &session;
        while written < total {
            let r = if written == 0 {
                s.write_vectored(&[IoSlice::new(&head), IoSlice::new(replay)])
            } else {
                s.write(replay.get(written - 1..).unwrap_or_default())
            };
            match r {
                Ok(0) => return self.ingress.stats.drop(Drop::MarkerWriteFailed),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return self.ingress.stats.drop(Drop::MarkerWriteFailed),
            }
        }
        if written == total {
            return self.splice(client, session, slot);
        }
        // The session's send buffer was full (rare: it is fresh): keep the rest and wait.
        let mut rest = Vec::with_capacity(total - written);
        if written == 0 {
            rest.push(head[0]);
            rest.extend_from_slice(replay);
        } else {
            rest.extend_from_slice(replay.get(written - 1..).unwrap_or_default());
        }
        let conn = Conn {
            socket: client,
            armed: Interest::NONE,
            state: State::Marker(Box::new(MarkerWrite {
                session,
                slot,
                rest,
            })),
        };
        let Some(key) = self.conns.insert(conn) else {
            return;
        };
        self.timers
            .arm(TimerKind::Marker, key, self.now + self.timeouts.marker);
        self.arm(key, Interest::WRITE);
    }

    /// The claimed session of connection `key` is writable: write the rest of the marker.
    pub(crate) fn writable(&mut self, key: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.armed = conn.armed.minus(Interest::WRITE);
        let State::Marker(m) = &mut conn.state else {
            return;
        };
        loop {
            let mut s = &m.session;
            match s.write(&m.rest) {
                Ok(0) => return self.close(key, Drop::MarkerWriteFailed),
                Ok(n) => {
                    m.rest.drain(..n);
                    if m.rest.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return self.arm(key, Interest::WRITE);
                }
                Err(_) => return self.close(key, Drop::MarkerWriteFailed),
            }
        }
        let Some(conn) = self.take(key) else { return };
        if let State::Marker(m) = conn.state {
            let MarkerWrite { session, slot, .. } = *m;
            self.splice(conn.socket, session, slot);
        }
    }

    /// Hands `client` ⇄ `session` to this worker's engine; the lease's places are given back
    /// when the pair ends.
    fn splice(&mut self, client: TcpStream, session: TcpStream, slot: ConnSlot) {
        if !self.cut.is_empty() && slot.lease().is_some_and(|l| self.cut.contains_key(l)) {
            // Its lease was cut while this claim was under way: both sockets close here.
            return self.ingress.stats.drop(Drop::LeaseGone);
        }
        // TCP keep-alive on both legs of a spliced pair (public-ingress.md): a vanished peer
        // is noticed by the kernel instead of holding the pair for the idle timeout.
        for socket in [&client, &session] {
            let _ = socket2::SockRef::from(socket).set_keepalive(true);
        }
        // Bandwidth limits (issue 21): client → agent is to_service, agent → client to_client,
        // each held to the lease's and its tenant's buckets (rates live, 0 = none).
        let limits = slot
            .lease()
            .and_then(|id| self.ingress.shared.bandwidth.lease(id))
            .map(|b| [b.to_service(), b.to_client()])
            .unwrap_or_default();
        let tag = slot.into_tag();
        match self.engine.add_limited(
            OwnedFd::from(client),
            OwnedFd::from(session),
            tag,
            limits,
            self.now,
        ) {
            Ok(()) => {
                self.ingress.stats.spliced.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.ingress.lease_conns().release_tag(tag);
                self.ingress.stats.drop(Drop::EngineFull);
            }
        }
    }
}
