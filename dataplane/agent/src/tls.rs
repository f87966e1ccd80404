//! TLS towards relays: the agent's certificate material, its own identity URI (sent in HELLO),
//! and the server-certificate verifier that checks the chain to the controller CA AND that the
//! relay certificate carries exactly one identity URI with role `relay` (webpki does not look
//! at URI SANs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outrelay_proto::frame::ORP_ALPN;
use outrelay_proto::identity::{Identity, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConnectionConfig, IdentityFiles};

/// Why the identity material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held no item.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The agent certificate does not carry one valid agent identity URI.
    #[error("agent certificate: {0}")]
    BadIdentity(String),
    /// rustls or quinn refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The agent's certificate chain, key, CA roots and identity.
#[derive(Debug)]
pub struct AgentIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
    /// The controller CA roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's URI SAN exactly as written (HELLO's `agent_uri`).
    pub uri: String,
}

impl AgentIdentity {
    /// Reads the three PEM files and checks the leaf carries an agent identity.
    ///
    /// # Errors
    /// [`TlsError::Pem`] naming the file, or [`TlsError::BadIdentity`].
    pub fn load(files: &IdentityFiles) -> Result<AgentIdentity, TlsError> {
        let chain = certs(&files.cert)?;
        let roots = certs(&files.ca)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Pem {
            path: files.key.display().to_string(),
            reason: e.to_string(),
        })?;
        let (identity, uri) = cert_identity(&chain[0]).map_err(TlsError::BadIdentity)?;
        if identity.role() != Role::Agent {
            return Err(TlsError::BadIdentity(format!(
                "{uri} has role {}, want agent",
                identity.role().as_str()
            )));
        }
        Ok(AgentIdentity {
            chain,
            key,
            roots,
            uri,
        })
    }

    /// The quinn client configuration: TLS 1.3, ALPN `orp/1`, client certificate (from
    /// `reloadable` when the certificate is renewed in place), relay-role verifier, keep-alive
    /// and idle timeout from `conn`.
    ///
    /// # Errors
    /// [`TlsError::Setup`].
    pub fn quic_client_config(
        &self,
        conn: &ConnectionConfig,
        reloadable: Option<Arc<outrelay_client::Reloadable>>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.rustls_client(reloadable, None)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(conn.keepalive));
        // UDP leases: room for bursts of datagrams both ways (quinn drops the OLDEST received
        // datagram when its buffer is full, uncounted; the defaults hold about a millisecond
        // of a busy lease).
        transport.datagram_receive_buffer_size(Some(crate::udp::QUIC_DATAGRAM_BUFFER_BYTES));
        transport.datagram_send_buffer_size(crate::udp::QUIC_DATAGRAM_BUFFER_BYTES);
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(conn.idle_timeout.min(Duration::from_secs(600)))
                .map_err(|e| TlsError::Setup(format!("idle timeout: {e}")))?,
        ));
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport));
        Ok(client)
    }

    /// The TLS client of the TCP fallback: the same certificate, verifier and ALPN as QUIC's,
    /// but the relay certificate is checked against `verify_as` (the `server_name` QUIC checks)
    /// whatever SNI the tunnel sends (the relay's root host, which routes it).
    ///
    /// # Errors
    /// [`TlsError::Setup`].
    pub fn fallback_client_config(
        &self,
        reloadable: Option<Arc<outrelay_client::Reloadable>>,
        verify_as: &str,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let name = ServerName::try_from(verify_as.to_owned())
            .map_err(|e| TlsError::Setup(format!("server_name {verify_as:?}: {e}")))?;
        self.rustls_client(reloadable, Some(name))
    }

    fn rustls_client(
        &self,
        reloadable: Option<Arc<outrelay_client::Reloadable>>,
        verify_as: Option<ServerName<'static>>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in &self.roots {
            roots
                .add(ca.clone())
                .map_err(|e| TlsError::Setup(format!("CA root: {e}")))?;
        }
        let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Setup(format!("server verifier: {e}")))?;
        let verifier = Arc::new(RelayCertVerifier { chain, verify_as });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        // A renewing agent presents whatever certificate the renewal loop swapped in last, so
        // new connections use the fresh one and established ones are not dropped.
        let mut tls = match reloadable {
            Some(r) => builder.with_client_cert_resolver(r),
            None => builder
                .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
                .map_err(|e| TlsError::Setup(format!("client certificate: {e}")))?,
        };
        tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
        Ok(tls)
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate".to_owned()));
    }
    Ok(certs)
}

/// The single URI SAN identity of a DER certificate, and the URI as written.
///
/// # Errors
/// A reason when the certificate does not parse or its URI SANs are not exactly one valid
/// identity URI.
pub fn cert_identity(cert: &CertificateDer<'_>) -> Result<(Identity, String), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| "malformed subjectAltName".to_owned())?;
    let mut uris = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let identity = Identity::from_uri_sans(uris.iter().copied()).map_err(|e| e.to_string())?;
    let uri = uris.first().map(|u| (*u).to_owned()).unwrap_or_default();
    Ok((identity, uri))
}

/// webpki chain + DNS-name check, then the relay role from the URI SAN.
#[derive(Debug)]
struct RelayCertVerifier {
    chain: Arc<WebPkiServerVerifier>,
    /// The name checked instead of the SNI (the TCP fallback).
    verify_as: Option<ServerName<'static>>,
}

impl ServerCertVerifier for RelayCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain.verify_server_cert(
            end_entity,
            intermediates,
            self.verify_as.as_ref().unwrap_or(server_name),
            ocsp_response,
            now,
        )?;
        match cert_identity(end_entity) {
            Ok((identity, _)) if identity.role() == Role::Relay => {
                Ok(ServerCertVerified::assertion())
            }
            Ok((identity, _)) => Err(rustls::Error::General(format!(
                "server certificate role is {}, not relay",
                identity.role().as_str()
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "server certificate identity: {e}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
