//! An incremental, streaming TLS ClientHello parser: the relay's SNI peek.
//!
//! The relay must route a public TLS connection by its server name without terminating TLS,
//! while a hostile client controls every byte and every segment boundary. So the parser:
//!
//! - is fed whatever bytes arrived ([`ClientHelloParser::feed`]) and keeps only a few dozen
//!   bytes of state: it never re-reads or copies earlier input, so byte-by-byte feeding is
//!   linear, and the caller's replay buffer is the only copy of the hello;
//! - reassembles the handshake message across any number of TLS records (HAProxy 2.6 misroutes
//!   record splits) and any TCP segmentation;
//! - enforces a cap on the raw bytes (records included) it will look at;
//! - validates every length against its enclosing structure, so malformed input is a typed
//!   [`HelloError`], never a panic or a read past a boundary;
//! - refuses duplicate SNI (or ALPN/ECH) extensions, more than one server name, non-host-name
//!   name types, IP literals and overlong names, and normalises the name ([`HostName`]).
//!
//! Only the fields routing needs are extracted: the server name, the ALPN protocols (the
//! first [`ALPN_CAPACITY_BYTES`] bytes of them) and whether an encrypted_client_hello extension
//! is present (its outer SNI is then the client-facing server, which is what we route on).

use crate::hostname::{HostName, NameError};

/// Default cap on the raw ClientHello bytes (records included) the relay reads: 16 KiB.
pub const DEFAULT_MAX_HELLO_BYTES: usize = 16 * 1024;
/// The largest cap a configuration may set: 64 KiB.
pub const MAX_HELLO_BYTES_LIMIT: usize = 64 * 1024;
/// TLS record header length.
pub const RECORD_HEADER_BYTES: usize = 5;
/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
pub const MAX_RECORD_PAYLOAD_BYTES: usize = 1 << 14;
/// How many bytes of ALPN protocol names (each with its length byte) are kept.
pub const ALPN_CAPACITY_BYTES: usize = 256;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// A host name plus one trailing dot.
const MAX_SNI_WIRE_BYTES: usize = crate::hostname::MAX_HOSTNAME_BYTES + 1;

/// Why a connection's first bytes are not a ClientHello we route. Each variant is a counted
/// refusal reason; [`HelloError::reason`] gives its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first byte looks like plain HTTP (an ASCII upper-case method).
    #[error("plain HTTP on the TLS port")]
    PlainHttp,
    /// The first byte is not a TLS handshake record (includes SSLv2-style hellos).
    #[error("not a TLS handshake")]
    NotTls,
    /// A later record is not a handshake record before the ClientHello ended.
    #[error("record of content type {0} inside the ClientHello")]
    UnexpectedRecordType(u8),
    /// A record header names a protocol version other than 3.x.
    #[error("unsupported record version {0:#06x}")]
    BadRecordVersion(u16),
    /// A zero-length handshake record (forbidden by RFC 8446).
    #[error("empty handshake record")]
    EmptyRecord,
    /// A record longer than 2^14 bytes.
    #[error("record longer than 16 KiB")]
    RecordTooLong,
    /// The first handshake message is not a ClientHello.
    #[error("handshake message type {0} is not ClientHello")]
    NotClientHello(u8),
    /// The ClientHello (records included) exceeds the configured cap.
    #[error("ClientHello larger than the cap")]
    TooLarge,
    /// A length field disagrees with its enclosing structure, or a field is out of range.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// Two server_name extensions.
    #[error("duplicate server_name extension")]
    DuplicateServerName,
    /// More than one name in the server_name list.
    #[error("more than one server name")]
    MultipleServerNames,
    /// A server name entry whose type is not host_name (0).
    #[error("server name type {0} is not host_name")]
    UnsupportedNameType(u8),
    /// The server name is longer than a host name can be.
    #[error("server name too long")]
    NameTooLong,
    /// The server name is an IP literal (RFC 6066 forbids them).
    #[error("server name is an IP literal")]
    IpLiteral,
    /// The server name is not a valid host name.
    #[error("invalid server name: {0}")]
    InvalidName(NameError),
    /// Two ALPN or two encrypted_client_hello extensions.
    #[error("duplicate extension {0:#06x}")]
    DuplicateExtension(u16),
}

