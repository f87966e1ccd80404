//! The splice engine end to end on real loopback TCP sockets, on both readiness backends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use outrelay_io::{Backend, CloseReason, Engine, EngineConfig, EngineStats, Finished, PipeLimits};
use sha2::{Digest, Sha256};

/// The backends this machine can run; io_uring is skipped LOUDLY when unavailable.
fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Epoll];
    if Backend::probe() == Backend::Uring {
        b.push(Backend::Uring);
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    b
}

/// A connected loopback pair: (one end, the other end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

/// An engine on its own thread. Finished pairs arrive on `finished`.
struct Running {
    handle: outrelay_io::EngineHandle,
    stop: Arc<AtomicBool>,
    finished: mpsc::Receiver<Finished>,
    /// The engine's stats, published after every round.
    live: Arc<Mutex<EngineStats>>,
    thread: Option<thread::JoinHandle<EngineStats>>,
}

impl Running {
    fn start(config: EngineConfig, clock_offset_ms: Arc<AtomicU64>) -> Running {
        let mut engine = Engine::new(config).expect("engine");
        let handle = engine.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, finished) = mpsc::channel();
        let stop2 = stop.clone();
        let live = Arc::new(Mutex::new(EngineStats::default()));
        let live2 = live.clone();
        let thread = thread::spawn(move || {
            let base = Instant::now();
            let mut clock = move || {
                base + base.elapsed()
                    + Duration::from_millis(clock_offset_ms.load(Ordering::SeqCst))
            };
            let mut out = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                engine
                    .run_once(Duration::from_millis(50), &mut clock, &mut out)
                    .expect("engine round");
                for f in out.drain(..) {
                    let _ = tx.send(f);
                }
                *live2.lock().expect("stats lock") = engine.stats();
            }
            engine.shutdown(&mut out);
            engine.stats()
        });
        Running {
            handle,
            stop,
            finished,
            live,
            thread: Some(thread),
        }
    }

    fn add(&self, a: TcpStream, b: TcpStream, tag: u64) {
        self.handle
            .add(OwnedFd::from(a), OwnedFd::from(b), tag)
            .expect("engine takes the pair");
    }

    fn next_finished(&self) -> Finished {
        self.finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a pair finished within 60 s")
    }

    /// The stats after the engine's last round.
    fn stats(&self) -> EngineStats {
        *self.live.lock().expect("stats lock")
    }

    /// Waits (up to 10 s) until the stats satisfy `ok`; panics naming `what` otherwise.
    fn wait_for(&self, what: &str, ok: impl Fn(&EngineStats) -> bool) -> EngineStats {
        let start = Instant::now();
        loop {
            let stats = self.stats();
            if ok(&stats) {
                return stats;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: not within 10 s: {stats:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) -> EngineStats {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.wake();
        self.thread
            .take()
            .expect("thread")
            .join()
            .expect("engine thread")
    }
}

fn config(backend: Backend) -> EngineConfig {
    EngineConfig {
        backend,
        sweep_interval: Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can hash what they expect.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Writes `data` then half-closes; returns the hash of what was written.
fn send_all(mut s: TcpStream, data: Vec<u8>) -> thread::JoinHandle<[u8; 32]> {
    thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            s.write_all(chunk).expect("write");
        }
        s.shutdown(Shutdown::Write).expect("half-close");
        Sha256::digest(&data).into()
    })
}

/// Reads to EOF; returns (bytes, hash).
fn recv_all(mut s: TcpStream) -> thread::JoinHandle<(u64, [u8; 32])> {
    thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let k = match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read"),
            };
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        (n, h.finalize().into())
    })
}

