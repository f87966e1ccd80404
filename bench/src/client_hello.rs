//! The TLS ClientHello the `connrate` client sends, and how the backend knows it has all of it.
//!
//! The preferred hello is a real one captured from OpenSSL (`openssl_tls13.bin`, captured in
//! parallel for the proto crate's tests). When that file is missing, a TLS 1.3 ClientHello is
//! built here with the same SNI; the report says which one was used.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The server name the connrate scenario routes on.
pub const DEMO_SNI: &str = "demo.outrelay.test";

/// TLS record content type for handshake messages.
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Largest ClientHello the backend accepts (post-quantum key shares fit comfortably).
const MAX_HELLO_BYTES: usize = 64 * 1024;

/// A ClientHello ready to send: whole TLS records.
#[derive(Debug, Clone)]
pub struct ClientHello {
    /// The bytes on the wire (one or more handshake records).
    pub bytes: Vec<u8>,
    /// Where they came from, for the report.
    pub source: String,
}

/// The captured OpenSSL hello in the proto crate's test data.
pub fn captured_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dataplane/proto/testdata/client_hello/openssl_tls13.bin")
}

/// Loads the hello from `path` (default: [`captured_path`]). A missing or unusable default
/// falls back to [`build`]; an explicitly given path that is unusable is an error.
pub fn load(path: Option<&Path>) -> Result<ClientHello> {
    let explicit = path.is_some();
    let path = path.map_or_else(captured_path, Path::to_owned);
    let shown = display_path(&path);
    match std::fs::read(&path) {
        Ok(bytes) => match check(&bytes) {
            Ok(()) => Ok(ClientHello {
                source: format!("captured OpenSSL hello {shown} ({} bytes)", bytes.len()),
                bytes,
            }),
            Err(e) if explicit => Err(e.context(format!("unusable ClientHello in {shown}"))),
            Err(e) => Ok(fallback(&format!("{shown} unusable: {e:#}"))),
        },
        Err(e) if explicit => Err(e).context(format!("reading {shown}")),
        Err(_) => Ok(fallback(&format!("{shown} not present"))),
    }
}

/// A TLS 1.3 ClientHello in one record, naming `sni`: TLS_AES_*/CHACHA20 suites, x25519 key
/// share, the extensions a real client sends first. Deterministic bytes (no randomness needed:
/// nothing completes the handshake).
pub fn build(sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    // server_name: list of one host_name.
    let name = sni.as_bytes();
    let server_name = [&[0x00][..], &vec16(name)].concat();
    extension(&mut ext, 0x0000, &vec16(&server_name));
    // supported_groups: x25519, secp256r1.
    extension(&mut ext, 0x000a, &vec16(&[0x00, 0x1d, 0x00, 0x17]));
    // signature_algorithms: rsa_pss_rsae_sha256, ecdsa_secp256r1_sha256, ed25519.
    extension(
        &mut ext,
        0x000d,
        &vec16(&[0x08, 0x04, 0x04, 0x03, 0x08, 0x07]),
    );
    // supported_versions: TLS 1.3 only.
    extension(&mut ext, 0x002b, &[0x02, 0x03, 0x04]);
    // psk_key_exchange_modes: psk_dhe_ke.
    extension(&mut ext, 0x002d, &[0x01, 0x01]);
    // key_share: one x25519 share of 32 bytes.
    let share = [&[0x00, 0x1d][..], &vec16(&[0x42; 32])].concat();
    extension(&mut ext, 0x0033, &vec16(&share));

    let mut body = Vec::new();
    body.extend_from_slice(&[0x03, 0x03]); // legacy_version TLS 1.2
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(32); // legacy_session_id
    body.extend_from_slice(&[0xa5; 32]);
    body.extend_from_slice(&vec16(&[0x13, 0x01, 0x13, 0x02, 0x13, 0x03])); // cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&vec16(&ext));

    let mut handshake = vec![HANDSHAKE_CLIENT_HELLO];
    handshake.extend_from_slice(&u24(body.len()));
    handshake.extend_from_slice(&body);

    let mut record = vec![CONTENT_TYPE_HANDSHAKE, 0x03, 0x01];
    record.extend_from_slice(&u16_len(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

/// Reads one complete ClientHello (possibly split across records and reads) from `r`,
/// returning how many bytes it took. Anything that is not a handshake record is an error.
pub async fn read_client_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut consumed = 0;
    loop {
        let mut header = [0_u8; 5];
        r.read_exact(&mut header)
            .await
            .context("reading record header")?;
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            bail!("not a handshake record (content type {:#04x})", header[0]);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let start = handshake.len();
        handshake.resize(start + len, 0);
        r.read_exact(&mut handshake[start..])
            .await
            .context("reading record body")?;
        consumed += header.len() + len;
        if let Some(total) = handshake_len(&handshake)?
            && handshake.len() >= total
        {
            return Ok(consumed);
        }
        if handshake.len() > MAX_HELLO_BYTES {
            bail!("ClientHello longer than {MAX_HELLO_BYTES} bytes");
        }
    }
}

/// Whole handshake message length (header included) once its 4-byte header is in `buf`.
fn handshake_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        bail!("handshake is not a ClientHello (type {:#04x})", header[0]);
    }
    let body = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    Ok(Some(4 + body))
}

