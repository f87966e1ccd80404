//! Bandwidth limits on the splice engine (issue 21), on real loopback TCP and both backends:
//! a limited pair moves at its bucket's rate, an unlimited pair beside it is not held to it,
//! a rate change applies to the running transfer, and every byte arrives intact.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use outrelay_io::{Backend, Bucket, Engine, EngineConfig, Limits};
use sha2::{Digest, Sha256};

fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Epoll];
    if Backend::probe() == Backend::Uring {
        b.push(Backend::Uring);
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    b
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

/// Writes a deterministic stream until `stop`, then half-closes; returns the hash written.
fn sender(mut s: TcpStream, stop: Arc<AtomicBool>) -> thread::JoinHandle<[u8; 32]> {
    thread::spawn(move || {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 128 * 1024];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        s.set_write_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        while !stop.load(Ordering::SeqCst) {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
            }
            let mut off = 0;
            while off < chunk.len() {
                match s.write(&chunk[off..]) {
                    Ok(n) => {
                        h.update(&chunk[off..off + n]);
                        off += n;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
        }
        s.shutdown(Shutdown::Write).expect("half-close");
        h.finalize().into()
    })
}

/// Reads to EOF counting into `count`; returns the hash read.
fn receiver(mut s: TcpStream, count: Arc<AtomicU64>) -> thread::JoinHandle<[u8; 32]> {
    thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read"),
            };
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            count.fetch_add(k as u64, Ordering::SeqCst);
        }
        h.finalize().into()
    })
}

/// Bytes per second `count` grows at over `span`.
fn rate_over(count: &AtomicU64, span: Duration) -> f64 {
    let (t0, b0) = (Instant::now(), count.load(Ordering::SeqCst));
    thread::sleep(span);
    let (t1, b1) = (Instant::now(), count.load(Ordering::SeqCst));
    (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
}

#[test]
fn a_limited_pair_moves_at_its_rate_and_follows_a_change_while_another_is_not_held() {
    const LIMIT: u64 = 40_000_000; // 40 MB/s
    for backend in backends() {
        let mut engine = Engine::new(EngineConfig {
            backend,
            sweep_interval: Duration::from_millis(100),
            ..EngineConfig::default()
        })
        .expect("engine");
        let handle = engine.handle();
        let stop_engine = Arc::new(AtomicBool::new(false));
        let stop2 = stop_engine.clone();
        let engine_thread = thread::spawn(move || {
            let mut out = Vec::new();
            let mut clock = Instant::now;
            while !stop2.load(Ordering::SeqCst) {
                engine
                    .run_once(Duration::from_millis(50), &mut clock, &mut out)
                    .expect("engine round");
            }
            engine.shutdown(&mut out);
            engine.stats()
        });
        let bucket = Arc::new(Bucket::new(LIMIT));
        let stop = Arc::new(AtomicBool::new(false));
        let mut flows = Vec::new();
        for limited in [true, false] {
            let (client, engine_a) = tcp_pair();
            let (engine_b, server) = tcp_pair();
            let limits = if limited {
                [Limits::new(Some(bucket.clone()), None), Limits::default()]
            } else {
                [Limits::default(), Limits::default()]
            };
            handle
                .add_limited(
                    OwnedFd::from(engine_a),
                    OwnedFd::from(engine_b),
                    u64::from(limited),
                    limits,
                )
                .expect("engine takes the pair");
            let count = Arc::new(AtomicU64::new(0));
            let tx = sender(client, stop.clone());
            let rx = receiver(server, count.clone());
            flows.push((count, tx, rx));
        }
        // Past the first burst, the limited flow is at its rate, the other is not held to it.
        thread::sleep(Duration::from_millis(300));
        let (lim, free) = thread::scope(|s| {
            let l = s.spawn(|| rate_over(&flows[0].0, Duration::from_secs(2)));
            let f = s.spawn(|| rate_over(&flows[1].0, Duration::from_secs(2)));
            (l.join().expect("l"), f.join().expect("f"))
        });
        let err = (lim - LIMIT as f64).abs() / LIMIT as f64;
        eprintln!(
            "{backend:?}: limited {:.1} MB/s (limit {} MB/s, {:.1} %), unlimited {:.1} MB/s",
            lim / 1e6,
            LIMIT / 1_000_000,
            err * 100.0,
            free / 1e6
        );
        assert!(
            err < 0.10,
            "{backend:?}: limited pair at {lim} B/s, limit {LIMIT}"
        );
        assert!(
            free > 1.5 * LIMIT as f64,
            "{backend:?}: the unlimited pair is held near the limit: {free} B/s"
        );
        // A change applies to the running transfer within a second.
        bucket.set_rate(LIMIT / 2);
        thread::sleep(Duration::from_millis(500));
        let half = rate_over(&flows[0].0, Duration::from_secs(1));
        let err = (half - (LIMIT / 2) as f64).abs() / (LIMIT / 2) as f64;
        eprintln!("{backend:?}: after the change {:.1} MB/s", half / 1e6);
        assert!(err < 0.10, "{backend:?}: after the change {half} B/s");
        // Lifted: the flow is no longer held.
        bucket.set_rate(0);
        thread::sleep(Duration::from_millis(300));
        let lifted = rate_over(&flows[0].0, Duration::from_millis(500));
        assert!(
            lifted > 1.5 * LIMIT as f64,
            "{backend:?}: lifted {lifted} B/s"
        );
        stop.store(true, Ordering::SeqCst);
        for (_, tx, rx) in flows {
            let sent = tx.join().expect("sender");
            let got = rx.join().expect("receiver");
            assert_eq!(sent, got, "{backend:?}: bytes intact");
        }
        stop_engine.store(true, Ordering::SeqCst);
        let _ = handle.wake();
        let stats = engine_thread.join().expect("engine thread");
        assert!(stats.throttles > 0, "{backend:?}: {stats:?}");
        assert!(
            bucket.throttled_ns() > 0,
            "{backend:?}: throttled time counted"
        );
    }
}