#[test]
fn hundred_megabytes_each_way_with_half_close() {
    const LEN: usize = 100 * 1024 * 1024;
    for backend in backends() {
        let engine = Running::start(config(backend), Arc::default());
        let (client, relay_a) = tcp_pair();
        let (relay_b, server) = tcp_pair();
        engine.add(relay_a, relay_b, 7);

        let up = pattern(1, LEN);
        let down = pattern(2, LEN);
        let client_rx = recv_all(client.try_clone().expect("clone"));
        let server_rx = recv_all(server.try_clone().expect("clone"));
        let client_tx = send_all(client, up);
        let server_tx = send_all(server, down);

        let (up_bytes, up_hash) = server_rx.join().expect("server reader");
        let (down_bytes, down_hash) = client_rx.join().expect("client reader");
        assert_eq!(up_bytes, LEN as u64, "{backend:?}: bytes up");
        assert_eq!(down_bytes, LEN as u64, "{backend:?}: bytes down");
        assert_eq!(
            up_hash,
            client_tx.join().expect("client writer"),
            "{backend:?}: up hash"
        );
        assert_eq!(
            down_hash,
            server_tx.join().expect("server writer"),
            "{backend:?}: down hash"
        );

        let f = engine.next_finished();
        assert_eq!(f.tag, 7);
        assert_eq!(f.reason, CloseReason::Completed, "{backend:?}");
        assert_eq!(f.bytes, [LEN as u64, LEN as u64]);
        let stats = engine.stop();
        assert_eq!(stats.pairs_active, 0);
        assert_eq!(stats.closed[0], 1);
        assert!(stats.pipes.held_bytes <= EngineConfig::default().pipes.budget_bytes);
        eprintln!(
            "{backend:?}: 2 x 100 MiB in {} splice calls, pipes created {}, grown {}",
            stats.splice_calls, stats.pipes.created, stats.pipes.grown
        );
    }
}

#[test]
fn one_direction_ends_and_the_other_keeps_flowing() {
    for backend in backends() {
        let engine = Running::start(config(backend), Arc::default());
        let (mut client, relay_a) = tcp_pair();
        let (relay_b, mut server) = tcp_pair();
        engine.add(relay_a, relay_b, 1);

        client.write_all(b"ping").expect("write");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).expect("server reads to EOF");
        assert_eq!(got, b"ping", "{backend:?}");

        // The client's FIN reached the server; the server can still answer.
        server.write_all(b"pong").expect("write after peer FIN");
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("client reads to EOF");
        assert_eq!(got, b"pong", "{backend:?}");
        assert_eq!(engine.next_finished().reason, CloseReason::Completed);
        engine.stop();
    }
}

#[test]
fn idle_and_half_closed_timeouts_close_pairs() {
    for backend in backends() {
        let offset = Arc::new(AtomicU64::new(0));
        let mut cfg = config(backend);
        cfg.idle_timeout = Duration::from_secs(3600);
        cfg.half_closed_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, offset.clone());

        // Idle: nothing moves; an hour passes on the engine's clock.
        let (mut idle_client, a) = tcp_pair();
        let (b, _idle_server) = tcp_pair();
        engine.add(a, b, 1);
        // Half-closed: the client sends FIN, the server never answers or closes.
        let (half_client, a) = tcp_pair();
        let (b, mut half_server) = tcp_pair();
        engine.add(a, b, 2);
        half_client.shutdown(Shutdown::Write).expect("half-close");
        let mut sink = Vec::new();
        half_server.read_to_end(&mut sink).expect("FIN forwarded");

        offset.store(61_000, Ordering::SeqCst);
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (2, CloseReason::HalfClosedTimeout),
            "{backend:?}"
        );
        offset.store(3_601_000, Ordering::SeqCst);
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (1, CloseReason::IdleTimeout),
            "{backend:?}"
        );
        // The idle client sees its connection end.
        let mut buf = [0u8; 1];
        assert_eq!(idle_client.read(&mut buf).unwrap_or(0), 0);
        let stats = engine.stop();
        assert_eq!(stats.closed[2..4], [1, 1]);
    }
}