impl HelloError {
    /// A stable snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::PlainHttp => "plain_http",
            HelloError::NotTls => "not_tls",
            HelloError::UnexpectedRecordType(_) => "unexpected_record_type",
            HelloError::BadRecordVersion(_) => "bad_record_version",
            HelloError::EmptyRecord => "empty_record",
            HelloError::RecordTooLong => "record_too_long",
            HelloError::NotClientHello(_) => "not_client_hello",
            HelloError::TooLarge => "hello_too_large",
            HelloError::Malformed(_) => "malformed_hello",
            HelloError::DuplicateServerName => "duplicate_sni",
            HelloError::MultipleServerNames => "multiple_sni",
            HelloError::UnsupportedNameType(_) => "sni_name_type",
            HelloError::NameTooLong => "sni_too_long",
            HelloError::IpLiteral => "sni_ip_literal",
            HelloError::InvalidName(_) => "sni_invalid",
            HelloError::DuplicateExtension(_) => "duplicate_extension",
        }
    }
}

/// What routing needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The normalised server name, if the client sent one.
    pub server_name: Option<HostName>,
    /// Whether an encrypted_client_hello extension is present (its outer SNI is routed).
    pub ech_offered: bool,
    alpn: [u8; ALPN_CAPACITY_BYTES],
    alpn_len: usize,
    alpn_truncated: bool,
}

impl ClientHello {
    /// The ALPN protocol names offered, in the client's order (as many as fit in
    /// [`ALPN_CAPACITY_BYTES`]; see [`ClientHello::alpn_truncated`]).
    pub fn alpn(&self) -> AlpnIter<'_> {
        AlpnIter {
            rest: &self.alpn[..self.alpn_len],
        }
    }

    /// True when the client offered more ALPN names than were kept.
    pub fn alpn_truncated(&self) -> bool {
        self.alpn_truncated
    }
}

/// Iterator over kept ALPN protocol names.
#[derive(Debug, Clone)]
pub struct AlpnIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AlpnIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        let (name, rest) = rest.split_at_checked(usize::from(len))?;
        self.rest = rest;
        Some(name)
    }
}

/// The result of feeding bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per connection by value; boxing would allocate on the accept path"
)]
pub enum Progress {
    /// Valid so far; feed more bytes.
    NeedMore,
    /// The ClientHello is complete.
    Done {
        /// The extracted fields.
        hello: ClientHello,
        /// How many bytes of the LAST `feed` call belong to the hello's records up to the end
        /// of the ClientHello message (the rest, if any, was not looked at).
        used: usize,
    },
}

/// The field being read. Integer fields accumulate into `acc`; data fields are skipped or
/// collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    HandshakeType,
    HandshakeLen,
    LegacyVersion,
    Random,
    SessionIdLen,
    SessionId,
    CipherSuitesLen,
    CipherSuites,
    CompressionLen,
    Compression,
    ExtensionsLen,
    ExtType,
    ExtLen,
    ExtBody,
    SniListLen,
    SniType,
    SniNameLen,
    SniName,
    AlpnListLen,
    AlpnNameLen,
    AlpnName,
    Done,
}

impl Field {
    fn is_integer(self) -> bool {
        matches!(
            self,
            Field::HandshakeType
                | Field::HandshakeLen
                | Field::SessionIdLen
                | Field::CipherSuitesLen
                | Field::CompressionLen
                | Field::ExtensionsLen
                | Field::ExtType
                | Field::ExtLen
                | Field::SniListLen
                | Field::SniType
                | Field::SniNameLen
                | Field::AlpnListLen
                | Field::AlpnNameLen
        )
    }
}

