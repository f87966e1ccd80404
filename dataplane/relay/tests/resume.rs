//! Issue 19 part 2, relay side, against the REAL relay binary: `[resume]` read from the config
//! file, two agents' STREAM_RESUME halves joined, a lonely half expired, and every outcome in
//! `/metrics`. (The protocol cases, one by one, are in `quic.rs`.)

mod common;

use common::*;
use outrelay_proto::frame::Frame;
use outrelay_proto::orp;

/// A tenant-`a` agent identity numbered `n`.
fn uri(n: u8) -> String {
    format!("outrelay://a/agent/00000000-0000-4000-8000-0000000000{n:02x}")
}

fn resume_total(result: &str) -> String {
    format!("outrelay_relay_resume_total{{result=\"{result}\"}}")
}

fn resume_frame(id: u64, my: u64, ack: u64, peer: &str, consumer: bool) -> Vec<u8> {
    Frame::StreamResume(orp::StreamResume {
        stream_id: id,
        my_position: my,
        peer_ack_position: ack,
        peer_agent_uri: peer.to_owned(),
        target_service: "db".to_owned(),
        method: "query".to_owned(),
        consumer,
    })
    .to_vec()
    .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_binary_resumes_a_pair_expires_a_lonely_half_and_counts_both() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: "[resume]\npark_timeout_ms = 400\nmax_parked_per_agent = 4\n\
                     [[policy]]\ntenant = \"a\"\ncaller = \"*\"\ntarget = \"db\"\ndecision = \"allow\"\n"
                .to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let consumer = Agent::connect_as(&relay, &ca, &uri(1)).await;
    let provider = Agent::connect_as(&relay, &ca, &uri(2)).await;

    // Consumer sent 1000 and got 700; provider sent 800 and got 600: the consumer is resent
    // 800 - 700 = 100 bytes, the provider 1000 - 600 = 400.
    let (mut c_send, mut c_recv, wrote) = consumer
        .open_raw(&resume_frame(4242, 1000, 700, &uri(2), true))
        .await;
    wrote.expect("consumer half written");
    let (mut p_send, mut p_recv, wrote) = provider
        .open_raw(&resume_frame(4242, 800, 600, &uri(1), false))
        .await;
    wrote.expect("provider half written");
    for (recv, peer, my) in [(&mut c_recv, uri(2), 800), (&mut p_recv, uri(1), 1000)] {
        match read_one(recv).await {
            Frame::StreamResume(r) => {
                assert_eq!((r.peer_agent_uri, r.my_position), (peer, my))
            }
            other => panic!("expected the peer's STREAM_RESUME, got {other:?}"),
        }
    }
    c_send.write_all(b"resent from 700").await.expect("write");
    let mut got = [0u8; 15];
    p_recv.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"resent from 700");
    p_send.write_all(b"resent from 600").await.expect("write");
    c_recv.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"resent from 600");

    // A half whose peer never comes: 404 once the configured 400 ms are over.
    let lonely = Agent::connect_as(&relay, &ca, &uri(3)).await;
    let (_s, mut r, _) = lonely
        .open_raw(&resume_frame(77, 0, 0, &uri(1), true))
        .await;
    match read_one(&mut r).await {
        Frame::StreamReject(rej) => assert_eq!(
            (rej.code, rej.reason.as_str()),
            (404, "resume window of 400 ms expired without the peer")
        ),
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }

    let body = relay.scrape().await;
    assert_eq!(sample(&body, &resume_total("resumed")), 1.0, "{body}");
    assert_eq!(sample(&body, &resume_total("expired")), 1.0);
    assert_eq!(sample(&body, &resume_total("refused_mismatch")), 0.0);
    assert_eq!(
        sample(&body, "outrelay_relay_resume_bytes_retransmitted_total"),
        500.0
    );
    assert!(body.contains("outrelay_relay_resume_parked 0"), "{body}");
    assert!(
        body.contains("# HELP outrelay_relay_resume_total"),
        "described: {body}"
    );
}