#[test]
fn directions_wait_for_the_pipe_budget_and_then_complete() {
    // More than the socket buffers on both sides can absorb, so pair 1's pipe stays full.
    const LEN: usize = 32 * 1024 * 1024;
    for backend in backends() {
        let mut cfg = config(backend);
        // Room for exactly one default-sized pipe and no growth, no copy path, and no stall
        // give-back within the test: the second pair can only wait.
        cfg.pipes = PipeLimits {
            budget_bytes: 64 * 1024,
            max_pipe_bytes: 64 * 1024,
            pool_max: 4,
        };
        cfg.buffers.copy_budget_bytes = 0;
        cfg.stall_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, Arc::default());

        // Pair 1: data is waiting and its receiver does not read yet, so once its pipe fills
        // the pipe stays held.
        let (c1, a1) = tcp_pair();
        let (b1, s1) = tcp_pair();
        let tx1 = send_all(c1.try_clone().expect("clone"), pattern(3, LEN));
        engine.add(a1, b1, 1);
        thread::sleep(Duration::from_millis(200));
        // Pair 2 now needs a pipe and must wait for pair 1's.
        let (c2, a2) = tcp_pair();
        let (b2, s2) = tcp_pair();
        let tx2 = send_all(c2.try_clone().expect("clone"), pattern(4, LEN));
        engine.add(a2, b2, 2);
        thread::sleep(Duration::from_millis(200));

        let rx1 = recv_all(s1.try_clone().expect("clone"));
        let rx2 = recv_all(s2.try_clone().expect("clone"));
        drop((s1, s2));
        assert_eq!(rx1.join().expect("rx1").1, tx1.join().expect("tx1"));
        assert_eq!(rx2.join().expect("rx2").1, tx2.join().expect("tx2"));
        // Close the other directions so the pairs complete.
        drop((c1, c2));
        let _ = engine.next_finished();
        let _ = engine.next_finished();
        let stats = engine.stop();
        assert!(
            stats.pipe_waits > 0,
            "{backend:?}: the second pair never waited: {stats:?}"
        );
        assert!(
            stats.pipes.created <= 1,
            "{backend:?}: budget exceeded: {stats:?}"
        );
    }
}

/// A slow reader behind a half-closed connection must not make the engine spin: with a full
/// pipe (or full pipe slots) the engine waits for the destination, and with the peer's FIN seen
/// a write-only wait must not fire at once. Checked by counting splice calls, not by time.
#[test]
fn a_slow_half_closed_reader_does_not_make_the_engine_spin() {
    const LEN: usize = 8 * 1024 * 1024;
    for backend in backends() {
        let engine = Running::start(config(backend), Arc::default());
        let (mut client, relay_a) = tcp_pair();
        let (relay_b, mut server) = tcp_pair();
        engine.add(relay_a, relay_b, 1);
        client.write_all(b"GET /big").expect("request");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut request = Vec::new();
        server.read_to_end(&mut request).expect("request and FIN");
        let sender = send_all(server, pattern(9, LEN));
        let mut got = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got += n;
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(got, LEN);
        sender.join().expect("sender");
        let f = engine.next_finished();
        assert_eq!(f.reason, CloseReason::Completed);
        let stats = engine.stop();
        eprintln!(
            "{backend:?}: {} splice calls for {LEN} bytes to a slow half-closed reader",
            stats.splice_calls
        );
        // A spinning engine makes hundreds of thousands of calls per second here; a waiting
        // one makes a few per window the reader opens.
        assert!(
            stats.splice_calls < 50_000,
            "{backend:?}: {} splice calls",
            stats.splice_calls
        );
    }
}

