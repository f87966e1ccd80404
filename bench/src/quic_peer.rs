//! The two ends of the `quinn-direct` target (P6's baseline): a plain quinn server that reads
//! one stream's bytes and drops them, and a plain quinn client that writes one stream as fast
//! as it can until it is stopped. They run as hidden subcommands of this binary
//! (`outrelay-bench quinn-server` / `quinn-client`) in processes of their own, so their CPU is
//! read from `/proc` like a relay's.
//!
//! "Plain" means what OutRelay's QUIC hops use, and nothing more: quinn with rustls on aws-lc-rs,
//! TLS 1.3 only, quinn's default transport (windows, congestion control, MTU discovery, GSO)
//! plus the keep-alive and idle timeout defaults of the relay, 8 MiB socket buffers asked for
//! on both sockets (as the relay and the agent do), and a 2-worker tokio runtime (as the relay
//! and the agent run). The server authenticates with a self-signed certificate made at start
//! (rcgen); the client does not present one (the relay's mutual TLS only costs at the
//! handshake). The sender writes shared [`Bytes`] chunks (no copy before quinn's own); the
//! receiver takes chunks without copying them out: the cheapest a quinn application can be.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;

/// ALPN of the baseline (any value: both ends agree on it).
const ALPN: &[u8] = b"bench/1";
/// The name in the server's self-signed certificate and the one the client checks.
const SERVER_NAME: &str = "localhost";
/// SO_RCVBUF / SO_SNDBUF asked for (the relay's and the agent's QUIC socket value).
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Tokio workers per process (the relay's and the agent's runtime).
const WORKER_THREADS: usize = 2;
/// Idle timeout and keep-alive (the relay's defaults; irrelevant while bytes flow).
const IDLE_TIMEOUT_MS: u64 = 10_000;
const KEEP_ALIVE_MS: u64 = 3_000;
/// Bytes per `write_chunk` of the client.
const WRITE_BYTES: usize = 256 * 1024;

/// `quinn-server`: listen on 127.0.0.1, count the bytes of every stream, serve the count.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// JSON written once listening: `{"quic": ADDR, "stats": ADDR, "cert": PATH}`. A TCP
    /// connection to `stats` gets the bytes received so far (u64 little-endian), then EOF.
    #[arg(long)]
    ready_file: PathBuf,
}

/// `quinn-client`: connect, open one bidirectional stream, write until killed.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The server's QUIC address.
    #[arg(long)]
    connect: SocketAddr,
    /// The server's certificate (DER), the only trusted root.
    #[arg(long)]
    cert: PathBuf,
    /// Pace the writes at this many Gbit/s (0: as fast as possible). For comparing CPU per
    /// Gbit at a relayed path's lower rate by hand; the harness never paces.
    #[arg(long, default_value_t = 0.0)]
    rate_gbps: f64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting tokio")
}

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(IDLE_TIMEOUT_MS))
            .context("idle timeout")?,
    ))
    .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    Ok(Arc::new(t))
}

fn endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .context("UDP socket")?;
    // Best effort, like the relay and the agent: the kernel caps the sizes.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&bind.into()).context("binding UDP")?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .context("QUIC endpoint")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Runs the server until killed.
pub fn server(args: &ServerArgs) -> Result<()> {
    runtime()?.block_on(serve(args))
}

async fn serve(args: &ServerArgs) -> Result<()> {
    let certified =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()]).context("rcgen")?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .context("server certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).context("QUIC server crypto")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport()?);
    let endpoint = endpoint(Some(config))?;
    let stats = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the stats listener")?;

    let dir = args.ready_file.parent().unwrap_or(Path::new("."));
    let cert_path = dir.join("quinn-server-cert.der");
    std::fs::write(&cert_path, cert.as_ref()).context("writing the certificate")?;
    let ready = serde_json::json!({
        "quic": endpoint.local_addr().context("QUIC address")?.to_string(),
        "stats": stats.local_addr().context("stats address")?.to_string(),
        "cert": cert_path.display().to_string(),
    });
    // Written whole under another name, then renamed: a reader never sees half of it.
    let partial = args.ready_file.with_extension("partial");
    std::fs::write(&partial, ready.to_string()).context("writing the ready file")?;
    std::fs::rename(&partial, &args.ready_file).context("renaming the ready file")?;

    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = stats.accept().await {
            let n = counter.load(Ordering::Relaxed);
            let _ = s.write_all(&n.to_le_bytes()).await;
        }
    });
    while let Some(incoming) = endpoint.accept().await {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((_send, recv)) = conn.accept_bi().await {
                tokio::spawn(drain(recv, Arc::clone(&received)));
            }
        });
    }
    Ok(())
}

/// Reads chunks (no copy) and counts them until the stream ends.
async fn drain(mut recv: quinn::RecvStream, received: Arc<AtomicU64>) {
    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
        received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
    }
}

/// Runs the client until killed (or until the connection fails: an error).
pub fn client(args: &ClientArgs) -> Result<()> {
    runtime()?.block_on(send(args))
}

async fn send(args: &ClientArgs) -> Result<()> {
    let der =
        std::fs::read(&args.cert).with_context(|| format!("reading {}", args.cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(der))
        .context("trusting the server certificate")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport()?);
    let endpoint = endpoint(None)?;
    let conn = endpoint
        .connect_with(config, args.connect, SERVER_NAME)
        .context("connecting")?
        .await
        .context("QUIC handshake")?;
    let (mut stream, _recv) = conn.open_bi().await.context("opening the stream")?;
    let chunk = Bytes::from(vec![0x17_u8; WRITE_BYTES]);
    let interval = (args.rate_gbps > 0.0)
        .then(|| Duration::from_secs_f64(WRITE_BYTES as f64 * 8.0 / (args.rate_gbps * 1e9)));
    let mut next = tokio::time::Instant::now();
    loop {
        if let Some(interval) = interval {
            next += interval;
            tokio::time::sleep_until(next).await;
        }
        stream.write_chunk(chunk.clone()).await.context("writing")?;
    }
}

/// The bytes a `quinn-server` has received so far, read from its stats address.
pub fn read_received(stats: SocketAddr) -> Result<u64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(stats).context("connecting to quinn-server stats")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .context("stats read timeout")?;
    let mut buf = [0_u8; 8];
    s.read_exact(&mut buf)
        .context("reading quinn-server stats")?;
    Ok(u64::from_le_bytes(buf))
}
