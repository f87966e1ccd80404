//! One UDP lease port: a single task owns the socket, the lease's flows and their
//! amplification budgets, so nothing here is locked. Client datagrams arrive in `recvmmsg`
//! batches and go to the agent as QUIC DATAGRAM frames; agent datagrams arrive through a
//! bounded queue (from the agent connection's datagram reader) and leave in `sendmmsg`
//! batches from the lease port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use outrelay_proto::reverse::LeaseId;
use outrelay_proto::udp::DatagramHeader;
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::UdpConfig;
use super::batch::{BATCH, RecvBatch, SendBatch};
use super::stats::{UdpDrop, UdpStats};
use crate::ingress::limits::SourceKey;
use crate::lease::ConnId;
use crate::state::Shared;

/// The relay's flow id counter, shared by every lease port: an id is handed out once per relay
/// process, never again for a later lease of the same port or slot (review M4: the agent maps
/// `(slot, flow_id)` to a local socket, so a reused id handed a new client an old client's
/// socket). 2^64 ids do not run out.
#[derive(Debug)]
pub(crate) struct FlowIds(AtomicU64);

impl Default for FlowIds {
    fn default() -> Self {
        FlowIds(AtomicU64::new(1))
    }
}

impl FlowIds {
    /// The next unused id (one relaxed add per new flow, never per datagram).
    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// A datagram from an agent for one flow of this port's lease.
#[derive(Debug)]
pub(crate) struct AgentDatagram {
    /// The agent connection it arrived on.
    pub(crate) conn: ConnId,
    /// The flow it answers.
    pub(crate) flow_id: u64,
    /// The payload (header stripped).
    pub(crate) payload: Bytes,
}

/// A client datagram for this port that arrived on a lease-range socket (eBPF lookup).
#[derive(Debug)]
pub(crate) struct ClientDatagram {
    pub(crate) from: SocketAddr,
    pub(crate) payload: Bytes,
    /// Cut by the kernel (larger than the receive slot).
    pub(crate) truncated: bool,
}

/// One client address of the lease.
#[derive(Debug)]
struct Flow {
    id: u64,
    /// Reply bytes this flow may still receive: 3 × what its client sent, less what was sent
    /// back since.
    budget_bytes: u64,
    /// Last datagram either way (the idle timeout).
    last_active: Instant,
    /// Last datagram from the client (eviction from a full table: replies do not count).
    last_client: Instant,
    /// The client's address or /64 (its per-source share).
    source: SourceKey,
}

/// The state of one lease port.
pub(crate) struct Port {
    pub(crate) port: u16,
    pub(crate) socket: Arc<tokio::net::UdpSocket>,
    pub(crate) rx: mpsc::Receiver<AgentDatagram>,
    pub(crate) client_rx: mpsc::Receiver<ClientDatagram>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stats: Arc<UdpStats>,
    pub(crate) config: UdpConfig,
    lease: Option<LeaseId>,
    flows: HashMap<SocketAddr, Flow>,
    by_id: HashMap<u64, SocketAddr>,
    /// Flows per source (address or /64); keys at zero are removed.
    per_source: HashMap<SourceKey, usize>,
    /// A full table found no evictable flow: none can be before this instant.
    no_evict_before: Option<Instant>,
    /// Relay-wide: ids keep growing across leases and port tasks.
    flow_ids: Arc<FlowIds>,
}

impl Port {
    /// `queues`: from the lease's agent, and from the lease-range sockets (eBPF lookup).
    pub(crate) fn new(
        port: u16,
        socket: Arc<tokio::net::UdpSocket>,
        (rx, client_rx): (
            mpsc::Receiver<AgentDatagram>,
            mpsc::Receiver<ClientDatagram>,
        ),
        shared: Arc<Shared>,
        stats: Arc<UdpStats>,
        config: UdpConfig,
        flow_ids: Arc<FlowIds>,
    ) -> Port {
        Port {
            port,
            socket,
            rx,
            client_rx,
            shared,
            stats,
            config,
            lease: None,
            flows: HashMap::new(),
            by_id: HashMap::new(),
            per_source: HashMap::new(),
            no_evict_before: None,
            flow_ids,
        }
    }