#[test]
fn a_pair_refused_from_the_inbox_is_reported_with_its_tag() {
    for backend in backends() {
        let mut cfg = config(backend);
        cfg.max_pairs = 1;
        let engine = Running::start(cfg, Arc::new(AtomicU64::new(0)));
        let (a1, b1) = tcp_pair();
        let (a2, b2) = tcp_pair();
        // Both are accepted by the handle (the inbox has room); the engine takes the first and
        // refuses the second when it drains the inbox.
        engine.add(a1, b1, 1);
        engine.add(a2, b2, 2);
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason, f.bytes),
            (2, CloseReason::Refused, [0, 0]),
            "{backend:?}"
        );
        let stats = engine.stop();
        assert_eq!(stats.pairs_refused, 1, "{backend:?}");
    }
}

// ---------- stalled readers (review H1) ----------

/// Shrinks the kernel buffers in front of a reader that will not read: the engine's send
/// buffer (`engine_side`) and the reader's receive buffer, so the pipe fills at once.
fn small_buffers(engine_side: &TcpStream, reader: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(engine_side, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    setsockopt(reader, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
}

/// Writes zeros until the connection fails (the engine closed it, or the test ended).
fn flood(mut s: TcpStream) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        while let Ok(k) = s.write(&chunk) {
            n += k as u64;
        }
        n
    })
}

/// A pair whose server end never reads: (client, server) test ends, flooded by the client.
fn stalled_pair(engine: &Running, tag: u64) -> (TcpStream, TcpStream, thread::JoinHandle<u64>) {
    let (client, relay_a) = tcp_pair();
    let (relay_b, server) = tcp_pair();
    small_buffers(&relay_b, &server);
    engine.add(relay_a, relay_b, tag);
    let writer = flood(client.try_clone().expect("clone"));
    (client, server, writer)
}

/// Moves `len` bytes each way through a new pair of `engine`; asserts equal hashes and
/// returns how long it took.
fn transfer(engine: &Running, tag: u64, len: usize, what: &str) -> Duration {
    let started = Instant::now();
    let (client, relay_a) = tcp_pair();
    let (relay_b, server) = tcp_pair();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
    }
    engine.add(relay_a, relay_b, tag);
    let client_rx = recv_all(client.try_clone().expect("clone"));
    let server_rx = recv_all(server.try_clone().expect("clone"));
    let client_tx = send_all(client, pattern(tag, len));
    let server_tx = send_all(server, pattern(tag + 1000, len));
    let (up_bytes, up_hash) = server_rx.join().expect("server reader (timed out?)");
    let (down_bytes, down_hash) = client_rx.join().expect("client reader (timed out?)");
    assert_eq!((up_bytes, down_bytes), (len as u64, len as u64), "{what}");
    assert_eq!(up_hash, client_tx.join().expect("client writer"), "{what}");
    assert_eq!(
        down_hash,
        server_tx.join().expect("server writer"),
        "{what}"
    );
    started.elapsed()
}

#[test]
fn a_stalled_reader_gives_its_pipe_back_after_the_stall_time() {
    const LEN: usize = 16 * 1024 * 1024;
    for backend in backends() {
        let mut cfg = config(backend);
        // One default pipe and no copy path: the second pair below moves only if the
        // stalled pair gave its pipe back.
        cfg.pipes = PipeLimits {
            budget_bytes: 64 * 1024,
            max_pipe_bytes: 64 * 1024,
            pool_max: 4,
        };
        cfg.buffers.copy_budget_bytes = 0;
        cfg.stall_timeout = Duration::from_millis(300);
        cfg.write_stall_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, Arc::default());
        let (client, relay_a) = tcp_pair();
        let (relay_b, server) = tcp_pair();
        // Default socket buffers (this reader drains later at full speed): LEN is far more
        // than they absorb while it does not read.
        server
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        engine.add(relay_a, relay_b, 1);
        let sent = send_all(client.try_clone().expect("clone"), pattern(5, LEN));
        let started = Instant::now();
        let stats = engine.wait_for("the stalled pipe is spilled", |s| s.spills >= 1);
        eprintln!(
            "{backend:?}: stalled pipe given back after {:?}: {stats:?}",
            started.elapsed()
        );
        assert!(stats.buffers.spill_held_bytes > 0, "{backend:?}: {stats:?}");
        assert!(
            stats.buffers.spill_held_bytes <= 64 * 1024,
            "{backend:?}: {stats:?}"
        );
        // The only pipe is free again: another pair moves 1 MiB each way through it.
        let took = transfer(&engine, 2, 1024 * 1024, "second pair");
        eprintln!("{backend:?}: second pair 2 x 1 MiB in {took:?} beside the stalled one");
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (2, CloseReason::Completed),
            "{backend:?}"
        );
        // The stalled reader now drains: every byte arrives, in order.
        let received = recv_all(server);
        assert_eq!(
            received.join().expect("reader").1,
            sent.join().expect("writer"),
            "{backend:?}: the spilled bytes kept their order"
        );
        drop(client);
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (1, CloseReason::Completed),
            "{backend:?}"
        );
        let stats = engine.stop();
        assert_eq!(stats.buffers.spill_held_bytes, 0, "{backend:?}: {stats:?}");
    }
}

