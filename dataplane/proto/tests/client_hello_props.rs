//! Property tests: the streaming ClientHello parser against a simple whole-buffer reference
//! parser, on generated hellos (valid and invalid names, duplicate and unknown extensions,
//! random record framing and random segmentation) and on randomly corrupted bytes.

mod common;

use outrelay_proto::client_hello::{ClientHelloParser, MAX_HELLO_BYTES_LIMIT, Progress};
use outrelay_proto::hostname::HostName;
use proptest::prelude::*;

/// What both parsers must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Incomplete,
    Invalid,
    Hello {
        sni: Option<String>,
        alpn: Vec<Vec<u8>>,
        ech: bool,
    },
}

// ---------------------------------------------------------------------------------------------
// The reference: de-frame records, then a plain recursive-descent parse of the whole message.
// Record errors are reported only when the message parse reaches the bytes behind them, which
// is the order in which a streaming reader meets them.

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Where the bytes stop because a record was invalid (rather than because input ended).
    broken_at: Option<usize>,
}

enum Stop {
    Incomplete,
    Invalid,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        if self.pos + n > self.buf.len() {
            return Err(if self.broken_at.is_some() {
                Stop::Invalid
            } else {
                Stop::Incomplete
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<usize, Stop> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, Stop> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn reference(raw: &[u8], cap: usize) -> Outcome {
    match raw.first() {
        None => return Outcome::Incomplete,
        Some(0x16) => {}
        Some(_) => return Outcome::Invalid,
    }
    // De-frame.
    let mut hs = Vec::new();
    let mut rest = raw;
    let mut broken = false;
    let mut record_ends = Vec::new(); // (handshake offset, raw offset) at each record end
    let mut raw_pos = 0;
    while !rest.is_empty() {
        if rest.len() < 5 {
            break;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest[0] != 0x16 || rest[1] != 3 || rest[2] > 4 || len == 0 || len > 1 << 14 {
            broken = true;
            break;
        }
        let avail = len.min(rest.len() - 5);
        hs.extend_from_slice(&rest[5..5 + avail]);
        raw_pos += 5 + avail;
        record_ends.push((hs.len(), raw_pos));
        rest = &rest[5 + avail..];
    }
    let mut c = Cursor {
        buf: &hs,
        pos: 0,
        broken_at: broken.then_some(hs.len()),
    };
    let parsed = parse_message(&mut c, cap);
    let end = c.pos;
    match parsed {
        Err(Stop::Incomplete) => Outcome::Incomplete,
        Err(Stop::Invalid) => Outcome::Invalid,
        Ok(hello) => {
            // Raw bytes up to the end of the message: headers of every record touched.
            let headers = 5 * (1 + record_ends.iter().filter(|(h, _)| *h < end).count());
            if end + headers > cap {
                Outcome::Invalid
            } else {
                hello
            }
        }
    }
}

fn parse_message(c: &mut Cursor<'_>, cap: usize) -> Result<Outcome, Stop> {
    if c.u8()? != 1 {
        return Err(Stop::Invalid);
    }
    let b = c.take(3)?;
    let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
    if 9 + len > cap {
        return Err(Stop::Invalid);
    }
    let start = c.pos;
    let body_end = start + len;
    let within = |c: &Cursor<'_>, n: usize, end: usize| c.pos + n <= end;
    macro_rules! need {
        ($n:expr, $end:expr) => {
            if !within(c, $n, $end) {
                return Err(Stop::Invalid);
            }
        };
    }
    need!(2 + 32 + 1, body_end);
    c.take(34)?;
    let sid = c.u8()?;
    if sid > 32 {
        return Err(Stop::Invalid);
    }
    need!(sid, body_end);
    c.take(sid)?;
    need!(2, body_end);
    let cs = c.u16()?;
    if cs < 2 || cs % 2 != 0 {
        return Err(Stop::Invalid);
    }
    need!(cs, body_end);
    c.take(cs)?;
    need!(1, body_end);
    let comp = c.u8()?;
    if comp < 1 {
        return Err(Stop::Invalid);
    }
    need!(comp, body_end);
    c.take(comp)?;
    let mut out = Outcome::Hello {
        sni: None,
        alpn: Vec::new(),
        ech: false,
    };
    if c.pos == body_end {
        return Ok(out);
    }
    need!(2, body_end);
    let exts_len = c.u16()?;
    if exts_len != body_end - c.pos {
        return Err(Stop::Invalid);
    }
    let (mut seen_sni, mut seen_alpn, mut seen_ech) = (false, false, false);
    let Outcome::Hello { sni, alpn, ech } = &mut out else {
        unreachable!()
    };
    while c.pos < body_end {
        need!(4, body_end);
        let ty = c.u16()?;
        let elen = c.u16()?;
        need!(elen, body_end);
        let ext_end = c.pos + elen;
        match ty {
            0 => {
                if seen_sni {
                    return Err(Stop::Invalid);
                }
                seen_sni = true;
                need!(2, ext_end);
                let list = c.u16()?;
                if list == 0 || list != ext_end - c.pos {
                    return Err(Stop::Invalid);
                }
                // Exactly one entry, host_name, valid name filling the list.
                need!(1, ext_end);
                if c.u8()? != 0 {
                    return Err(Stop::Invalid);
                }
                need!(2, ext_end);
                let n = c.u16()?;
                if n == 0 || n > 254 {
                    return Err(Stop::Invalid);
                }
                need!(n, ext_end);
                let name = c.take(n)?;
                let host = HostName::parse(name).map_err(|_| Stop::Invalid)?;
                if c.pos != ext_end {
                    // A second entry: refused once its first byte (the type) arrives.
                    c.take(1)?;
                    return Err(Stop::Invalid);
                }
                *sni = Some(host.to_string());
            }
            0x10 => {
                if seen_alpn {
                    return Err(Stop::Invalid);
                }
                seen_alpn = true;
                need!(2, ext_end);
                let list = c.u16()?;
                if list < 2 || list != ext_end - c.pos {
                    return Err(Stop::Invalid);
                }
                let mut used = 0;
                while c.pos < ext_end {
                    let n = c.u8()?;
                    if n == 0 {
                        return Err(Stop::Invalid);
                    }
                    need!(n, ext_end);
                    let name = c.take(n)?;
                    if used != usize::MAX && used + 1 + n <= 256 {
                        alpn.push(name.to_vec());
                        used += 1 + n;
                    } else {
                        used = usize::MAX;
                    }
                }
            }
            other => {
                if other == 0xfe0d {
                    if seen_ech {
                        return Err(Stop::Invalid);
                    }
                    seen_ech = true;
                    *ech = true;
                }
                c.take(elen)?;
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The parser under test, fed in the given chunk sizes.

fn streaming(raw: &[u8], cap: usize, chunks: &[usize]) -> Outcome {
    let mut p = ClientHelloParser::new(cap);
    let mut rest = raw;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        match p.feed(&rest[..n]) {
            Err(_) => return Outcome::Invalid,
            Ok(Progress::NeedMore) => {}
            Ok(Progress::Done { hello, .. }) => {
                return Outcome::Hello {
                    sni: hello.server_name.map(|h| h.to_string()),
                    alpn: hello.alpn().map(<[u8]>::to_vec).collect(),
                    ech: hello.ech_offered,
                };
            }
        }
        rest = &rest[n..];
    }
    Outcome::Incomplete
}

// ---------------------------------------------------------------------------------------------
// Generators.

#[derive(Debug, Clone)]
enum Ext {
    Sni(Vec<(u8, Vec<u8>)>),
    Alpn(Vec<Vec<u8>>),
    Ech(Vec<u8>),
    Other(u16, Vec<u8>),
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?",
        Just("xn--bcher-kva".to_owned()),
        Just("127".to_owned()),
        Just("a_b".to_owned()),
        Just("-bad".to_owned()),
        Just(String::new()),
    ]
}

fn host_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (prop::collection::vec(label(), 1..5), any::<bool>()).prop_map(|(labels, dot)| {
            let mut s = labels.join(".");
            if dot {
                s.push('.');
            }
            s.into_bytes()
        }),
        1 => Just(b"10.1.2.3".to_vec()),
        1 => Just(b"::1".to_vec()),
        1 => Just(vec![b'a'; 254]),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ]
}

fn ext() -> impl Strategy<Value = Ext> {
    prop_oneof![
        3 => prop::collection::vec((prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => any::<u8>()], host_name()), 1..3)
            .prop_map(Ext::Sni),
        2 => prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 1..10).prop_map(Ext::Alpn),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Ext::Ech),
        3 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..600))
            .prop_filter("not a parsed type", |(t, _)| ![0, 0x10, 0xfe0d].contains(t))
            .prop_map(|(t, d)| Ext::Other(t, d)),
    ]
}