    /// Serves the port until its queue closes (the lease is gone and the sync loop dropped
    /// the sender) or the task is aborted.
    pub(crate) async fn run(mut self) {
        // Allocated at the first datagram on the port's own socket: under the eBPF lookup
        // program that socket only sends replies, and 32 receive slots per UDP lease were most
        // of its memory (docs/benchmarks.md, issue 17, L1).
        let mut recv: Option<RecvBatch> = None;
        let mut send = SendBatch::default();
        let mut from_agent = Vec::with_capacity(BATCH);
        let mut from_range = Vec::with_capacity(BATCH);
        let every = Duration::from_millis((self.config.flow_idle_ms / 4).clamp(50, 1_000));
        let mut sweep = tokio::time::interval(every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = self.socket.readable() => {
                    if ready.is_err() {
                        break;
                    }
                    let socket = &self.socket;
                    let recv = recv.get_or_insert_with(|| RecvBatch::new(self.config.recv_slot_bytes));
                    match socket.try_io(Interest::READABLE, || recv.recv(socket.as_fd())) {
                        Ok(_) => {
                            let batch = recv.received().map(|(r, d)| (r.from, d, r.truncated));
                            self.forward_to_agent(batch);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // ICMP errors of earlier replies surface here; nothing was received.
                        Err(e) => tracing::trace!(port = self.port, error = %e, "udp receive"),
                    }
                }
                n = self.client_rx.recv_many(&mut from_range, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let batch = from_range.iter().map(|d| (d.from, &d.payload[..], d.truncated));
                    self.forward_to_agent(batch);
                    from_range.clear();
                }
                n = self.rx.recv_many(&mut from_agent, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.forward_to_clients(&mut from_agent, &mut send);
                }
                _ = sweep.tick() => self.sweep(Instant::now()),
            }
        }
        let flows = self.flows.len() as u64;
        self.stats.flows_active.fetch_sub(flows, Ordering::Relaxed);
    }

    /// A new lease on this port (first use, or the agent registered again): flows start over,
    /// with new ids (the flow id counter is never reset).
    fn reset(&mut self, lease: LeaseId) {
        let flows = self.flows.len() as u64;
        self.stats.flows_active.fetch_sub(flows, Ordering::Relaxed);
        self.flows.clear();
        self.by_id.clear();
        self.per_source.clear();
        self.no_evict_before = None;
        self.lease = Some(lease);
    }

    /// Client datagrams of one batch, `(client, payload, truncated)`, to the lease's agent.
    fn forward_to_agent<'a>(
        &mut self,
        datagrams: impl Iterator<Item = (SocketAddr, &'a [u8], bool)> + Clone,
    ) {
        let now = Instant::now();
        let snapshot = self.shared.load();
        let batch = datagrams.clone().count() as u64;
        let Some(route) = snapshot.routes.lookup_udp(self.port) else {
            return self.stats.dropped_n(UdpDrop::NoRoute, batch);
        };
        if self.lease != Some(route.lease_id) {
            self.reset(route.lease_id);
        }
        let conn = snapshot.udp_conns.get(&route.conn);
        let Some((conn, max)) = conn.and_then(|c| Some((c, c.max_datagram_size()?))) else {
            return self.stats.dropped_n(UdpDrop::NoAgent, batch);
        };
        // Bandwidth limits (issue 21): one lookup per batch, one check per datagram.
        let bandwidth = self.shared.bandwidth.lease(&route.lease_id);
        for (from, payload, truncated) in datagrams {
            let flow_id = match self.flows.get_mut(&from) {
                Some(flow) => {
                    flow.last_active = now;
                    flow.last_client = now;
                    flow.budget_bytes = flow
                        .budget_bytes
                        .saturating_add(self.config.reply_factor * payload.len() as u64);
                    flow.id
                }
                None => match self.admit_flow(from, now) {
                    Ok(source) => self.new_flow(from, source, payload.len(), now),
                    Err(reason) => {
                        self.stats.dropped(reason);
                        continue;
                    }
                },
            };
            let header = DatagramHeader {
                udp_slot: route.udp_slot,
                flow_id,
            };
            let header_len = header.encoded_len();
            self.stats
                .payload_max_bytes
                .store(max.saturating_sub(header_len) as u64, Ordering::Relaxed);
            let len = header_len + payload.len();
            if truncated || len > max {
                self.stats.dropped(UdpDrop::TooLarge);
                continue;
            }
            if conn.datagram_send_buffer_space() < len {
                self.stats.dropped(UdpDrop::ToAgentQueueFull);
                continue;
            }
            if bandwidth
                .as_ref()
                .is_some_and(|b| !b.admit_datagram(true, payload.len()))
            {
                self.stats.dropped(UdpDrop::RateLimited);
                continue;
            }
            let mut datagram = BytesMut::with_capacity(len);
            datagram.resize(header_len, 0);
            header.encode(&mut datagram);
            datagram.put_slice(payload);
            match conn.send_datagram(datagram.freeze()) {
                Ok(()) => {
                    self.stats
                        .to_agent_datagrams
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .to_agent_bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                }
                Err(quinn::SendDatagramError::TooLarge) => self.stats.dropped(UdpDrop::TooLarge),
                Err(_) => self.stats.dropped(UdpDrop::NoAgent),
            }
        }
    }