#[test]
fn pipes_do_not_grow_toward_a_stalled_reader() {
    for backend in backends() {
        let mut cfg = config(backend);
        cfg.stall_timeout = Duration::from_secs(60);
        cfg.write_stall_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, Arc::default());
        let (_client, _server, _writer) = stalled_pair(&engine, 1);
        // Let it fill its pipe and stall (the source floods, the reader never reads).
        engine.wait_for("the pair moved bytes", |s| s.bytes > 0);
        thread::sleep(Duration::from_millis(500));
        let stats = engine.stats();
        eprintln!("{backend:?}: toward a stalled reader: {stats:?}");
        assert_eq!(stats.pipes.grown, 0, "{backend:?}: {stats:?}");
        assert!(
            stats.pipes.held_bytes <= 64 * 1024,
            "{backend:?}: {stats:?}"
        );
        let stats = engine.stop();
        assert_eq!(stats.pipes.grown, 0, "{backend:?}: {stats:?}");
    }
}

#[test]
fn a_new_pair_takes_the_copy_path_while_stalled_pairs_pin_every_pipe() {
    const LEN: usize = 8 * 1024 * 1024;
    for backend in backends() {
        let mut cfg = config(backend);
        // Two default pipes, both pinned by stalled readers for the whole test.
        cfg.pipes = PipeLimits {
            budget_bytes: 128 * 1024,
            max_pipe_bytes: 64 * 1024,
            pool_max: 4,
        };
        cfg.stall_timeout = Duration::from_secs(60);
        cfg.write_stall_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, Arc::default());
        let _a = stalled_pair(&engine, 1);
        let _b = stalled_pair(&engine, 2);
        engine.wait_for("both pipes pinned", |s| {
            s.pipes.held_bytes >= 128 * 1024 && s.pairs_active == 2
        });
        thread::sleep(Duration::from_millis(200));
        let took = transfer(&engine, 3, LEN, "copy-path pair");
        eprintln!("{backend:?}: 2 x 8 MiB on the copy path in {took:?}");
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (3, CloseReason::Completed),
            "{backend:?}"
        );
        let stats = engine.stats();
        eprintln!("{backend:?}: {stats:?}");
        assert!(stats.buffers.copy_taken >= 1, "{backend:?}: {stats:?}");
        assert!(
            stats.pipes.held_bytes <= 128 * 1024,
            "{backend:?}: {stats:?}"
        );
        // Buffers go back when the pair has nothing in flight.
        assert_eq!(stats.buffers.copy_active, 0, "{backend:?}: {stats:?}");
        engine.stop();
    }
}

