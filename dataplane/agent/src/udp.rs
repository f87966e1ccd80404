//! UDP leases on the agent side (`public-ingress.md`, "UDP port leases"): QUIC datagrams from
//! the relay carry `uvarint udp_slot`, `uvarint flow_id`, payload. Each flow (one public client
//! of the lease) gets its own local UDP socket connected to the lease's `udp_to`, so the local
//! service sees distinct clients; its replies go back on the same connection with the same
//! header. Flows idle for `udp.flow_idle_ms` are closed; at most `udp.flow_max` per lease.
//! A slot's flows are closed whenever its lease changes (a new lease id, even for the same slot
//! and target: the agent registered again) or ends, so a flow id of an earlier lease never
//! reaches a later lease's client.
//!
//! One mux task per relay connection owns the slot and flow tables (no locks); one reply task
//! per flow reads its local socket. Nothing is truncated: a reply larger than the connection's
//! current maximum datagram size (read per send) is dropped and counted `udp_too_large`; a
//! full datagram send buffer drops the newest (`queue_full`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use outrelay_proto::client_addr::ClientAddr;
use outrelay_proto::reverse::LeaseId;
use outrelay_proto::udp::DatagramHeader;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::UdpConfig;

/// Bytes read from a flow's local socket per datagram: above any QUIC datagram (quinn's MTU
/// upper bound is 1452), so a reply that fills it is too large to travel anyway.
const LOCAL_RECV_BYTES: usize = 2048;
/// quinn's datagram buffers on the agent's relay connections, each way.
pub const QUIC_DATAGRAM_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// SO_RCVBUF / SO_SNDBUF asked for the agent's QUIC socket (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`): the kernel's default holds a few milliseconds of a busy
/// UDP lease, less than a scheduling gap on a loaded host.
pub const QUIC_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Slot changes queued from the connection's state machine.
const COMMAND_QUEUE: usize = 64;

/// Why a datagram was dropped on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum UdpDrop {
    /// A relay datagram whose header does not decode.
    BadHeader,
    /// A relay datagram for a slot this connection has no UDP lease on.
    UnknownSlot,
    /// A new flow while the lease already has `flow_max`.
    FlowLimit,
    /// A reply larger than the connection's maximum datagram size.
    TooLarge,
    /// The connection's datagram send buffer was full, or the local socket would block.
    QueueFull,
    /// The local service could not be reached (socket error, ICMP unreachable).
    LocalError,
    /// A `client_addr` slot's datagram whose client address block does not decode.
    BadClientAddr,
}

impl UdpDrop {
    /// Every reason, in counter order.
    pub const ALL: [UdpDrop; 7] = [
        UdpDrop::BadHeader,
        UdpDrop::UnknownSlot,
        UdpDrop::FlowLimit,
        UdpDrop::TooLarge,
        UdpDrop::QueueFull,
        UdpDrop::LocalError,
        UdpDrop::BadClientAddr,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            UdpDrop::BadHeader => "bad_header",
            UdpDrop::UnknownSlot => "unknown_slot",
            UdpDrop::FlowLimit => "flow_limit",
            UdpDrop::TooLarge => "udp_too_large",
            UdpDrop::QueueFull => "queue_full",
            UdpDrop::LocalError => "local_error",
            UdpDrop::BadClientAddr => "bad_client_addr",
        }
    }
}

/// UDP counters (relaxed atomics).
#[derive(Debug, Default)]
pub struct UdpStats {
    drops: [AtomicU64; UdpDrop::ALL.len()],
    /// Datagrams handed to local services.
    pub to_local: AtomicU64,
    /// Replies sent to the relay.
    pub to_relay: AtomicU64,
    /// Flows opened.
    pub flows_opened: AtomicU64,
    /// Flows closed after the idle timeout.
    pub flows_expired: AtomicU64,
    /// Datagrams sent to local services behind a PROXY protocol v2 DGRAM header.
    pub proxy_headers: AtomicU64,
    /// Of those, datagrams without the client's addresses (the relay did not grant
    /// `client_addr`): a LOCAL header.
    pub client_addr_missing: AtomicU64,
}

/// What a slot's datagrams carry for the PROXY protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UdpProxy {
    /// Payloads go to the local service as they come.
    #[default]
    Off,
    /// A v2 DGRAM header before each payload; `client_addr`: the relay granted it, so each
    /// relay datagram carries the client's address block after its `(slot, flow)` header.
    V2 {
        /// The relay prefixes the client's address block.
        client_addr: bool,
    },
}

impl UdpStats {
    /// Counts one drop.
    pub fn dropped(&self, reason: UdpDrop) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of one reason.
    pub fn drops(&self, reason: UdpDrop) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }
}

enum Command {
    Set {
        slot: u32,
        lease: LeaseId,
        target: SocketAddr,
        proxy: UdpProxy,
    },
    Remove {
        slot: u32,
    },
}

/// The slots a connection's mux serves: the lease each was granted for and its local service.
#[derive(Debug, Default)]
struct Slots(HashMap<u32, (LeaseId, SocketAddr, UdpProxy)>);

