//! Issue 22, item 1: agents on several relays (`ha_connections`). Real processes: a controller,
//! three relays following it and agents, all from `target/release/` (build first: `cargo build
//! --release -p outrelay-controller -p outrelay-relay -p outrelay-agent -p outrelay`).
//!
//! - three relays, `ha_connections = 2`: exactly two held; a TLS passthrough lease and a TCP
//!   lease answer through each; `kill -9` of one: clients retrying over the relay list are
//!   served by the survivor, the agent takes the third relay and serves there too;
//! - a `host:port` name as the relay entry (the resolution path);
//! - MEASURED: new service streams after a relay dies (median of 10).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::world::*;
use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bound on the agent holding a replacement relay after one died.
const REPLACE_BOUND: Duration = Duration::from_secs(15);
/// Bound on one client call (connect, answer).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// The TLS lease's name and the certificate names its target serves.
const TLS_LEASE: &str = "web";
const TLS_NAMES: [&str; 2] = ["web.relay.mesh.test", "web.mesh.test"];

/// A TCP echo server.
async fn echo_target() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// A TLS server for [`TLS_NAMES`] that answers each connection's first line with `tls ok\n`.
async fn tls_target(ca: &common::Ca) -> (SocketAddr, JoinHandle<()>) {
    let leaf = ca.leaf(
        TLS_NAMES[0],
        &TLS_NAMES,
        None,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind tls");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut b = [0u8; 64];
                if matches!(tls.read(&mut b).await, Ok(n) if n > 0) {
                    let _ = tls.write_all(b"tls ok\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// One TLS round trip to `public_tls` with SNI `host`.
async fn tls_call(ca_pem: &str, public_tls: SocketAddr, host: &str) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let attempt = async {
        let tcp = TcpStream::connect(public_tls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"hello\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        if out == b"tls ok\n" {
            Ok(())
        } else {
            Err(format!("answer {:?}", String::from_utf8_lossy(&out)))
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// One echo round trip through a public TCP lease port.
async fn tcp_call(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut c = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"ha ping")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut b = [0u8; 7];
        c.read_exact(&mut b)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if &b == b"ha ping" {
            Ok(())
        } else {
            Err("wrong echo".into())
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// A relay of the test: its QUIC and public TLS addresses, its identity.
struct Relay {
    /// `None` for the world's own relay (`World::relay`).
    proc: Option<Proc>,
    quic: SocketAddr,
    public_tls: SocketAddr,
    id: String,
}

/// The connected relays in the agent's `/status` (`addr` → `relay_id`).
fn held(agent: &Agent) -> Vec<(String, String)> {
    let st = World::agent_status(agent);
    st["relays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["connected"] == true)
        .map(|r| {
            (
                r["addr"].as_str().unwrap_or_default().to_owned(),
                r["relay_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The ready file's per-relay lease `name`'s `key` port for the relay at QUIC `quic`.
fn lease_port_on(
    ready: &serde_json::Value,
    quic: SocketAddr,
    name: &str,
    key: &str,
) -> Option<u16> {
    ready["relays"]
        .as_array()?
        .iter()
        .find(|r| r["addr"] == quic.to_string())?["leases"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)?[key]
        .as_str()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

fn hostname_on(ready: &serde_json::Value, quic: SocketAddr) -> Option<String> {
    ready["relays"]
        .as_array()?
        .iter()
        .find(|r| r["addr"] == quic.to_string())?["leases"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == TLS_LEASE)?["hostname"]
        .as_str()
        .map(str::to_owned)
}

/// Reads the agent's ready file again until it lists exactly `quics`.
async fn ready_on(agent: &Agent, quics: &BTreeSet<String>) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&agent.ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let listed: BTreeSet<String> = v["relays"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["addr"].as_str().map(str::to_owned))
                .collect();
            if &listed == quics {
                return v;
            }
        }
        assert!(
            start.elapsed() < REPLACE_BOUND,
            "the ready file never listed {quics:?}: {:?}",
            std::fs::read_to_string(&agent.ready)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Both leases answer through relay `r` (TLS by SNI on its public TLS port, TCP on the lease
/// port the ready file names for it); retried briefly while the relay's lease settles.
async fn leases_answer_through(ca_pem: &str, ready: &serde_json::Value, r: &Relay) {
    let tcp = lease_port_on(ready, r.quic, "echo", "tcp_addr")
        .unwrap_or_else(|| panic!("TCP lease port on {} in {ready}", r.quic));
    let host = hostname_on(ready, r.quic).unwrap_or_else(|| panic!("hostname in {ready}"));
    assert!(
        TLS_NAMES.contains(&host.as_str()),
        "granted hostname {host} is not one the target's certificate names"
    );
    let start = Instant::now();
    loop {
        let t = tls_call(ca_pem, r.public_tls, &host).await;
        let e = tcp_call(SocketAddr::from(([127, 0, 0, 1], tcp))).await;
        if t.is_ok() && e.is_ok() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "leases through {} ({}): tls {t:?}, tcp {e:?}",
            r.quic,
            r.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 22 "Tests" (HA): three relays, `ha_connections = 2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_relays_are_held_and_a_killed_one_is_replaced_by_the_third() {
    // One lease-port range per relay (they share 127.0.0.1).
    let (lo, hi) = outrelay_testkit::claim_port_ranges(3);
    let per = (hi - lo + 1) / 3;
    let leases_cfg = |i: u16| {
        format!(
            "[leases]\ntcp = true\nmin_port = {}\nmax_port = {}\n[ingress]\nclaim_timeout_ms = 5000\n",
            lo + i * per,
            lo + i * per + per - 1
        )
    };
    let first = leases_cfg(0);
    let mut w = World::start_with(None, &first).await;
    let info1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.path().join("relay-ready.json")).expect("relay ready file"),
    )
    .expect("relay ready JSON");
    let mut relays = vec![Relay {
        proc: None,
        quic: w.quic,
        public_tls: addr_in(&info1, "public_tls"),
        id: RELAY.to_owned(),
    }];
    for (i, name) in [(1u16, "relay2"), (2, "relay3")] {
        let id = format!("relay-{}", i + 1);
        let tail = w.relay_tail.replace(&first, &leases_cfg(i));
        let (proc, info) = w.relay_with_tail(name, &id, "127.0.0.1:0", &tail).await;
        relays.push(Relay {
            proc: Some(proc),
            quic: addr_in(&info, "quic"),
            public_tls: addr_in(&info, "public_tls"),
            id: format!("outrelay://dev/relay/{id}"),
        });
    }
    let ca_pem = std::fs::read_to_string(w.path().join("ca.pem")).expect("ca.pem");
    let (tls_to, _t1) = tls_target(&w.ca).await;
    let (tcp_to, _t2) = echo_target().await;
    let list: Vec<String> = relays.iter().map(|r| r.quic.to_string()).collect();
    let mut agent = w.agent_ha(
        "ha",
        PROVIDER_A,
        &list,
        "ha_connections = 2",
        &format!(
            "[[lease]]\nname = \"{TLS_LEASE}\"\ntls_to = \"{tls_to}\"\n\
             [[lease]]\nname = \"echo\"\ntcp_to = \"{tcp_to}\"\n"
        ),
    );
    agent.ready().await;
    assert!(
        poll(WAIT, || held(&agent).len() == 2).await,
        "the agent never held two relays: {}",
        World::agent_status(&agent)
    );
    // Still exactly two a moment later (never a third).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = held(&agent);
    assert_eq!(before.len(), 2, "{before:?}");
    let held_quics: BTreeSet<String> = before.iter().map(|(a, _)| a.clone()).collect();
    let ready = ready_on(&agent, &held_quics).await;
    let idx = |quic: &str| {
        relays
            .iter()
            .position(|r| r.quic.to_string() == quic)
            .expect("known")
    };
    for (addr, id) in &before {
        let r = &relays[idx(addr)];
        assert_eq!(id, &r.id, "relay id from the certificate");
        leases_answer_through(&ca_pem, &ready, r).await;
    }
    let st = World::agent_status(&agent);
    assert_eq!(st["candidates"].as_array().map(Vec::len), Some(3), "{st}");
    eprintln!("status before: {}", st["candidates"]);

    // kill -9 the first held relay (slot order).
    let victim = idx(&before[0].0);
    let survivor = idx(&before[1].0);
    let third = (0..3)
        .find(|i| *i != victim && *i != survivor)
        .expect("third");
    let tcp_ports: Vec<(usize, u16)> = [victim, survivor]
        .iter()
        .map(|&i| {
            (
                i,
                lease_port_on(&ready, relays[i].quic, "echo", "tcp_addr").expect("port"),
            )
        })
        .collect();
    let host = hostname_on(&ready, relays[survivor].quic).expect("hostname");
    match relays[victim].proc.as_mut() {
        Some(p) => p.kill9(),
        None => w.relay.kill9(),
    }
    let killed = Instant::now();
    // Clients retry over the relay list (as DNS would): the survivor serves them.
    let mut served = None;
    'retry: while killed.elapsed() < Duration::from_secs(10) {
        for &(i, port) in &tcp_ports {
            let tls = tls_call(&ca_pem, relays[i].public_tls, &host).await;
            let tcp = tcp_call(SocketAddr::from(([127, 0, 0, 1], port))).await;
            if tls.is_ok() && tcp.is_ok() {
                served = Some((i, killed.elapsed()));
                break 'retry;
            }
        }
    }
    let (via, after) = served.expect("no client served through the relay list after the kill");
    assert_eq!(via, survivor, "served by the survivor");
    eprintln!("MEASURED clients served through the survivor {after:?} after kill -9");

    // The agent takes the third relay.
    let want: BTreeSet<String> = [relays[survivor].quic, relays[third].quic]
        .iter()
        .map(ToString::to_string)
        .collect();
    let replaced = poll(REPLACE_BOUND, || {
        held(&agent)
            .iter()
            .map(|(a, _)| a.clone())
            .collect::<BTreeSet<_>>()
            == want
    })
    .await;
    assert!(
        replaced,
        "not on {want:?} within {REPLACE_BOUND:?}: {}",
        World::agent_status(&agent)
    );
    eprintln!(
        "MEASURED third relay held {:?} after kill -9",
        killed.elapsed()
    );
    let ready = ready_on(&agent, &want).await;
    leases_answer_through(&ca_pem, &ready, &relays[third]).await;
    leases_answer_through(&ca_pem, &ready, &relays[survivor]).await;
    let st = World::agent_status(&agent);
    let victim_quic = relays[victim].quic.to_string();
    let cand = st["candidates"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["addr"] == victim_quic.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("the killed relay is still a candidate: {st}"));
    assert_ne!(cand["state"], "held", "{cand}");
    let ids: BTreeSet<String> = held(&agent).into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        ids,
        [relays[survivor].id.clone(), relays[third].id.clone()]
            .into_iter()
            .collect::<BTreeSet<_>>()
    );
    let text = agent.scrape();
    assert_eq!(metric(&text, "outrelay_agent_relays_held", &[]), 2.0);
    assert!(metric(&text, "outrelay_agent_relay_replacements_total", &[]) >= 1.0);
    assert_eq!(
        metric(
            &text,
            "outrelay_agent_relay_candidates",
            &[("state", "held")]
        ),
        2.0
    );
    // `outrelay-agent status` prints the held set and the standby candidate.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
        .args(["status", "--metrics"])
        .arg(addr_in(&agent.info, "metrics").to_string())
        .output()
        .expect("outrelay-agent status");
    let printed = String::from_utf8_lossy(&out.stdout);
    eprintln!("{printed}");
    assert!(printed.contains(&relays[third].id), "{printed}");
    assert!(
        printed.contains(&format!("candidate {victim_quic}")),
        "{printed}"
    );
}

/// A `host:port` name as the only relay entry: resolved, held once (two slots, one relay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_named_by_dns_is_resolved_and_held_once() {
    let w = World::new().await;
    let (target, _t) = http_target().await;
    let name = format!("localhost:{}", w.quic.port());
    let mut agent = w.agent_ha(
        "dns",
        PROVIDER_A,
        std::slice::from_ref(&name),
        "ha_connections = 2",
        &provide("web", target),
    );
    agent.ready().await;
    let st = World::agent_status(&agent);
    let connected: Vec<&serde_json::Value> = st["relays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["connected"] == true)
        .collect();
    assert_eq!(connected.len(), 1, "one relay behind the name: {st}");
    assert_eq!(connected[0]["name"], name.as_str(), "{st}");
    assert_eq!(connected[0]["addr"], w.quic.to_string(), "{st}");
    assert_eq!(connected[0]["relay_id"], RELAY, "{st}");
    assert_eq!(connected[0]["transport"], "quic", "{st}");
    let cands = st["candidates"].as_array().expect("candidates");
    assert!(
        cands
            .iter()
            .any(|c| c["name"] == name.as_str() && c["state"] == "held"),
        "{st}"
    );
    // The second slot finds nothing else to hold, and never holds the same relay twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(held(&agent).len(), 1);
    assert_eq!(agent.info["relays"].as_array().map(Vec::len), Some(1));
}

/// Issue 22 "Measure": time for NEW service streams to succeed after the relay a consumer uses
/// is killed (-9), median of 10; the relay comes back on its QUIC port between rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_new_streams_after_relay_death() {
    let mut w = World::new().await;
    let (p2, info2) = w.extra_relay("relay2", "relay-2", "").await;
    let quic2 = addr_in(&info2, "quic");
    // `None`: the world's own relay process.
    let mut procs: [Option<Proc>; 2] = [None, Some(p2)];
    let quics = [w.quic, quic2];
    let list: Vec<String> = quics.iter().map(ToString::to_string).collect();
    w.rule(TENANT_A, CONSUMER_A, "web", "allow", None).await;
    let (target, _t) = http_target().await;
    let mut provider = w.agent_ha(
        "provider",
        PROVIDER_A,
        &list,
        "ha_connections = 2",
        &provide("web", target),
    );
    provider.ready().await;
    let mut consumer = w.agent_ha(
        "consumer",
        CONSUMER_A,
        &list,
        "ha_connections = 2",
        &consume("web"),
    );
    consumer.ready().await;
    let both = |a: &Agent| {
        let st = World::agent_status(a);
        st["relays"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["connected"] == true
                    && r["services"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .all(|s| s["state"] == "registered")
            })
            .count()
            == 2
    };
    let mut took = Vec::new();
    let started = Instant::now();
    for round in 0..10 {
        assert!(
            poll(WAIT, || both(&provider) && both(&consumer)).await,
            "round {round}: not on both relays"
        );
        eventually_ok(consumer.consumer(0), Instant::now(), "before the kill").await;
        // That call's stream has ended on the agent too (it counts toward its relay's load).
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The relay new streams use: with none running, the least loaded is the first in
        // config order (relay 1, back on its port after each round).
        let victim = 0;
        match procs[victim].as_mut() {
            Some(p) => p.kill9(),
            None => w.relay.kill9(),
        }
        let t0 = Instant::now();
        let ms = loop {
            if http_call(consumer.consumer(0)).await.is_ok() {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "round {round}: no new stream within 15 s"
            );
        };
        took.push(ms);
        // Back on the same QUIC port.
        let (name, id) = ("relay", "relay-1");
        let (p, _) = w
            .relay_with_tail(name, id, &quics[victim].to_string(), &w.relay_tail)
            .await;
        procs[victim] = Some(p);
    }
    took.sort();
    let ms = |d: Duration| d.as_millis();
    eprintln!(
        "MEASURED new_stream_after_relay_death_ms median={} min={} max={} (10 rounds in {:?})",
        ms(took[took.len() / 2]),
        ms(took[0]),
        ms(took[took.len() - 1]),
        started.elapsed()
    );
    assert!(
        took.iter().all(|d| *d < Duration::from_secs(15)),
        "{took:?}"
    );
    // The calls that waited for the dead relay were opened again on the survivor (counted).
    let reopened = World::agent_status(&consumer)["mesh"]["reopened"]
        .as_u64()
        .unwrap_or(0);
    eprintln!("MEASURED consumer opens made again on the other relay: {reopened}");
    assert!(
        took.iter().all(|d| *d < Duration::from_millis(500)) || reopened >= 1,
        "calls waited for the dead relay ({took:?}) but none was opened again elsewhere"
    );
}