#[test]
fn a_pair_whose_reader_never_drains_is_closed_write_stall() {
    for backend in backends() {
        let mut cfg = config(backend);
        cfg.stall_timeout = Duration::from_millis(100);
        cfg.write_stall_timeout = Duration::from_millis(600);
        let engine = Running::start(cfg, Arc::default());
        let started = Instant::now();
        let (_client, mut server, writer) = stalled_pair(&engine, 1);
        let f = engine.next_finished();
        let after = started.elapsed();
        eprintln!("{backend:?}: closed {:?} after {after:?}", f.reason);
        assert_eq!(
            (f.tag, f.reason),
            (1, CloseReason::WriteStall),
            "{backend:?}"
        );
        assert!(
            after >= Duration::from_millis(600),
            "{backend:?}: {after:?}"
        );
        // Both ends see the close; the flooding source stops.
        let mut sink = Vec::new();
        let _ = server.read_to_end(&mut sink);
        eprintln!(
            "{backend:?}: source wrote {} bytes",
            writer.join().expect("writer")
        );
        let stats = engine.stop();
        assert_eq!(stats.closed[5], 1, "{backend:?}: {stats:?}");
        assert_eq!(stats.buffers.spill_held_bytes, 0, "{backend:?}: {stats:?}");
        assert_eq!(
            outrelay_io::CLOSED_LABELS[5],
            CloseReason::WriteStall.label()
        );
    }
}

#[test]
fn a_slow_but_progressing_reader_is_not_closed_and_gets_every_byte() {
    const LEN: usize = 8 * 1024 * 1024;
    const BURST: usize = 1024 * 1024;
    for backend in backends() {
        let mut cfg = config(backend);
        cfg.stall_timeout = Duration::from_millis(100);
        cfg.write_stall_timeout = Duration::from_secs(2);
        let engine = Running::start(cfg, Arc::default());
        let (client, relay_a) = tcp_pair();
        let (relay_b, mut server) = tcp_pair();
        server
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        engine.add(relay_a, relay_b, 1);
        let sent = send_all(client.try_clone().expect("clone"), pattern(11, LEN));
        // Reads a burst, then pauses longer than the stall time (the pipe is given back)
        // and shorter than the write-stall time (the pair is not cut).
        let mut h = Sha256::new();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut burst = 0usize;
            while burst < BURST {
                let n = match server.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => r.expect("read"),
                };
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                burst += n;
            }
            got += burst;
            if burst < BURST {
                break;
            }
            thread::sleep(Duration::from_millis(400));
        }
        assert_eq!(got, LEN, "{backend:?}");
        let digest: [u8; 32] = h.finalize().into();
        assert_eq!(digest, sent.join().expect("writer"), "{backend:?}");
        drop((client, server));
        let f = engine.next_finished();
        assert_eq!(f.reason, CloseReason::Completed, "{backend:?}");
        let stats = engine.stop();
        eprintln!("{backend:?}: slow reader: {stats:?}");
        assert!(stats.spills >= 1, "{backend:?}: never spilled: {stats:?}");
        assert_eq!(stats.closed[5], 0, "{backend:?}");
    }
}

#[test]
fn stalled_directions_on_pipes_and_copy_buffers_both_give_them_back() {
    for backend in backends() {
        let mut cfg = config(backend);
        // One pipe and one copy buffer: the first stalled pair takes the pipe, the second the
        // copy buffer; after the stall time both are spilled and a third pair moves.
        cfg.pipes = PipeLimits {
            budget_bytes: 64 * 1024,
            max_pipe_bytes: 64 * 1024,
            pool_max: 4,
        };
        cfg.buffers.copy_budget_bytes = 16 * 1024;
        cfg.buffers.copy_buffer_bytes = 16 * 1024;
        cfg.stall_timeout = Duration::from_millis(200);
        cfg.write_stall_timeout = Duration::from_secs(60);
        let engine = Running::start(cfg, Arc::default());
        let _a = stalled_pair(&engine, 1);
        engine.wait_for("the pipe is taken", |s| s.pipes.held_bytes > 0);
        let _b = stalled_pair(&engine, 2);
        let stats = engine.wait_for("both stalled carriers spilled", |s| {
            s.spills >= 2 && s.buffers.copy_taken >= 1
        });
        eprintln!("{backend:?}: {stats:?}");
        assert_eq!(stats.buffers.copy_active, 0, "{backend:?}: {stats:?}");
        let took = transfer(&engine, 3, 1024 * 1024, "third pair");
        eprintln!("{backend:?}: third pair 2 x 1 MiB in {took:?}");
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (3, CloseReason::Completed),
            "{backend:?}"
        );
        let stats = engine.stop();
        assert_eq!(stats.buffers.spill_held_bytes, 0, "{backend:?}: {stats:?}");
    }
}