impl Slots {
    /// `slot` now serves `lease` with `target`. True when the slot's flows must close: any
    /// change, including a new lease id with the same target (review M4: a re-registration
    /// on the same connection gets the same slot, and an earlier lease's flow sockets must not
    /// serve the new lease's clients). A renewal (same lease, same target) keeps them.
    fn set(&mut self, slot: u32, lease: LeaseId, target: SocketAddr, proxy: UdpProxy) -> bool {
        self.0.insert(slot, (lease, target, proxy)) != Some((lease, target, proxy))
    }

    fn target(&self, slot: u32) -> Option<(SocketAddr, UdpProxy)> {
        self.0
            .get(&slot)
            .map(|(_, target, proxy)| (*target, *proxy))
    }

    fn remove(&mut self, slot: u32) {
        self.0.remove(&slot);
    }
}

/// The state machine's handle on its connection's mux.
#[derive(Debug, Clone)]
pub struct Mux {
    tx: mpsc::Sender<Command>,
}

impl Mux {
    /// Serves `slot` of `lease` (from LEASE_GRANT) with the local service `target`. A new lease
    /// or target on the slot closes its flows; a renewal keeps them.
    pub fn set(&self, slot: u32, lease: LeaseId, target: SocketAddr, proxy: UdpProxy) {
        // The queue only fills if the mux stopped; then the connection is ending anyway.
        let _ = self.tx.try_send(Command::Set {
            slot,
            lease,
            target,
            proxy,
        });
    }

    /// Stops serving `slot` (its flows close).
    pub fn remove(&self, slot: u32) {
        let _ = self.tx.try_send(Command::Remove { slot });
    }
}

