//! The ClientHello parser: fed whole and in the segment sizes the input's first byte picks,
//! both ways must agree (the parser's outcome may not depend on segmentation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::client_hello::{ClientHelloParser, MAX_HELLO_BYTES_LIMIT, Progress};

fn run(data: &[u8], chunk: usize) -> Option<Result<Option<String>, ()>> {
    let mut p = ClientHelloParser::new(MAX_HELLO_BYTES_LIMIT);
    for piece in data.chunks(chunk.max(1)) {
        match p.feed(piece) {
            Err(_) => return Some(Err(())),
            Ok(Progress::NeedMore) => {}
            Ok(Progress::Done { hello, .. }) => {
                return Some(Ok(hello.server_name.map(|n| n.to_string())));
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let whole = run(rest, rest.len());
    let split = run(rest, usize::from(first % 17) + 1);
    assert_eq!(whole, split);
});