/// Nesting levels whose remaining byte counts every consumed handshake byte decrements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Depth {
    /// Reading the 4-byte handshake header: no body level yet.
    Header,
    /// Inside the ClientHello body.
    Body,
    /// Inside the extensions block.
    Extensions,
    /// Inside one extension.
    Extension,
    /// Inside the SNI or ALPN list of an extension.
    List,
}

/// Incremental ClientHello parser; one per connection, under 1 KiB of state, no heap.
#[derive(Debug, Clone)]
pub struct ClientHelloParser {
    max_hello_bytes: usize,
    /// Raw bytes consumed so far (record headers included).
    consumed: usize,

    // Record layer.
    record_header: [u8; RECORD_HEADER_BYTES],
    record_header_len: usize,
    record_left: usize,
    first_record: bool,

    // Handshake layer.
    field: Field,
    /// Bytes still needed to complete `field`.
    need: usize,
    acc: u32,
    depth: Depth,
    body_left: usize,
    extensions_left: usize,
    extension_left: usize,
    list_left: usize,
    ext_type: u16,
    seen_sni: bool,
    seen_alpn: bool,
    keep_alpn_name: bool,

    sni: [u8; MAX_SNI_WIRE_BYTES],
    sni_len: usize,
    server_name: Option<HostName>,
    hello: ClientHello,
}

impl ClientHelloParser {
    /// A parser that refuses ClientHellos whose records exceed `max_hello_bytes` in total
    /// (clamped to [`MAX_HELLO_BYTES_LIMIT`]).
    pub fn new(max_hello_bytes: usize) -> ClientHelloParser {
        ClientHelloParser {
            max_hello_bytes: max_hello_bytes.min(MAX_HELLO_BYTES_LIMIT),
            consumed: 0,
            record_header: [0; RECORD_HEADER_BYTES],
            record_header_len: 0,
            record_left: 0,
            first_record: true,
            field: Field::HandshakeType,
            need: 1,
            acc: 0,
            depth: Depth::Header,
            body_left: 0,
            extensions_left: 0,
            extension_left: 0,
            list_left: 0,
            ext_type: 0,
            seen_sni: false,
            seen_alpn: false,
            keep_alpn_name: false,
            sni: [0; MAX_SNI_WIRE_BYTES],
            sni_len: 0,
            server_name: None,
            hello: ClientHello {
                server_name: None,
                ech_offered: false,
                alpn: [0; ALPN_CAPACITY_BYTES],
                alpn_len: 0,
                alpn_truncated: false,
            },
        }
    }