fn u16be(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("fits u16").to_be_bytes()
}

fn encode_hello(sid: usize, suites: usize, exts: &[Ext], no_ext_block: bool) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0xaa; 32]);
    body.push(u8::try_from(sid).expect("sid"));
    body.extend_from_slice(&vec![0x55; sid]);
    body.extend_from_slice(&u16be(2 * suites));
    body.extend_from_slice(&vec![0x13; 2 * suites]);
    body.extend_from_slice(&[1, 0]);
    if !no_ext_block {
        let mut block = Vec::new();
        for e in exts {
            let (ty, data) = match e {
                Ext::Sni(names) => {
                    let mut list = Vec::new();
                    for (t, n) in names {
                        list.push(*t);
                        list.extend_from_slice(&u16be(n.len()));
                        list.extend_from_slice(n);
                    }
                    let mut d = u16be(list.len()).to_vec();
                    d.extend_from_slice(&list);
                    (0, d)
                }
                Ext::Alpn(protos) => {
                    let mut list = Vec::new();
                    for p in protos {
                        list.push(u8::try_from(p.len()).expect("alpn"));
                        list.extend_from_slice(p);
                    }
                    let mut d = u16be(list.len()).to_vec();
                    d.extend_from_slice(&list);
                    (0x10, d)
                }
                Ext::Ech(d) => (0xfe0d, d.clone()),
                Ext::Other(t, d) => (*t, d.clone()),
            };
            block.extend_from_slice(&ty.to_be_bytes());
            block.extend_from_slice(&u16be(data.len()));
            block.extend_from_slice(&data);
        }
        body.extend_from_slice(&u16be(block.len()));
        body.extend_from_slice(&block);
    }
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    hs
}