struct Flow {
    /// Sending side (a duplicate of the reply task's socket): a plain non-blocking send, which
    /// does not wait for tokio to learn the new socket's readiness (tokio's `try_send` on a
    /// fresh socket reports `WouldBlock` until the reactor has polled it, and the flow's
    /// first datagram would be lost).
    socket: std::net::UdpSocket,
    task: JoinHandle<()>,
    /// Milliseconds since the mux started, of the last datagram either way.
    last_active_ms: Arc<AtomicU64>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the mux of one relay connection; it ends with the connection (abort it earlier by
/// dropping the handle's task).
pub fn spawn(
    conn: quinn::Connection,
    stats: Arc<UdpStats>,
    config: UdpConfig,
) -> (Mux, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let task = tokio::spawn(run(conn, rx, stats, config));
    (Mux { tx }, task)
}

async fn run(
    conn: quinn::Connection,
    mut commands: mpsc::Receiver<Command>,
    stats: Arc<UdpStats>,
    config: UdpConfig,
) {
    let epoch = Instant::now();
    let mut slots = Slots::default();
    let mut flows: HashMap<(u32, u64), Flow> = HashMap::new();
    let mut per_slot: HashMap<u32, usize> = HashMap::new();
    let mut sweep = tokio::time::interval(
        (config.flow_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    loop {
        tokio::select! {
            d = conn.read_datagram() => {
                let Ok(datagram) = d else { break };
                let Ok((header, payload)) = DatagramHeader::decode(&datagram) else {
                    stats.dropped(UdpDrop::BadHeader);
                    continue;
                };
                let Some((target, proxy)) = slots.target(header.udp_slot) else {
                    stats.dropped(UdpDrop::UnknownSlot);
                    continue;
                };
                // A client_addr slot: the client's address block comes first.
                let (client, payload) = match proxy {
                    UdpProxy::V2 { client_addr: true } => match ClientAddr::decode(payload) {
                        Ok((client, rest)) => (Some(client), rest),
                        Err(_) => {
                            stats.dropped(UdpDrop::BadClientAddr);
                            continue;
                        }
                    },
                    _ => (None, payload),
                };
                let key = (header.udp_slot, header.flow_id);
                let now_ms = ms_since(epoch);
                let flow = match flows.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let count = per_slot.entry(header.udp_slot).or_default();
                        if *count >= config.flow_max {
                            stats.dropped(UdpDrop::FlowLimit);
                            continue;
                        }
                        match open_flow(target, header, conn.clone(), stats.clone(), epoch) {
                            Ok(flow) => {
                                *count += 1;
                                stats.flows_opened.fetch_add(1, Ordering::Relaxed);
                                e.insert(flow)
                            }
                            Err(err) => {
                                tracing::debug!(%target, error = %err, "cannot open a local UDP socket");
                                stats.dropped(UdpDrop::LocalError);
                                continue;
                            }
                        }
                    }
                };
                flow.last_active_ms.store(now_ms, Ordering::Relaxed);
                let sent = match proxy {
                    UdpProxy::Off => flow.socket.send(payload),
                    UdpProxy::V2 { .. } => {
                        if client.is_none() {
                            stats.client_addr_missing.fetch_add(1, Ordering::Relaxed);
                        }
                        let mut d = crate::proxy::datagram_header(client.as_ref());
                        d.extend_from_slice(payload);
                        stats.proxy_headers.fetch_add(1, Ordering::Relaxed);
                        flow.socket.send(&d)
                    }
                };
                match sent {
                    Ok(_) => {
                        stats.to_local.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stats.dropped(UdpDrop::QueueFull),
                    Err(_) => stats.dropped(UdpDrop::LocalError),
                }
            }
            c = commands.recv() => match c {
                None => break,
                Some(Command::Set { slot, lease, target, proxy }) => {
                    if slots.set(slot, lease, target, proxy) {
                        close_slot(slot, &mut flows, &mut per_slot);
                    }
                }
                Some(Command::Remove { slot }) => {
                    slots.remove(slot);
                    close_slot(slot, &mut flows, &mut per_slot);
                }
            },
            _ = sweep.tick() => {
                let now_ms = ms_since(epoch);
                let idle_ms = u64::try_from(config.flow_idle.as_millis()).unwrap_or(u64::MAX);
                flows.retain(|(slot, _), f| {
                    let keep = now_ms.saturating_sub(f.last_active_ms.load(Ordering::Relaxed)) < idle_ms;
                    if !keep {
                        stats.flows_expired.fetch_add(1, Ordering::Relaxed);
                        if let Some(c) = per_slot.get_mut(slot) {
                            *c = c.saturating_sub(1);
                        }
                    }
                    keep
                });
            }
        }
    }
}

fn close_slot(
    slot: u32,
    flows: &mut HashMap<(u32, u64), Flow>,
    per_slot: &mut HashMap<u32, usize>,
) {
    flows.retain(|(s, _), _| *s != slot);
    per_slot.remove(&slot);
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A local socket connected to `target` and the task that carries its replies to the relay.
fn open_flow(
    target: SocketAddr,
    header: DatagramHeader,
    conn: quinn::Connection,
    stats: Arc<UdpStats>,
    epoch: Instant,
) -> std::io::Result<Flow> {
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let std = std::net::UdpSocket::bind(bind)?;
    std.connect(target)?;
    std.set_nonblocking(true)?;
    let send = std.try_clone()?;
    let socket = UdpSocket::from_std(std)?;
    let last_active_ms = Arc::new(AtomicU64::new(ms_since(epoch)));
    let task = tokio::spawn(replies(
        socket,
        conn,
        header,
        stats,
        last_active_ms.clone(),
        epoch,
    ));
    Ok(Flow {
        socket: send,
        task,
        last_active_ms,
    })
}

async fn replies(
    socket: UdpSocket,
    conn: quinn::Connection,
    header: DatagramHeader,
    stats: Arc<UdpStats>,
    last_active_ms: Arc<AtomicU64>,
    epoch: Instant,
) {
    let mut buf = vec![0u8; LOCAL_RECV_BYTES];
    let mut head = [0u8; outrelay_proto::udp::MAX_DATAGRAM_HEADER_BYTES];
    let head_len = header.encode(&mut head);
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                // ICMP unreachable from the local service: counted, and the flow stays (the
                // service may come back before the flow idles out).
                stats.dropped(UdpDrop::LocalError);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        last_active_ms.store(ms_since(epoch), Ordering::Relaxed);
        let len = head_len + n;
        let Some(max) = conn.max_datagram_size() else {
            stats.dropped(UdpDrop::TooLarge);
            continue;
        };
        if n == buf.len() || len > max {
            stats.dropped(UdpDrop::TooLarge);
            continue;
        }
        if conn.datagram_send_buffer_space() < len {
            stats.dropped(UdpDrop::QueueFull);
            continue;
        }
        let mut d = BytesMut::with_capacity(len);
        d.put_slice(&head[..head_len]);
        d.put_slice(&buf[..n]);
        match conn.send_datagram(Bytes::from(d)) {
            Ok(()) => {
                stats.to_relay.fetch_add(1, Ordering::Relaxed);
            }
            Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
            Err(_) => stats.dropped(UdpDrop::TooLarge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_on_the_same_slot_and_target_closes_the_slots_flows() {
        let mut slots = Slots::default();
        let target: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let other: SocketAddr = "127.0.0.1:54".parse().expect("addr");
        let (first, second) = (LeaseId([1; 16]), LeaseId([2; 16]));
        assert!(slots.set(1, first, target, UdpProxy::Off), "a new slot");
        assert!(
            !slots.set(1, first, target, UdpProxy::Off),
            "a renewal keeps the flows"
        );
        assert!(
            slots.set(1, second, target, UdpProxy::Off),
            "a re-registration (new lease id, same slot and target) closes the flows"
        );
        assert!(
            slots.set(1, second, other, UdpProxy::Off),
            "a new target closes the flows"
        );
        assert_eq!(slots.target(1), Some((other, UdpProxy::Off)));
        slots.remove(1);
        assert_eq!(slots.target(1), None);
        assert!(
            slots.set(1, second, other, UdpProxy::Off),
            "released, then granted again"
        );
    }
}
