//! In-repo backends the scenarios send traffic to (iperf3 is the other, for `bulk`). They run
//! as tasks on the harness's tokio runtime, so their CPU is never counted as the relay's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::client_hello::read_client_hello;

/// Bytes the connrate backend answers each ClientHello with.
pub const REPLY_BYTES: usize = 1024;
/// The byte the connrate backend's reply is made of.
pub const REPLY_BYTE: u8 = 0x17;

/// A backend accepting on 127.0.0.1; stops accepting when dropped. Connections already
/// accepted end when their client side closes.
#[derive(Debug)]
pub struct Backend {
    /// Where the backend listens.
    pub addr: SocketAddr,
    /// Bytes counted by [`Behaviour::HelloSink`] (after the ClientHello) and
    /// [`Behaviour::Sink`] connections, all together.
    pub sunk_bytes: Arc<AtomicU64>,
    accept_loop: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// What a backend does with each accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Read one TLS ClientHello, write [`REPLY_BYTES`], then wait for the client to close
    /// (so the client closes first and the backend never holds TIME_WAIT).
    HelloReply,
    /// Echo every byte back until the client closes.
    Echo,
    /// Read one TLS ClientHello, then read and discard everything until the client closes,
    /// counting the bytes (a bulk receiver behind an SNI-routed path).
    HelloSink,
    /// Read and discard everything until the client closes, counting the bytes (the mesh's
    /// bulk receiver).
    Sink,
    /// Write zeros as fast as the connection takes them, never reading, until a write fails
    /// (the large body behind the abuse scenario's stalled readers).
    Flood,
}

/// Starts a backend on `127.0.0.1:0` on the runtime behind `rt`.
pub fn start(rt: &Handle, behaviour: Behaviour) -> Result<Backend> {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .context("binding backend")?;
    let addr = listener.local_addr().context("backend address")?;
    let reply: Arc<[u8]> = vec![REPLY_BYTE; REPLY_BYTES].into();
    let sunk_bytes = Arc::new(AtomicU64::new(0));
    let sunk = Arc::clone(&sunk_bytes);
    let accept_loop = rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let reply = Arc::clone(&reply);
            let sunk = Arc::clone(&sunk);
            tokio::spawn(async move {
                // A failed connection only shows up at the client, which counts it.
                let _ = match behaviour {
                    Behaviour::HelloReply => hello_reply(stream, &reply).await,
                    Behaviour::Echo => echo(stream).await,
                    Behaviour::HelloSink => hello_sink(stream, &sunk).await,
                    Behaviour::Sink => sink(stream, &sunk).await,
                    Behaviour::Flood => flood(stream).await,
                };
            });
        }
    });
    Ok(Backend {
        addr,
        sunk_bytes,
        accept_loop,
    })
}

async fn hello_reply(mut stream: TcpStream, reply: &[u8]) -> Result<()> {
    read_client_hello(&mut stream).await?;
    stream.write_all(reply).await?;
    let mut sink = [0_u8; 512];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

async fn echo(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn hello_sink(mut stream: TcpStream, sunk: &AtomicU64) -> Result<()> {
    read_client_hello(&mut stream).await?;
    sink(stream, sunk).await
}

async fn flood(mut stream: TcpStream) -> Result<()> {
    let block = vec![0_u8; 64 * 1024];
    loop {
        stream.write_all(&block).await?;
    }
}

async fn sink(mut stream: TcpStream, sunk: &AtomicU64) -> Result<()> {
    let mut buf = vec![0_u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        sunk.fetch_add(n as u64, Ordering::Relaxed);
    }
}
