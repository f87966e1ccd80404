//! A single-hop TCP forwarder on the splice engine, for benchmarks: every accepted connection
//! is joined to a fresh connection to `--to`. Not a product: no routing, no policy, no limits
//! beyond the engine's own. The bench harness runs it as the `engine-uring` / `engine-epoll`
//! targets so the engine's design choices are measured side by side with the peers.
//!
//! `forward --listen 127.0.0.1:0 --to 127.0.0.1:5201 --backend io_uring [--workers 1]`
//! prints `listening <addr>` on stdout once bound.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use outrelay_io::{Backend, Engine, EngineConfig};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let to = arg(&args, "--to").ok_or("--to ADDR is required")?;
    let backend: Backend = arg(&args, "--backend")
        .map(|b| b.parse())
        .transpose()?
        .unwrap_or_else(Backend::probe);
    let workers: usize = arg(&args, "--workers")
        .map(|w| w.parse())
        .transpose()?
        .unwrap_or(1);

    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let mut engine = Engine::new(EngineConfig {
            backend,
            ..EngineConfig::default()
        })?;
        handles.push(engine.handle());
        std::thread::spawn(move || {
            let mut clock = Instant::now;
            let mut finished = Vec::new();
            loop {
                if let Err(e) = engine.run_once(Duration::from_secs(1), &mut clock, &mut finished) {
                    eprintln!("engine failed: {e}");
                    std::process::exit(1);
                }
                finished.clear();
            }
        });
    }

    let listener = TcpListener::bind(&listen)?;
    println!("listening {}", listener.local_addr()?);
    for (i, conn) in listener.incoming().enumerate() {
        let Ok(client) = conn else { continue };
        let Ok(upstream) = TcpStream::connect(&to) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let handle = &handles[i % handles.len()];
        if let Err(e) = handle.add(OwnedFd::from(client), OwnedFd::from(upstream), i as u64) {
            eprintln!("pair refused: {e}");
        }
    }
    Ok(())
}