#[test]
fn a_spent_spill_budget_keeps_the_stalled_pipe_and_is_counted_once() {
    for backend in backends() {
        let mut cfg = config(backend);
        cfg.buffers.spill_budget_bytes = 0;
        cfg.stall_timeout = Duration::from_millis(100);
        cfg.write_stall_timeout = Duration::from_millis(1500);
        let engine = Running::start(cfg, Arc::default());
        let (_client, _server, _writer) = stalled_pair(&engine, 1);
        let stats = engine.wait_for("the spill refused", |s| s.spill_refusals >= 1);
        assert_eq!(stats.spills, 0, "{backend:?}: {stats:?}");
        assert!(
            stats.pipes.held_bytes > 0,
            "{backend:?}: pipe kept: {stats:?}"
        );
        // Several sweeps later it is still one refusal (one per stall), until the
        // write-stall timeout closes the pair.
        let f = engine.next_finished();
        assert_eq!(
            (f.tag, f.reason),
            (1, CloseReason::WriteStall),
            "{backend:?}"
        );
        let stats = engine.stop();
        assert_eq!(stats.spill_refusals, 1, "{backend:?}: {stats:?}");
    }
}

#[test]
fn close_where_cuts_the_selected_pairs_and_leaves_the_others() {
    for backend in backends() {
        let mut engine = Engine::new(EngineConfig {
            backend,
            ..EngineConfig::default()
        })
        .expect("engine");
        let (mut cut_client, cut_a) = tcp_pair();
        let (cut_b, mut cut_server) = tcp_pair();
        let (mut kept_client, kept_a) = tcp_pair();
        let (kept_b, mut kept_server) = tcp_pair();
        let now = Instant::now();
        engine
            .add(OwnedFd::from(cut_a), OwnedFd::from(cut_b), 1, now)
            .expect("add cut");
        engine
            .add(OwnedFd::from(kept_a), OwnedFd::from(kept_b), 2, now)
            .expect("add kept");
        let mut finished = Vec::new();
        let mut clock = Instant::now;
        engine
            .run_once(Duration::from_millis(10), &mut clock, &mut finished)
            .expect("round");
        assert_eq!(engine.close_where(|tag| tag == 1, &mut finished), 1);
        assert_eq!(
            finished,
            vec![Finished {
                tag: 1,
                bytes: [0, 0],
                reason: CloseReason::Cut
            }],
            "{backend:?}"
        );
        for s in [&cut_client, &cut_server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
        }
        let mut buf = [0u8; 8];
        assert_eq!(cut_client.read(&mut buf).unwrap_or(0), 0, "{backend:?}");
        assert_eq!(cut_server.read(&mut buf).unwrap_or(0), 0, "{backend:?}");
        // The other pair still carries bytes.
        kept_client.write_all(b"ping").expect("write");
        kept_server
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < 4 && Instant::now() < deadline {
            engine
                .run_once(Duration::from_millis(10), &mut clock, &mut finished)
                .expect("round");
            if let Ok(n) = kept_server.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(got, b"ping", "{backend:?}");
        let stats = engine.stats();
        assert_eq!(stats.pairs_active, 1, "{backend:?}");
        assert_eq!(stats.closed[6], 1, "{backend:?}: counted as cut");
        assert_eq!(outrelay_io::CLOSED_LABELS[6], "cut");
    }
}