    /// Raw bytes consumed so far, record headers included.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Feeds the next bytes received (only the new ones).
    ///
    /// # Errors
    /// A [`HelloError`] as soon as the input can no longer be a routable ClientHello. After an
    /// error or after [`Progress::Done`] the parser must not be fed again.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Progress, HelloError> {
        let start_len = input.len();
        while !input.is_empty() {
            if self.record_left == 0 {
                let take = (RECORD_HEADER_BYTES - self.record_header_len).min(input.len());
                self.record_header[self.record_header_len..self.record_header_len + take]
                    .copy_from_slice(&input[..take]);
                self.record_header_len += take;
                self.account(take)?;
                input = &input[take..];
                if self.first_record && self.record_header_len >= 1 {
                    check_first_byte(self.record_header[0])?;
                }
                if self.record_header_len == RECORD_HEADER_BYTES {
                    self.record_left = self.open_record()?;
                    self.record_header_len = 0;
                    self.first_record = false;
                }
                continue;
            }
            let take = self.record_left.min(input.len());
            let used = self.handshake_bytes(&input[..take])?;
            self.record_left -= used;
            input = &input[used..];
            if self.field == Field::Done {
                self.hello.server_name = self.server_name;
                return Ok(Progress::Done {
                    hello: self.hello.clone(),
                    used: start_len - input.len(),
                });
            }
        }
        Ok(Progress::NeedMore)
    }

    fn account(&mut self, n: usize) -> Result<(), HelloError> {
        self.consumed += n;
        if self.consumed > self.max_hello_bytes {
            return Err(HelloError::TooLarge);
        }
        Ok(())
    }

    /// Checks a complete record header and returns its payload length.
    fn open_record(&self) -> Result<usize, HelloError> {
        let [content_type, major, minor, len_hi, len_lo] = self.record_header;
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(HelloError::UnexpectedRecordType(content_type));
        }
        if major != 3 || minor > 4 {
            return Err(HelloError::BadRecordVersion(u16::from_be_bytes([
                major, minor,
            ])));
        }
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 {
            return Err(HelloError::EmptyRecord);
        }
        if len > MAX_RECORD_PAYLOAD_BYTES {
            return Err(HelloError::RecordTooLong);
        }
        Ok(len)
    }

    /// Consumes handshake bytes (all inside one record); returns how many were used, which
    /// is fewer than offered only when the ClientHello ends inside `input`.
    fn handshake_bytes(&mut self, input: &[u8]) -> Result<usize, HelloError> {
        let mut pos = 0;
        while pos < input.len() && self.field != Field::Done {
            let take = self.need.min(input.len() - pos);
            let chunk = &input[pos..pos + take];
            if self.field.is_integer() {
                for &b in chunk {
                    self.acc = (self.acc << 8) | u32::from(b);
                }
            } else if self.field == Field::SniName {
                self.sni[self.sni_len..self.sni_len + take].copy_from_slice(chunk);
                self.sni_len += take;
            } else if self.field == Field::AlpnName && self.keep_alpn_name {
                let alpn = &mut self.hello.alpn;
                alpn[self.hello.alpn_len..self.hello.alpn_len + take].copy_from_slice(chunk);
                self.hello.alpn_len += take;
            }
            pos += take;
            self.account(take)?;
            self.consume_levels(take);
            self.need -= take;
            if self.need == 0 {
                let value = self.acc;
                self.acc = 0;
                self.complete_field(value)?;
            }
        }
        Ok(pos)
    }

    /// Subtracts `n` consumed bytes from every open level. `need` never exceeds the innermost
    /// level's remaining bytes (checked in `expect`), so none of these can underflow.
    fn consume_levels(&mut self, n: usize) {
        if self.depth >= Depth::Body {
            self.body_left -= n;
        }
        if self.depth >= Depth::Extensions {
            self.extensions_left -= n;
        }
        if self.depth >= Depth::Extension {
            self.extension_left -= n;
        }
        if self.depth >= Depth::List {
            self.list_left -= n;
        }
    }

    fn innermost_left(&self) -> usize {
        match self.depth {
            Depth::Header => usize::MAX,
            Depth::Body => self.body_left,
            Depth::Extensions => self.extensions_left,
            Depth::Extension => self.extension_left,
            Depth::List => self.list_left,
        }
    }

    /// Moves to `field`, which occupies `len` bytes of the innermost level.
    fn expect(&mut self, field: Field, len: usize, what: &'static str) -> Result<(), HelloError> {
        if len > self.innermost_left() {
            return Err(HelloError::Malformed(what));
        }
        self.field = field;
        self.need = len;
        if len == 0 {
            self.complete_field(0)?;
        }
        Ok(())
    }

    /// Acts on a completed field and picks the next one.
    fn complete_field(&mut self, value: u32) -> Result<(), HelloError> {
        let len = usize::try_from(value).map_err(|_| HelloError::Malformed("length"))?;
        match self.field {
            Field::HandshakeType => {
                let msg_type = u8::try_from(value).unwrap_or(u8::MAX);
                if msg_type != HANDSHAKE_CLIENT_HELLO {
                    return Err(HelloError::NotClientHello(msg_type));
                }
                self.expect(Field::HandshakeLen, 3, "handshake header")
            }
            Field::HandshakeLen => {
                // At least one record header and the handshake header precede the body.
                if RECORD_HEADER_BYTES + 4 + len > self.max_hello_bytes {
                    return Err(HelloError::TooLarge);
                }
                self.depth = Depth::Body;
                self.body_left = len;
                self.expect(Field::LegacyVersion, 2, "legacy_version")
            }
            Field::LegacyVersion => self.expect(Field::Random, 32, "random"),
            Field::Random => self.expect(Field::SessionIdLen, 1, "session id length"),
            Field::SessionIdLen => {
                if len > 32 {
                    return Err(HelloError::Malformed("session id longer than 32 bytes"));
                }
                self.expect(Field::SessionId, len, "session id")
            }
            Field::SessionId => self.expect(Field::CipherSuitesLen, 2, "cipher suites length"),
            Field::CipherSuitesLen => {
                if len < 2 || len % 2 != 0 {
                    return Err(HelloError::Malformed("cipher suites length"));
                }
                self.expect(Field::CipherSuites, len, "cipher suites")
            }
            Field::CipherSuites => self.expect(Field::CompressionLen, 1, "compression length"),
            Field::CompressionLen => {
                if len < 1 {
                    return Err(HelloError::Malformed("no compression methods"));
                }
                self.expect(Field::Compression, len, "compression methods")
            }
            Field::Compression => {
                if self.body_left == 0 {
                    // A ClientHello without extensions (TLS 1.2 and older allow it).
                    self.field = Field::Done;
                    Ok(())
                } else {
                    self.expect(Field::ExtensionsLen, 2, "extensions length")
                }
            }
            Field::ExtensionsLen => {
                if len != self.body_left {
                    return Err(HelloError::Malformed(
                        "extensions do not fill the ClientHello",
                    ));
                }
                self.depth = Depth::Extensions;
                self.extensions_left = len;
                self.next_extension()
            }
            Field::ExtType => {
                self.ext_type = u16::try_from(value).unwrap_or(u16::MAX);
                self.expect(Field::ExtLen, 2, "extension header")
            }
            Field::ExtLen => self.open_extension(len),
            Field::ExtBody => self.close_extension(),
            Field::SniListLen => {
                if len == 0 || len != self.extension_left {
                    return Err(HelloError::Malformed("server_name list length"));
                }
                self.depth = Depth::List;
                self.list_left = len;
                self.expect(Field::SniType, 1, "server name entry")
            }
            Field::SniType => {
                if self.server_name.is_some() {
                    return Err(HelloError::MultipleServerNames);
                }
                let name_type = u8::try_from(value).unwrap_or(u8::MAX);
                if name_type != NAME_TYPE_HOST_NAME {
                    return Err(HelloError::UnsupportedNameType(name_type));
                }
                self.expect(Field::SniNameLen, 2, "server name entry")
            }
            Field::SniNameLen => {
                if len > MAX_SNI_WIRE_BYTES {
                    return Err(HelloError::NameTooLong);
                }
                if len == 0 {
                    return Err(HelloError::InvalidName(NameError::Empty));
                }
                self.sni_len = 0;
                self.expect(Field::SniName, len, "server name")
            }
            Field::SniName => {
                let name = HostName::parse(&self.sni[..self.sni_len]).map_err(|e| match e {
                    NameError::IpLiteral => HelloError::IpLiteral,
                    NameError::TooLong => HelloError::NameTooLong,
                    other => HelloError::InvalidName(other),
                })?;
                self.server_name = Some(name);
                if self.list_left == 0 {
                    self.depth = Depth::Extension;
                    self.close_extension()
                } else {
                    self.expect(Field::SniType, 1, "server name entry")
                }
            }
            Field::AlpnListLen => {
                if len < 2 || len != self.extension_left {
                    return Err(HelloError::Malformed("ALPN list length"));
                }
                self.depth = Depth::List;
                self.list_left = len;
                self.expect(Field::AlpnNameLen, 1, "ALPN entry")
            }
            Field::AlpnNameLen => {
                if len == 0 {
                    return Err(HelloError::Malformed("empty ALPN protocol name"));
                }
                let hello = &mut self.hello;
                self.keep_alpn_name =
                    !hello.alpn_truncated && hello.alpn_len + 1 + len <= ALPN_CAPACITY_BYTES;
                if self.keep_alpn_name {
                    hello.alpn[hello.alpn_len] = u8::try_from(len).unwrap_or(u8::MAX);
                    hello.alpn_len += 1;
                } else {
                    hello.alpn_truncated = true;
                }
                self.expect(Field::AlpnName, len, "ALPN protocol name")
            }
            Field::AlpnName => {
                if self.list_left == 0 {
                    self.depth = Depth::Extension;
                    self.close_extension()
                } else {
                    self.expect(Field::AlpnNameLen, 1, "ALPN entry")
                }
            }
            Field::Done => Ok(()),
        }
    }

    fn next_extension(&mut self) -> Result<(), HelloError> {
        if self.extensions_left == 0 {
            // Extensions fill the body exactly (checked at ExtensionsLen), so the hello ends.
            self.field = Field::Done;
            Ok(())
        } else {
            self.expect(Field::ExtType, 2, "extension header")
        }
    }

    fn open_extension(&mut self, len: usize) -> Result<(), HelloError> {
        if len > self.extensions_left {
            return Err(HelloError::Malformed(
                "extension longer than the extensions block",
            ));
        }
        self.depth = Depth::Extension;
        self.extension_left = len;
        match self.ext_type {
            EXT_SERVER_NAME => {
                if self.seen_sni {
                    return Err(HelloError::DuplicateServerName);
                }
                self.seen_sni = true;
                self.expect(Field::SniListLen, 2, "server_name extension")
            }
            EXT_ALPN => {
                if self.seen_alpn {
                    return Err(HelloError::DuplicateExtension(EXT_ALPN));
                }
                self.seen_alpn = true;
                self.expect(Field::AlpnListLen, 2, "ALPN extension")
            }
            other => {
                if other == EXT_ECH {
                    if self.hello.ech_offered {
                        return Err(HelloError::DuplicateExtension(EXT_ECH));
                    }
                    self.hello.ech_offered = true;
                }
                self.expect(Field::ExtBody, len, "extension body")
            }
        }
    }

    fn close_extension(&mut self) -> Result<(), HelloError> {
        if self.extension_left != 0 {
            return Err(HelloError::Malformed("bytes left over in an extension"));
        }
        self.depth = Depth::Extensions;
        self.next_extension()
    }
}

