//! UDP port leases (`public-ingress.md`, "UDP port leases"): the relay binds each leased UDP
//! port; every distinct client address is a flow (idle after `flow_idle_ms`; its id comes from
//! one relay-wide counter, so no id is ever reused for a later lease while the agent
//! connection that may still map it lives); client datagrams travel to the agent as QUIC DATAGRAM frames on its ORP
//! connection (`uvarint udp_slot`, `uvarint flow_id`, payload) and replies leave from the lease
//! port to the flow's client.
//!
//! ```text
//! client ──UDP lease port──► port task (recvmmsg) ──QUIC DATAGRAM──► agent
//! client ◄─────────────────── port task (sendmmsg) ◄─ bounded queue ◄─ datagram reader of the
//!                                                                      agent's connection
//! ```
//!
//! One task per lease port owns its socket and flows (no locks on the data path). With the
//! eBPF lookup program ([`crate::steer`]) client datagrams of the whole lease range arrive on
//! one socket per worker instead ([`UdpIngress::serve_range`]), which hands each to its port's
//! task through a bounded queue (`client_queue_full` when full); the port's own socket then
//! only sends the replies (Linux cannot pick a source port per `sendmsg`, so a reply needs a
//! socket bound to the lease port; the kernel's lookup hands it nothing, the program runs
//! first). Sockets are
//! bound and dropped by [`UdpIngress::sync`], which the QUIC side calls right after publishing
//! a snapshot and before answering LEASE_GRANT (so a granted port is already bound when the
//! agent learns it), and [`UdpIngress::serve`] repeats to retry ports that could not be bound.
//! Agent datagrams are accepted only for slots granted on their own connection and
//! flow ids the port created. Nothing is truncated: a datagram larger than the connection's
//! current maximum datagram size (read per send; it moves with path MTU discovery) is dropped
//! and counted as `udp_too_large`. Every queue is bounded and every drop counted
//! ([`stats::UdpDrop`]).

mod batch;
mod port;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use outrelay_proto::udp::DatagramHeader;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::lease::ConnId;
use crate::state::Shared;
use port::{AgentDatagram, ClientDatagram, FlowIds, Port};
use stats::{UdpDrop, UdpStats};

/// UDP lease limits (`[udp]` in the config). Durations in milliseconds.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long ends (spec: 30 s).
    pub flow_idle_ms: u64,
    /// Flows per lease; a new client address beyond takes the place of the flow whose client
    /// has been silent longest, if that is at least `flow_evict_idle_ms`, or is dropped
    /// (`flow_limit`).
    pub flow_max: usize,
    /// Flows per lease from one source address (IPv6: one /64); more are dropped
    /// (`flow_per_source`), so one host cannot take a lease's whole table.
    pub flow_per_source_max: usize,
    /// A full table evicts a flow whose CLIENT has sent nothing for this long (agent replies
    /// do not count: a lease's own replies cannot pin its table).
    pub flow_evict_idle_ms: u64,
    /// A flow may receive this many times the bytes its client sent (spec: 3).
    pub reply_factor: u64,
    /// Agent datagrams queued per port before the newest are dropped.
    pub queue_max: usize,
    /// Receive slot per datagram; anything longer is cut by the kernel and dropped as too
    /// large. Must exceed the largest QUIC datagram payload (quinn's MTU upper bound is 1452).
    pub recv_slot_bytes: usize,
    /// SO_RCVBUF / SO_SNDBUF of each lease port (the kernel caps it at `rmem_max`/`wmem_max`).
    pub socket_buffer_bytes: usize,
    /// Address lease ports bind on.
    pub bind_ip: IpAddr,
    /// Longest wait between two route syncs (a published snapshot wakes the sync at once).
    pub sync_interval_ms: u64,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            flow_idle_ms: 30_000,
            flow_max: 1024,
            flow_per_source_max: 64,
            flow_evict_idle_ms: 5_000,
            reply_factor: 3,
            queue_max: 1024,
            recv_slot_bytes: 2048,
            socket_buffer_bytes: 4 * 1024 * 1024,
            bind_ip: IpAddr::from([0, 0, 0, 0]),
            sync_interval_ms: 1_000,
        }
    }
}

/// A bound lease port: its task and the queue into it.
struct Bound {
    task: JoinHandle<()>,
    tx: mpsc::Sender<AgentDatagram>,
    /// Client datagrams from the lease-range sockets (eBPF lookup).
    client_tx: mpsc::Sender<ClientDatagram>,
}

/// The queues into one bound port's task, as published for the datagram paths.
struct PortQueues {
    /// Datagrams from the lease's agent.
    agent: mpsc::Sender<AgentDatagram>,
    /// Client datagrams from the lease-range sockets (eBPF lookup).
    client: mpsc::Sender<ClientDatagram>,
}

