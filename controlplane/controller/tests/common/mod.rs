//! Test harness: runs the real `outrelay-controller` binary on 127.0.0.1:0 with a state dir in
//! a temp dir, reads the bound addresses from its ready file, and builds real mTLS / Unix-socket
//! gRPC channels.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use outrelay_controller::pki::{Ca, LeafProfile};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tonic::transport::{Channel, Endpoint};

pub const UUID_A: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
pub const UUID_B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

pub struct Controller {
    pub child: Child,
    pub state_dir: PathBuf,
    pub grpc: std::net::SocketAddr,
    pub socket: PathBuf,
    pub metrics: Option<String>,
    config: PathBuf,
    ready: PathBuf,
    nofile: Option<u64>,
}

impl Controller {
    /// Starts a controller whose state lives in `dir/state`; `extra` is appended to the config.
    pub fn start(dir: &Path, extra: &str) -> Controller {
        Controller::start_inner(dir, extra, None)
    }

    /// As [`Controller::start`], with the soft open-files limit set to `nofile` (`ulimit -n`
    /// in a shell that then execs the controller).
    pub fn start_with_nofile(dir: &Path, extra: &str, nofile: u64) -> Controller {
        Controller::start_inner(dir, extra, Some(nofile))
    }

    fn start_inner(dir: &Path, extra: &str, nofile: Option<u64>) -> Controller {
        let state_dir = dir.join("state");
        let socket = dir.join("controller.sock");
        let config = dir.join("controller.toml");
        let ready = dir.join("ready.json");
        // A `[grpc]` table in `extra` gets the listen address (a TOML table is written once).
        let listen = "[grpc]\nlisten = \"127.0.0.1:0\"\n";
        let (grpc, extra) = if extra.contains("[grpc]\n") {
            (String::new(), extra.replacen("[grpc]\n", listen, 1))
        } else {
            (listen.to_owned(), extra.to_owned())
        };
        std::fs::write(
            &config,
            format!(
                "state_dir = {state:?}\n{grpc}[admin]\nsocket_path = {sock:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}\n",
                state = state_dir.display().to_string(),
                sock = socket.display().to_string(),
            ),
        )
        .expect("write config");
        Controller::spawn(state_dir, socket, config, ready, nofile)
    }

    fn spawn(
        state_dir: PathBuf,
        socket: PathBuf,
        config: PathBuf,
        ready: PathBuf,
        nofile: Option<u64>,
    ) -> Controller {
        let _ = std::fs::remove_file(&ready);
        let bin = env!("CARGO_BIN_EXE_outrelay-controller");
        let mut cmd = match nofile {
            None => Command::new(bin),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
        };
        let child = cmd
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--log")
            .arg("warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn controller");
        let deadline = Instant::now() + Duration::from_secs(60);
        let json: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str(&text)
            {
                break v;
            }
            assert!(Instant::now() < deadline, "controller did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        };
        Controller {
            child,
            state_dir,
            socket,
            grpc: json["grpc"]
                .as_str()
                .expect("grpc addr")
                .parse()
                .expect("addr"),
            metrics: json["metrics"].as_str().map(str::to_owned),
            config,
            ready,
            nofile,
        }
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh process on the same state and config.
    pub fn restart(mut self) -> Controller {
        self.kill9();
        Controller::spawn(
            self.state_dir.clone(),
            self.socket.clone(),
            self.config.clone(),
            self.ready.clone(),
            self.nofile,
        )
    }

    pub fn ca(&self) -> Ca {
        let cert = std::fs::read_to_string(self.state_dir.join("ca.pem")).expect("ca.pem");
        let key = std::fs::read_to_string(self.state_dir.join("ca-key.pem")).expect("ca key");
        Ca::from_pem(&cert, &key).expect("ca")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("ca.pem")).expect("ca.pem")
    }

    /// A certificate for `uri` signed by this controller's CA.
    pub fn cert(&self, uri: &str, profile: LeafProfile) -> (String, String) {
        mint(&self.ca(), uri, profile, time::OffsetDateTime::now_utc())
    }

    pub async fn channel(&self, cert: Option<&(String, String)>) -> Channel {
        tls_channel(self.grpc, &self.ca_pem(), cert)
            .await
            .expect("tls channel")
    }

    pub async fn unix_channel(&self) -> Channel {
        unix_channel(self.socket.clone()).await
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.as_deref().expect("metrics enabled");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("response");
        body
    }

    /// The sum of every sample whose series starts with `series` (name, or name with the
    /// opening of its labels, e.g. `x_total{reason="a"`); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        sum_metric(&self.metrics_text().await, series)
    }
}