fn check_first_byte(b: u8) -> Result<(), HelloError> {
    match b {
        CONTENT_TYPE_HANDSHAKE => Ok(()),
        b'A'..=b'Z' => Err(HelloError::PlainHttp),
        _ => Err(HelloError::NotTls),
    }
}

/// Parses a whole buffer in one call (convenience for tests and tools).
///
/// # Errors
/// As [`ClientHelloParser::feed`]; an incomplete hello is `Ok(None)`.
pub fn parse_client_hello(
    bytes: &[u8],
    max_hello_bytes: usize,
) -> Result<Option<ClientHello>, HelloError> {
    match ClientHelloParser::new(max_hello_bytes).feed(bytes)? {
        Progress::NeedMore => Ok(None),
        Progress::Done { hello, .. } => Ok(Some(hello)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal ClientHello body with the given extensions.
    fn hello_with_extensions(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x11; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        let mut ext_block = Vec::new();
        for (t, data) in exts {
            ext_block.extend_from_slice(&t.to_be_bytes());
            ext_block.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
            ext_block.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(ext_block.len()).expect("len").to_be_bytes());
        body.extend_from_slice(&ext_block);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&u16::try_from(hs.len()).expect("len").to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&u16::try_from(n.len()).expect("len").to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        (0, data)
    }

    fn parse(bytes: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        parse_client_hello(bytes, DEFAULT_MAX_HELLO_BYTES)
    }

    #[test]
    fn minimal_hello_with_sni() {
        let h = parse(&hello_with_extensions(&[sni_ext(&[(
            0,
            b"Demo.Example.COM.",
        )])]))
        .expect("valid")
        .expect("complete");
        assert_eq!(
            h.server_name.map(|n| n.to_string()),
            Some("demo.example.com".into())
        );
        assert!(!h.ech_offered);
        assert_eq!(h.alpn().count(), 0);
    }

    #[test]
    fn alpn_and_ech() {
        let alpn = (
            0x10,
            vec![
                0x00, 0x0c, 0x02, b'h', b'2', 0x08, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1',
            ],
        );
        let h = parse(&hello_with_extensions(&[alpn, (0xfe0d, vec![1, 2, 3])]))
            .expect("valid")
            .expect("complete");
        assert_eq!(h.server_name, None);
        assert!(h.ech_offered);
        assert_eq!(
            h.alpn().collect::<Vec<_>>(),
            vec![&b"h2"[..], &b"http/1.1"[..]]
        );
        assert!(!h.alpn_truncated());
    }

    #[test]
    fn alpn_overflow_is_flagged_not_lost_silently() {
        let mut list = Vec::new();
        for _ in 0..10 {
            list.push(40);
            list.extend_from_slice(&[b'x'; 40]);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        let h = parse(&hello_with_extensions(&[(0x10, data)]))
            .expect("valid")
            .expect("complete");
        assert_eq!(h.alpn().count(), 6);
        assert!(h.alpn_truncated());
    }

    #[test]
    fn sni_rejections() {
        let long = vec![b'a'; 255];
        type Extensions = Vec<(u16, Vec<u8>)>;
        let cases: Vec<(Extensions, HelloError)> = vec![
            (
                vec![sni_ext(&[(0, b"a.com"), (0, b"b.com")])],
                HelloError::MultipleServerNames,
            ),
            (
                vec![sni_ext(&[(0, b"a.com")]), sni_ext(&[(0, b"a.com")])],
                HelloError::DuplicateServerName,
            ),
            (
                vec![sni_ext(&[(1, b"a.com")])],
                HelloError::UnsupportedNameType(1),
            ),
            (vec![sni_ext(&[(0, b"10.0.0.1")])], HelloError::IpLiteral),
            (vec![sni_ext(&[(0, b"::1")])], HelloError::IpLiteral),
            (vec![sni_ext(&[(0, &long)])], HelloError::NameTooLong),
            (
                vec![sni_ext(&[(0, b"")])],
                HelloError::InvalidName(NameError::Empty),
            ),
            (
                vec![sni_ext(&[(0, b"a..com")])],
                HelloError::InvalidName(NameError::EmptyLabel),
            ),
            (
                vec![sni_ext(&[(0, b"a_b.com")])],
                HelloError::InvalidName(NameError::InvalidCharacter),
            ),
            (
                vec![(0, vec![0, 0])],
                HelloError::Malformed("server_name list length"),
            ),
            (
                vec![(0, vec![])],
                HelloError::Malformed("server_name extension"),
            ),
            (
                vec![(0x10, vec![0, 2, 0, 0]), (0x10, vec![0, 2, 1, b'x'])],
                HelloError::Malformed("empty ALPN protocol name"),
            ),
            (
                vec![(0x10, vec![0, 2, 1, b'x']), (0x10, vec![0, 2, 1, b'x'])],
                HelloError::DuplicateExtension(0x10),
            ),
            (
                vec![(0xfe0d, vec![]), (0xfe0d, vec![])],
                HelloError::DuplicateExtension(0xfe0d),
            ),
        ];
        for (exts, want) in cases {
            assert_eq!(parse(&hello_with_extensions(&exts)), Err(want), "{want:?}");
        }
    }

    #[test]
    fn record_layer_rejections() {
        let good = hello_with_extensions(&[sni_ext(&[(0, b"a.com")])]);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::PlainHttp));
        assert_eq!(parse(b"\x80\x2e\x01"), Err(HelloError::NotTls));
        assert_eq!(parse(b"\x15\x03\x03\x00\x02"), Err(HelloError::NotTls));
        assert_eq!(
            parse(b"\x16\x02\x00\x00\x10"),
            Err(HelloError::BadRecordVersion(0x0200))
        );
        assert_eq!(
            parse(b"\x16\x03\x05\x00\x10"),
            Err(HelloError::BadRecordVersion(0x0305))
        );
        assert_eq!(parse(b"\x16\x03\x01\x00\x00"), Err(HelloError::EmptyRecord));
        assert_eq!(
            parse(b"\x16\x03\x01\x40\x01"),
            Err(HelloError::RecordTooLong)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Err(HelloError::NotClientHello(2))
        );

        // A handshake message continued in an alert record.
        let mut split = good[..10].to_vec();
        split[3..5].copy_from_slice(&5u16.to_be_bytes());
        split.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
        assert_eq!(parse(&split), Err(HelloError::UnexpectedRecordType(0x15)));
    }

    #[test]
    fn size_cap_applies_to_raw_bytes_and_to_the_declared_length() {
        let good = hello_with_extensions(&[sni_ext(&[(0, b"a.com")]), (0x1234, vec![0; 500])]);
        assert!(
            parse_client_hello(&good, good.len())
                .expect("fits")
                .is_some()
        );
        assert_eq!(
            parse_client_hello(&good, good.len() - 1),
            Err(HelloError::TooLarge)
        );
        // The declared length alone refuses a hello that could never fit, before its bytes.
        assert_eq!(
            parse_client_hello(&good[..10], good.len() - 1),
            Err(HelloError::TooLarge)
        );
    }

    #[test]
    fn structural_rejections() {
        let good = hello_with_extensions(&[sni_ext(&[(0, b"a.com")])]);
        // Handshake length larger than the body actually framed by the extensions.
        let mut longer = good.clone();
        longer[8] += 1;
        longer[4] += 1;
        longer.push(0);
        assert_eq!(
            parse(&longer),
            Err(HelloError::Malformed(
                "extensions do not fill the ClientHello"
            ))
        );
        // Session id longer than 32.
        let mut sid = good.clone();
        sid[9 + 2 + 32] = 33;
        assert_eq!(
            parse(&sid),
            Err(HelloError::Malformed("session id longer than 32 bytes"))
        );
        // Odd cipher suite length.
        let mut cs = good.clone();
        cs[9 + 2 + 32 + 1 + 1] = 3;
        assert_eq!(
            parse(&cs),
            Err(HelloError::Malformed("cipher suites length"))
        );
    }

    #[test]
    fn hello_without_extensions_completes() {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
        let mut rec = vec![
            0x16,
            0x03,
            0x01,
            0,
            u8::try_from(body.len() + 4).expect("len"),
            1,
            0,
            0,
        ];
        rec.push(u8::try_from(body.len()).expect("len"));
        rec.extend_from_slice(&body);
        let h = parse(&rec).expect("valid").expect("complete");
        assert_eq!(h.server_name, None);
    }

    #[test]
    fn done_reports_bytes_used_and_ignores_what_follows() {
        let good = hello_with_extensions(&[sni_ext(&[(0, b"a.com")])]);
        let mut with_tail = good.clone();
        with_tail.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        let mut p = ClientHelloParser::new(DEFAULT_MAX_HELLO_BYTES);
        match p.feed(&with_tail) {
            Ok(Progress::Done { used, .. }) => assert_eq!(used, good.len()),
            other => panic!("{other:?}"),
        }
    }
}