fn hello_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![9 => 0usize..=32, 1 => 33usize..=40],
        1usize..40,
        prop::collection::vec(ext(), 0..8),
        prop::bool::weighted(0.05),
        prop::collection::vec(1usize..2000, 0..6),
    )
        .prop_map(|(sid, suites, exts, no_block, records)| {
            let hs = encode_hello(sid, suites, &exts, no_block && exts.is_empty());
            common::reframe(&hs, [3, 1], &records)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Generated hellos: same outcome as the reference however they are segmented.
    #[test]
    fn agrees_with_reference(raw in hello_bytes(), chunks in prop::collection::vec(1usize..300, 1..8)) {
        let want = reference(&raw, MAX_HELLO_BYTES_LIMIT);
        prop_assert_ne!(&want, &Outcome::Incomplete, "generated hellos are complete");
        prop_assert_eq!(streaming(&raw, MAX_HELLO_BYTES_LIMIT, &chunks), want.clone());
        prop_assert_eq!(streaming(&raw, MAX_HELLO_BYTES_LIMIT, &[1]), want);
    }

    /// Corrupted bytes and truncations: same outcome as the reference, never a panic.
    #[test]
    fn agrees_on_corrupted_input(
        raw in hello_bytes(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), -2i8..=2, any::<u8>(), any::<bool>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        chunks in prop::collection::vec(1usize..64, 1..4),
    ) {
        let mut raw = raw;
        for (at, delta, byte, nudge) in flips {
            let i = at.index(raw.len());
            // Nudging a byte by ±2 hits length and type boundaries far more often than a
            // random byte does.
            raw[i] = if nudge { raw[i].wrapping_add_signed(delta) } else { byte };
        }
        if truncate {
            raw.truncate(cut.index(raw.len() + 1));
        }
        let want = reference(&raw, MAX_HELLO_BYTES_LIMIT);
        prop_assert_eq!(streaming(&raw, MAX_HELLO_BYTES_LIMIT, &chunks), want);
    }

    /// Caps: a hello is admitted exactly when its raw bytes fit.
    #[test]
    fn cap_is_exact(raw in hello_bytes(), slack in 0usize..3) {
        if let Outcome::Hello { .. } = reference(&raw, MAX_HELLO_BYTES_LIMIT) {
            let cap = raw.len().saturating_sub(slack);
            let got = streaming(&raw, cap, &[97]);
            prop_assert_eq!(matches!(got, Outcome::Hello { .. }), slack == 0, "cap {} len {}", cap, raw.len());
        }
    }
}