/// A usable hello starts with a handshake record holding a ClientHello and names DEMO_SNI.
fn check(bytes: &[u8]) -> Result<()> {
    if bytes.first() != Some(&CONTENT_TYPE_HANDSHAKE)
        || bytes.get(5) != Some(&HANDSHAKE_CLIENT_HELLO)
    {
        bail!("does not start with a ClientHello handshake record");
    }
    if !bytes
        .windows(DEMO_SNI.len())
        .any(|w| w == DEMO_SNI.as_bytes())
    {
        bail!("does not name {DEMO_SNI}");
    }
    Ok(())
}

fn fallback(why: &str) -> ClientHello {
    let bytes = build(DEMO_SNI);
    ClientHello {
        source: format!(
            "ClientHello built in code ({} bytes, SNI {DEMO_SNI}); {why}",
            bytes.len()
        ),
        bytes,
    }
}

/// The path relative to the workspace root when it is inside it, for stable reports.
fn display_path(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = path.display().to_string();
    let root_text = format!("{}/", root.display());
    text.strip_prefix(&root_text).unwrap_or(&text).to_owned()
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&vec16(data));
}

/// `data` prefixed with its 16-bit big-endian length.
fn vec16(data: &[u8]) -> Vec<u8> {
    [&u16_len(data.len())[..], data].concat()
}

fn u16_len(len: usize) -> [u8; 2] {
    u16::try_from(len)
        .expect("ClientHello parts are far below 64 KiB")
        .to_be_bytes()
}

fn u24(len: usize) -> [u8; 3] {
    let [_, a, b, c] = u32::try_from(len)
        .expect("ClientHello is far below 16 MiB")
        .to_be_bytes();
    [a, b, c]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a one-record hello into records of at most `chunk` handshake bytes.
    fn split_records(hello: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in hello[5..].chunks(chunk) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&u16_len(piece.len()));
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn built_hello_has_consistent_lengths_and_names_the_sni() {
        let hello = build(DEMO_SNI);
        check(&hello).expect("built hello passes the same check as a captured one");
        let record_len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(record_len, hello.len() - 5);
        let hs_len = handshake_len(&hello[5..])
            .expect("ClientHello")
            .expect("has header");
        assert_eq!(hs_len, hello.len() - 5);
        // server_name extension: type 0, then lengths, then the name itself.
        let name_at = hello
            .windows(DEMO_SNI.len())
            .position(|w| w == DEMO_SNI.as_bytes())
            .expect("name present");
        let name_len = usize::from(u16::from_be_bytes([hello[name_at - 2], hello[name_at - 1]]));
        assert_eq!(name_len, DEMO_SNI.len());
        assert_eq!(hello[name_at - 3], 0x00, "host_name type");
    }

    #[tokio::test]
    async fn backend_reads_exactly_the_hello_whole_or_split() {
        let hello = build(DEMO_SNI);
        for chunk in [1, 7, 100, hello.len()] {
            let wire = split_records(&hello, chunk);
            let mut input = [&wire[..], b"trailing"].concat();
            let mut reader = &input[..];
            let consumed = read_client_hello(&mut reader).await.expect("valid hello");
            assert_eq!(consumed, wire.len(), "chunk {chunk}");
            input.truncate(wire.len() - 1);
            let mut short = &input[..];
            assert!(
                read_client_hello(&mut short).await.is_err(),
                "truncated, chunk {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn non_handshake_records_are_refused() {
        let mut alert: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
        assert!(read_client_hello(&mut alert).await.is_err());
        let mut http: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read_client_hello(&mut http).await.is_err());
    }

    #[test]
    fn missing_default_falls_back_and_missing_explicit_is_an_error() {
        let missing = Path::new("/nonexistent/hello.bin");
        assert!(load(Some(missing)).is_err());
        let dir = tempfile::tempdir().expect("temp dir");
        let wrong = dir.path().join("wrong.bin");
        std::fs::write(&wrong, b"not a hello").expect("write");
        assert!(load(Some(&wrong)).is_err());
        let good = dir.path().join("good.bin");
        std::fs::write(&good, build(DEMO_SNI)).expect("write");
        let loaded = load(Some(&good)).expect("valid hello file");
        assert!(loaded.source.starts_with("captured"), "{}", loaded.source);
    }
}