#[derive(Default)]
struct Ports {
    bound: HashMap<u16, Bound>,
    unbindable: HashSet<u16>,
}

/// The UDP side of a relay.
pub struct UdpIngress {
    /// The limits in force: replaced whole by [`UdpIngress::reload`]; each port task takes a
    /// copy when its port is bound.
    config: ArcSwap<UdpConfig>,
    shared: Arc<Shared>,
    /// Each bound port's queue, published by the sync loop for the agents' datagram readers.
    queues: ArcSwap<HashMap<u16, PortQueues>>,
    /// Bound ports and ports that failed to bind (control path only: lease changes and the
    /// retry tick; never taken by a datagram).
    ports: std::sync::Mutex<Ports>,
    /// Flow ids of every port, never reused while the relay runs.
    flow_ids: Arc<FlowIds>,
    /// Counters by reason.
    pub stats: Arc<UdpStats>,
    /// Lease sockets held for a hand-over and inherited ones (issue 20 upgrade).
    handover: std::sync::OnceLock<Arc<crate::upgrade::Sockets>>,
    /// Set after a hand-over: every port task ends and no port is bound again.
    stopped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for UdpIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpIngress")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl UdpIngress {
    /// UDP ingress reading routes from `shared`.
    pub fn new(config: UdpConfig, shared: Arc<Shared>) -> Arc<UdpIngress> {
        Arc::new(UdpIngress {
            config: ArcSwap::from_pointee(config),
            shared,
            queues: ArcSwap::default(),
            ports: std::sync::Mutex::default(),
            flow_ids: Arc::default(),
            stats: Arc::default(),
            handover: std::sync::OnceLock::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Publishes reloaded `[udp]` limits: ports bound from now on (new UDP leases) run with
    /// them; bound ports keep theirs. The bind address stays (`listen.lease_bind_ip`).
    pub fn reload(&self, mut config: UdpConfig) {
        config.bind_ip = self.config.load().bind_ip;
        self.config.store(Arc::new(config));
    }

    /// Holds the lease sockets bound from now on for a hand-over, and adopts the inherited
    /// ones (upgrade). Call before [`UdpIngress::serve`].
    pub fn set_handover(&self, sockets: Arc<crate::upgrade::Sockets>) {
        let _ = self.handover.set(sockets);
    }

    /// After a hand-over: ends every port task (the sockets live on in the new process) and
    /// binds no port again.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.sync();
    }

    /// Keeps one bound socket and task per routed UDP port until the runtime stops: binds new
    /// ports as soon as a snapshot publishes them, ends the tasks of ports whose route is gone.
    /// A port that cannot be bound is retried at every sync and logged once.
    pub fn serve(self: &Arc<Self>) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut changed = me.shared.subscribe();
            loop {
                me.sync();
                let tick = Duration::from_millis(me.config.load().sync_interval_ms.max(10));
                let _ = tokio::time::timeout(tick, changed.changed()).await;
            }
        })
    }

    /// Brings the bound ports in line with the current snapshot's UDP routes. Must run inside
    /// the tokio runtime (it spawns port tasks).
    pub fn sync(&self) {
        let mut ports = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Ports { bound, unbindable } = &mut *ports;
        let snapshot = self.shared.load();
        let before: Vec<u16> = bound.keys().copied().collect();
        unbindable.retain(|p| snapshot.routes.lookup_udp(*p).is_some());
        let stopped = self.stopped.load(Ordering::Acquire);
        let handover = self.handover.get();
        if let Some(h) = handover {
            h.expire_spares(std::time::Instant::now());
        }
        bound.retain(|port, b| {
            let keep = snapshot.routes.lookup_udp(*port).is_some() && !stopped;
            if !keep {
                b.task.abort();
                if let Some(h) = handover {
                    h.unhold_udp_port(*port);
                }
            }
            keep
        });
        for (port, _) in snapshot.routes.udp_ports() {
            if bound.contains_key(&port) || stopped {
                continue;
            }
            match self.bind(port) {
                Ok(socket) => {
                    let (tx, rx) = mpsc::channel(self.config.load().queue_max.max(1));
                    let (client_tx, client_rx) = mpsc::channel(self.config.load().queue_max.max(1));
                    let port_task = Port::new(
                        port,
                        socket,
                        (rx, client_rx),
                        self.shared.clone(),
                        self.stats.clone(),
                        UdpConfig::clone(&self.config.load()),
                        self.flow_ids.clone(),
                    );
                    let task = tokio::spawn(port_task.run());
                    bound.insert(
                        port,
                        Bound {
                            task,
                            tx,
                            client_tx,
                        },
                    );
                    unbindable.remove(&port);
                }
                Err(e) => {
                    if unbindable.insert(port) {
                        tracing::warn!(port, error = %e, "cannot bind UDP lease port; retrying");
                    }
                }
            }
        }
        let mut now: Vec<u16> = bound.keys().copied().collect();
        now.sort_unstable();
        let mut was = before;
        was.sort_unstable();
        if now != was {
            self.stats
                .ports_bound
                .store(bound.len() as u64, Ordering::Relaxed);
            self.queues.store(Arc::new(
                bound
                    .iter()
                    .map(|(p, b)| {
                        let queues = PortQueues {
                            agent: b.tx.clone(),
                            client: b.client_tx.clone(),
                        };
                        (*p, queues)
                    })
                    .collect(),
            ));
        }
    }

    /// Reads the lease-range sockets the eBPF lookup program steers every lease-port
    /// datagram to (one per worker) and hands each datagram to its port's task, by the
    /// destination port the client used.
    ///
    /// # Errors
    /// A socket could not be registered with tokio.
    pub fn serve_range(self: &Arc<Self>, sockets: Vec<std::net::UdpSocket>) -> std::io::Result<()> {
        for socket in sockets {
            let socket = tokio::net::UdpSocket::from_std(socket)?;
            tokio::spawn(self.clone().range_task(socket));
        }
        Ok(())
    }

    async fn range_task(self: Arc<Self>, socket: tokio::net::UdpSocket) {
        use std::os::fd::AsFd;
        let mut recv = batch::RecvBatch::with_orig_dst(self.config.load().recv_slot_bytes);
        loop {
            // After a hand-over the new process reads this (shared) socket: let go of it.
            if socket.readable().await.is_err() || self.stopped.load(Ordering::Acquire) {
                return;
            }
            match socket.try_io(tokio::io::Interest::READABLE, || recv.recv(socket.as_fd())) {
                Ok(_) => self.dispatch(&recv),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::trace!(error = %e, "udp range receive"),
            }
        }
    }

    /// One batch from a range socket to the port tasks.
    fn dispatch(&self, recv: &batch::RecvBatch) {
        let queues = self.queues.load();
        for (r, payload) in recv.received() {
            let Some(tx) = queues.get(&r.to_port).map(|q| &q.client) else {
                // An expected port is open in the lookup map before its lease exists.
                let expected = self.shared.expected();
                let reason = if expected.udp(r.to_port, std::time::Instant::now()) {
                    UdpDrop::LeaseWait
                } else {
                    UdpDrop::NoRoute
                };
                self.stats.dropped(reason);
                continue;
            };
            let d = ClientDatagram {
                from: r.from,
                payload: Bytes::copy_from_slice(payload),
                truncated: r.truncated,
            };
            match tx.try_send(d) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.dropped(UdpDrop::ClientQueueFull);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.stats.dropped(UdpDrop::NoRoute),
            }
        }
    }

    fn bind(&self, port: u16) -> std::io::Result<Arc<tokio::net::UdpSocket>> {
        let handover = self.handover.get();
        let socket = match handover.and_then(|h| h.adopt_udp_port(port)) {
            Some(s) => {
                s.set_nonblocking(true)?;
                s
            }
            None => self.bind_new(port)?,
        };
        let addr = socket.local_addr()?;
        let socket = Arc::new(tokio::net::UdpSocket::from_std(socket)?);
        if let Some(h) = handover {
            // The same socket, not a duplicate: a UDP lease costs one descriptor.
            h.hold_udp_port(port, socket.clone(), addr);
        }
        Ok(socket)
    }

    fn bind_new(&self, port: u16) -> std::io::Result<std::net::UdpSocket> {
        let addr = SocketAddr::new(self.config.load().bind_ip, port);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // Larger buffers absorb bursts between two batches; the kernel caps them silently.
        let _ = socket.set_recv_buffer_size(self.config.load().socket_buffer_bytes);
        let _ = socket.set_send_buffer_size(self.config.load().socket_buffer_bytes);
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        Ok(socket.into())
    }

    /// A datagram from agent connection `conn`: routed to the lease port of its slot on that
    /// same connection, or dropped and counted.
    pub fn from_agent(&self, conn: ConnId, datagram: Bytes) {
        let Ok((header, payload)) = DatagramHeader::decode(&datagram) else {
            return self.stats.dropped(UdpDrop::BadHeader);
        };
        let offset = datagram.len() - payload.len();
        let snapshot = self.shared.load();
        let Some(port) = snapshot.routes.lookup_udp_slot(conn, header.udp_slot) else {
            return self.stats.dropped(UdpDrop::UnknownSlot);
        };
        let queues = self.queues.load();
        let Some(tx) = queues.get(&port).map(|q| &q.agent) else {
            return self.stats.dropped(UdpDrop::NoRoute);
        };
        let d = AgentDatagram {
            conn,
            flow_id: header.flow_id,
            payload: datagram.slice(offset..),
        };
        match tx.try_send(d) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.dropped(UdpDrop::FromAgentQueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.stats.dropped(UdpDrop::NoRoute),
        }
    }
}