/// See [`Controller::metric`].
pub fn sum_metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(series))
        .filter(|l| {
            // The name must end where `series` ends or continue with labels.
            let rest = &l[series.len()..];
            series.contains('{') || rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn mint(
    ca: &Ca,
    uri: &str,
    profile: LeafProfile,
    now: time::OffsetDateTime,
) -> (String, String) {
    let (issued, key) = ca
        .issue_with_key(&[], Some(uri), profile, 3600, now)
        .expect("issue");
    (issued.cert_pem, key)
}

pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    cert: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    tls_channel_from(addr, None, ca_pem, cert).await
}

/// A rustls client config trusting `ca_pem`, with `cert` as client certificate if given.
pub fn client_tls(ca_pem: &str, cert: Option<&(String, String)>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca der"))
        .expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(k.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.0/8 is all local on
/// Linux, so tests can play distinct sources), or from the default address.
pub async fn tcp_from(
    addr: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = match from {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A gRPC channel over mTLS (or anonymous TLS) whose connections come from `from`.
pub async fn tls_channel_from(
    addr: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
    ca_pem: &str,
    cert: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_pem, cert)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tcp_from(addr, from).await?;
                let name = ServerName::try_from("localhost").expect("name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

pub async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .expect("unix channel")
}

/// A PEM CSR for a fresh key, optionally naming `uri`.
pub fn csr(uri: Option<&str>) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    if let Some(u) = uri {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(u.try_into().expect("ia5")));
    }
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

/// A CSR and its key, for certificates a test will then use.
pub fn csr_with_key() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    let pem = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (pem, key.serialize_pem())
}

/// Polls `f` until it returns true or 10 s pass.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A loopback address.
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}

/// A well-formed enrollment token for the CA with `fingerprint` that was never issued.
pub fn random_token(fingerprint: &str) -> String {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("random");
    format!("ort1.{}.{fingerprint}", hex::encode(secret))
}

/// The controller's CA fingerprint (via the admin socket).
pub async fn fingerprint(c: &Controller) -> String {
    outrelay_api::pb::pki_client::PkiClient::new(c.unix_channel().await)
        .ca_bundle(outrelay_api::pb::CaBundleRequest {})
        .await
        .expect("ca bundle")
        .into_inner()
        .ca_fingerprint_sha256
}

/// True when the server closes `s` (EOF or error) within `within`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Session tickets, HTTP/2 settings: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// An unauthenticated flood on the controller's TCP port until [`Flood::stop`]: garbage on raw
/// TCP and client certificates of a foreign CA from 127.0.0.2 (failed handshakes), anonymous
/// Enroll with random tokens from 127.0.0.3.
pub struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    attempts: Arc<std::sync::atomic::AtomicU64>,
    attackers: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    pub async fn start(c: &Controller) -> Flood {
        use outrelay_api::pb::{self, pki_client::PkiClient};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use tokio::io::AsyncWriteExt;
        use tonic::Code;
        let fp = fingerprint(c).await;
        let ca_pem = c.ca_pem();
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let mut attackers = Vec::new();
        // Garbage on raw TCP (failed handshakes), from 127.0.0.2.
        for _ in 0..8 {
            let (stop, attempts, addr) = (stop.clone(), attempts.clone(), c.grpc);
            attackers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = tcp_from(addr, Some(ip("127.0.0.2"))).await {
                        let _ = s.write_all(b"x\r\n\r\n").await;
                        let _ = closed_within(&mut s, Duration::from_secs(2)).await;
                    }
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Client certificates from a foreign CA (failed handshakes), from 127.0.0.2.
        let (other_cert, other_key) = outrelay_controller::pki::new_ca_pem("intruder").expect("ca");
        let intruder = outrelay_controller::pki::Ca::from_pem(&other_cert, &other_key).expect("ca");
        let foreign = mint(
            &intruder,
            "outrelay://system/admin/ops",
            LeafProfile::Client,
            time::OffsetDateTime::now_utc(),
        );
        for _ in 0..4 {
            let (stop, attempts, addr) = (stop.clone(), attempts.clone(), c.grpc);
            let cfg = Arc::new(client_tls(&ca_pem, Some(&foreign)));
            attackers.push(tokio::spawn(async move {
                let connector = tokio_rustls::TlsConnector::from(cfg);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(tcp) = tcp_from(addr, Some(ip("127.0.0.2"))).await {
                        let name = ServerName::try_from("localhost").expect("name");
                        if let Ok(mut tls) = connector.connect(name, tcp).await {
                            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                            let _ = closed_within(&mut tls, Duration::from_secs(2)).await;
                        }
                    }
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Anonymous Enroll with random tokens (right format, right CA fingerprint), 127.0.0.3.
        for _ in 0..8 {
            let (stop, attempts, fp, ca_pem, addr) = (
                stop.clone(),
                attempts.clone(),
                fp.clone(),
                ca_pem.clone(),
                c.grpc,
            );
            attackers.push(tokio::spawn(async move {
                let csr = csr(None);
                while !stop.load(Ordering::Relaxed) {
                    let Ok(ch) = tls_channel_from(addr, Some(ip("127.0.0.3")), &ca_pem, None).await
                    else {
                        continue;
                    };
                    let mut pki = PkiClient::new(ch);
                    for _ in 0..50 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = pki
                            .enroll(pb::EnrollRequest {
                                token: random_token(&fp),
                                csr_pem: csr.clone(),
                            })
                            .await;
                        attempts.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Err(e) if e.code() == Code::PermissionDenied => {}
                            // The connection was closed under us (idle/age/caps): reconnect.
                            Err(_) => break,
                            Ok(_) => panic!("a random token enrolled"),
                        }
                    }
                }
            }));
        }

        Flood {
            stop,
            attempts,
            attackers,
        }
    }

    /// Stops the attackers; returns how many hostile attempts they made.
    pub async fn stop(self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for a in self.attackers {
            let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
        }
        self.attempts.load(Ordering::Relaxed)
    }
}
