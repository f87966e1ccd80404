//! What the agent's end-to-end test files share (`mod common;` in each): a test CA and the local
//! echo targets.

pub mod daemons;
pub mod world;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP echo server for any number of connections.
#[allow(dead_code, reason = "used by some of the test files only")]
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

/// A UDP echo service in this process (any number of peers).
#[allow(dead_code, reason = "used by some of the test files only")]
pub async fn udp_echo_server() -> (SocketAddr, JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind UDP echo");
    let addr = socket.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// A TCP echo target for ONE connection: echoes everything, and after the client's FIN writes
/// the SHA-256 of what it received and closes. Yields (bytes received, their SHA-256).
#[allow(dead_code, reason = "used by some of the test files only")]
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

/// A bulk transfer to [`hashing_echo_target`] through whatever is in between: `bytes` of a
/// pseudo-random stream written (then FIN) while the echo is read and hashed.
#[allow(dead_code, reason = "used by some of the test files only")]
pub struct Bulk {
    writer: JoinHandle<(u64, Vec<u8>, Duration)>,
    reader: JoinHandle<(u64, Vec<u8>, Vec<u8>, Duration)>,
    /// Echoed bytes received so far.
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[allow(dead_code, reason = "used by some of the test files only")]
impl Bulk {
    /// Connects to `addr` and starts.
    pub async fn start(addr: SocketAddr, bytes: u64) -> Bulk {
        let client = TcpStream::connect(addr).await.expect("connect");
        Bulk::start_on(client, bytes)
    }

    /// Starts on a connected `client`.
    pub fn start_on(client: TcpStream, bytes: u64) -> Bulk {
        Bulk::start_paced_on(client, bytes, None)
    }

    /// Connects to `addr` and starts, writing at most `bytes_per_s` (a transfer that lasts a
    /// known time, e.g. across a relay upgrade).
    pub async fn start_paced(addr: SocketAddr, bytes: u64, bytes_per_s: u64) -> Bulk {
        let client = TcpStream::connect(addr).await.expect("connect");
        Bulk::start_paced_on(client, bytes, Some(bytes_per_s))
    }

    /// Starts on a connected `client`, writing at most `pace` bytes per second when given.
    fn start_paced_on(client: TcpStream, bytes: u64, pace: Option<u64>) -> Bulk {
        use std::sync::atomic::Ordering;
        client.set_nodelay(true).expect("nodelay");
        let (mut r, mut w_half) = client.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let mut chunk = vec![0u8; 256 * 1024];
            let mut sent = 0u64;
            while sent < bytes {
                for word in chunk.chunks_exact_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    word.copy_from_slice(&state.to_le_bytes());
                }
                let n = usize::try_from((bytes - sent).min(chunk.len() as u64)).expect("fits");
                hasher.update(&chunk[..n]);
                w_half.write_all(&chunk[..n]).await.expect("client write");
                sent += n as u64;
                if let Some(rate) = pace {
                    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
                    tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
                }
            }
            w_half.shutdown().await.expect("client shutdown(Write)");
            (sent, hasher.finalize().to_vec(), started.elapsed())
        });
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = received.clone();
        let reader = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut got = 0u64;
            let mut trailer = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = r.read(&mut buf).await.expect("client read");
                if n == 0 {
                    break;
                }
                let data = &buf[..n];
                let want = usize::try_from((bytes - got).min(n as u64)).expect("fits");
                hasher.update(&data[..want]);
                got += want as u64;
                progress.store(got, Ordering::Relaxed);
                trailer.extend_from_slice(&data[want..]);
            }
            (got, hasher.finalize().to_vec(), trailer, started.elapsed())
        });
        Bulk {
            writer,
            reader,
            received,
        }
    }

    /// Echoed bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) until at least `bytes` came back.
    pub async fn wait_received(&self, bytes: u64) {
        let start = Instant::now();
        while self.received() < bytes {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "only {} of {bytes} bytes came back",
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (sent, its SHA-256, write time, echoed, their SHA-256, bytes after them, read time).
    #[allow(clippy::type_complexity)]
    pub async fn finish(self) -> (u64, Vec<u8>, Duration, u64, Vec<u8>, Vec<u8>, Duration) {
        let (sent, sent_hash, write_took) =
            tokio::time::timeout(Duration::from_secs(300), self.writer)
                .await
                .expect("writer finished within 300 s")
                .expect("writer task");
        let (got, got_hash, trailer, read_took) =
            tokio::time::timeout(Duration::from_secs(300), self.reader)
                .await
                .expect("reader finished within 300 s")
                .expect("reader task");
        (
            sent, sent_hash, write_took, got, got_hash, trailer, read_took,
        )
    }
}

/// A test CA: the controller's role in these tests (it signs relay and agent identities).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub pem: String,
    /// The CA key (PEM), for a controller that is handed this CA.
    #[allow(dead_code, reason = "used by some of the test files only")]
    pub key_pem: String,
}

/// A leaf certificate and its key, in DER (for in-test TLS) and PEM (for daemons' files).
pub struct Leaf {
    #[allow(dead_code, reason = "used by some of the test files only")]
    pub chain: Vec<CertificateDer<'static>>,
    #[allow(dead_code, reason = "used by some of the test files only")]
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A fresh self-signed CA named `cn`.
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf named `cn` with DNS names `dns`, an optional URI SAN and the given EKUs.
    pub fn leaf(
        &self,
        cn: &str,
        dns: &[&str],
        uri: Option<&str>,
        eku: Vec<ExtendedKeyUsagePurpose>,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
        if let Some(uri) = uri {
            p.subject_alt_names
                .push(SanType::URI(uri.try_into().expect("URI SAN")));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = eku;
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `<name>.pem` and `<name>-key.pem` into `dir`: a leaf for identity `uri`
    /// (clientAuth; plus serverAuth and DNS `localhost` when `server`).
    #[allow(dead_code, reason = "used by some of the test files only")]
    pub fn write_leaf(
        &self,
        dir: &Path,
        name: &str,
        uri: &str,
        server: bool,
    ) -> (PathBuf, PathBuf) {
        let (dns, eku): (&[&str], _) = if server {
            (
                &["localhost"],
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        } else {
            (&[], vec![ExtendedKeyUsagePurpose::ClientAuth])
        };
        let leaf = self.leaf(uri, dns, Some(uri), eku);
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, leaf.cert_pem).expect("write cert");
        std::fs::write(&k, leaf.key_pem).expect("write key");
        (c, k)
    }
}

/// The readiness backends this kernel offers (io_uring skipped LOUDLY when refused).
#[allow(dead_code, reason = "used by some of the test files only")]
pub fn io_backends() -> Vec<&'static str> {
    let mut backends = vec!["epoll"];
    if outrelay_io::Backend::probe() == outrelay_io::Backend::Uring {
        backends.push("io_uring");
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}

/// A target that writes zeros to every connection until it fails (a large download).
#[allow(dead_code, reason = "used by some of the test files only")]
pub async fn zeros_target() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind zeros");
    let addr = listener.local_addr().expect("zeros addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let zeros = vec![0u8; 64 * 1024];
                while s.write_all(&zeros).await.is_ok() {}
            });
        }
    });
    (addr, task)
}

/// A public client with `SO_RCVBUF = 4096` that sends nothing and never reads (review H1's
/// stalled reader); a refused connect is retried (the lease port may not listen yet).
#[allow(dead_code, reason = "used by some of the test files only")]
pub async fn stalled_reader(addr: SocketAddr) -> tokio::net::TcpStream {
    let started = std::time::Instant::now();
    loop {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        match socket.connect(addr).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(20),
                    "{addr} never listened: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}