    /// Whether a new client `from` may have a flow: its source's share, then a place in the
    /// table (evicting the flow whose client has been silent longest, if long enough).
    fn admit_flow(&mut self, from: SocketAddr, now: Instant) -> Result<SourceKey, UdpDrop> {
        let source = SourceKey::of(from.ip());
        let held = self.per_source.get(&source).copied().unwrap_or(0);
        if held >= self.config.flow_per_source_max {
            return Err(UdpDrop::FlowPerSource);
        }
        if self.flows.len() >= self.config.flow_max && !self.evict_one(now) {
            return Err(UdpDrop::FlowLimit);
        }
        Ok(source)
    }

    /// Ends the flow whose client has been silent longest if that is at least
    /// `flow_evict_idle_ms`. One scan of the table, and none at all until the oldest flow can
    /// qualify, so a flood of new clients against a full table of active ones costs O(1) each.
    fn evict_one(&mut self, now: Instant) -> bool {
        if self.no_evict_before.is_some_and(|t| now < t) {
            return false;
        }
        let min_idle = Duration::from_millis(self.config.flow_evict_idle_ms);
        let oldest = self
            .flows
            .iter()
            .min_by_key(|(_, f)| f.last_client)
            .map(|(addr, f)| (*addr, f.last_client));
        let Some((addr, last_client)) = oldest else {
            return false;
        };
        if now.saturating_duration_since(last_client) < min_idle {
            self.no_evict_before = Some(last_client + min_idle);
            return false;
        }
        self.remove_flow(&addr);
        self.stats.flows_evicted.fetch_add(1, Ordering::Relaxed);
        self.stats.flows_active.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Forgets one flow (its id and its source's share).
    fn remove_flow(&mut self, addr: &SocketAddr) {
        if let Some(flow) = self.flows.remove(addr) {
            self.by_id.remove(&flow.id);
            release_source(&mut self.per_source, &flow.source);
        }
    }

    fn new_flow(
        &mut self,
        from: SocketAddr,
        source: SourceKey,
        sent_bytes: usize,
        now: Instant,
    ) -> u64 {
        let id = self.flow_ids.next();
        self.flows.insert(
            from,
            Flow {
                id,
                budget_bytes: self.config.reply_factor * sent_bytes as u64,
                last_active: now,
                last_client: now,
                source,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        self.by_id.insert(id, from);
        self.stats.flows_created.fetch_add(1, Ordering::Relaxed);
        self.stats.flows_active.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// Agent datagrams to their flows' clients, in `sendmmsg` batches.
    fn forward_to_clients(&mut self, datagrams: &mut Vec<AgentDatagram>, send: &mut SendBatch) {
        let now = Instant::now();
        let snapshot = self.shared.load();
        let route = snapshot.routes.lookup_udp(self.port);
        let bandwidth = route.and_then(|r| self.shared.bandwidth.lease(&r.lease_id));
        for d in datagrams.drain(..) {
            // Only the connection that holds the lease now, only for the lease this port's
            // flows belong to.
            let Some(route) = route.filter(|r| r.conn == d.conn) else {
                self.stats.dropped(UdpDrop::UnknownSlot);
                continue;
            };
            if self.lease != Some(route.lease_id) {
                self.stats.dropped(UdpDrop::UnknownFlow);
                continue;
            }
            let Some(flow) = self
                .by_id
                .get(&d.flow_id)
                .and_then(|addr| self.flows.get_mut(addr).map(|f| (*addr, f)))
            else {
                self.stats.dropped(UdpDrop::UnknownFlow);
                continue;
            };
            let (addr, flow) = flow;
            let len = d.payload.len() as u64;
            if len > flow.budget_bytes {
                self.stats.dropped(UdpDrop::Amplification);
                continue;
            }
            if bandwidth
                .as_ref()
                .is_some_and(|b| !b.admit_datagram(false, d.payload.len()))
            {
                self.stats.dropped(UdpDrop::RateLimited);
                continue;
            }
            flow.budget_bytes -= len;
            flow.last_active = now;
            if !send.push(addr, d.payload) {
                self.flush(send);
            }
        }
        self.flush(send);
    }

    fn flush(&self, send: &mut SendBatch) {
        if send.is_empty() {
            return;
        }
        let queued = send.len();
        let (sent, bytes) = send.flush(self.socket.as_fd());
        self.stats
            .to_client_datagrams
            .fetch_add(sent as u64, Ordering::Relaxed);
        self.stats
            .to_client_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.stats
            .dropped_n(UdpDrop::SendFailed, (queued - sent) as u64);
    }

    /// Ends flows idle for `flow_idle_ms` (no datagram either way).
    fn sweep(&mut self, now: Instant) {
        let idle = Duration::from_millis(self.config.flow_idle_ms);
        let before = self.flows.len();
        let by_id = &mut self.by_id;
        let per_source = &mut self.per_source;
        self.flows.retain(|_, f| {
            let keep = now.saturating_duration_since(f.last_active) < idle;
            if !keep {
                by_id.remove(&f.id);
                release_source(per_source, &f.source);
            }
            keep
        });
        let ended = (before - self.flows.len()) as u64;
        if ended > 0 {
            self.stats.flows_expired.fetch_add(ended, Ordering::Relaxed);
            self.stats.flows_active.fetch_sub(ended, Ordering::Relaxed);
        }
    }
}

fn release_source(per_source: &mut HashMap<SourceKey, usize>, source: &SourceKey) {
    if let Some(n) = per_source.get_mut(source) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_source.remove(source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn flows_are_shared_per_source_and_a_full_table_evicts_the_longest_silent_client() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (_tx, rx) = mpsc::channel(1);
        let config = UdpConfig {
            flow_max: 3,
            flow_per_source_max: 2,
            flow_evict_idle_ms: 1_000,
            ..UdpConfig::default()
        };
        let (_client_tx, client_rx) = mpsc::channel(1);
        let mut port = Port::new(
            0,
            Arc::new(socket),
            (rx, client_rx),
            Arc::default(),
            Arc::default(),
            config,
            Arc::default(),
        );
        let t0 = Instant::now();
        let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let open = |port: &mut Port, a: SocketAddr, t: Instant| -> Result<u64, UdpDrop> {
            let source = port.admit_flow(a, t)?;
            Ok(port.new_flow(a, source, 1, t))
        };
        let (a1, a2, a3) = (
            addr("192.0.2.1:1"),
            addr("192.0.2.1:2"),
            addr("192.0.2.1:3"),
        );
        open(&mut port, a1, t0).expect("first flow of host a");
        open(&mut port, a2, at(t0, 100)).expect("second flow of host a");
        assert_eq!(
            open(&mut port, a3, at(t0, 200)),
            Err(UdpDrop::FlowPerSource),
            "host a has its share"
        );
        let b = addr("[2001:db8::1]:9");
        open(&mut port, b, at(t0, 300)).expect("host b");
        // Full. The longest silent client (a1) is silent for 500 ms only: nothing to evict.
        let c = addr("198.51.100.7:5");
        assert_eq!(open(&mut port, c, at(t0, 500)), Err(UdpDrop::FlowLimit));
        // Agent replies to a1 refresh its idle timer, not its client's silence.
        if let Some(f) = port.flows.get_mut(&a1) {
            f.last_active = at(t0, 1_100);
        }
        let id = open(&mut port, c, at(t0, 1_200)).expect("a1 evicted for c");
        assert!(!port.flows.contains_key(&a1), "a1 evicted");
        assert!(port.by_id.contains_key(&id));
        assert_eq!(port.stats.flows_evicted.load(Ordering::Relaxed), 1);
        // Full again: a2 (silent since 100 ms) is the longest silent client now.
        open(&mut port, a3, at(t0, 1_300)).expect("a2 evicted for a3");
        assert!(!port.flows.contains_key(&a2), "a2 evicted");
        assert_eq!(port.per_source.get(&SourceKey::of(a1.ip())), Some(&1));
        assert_eq!(port.stats.flows_evicted.load(Ordering::Relaxed), 2);
        // Another address of b's /64 counts as b.
        assert_eq!(
            port.per_source
                .get(&SourceKey::of("2001:db8::2".parse().expect("ip"))),
            Some(&1)
        );
    }

    #[tokio::test]
    async fn flow_ids_are_never_reused_by_a_later_lease_or_port_task() {
        let ids = Arc::new(FlowIds::default());
        let port = |ids: Arc<FlowIds>| async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let (_tx, rx) = mpsc::channel(1);
            let (_client_tx, client_rx) = mpsc::channel(1);
            Port::new(
                0,
                Arc::new(socket),
                (rx, client_rx),
                Arc::default(),
                Arc::default(),
                UdpConfig::default(),
                ids,
            )
        };
        let t0 = Instant::now();
        let a: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:1".parse().expect("addr");
        let open = |port: &mut Port, from: SocketAddr| -> u64 {
            let source = port.admit_flow(from, t0).expect("admitted");
            port.new_flow(from, source, 1, t0)
        };
        let mut first = port(ids.clone()).await;
        first.reset(LeaseId([1; 16]));
        let mut used = vec![open(&mut first, a), open(&mut first, b)];
        // The agent registers again on the same connection: a new lease id on the same port.
        first.reset(LeaseId([2; 16]));
        let id = open(&mut first, b);
        assert!(!used.contains(&id), "id {id} reused after {used:?}");
        used.push(id);
        // The route went away and came back: a new task for the port.
        let mut second = port(ids).await;
        second.reset(LeaseId([3; 16]));
        let id = open(&mut second, a);
        assert!(!used.contains(&id), "id {id} reused after {used:?}");
    }
}
