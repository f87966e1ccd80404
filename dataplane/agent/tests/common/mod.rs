//! Local targets shared by the agent's end-to-end test files (`mod common;` in each).

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP echo server for any number of connections.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// A TCP echo target for ONE connection: echoes everything, and after the client's FIN writes
/// the SHA-256 of what it received and closes. Yields (bytes received, their SHA-256).
pub async fn hashing_echo_target() -> (SocketAddr, JoinHandle<(u64, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept echo");
        let _ = s.set_nodelay(true);
        let (mut r, mut w) = s.into_split();
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.expect("echo read");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            w.write_all(&buf[..n]).await.expect("echo write");
        }
        let digest = hasher.finalize().to_vec();
        w.write_all(&digest).await.expect("trailer");
        w.shutdown().await.expect("echo fin");
        (total, digest)
    });
    (addr, task)
}
