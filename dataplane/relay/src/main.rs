//! `outrelay-relay`: validate the config (exit 64 with one line), bind every listener, report
//! the bound addresses in `--ready-file` (then `READY=1`), then serve: SIGHUP reloads the
//! config and the certificate files, SIGTERM/SIGINT stops accepting, sends GOAWAY to agents
//! and drains (`[lifecycle]`).
//!
//! `outrelay-relay enroll --controller URL --token T --state-dir D [--name DNS]... [--ip IP]...`
//! enrolls the relay's identity into `D` (see [`outrelay_relay::identity`]); usage errors exit
//! 64.
//!
//! `outrelay-relay upgrade [--config FILE] [--admin-socket PATH] [--timeout-s N]` asks the
//! running relay for a hitless upgrade (see [`outrelay_relay::upgrade`]) and prints its
//! answer: exit 0 when handed over, 1 when it failed (the old process serves on), 64 on usage.
//! A process started with `OUTRELAY_UPGRADE_FD` is the new side of such a hand-over.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use outrelay_io::EngineConfig;
use outrelay_relay::config::{Overrides, Settings};
use outrelay_relay::ingress::Ingress;
use outrelay_relay::lease::LeaseTable;
use outrelay_relay::quic::QuicServer;
use outrelay_relay::state::Shared;
use outrelay_relay::steer::{Inputs, LeaseRange, Steering};
use outrelay_relay::upgrade::{FdKind, Inherited, Sockets, Upgrader, UpgraderParts};
use outrelay_relay::worker::WorkerOptions;

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// OutRelay relay: public ingress (SNI passthrough, TCP lease ports) and the agents' QUIC
/// endpoint.
#[derive(Debug, Parser)]
#[command(name = "outrelay-relay", version)]
struct Flags {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE", default_value = "/etc/outrelay/relay.toml")]
    config: PathBuf,
    /// Write the bound addresses here as JSON once every listener is bound.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Force the splice engines' readiness backend (io_uring or epoll); overrides `io_backend`.
    #[arg(long, value_name = "BACKEND")]
    io_backend: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, default_value = "info", env = "OUTRELAY_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enroll this relay with a `outrelay token create --role relay` token: key generated
    /// here, controller pinned by the token, cert.pem/key.pem/ca.pem written into the state
    /// directory (point `[tls] state_dir` at it). Safe to run again after a lost answer.
    Enroll {
        /// The controller, `https://host:port`.
        #[arg(long, value_name = "URL")]
        controller: String,
        /// The enrollment token (`ort1.…`).
        #[arg(long, env = "OUTRELAY_TOKEN", hide_env_values = true)]
        token: String,
        /// Where the identity goes.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/outrelay-relay")]
        state_dir: PathBuf,
        /// A DNS name agents dial this relay by (repeatable).
        #[arg(long = "name", value_name = "DNS")]
        names: Vec<String>,
        /// An IP address agents dial this relay by (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<std::net::IpAddr>,
        /// Also take the host of this relay config's `public_url` as a name.
        #[arg(long = "config", value_name = "FILE")]
        names_from: Option<PathBuf>,
        /// The controller's CA certificate (PEM), when it is not in the controller's chain.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Hitless upgrade: the running relay starts this binary again (same arguments), hands
    /// it its listening sockets and leases, and exits once its spliced pairs end. Prints the
    /// relay's JSON answer; exit 1 when the upgrade failed (the old process serves on).
    Upgrade {
        /// The relay's config, to find `listen.admin_socket`.
        #[arg(long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// The admin socket (overrides the config's).
        #[arg(long, value_name = "PATH")]
        admin_socket: Option<PathBuf>,
        /// How long the new process has to become ready.
        #[arg(long, value_name = "N", default_value_t = outrelay_relay::upgrade::DEFAULT_TIMEOUT_S,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_s: u64,
    },
}

/// What the upgrade needs from start-up: the binary and argv to start again, and what an old
/// process handed over to this one.
struct Launch {
    exe: Option<PathBuf>,
    args: Vec<OsString>,
    inherited: Option<Inherited>,
}

fn main() -> ExitCode {
    // Resolved now: after a package upgrade this path holds the new binary, while
    // /proc/self/exe names the deleted one.
    let exe = std::env::current_exe().ok();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => e.exit(),
    };
    // The filter is a reload layer: `[log] level` replaces it at start and on SIGHUP.
    let (filter, filter_handle) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&flags.log));
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    let flag_level = flags.log.clone();
    let set_log_level = move |level: Option<&str>| {
        let filter = tracing_subscriber::EnvFilter::new(level.unwrap_or(&flag_level));
        if let Err(e) = filter_handle.reload(filter) {
            tracing::warn!(error = %e, "log level not changed");
        }
    };
    if let Some(Command::Enroll {
        controller,
        token,
        state_dir,
        names,
        ips,
        names_from,
        ca,
    }) = flags.command
    {
        return enroll(controller, token, state_dir, names, ips, names_from, ca);
    }
    if let Some(Command::Upgrade {
        config,
        admin_socket,
        timeout_s,
    }) = flags.command
    {
        return upgrade_command(config.unwrap_or(flags.config), admin_socket, timeout_s);
    }
    let overrides = Overrides {
        io_backend: flags.io_backend.clone(),
    };
    let settings = match Settings::load(&flags.config, &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outrelay-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if flags.check_config {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    set_log_level(settings.log_level.as_deref());
    // The new side of a hitless upgrade: the old process's sockets and leases.
    let inherited = match Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("outrelay-relay: upgrade hand-over: {e}");
            return ExitCode::FAILURE;
        }
    };
    let launch = Launch {
        exe,
        args,
        inherited,
    };
    // SIGHUP: the same validation as start-up; the live keys are published as one snapshot
    // (outrelay_relay::reload), the rest are logged `needs_upgrade`.
    let reloader = outrelay_lifecycle::Reloader::with_classes(
        Some(flags.config.clone()),
        settings.shutdown_grace_ms,
        outrelay_relay::reload::key_reload,
    );
    let config = flags.config;
    let reload = move || Settings::load(&config, &overrides).map_err(|e| e.to_string());
    match run(
        settings,
        flags.ready_file,
        reloader,
        reload,
        set_log_level,
        launch,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrelay-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `outrelay-relay enroll`: one line on success, exit 64 for bad arguments, 1 otherwise.
fn enroll(
    controller: String,
    token: String,
    state_dir: PathBuf,
    mut names: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    names_from: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> ExitCode {
    let usage = |e: &str| {
        eprintln!("outrelay-relay enroll: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    if let Err(e) = outrelay_client::Token::parse(&token) {
        return usage(&e.to_string());
    }
    if let Some(config) = &names_from {
        match outrelay_relay::identity::public_host_of(config) {
            Ok(host) => names.push(host),
            Err(e) => return usage(&e),
        }
    }
    names.extend(ips.iter().map(ToString::to_string));
    for n in &names {
        if n.parse::<std::net::IpAddr>().is_err()
            && outrelay_proto::hostname::HostName::parse(n.as_bytes()).is_err()
            && n != "localhost"
        {
            return usage(&format!("--name {n}: not a DNS host name"));
        }
    }
    let ca_pem = match &ca {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(pem) => Some(pem),
            Err(e) => return usage(&format!("--ca {}: {e}", path.display())),
        },
        None => None,
    };
    let args = outrelay_relay::identity::EnrollArgs {
        controller,
        token,
        state_dir,
        names,
        ca_pem,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outrelay-relay enroll: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outrelay_relay::identity::enroll(&args)) {
        Ok(identity) => {
            println!(
                "enrolled as {identity}; key, certificate and CA in {}",
                args.state_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(outrelay_relay::identity::IdentityError::Enroll(
            e @ (outrelay_client::EnrollError::Token(_) | outrelay_client::EnrollError::Url(_)),
        )) => usage(&e.to_string()),
        Err(e) => {
            eprintln!("outrelay-relay enroll: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `outrelay-relay upgrade`: sends `upgrade <timeout_s>` to the admin socket and prints the
/// answer.
fn upgrade_command(config: PathBuf, admin_socket: Option<PathBuf>, timeout_s: u64) -> ExitCode {
    let path = admin_socket.unwrap_or_else(|| outrelay_relay::upgrade::admin_socket_of(&config));
    match outrelay_relay::upgrade::request(&path, timeout_s) {
        Ok(answer) => {
            println!("{}", answer.trim());
            let ok = serde_json::from_str::<serde_json::Value>(&answer)
                .is_ok_and(|v| v["upgraded"] == serde_json::json!(true));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "outrelay-relay upgrade: admin socket {}: {e}",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn run(
    mut settings: Settings,
    ready_file: Option<PathBuf>,
    reloader: outrelay_lifecycle::Reloader,
    reload: impl Fn() -> Result<Settings, String>,
    set_log_level: impl Fn(Option<&str>),
    launch: Launch,
) -> anyhow::Result<()> {
    let Launch {
        exe,
        args,
        mut inherited,
    } = launch;
    let upgrading = inherited.is_some();
    let sockets = Arc::new(Sockets::default());
    let metrics_handle = outrelay_relay::metrics::install()?;
    outrelay_relay::metric_help::describe();
    // WATCHDOG=1 only while every worker thread and the control runtime beat.
    let watchdog = outrelay_lifecycle::Watchdog::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.control_threads)
        .thread_name("relay-control")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut signals = outrelay_lifecycle::Signals::install()?;
        let shared = Arc::new(Shared::default());
        shared.bandwidth.set_defaults(settings.bandwidth);
        let mut leases = LeaseTable::new(settings.leases.clone())?;
        if let Some(i) = &inherited {
            leases.inherit(&i.leases, Instant::now());
        }
        // With `[controller]`: decisions, reports and revocations from the controller;
        // without: standalone (every lease approved, no revocation list).
        let controller_url = settings.controller.as_ref().map(|c| c.url.clone());
        let mut controller = settings
            .controller
            .map(outrelay_relay::control::Controller::new)
            .transpose()?;
        // Bound before the QUIC endpoint so grants can name it: without `reverse_advertise`, a
        // reverse listener on a specific address is advertised as bound (port 0 resolved); one
        // on a wildcard address as `<root host>:<port>`.
        // One SO_REUSEPORT socket per worker for each public listener.
        let reverse = outrelay_relay::upgrade::listeners(&mut inherited, FdKind::Reverse, settings.reverse_listen, settings.workers)?;
        let reverse_copies = outrelay_relay::upgrade::hold_group(&sockets, FdKind::Reverse, &reverse)?;
        let reverse_bound = reverse[0].local_addr()?;
        if settings.quic.reverse_addr.is_empty() {
            let bound = reverse_bound;
            settings.quic.reverse_addr = if bound.ip().is_unspecified() {
                format!("{}:{}", settings.leases.root_host, bound.port())
            } else {
                bound.to_string()
            };
        }
        // An inherited QUIC socket is read by the old process until it says RELEASED: the
        // endpoint starts on a placeholder and moves to it then (upgrade.rs).
        let (quic_socket, inherited_quic) =
            match inherited.as_mut().and_then(|i| i.take_quic(settings.quic.listen)) {
                Some(s) => {
                    let loopback: std::net::IpAddr = if s.local_addr()?.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    };
                    let placeholder =
                        outrelay_relay::quic::bind_udp(std::net::SocketAddr::new(loopback, 0))?;
                    (placeholder, Some(s))
                }
                None => (
                    outrelay_relay::quic::bind_udp(settings.quic.listen).map_err(|e| {
                        anyhow::anyhow!("QUIC listen {}: {e}", settings.quic.listen)
                    })?,
                    None,
                ),
            };
        let quic_bound = {
            use std::os::fd::AsFd;
            let real = inherited_quic.as_ref().unwrap_or(&quic_socket);
            let bound = real.local_addr()?;
            sockets.hold(FdKind::Quic, real.as_fd(), bound)?;
            bound
        };
        let decider: Arc<dyn outrelay_relay::quic::LeaseDecider> = match &controller {
            Some(c) => c.decider(),
            None => Arc::new(outrelay_relay::quic::ApproveAll),
        };
        let quic = QuicServer::bind_with_socket(
            settings.quic,
            leases,
            shared.clone(),
            decider,
            Some(quic_socket),
        )?;
        let udp = outrelay_relay::udp::UdpIngress::new(settings.udp, shared.clone());
        udp.set_handover(sockets.clone());
        if let Some(i) = &mut inherited {
            let (tcp, udp_ports) = i.take_lease_ports();
            let until = Instant::now() + Duration::from_millis(settings.ingress.claim_timeout_ms);
            sockets.set_spares(tcp, udp_ports, until);
        }
        quic.serve_udp(udp.clone());
        let _udp_sync = udp.serve();
        // Service streams: the controller's registry, policy and audit, or standalone with the
        // config's `[[policy]]` rules.
        let relay_id = match quic.identity() {
            outrelay_proto::identity::Identity::Relay { id, .. } => id.as_str().to_owned(),
            other => other.to_string(),
        };
        let mesh = match &mut controller {
            Some(c) => {
                let mesh =
                    outrelay_relay::mesh::Mesh::new(settings.mesh, relay_id, c.mesh_backend());
                c.serve_mesh(mesh.clone());
                mesh
            }
            None => outrelay_relay::mesh::Mesh::standalone(settings.mesh, relay_id),
        };
        quic.serve_mesh(mesh.clone());
        quic.serve_forward(settings.forward.clone())?;
        let quic_addr = quic_bound;
        let rebind_quic = inherited_quic.map(|socket| (quic.rebinder(), socket));
        let control_tasks = controller.map(|c| {
            // What peer relays dial for forwarded streams (`[forward] advertise`).
            let endpoint = settings.forward.advertised(quic_addr, &settings.leases.root_host);
            Arc::new(c.start(quic.handle(), quic.identity(), endpoint))
        });
        // The relay's own certificate: swapped on SIGHUP and after each renewal.
        let relink: Box<dyn Fn() + Send + Sync> = match &control_tasks {
            Some(t) => {
                let t = t.clone();
                Box::new(move || t.relink())
            }
            None => Box::new(|| {}),
        };
        let live = Arc::new(outrelay_relay::identity::LiveIdentity::new(
            quic.identity().clone(),
            settings.tls_files.clone(),
            quic.cert_resolver(),
            settings.public_tls.clone(),
            relink,
        ));
        let _renewal = match (&settings.tls_state_dir, controller_url) {
            (Some(dir), Some(url)) => Some(tokio::spawn(outrelay_relay::identity::renewal_loop(
                live.clone(),
                outrelay_client::IdentityStore::new(dir.clone()),
                url,
            ))),
            (Some(_), None) => {
                tracing::warn!("[tls] state_dir without [controller]: the certificate is not renewed");
                None
            }
            _ => None,
        };
        let shutdown = quic.shutdown_handle();
        let mut ingress_config = settings.ingress;
        if let Some(tls) = settings.public_tls {
            // The root host's own HTTPS listener (loopback only; `/healthz`).
            let (addr, _task) = outrelay_relay::ingress::root::spawn(tls.config).await?;
            ingress_config.root_fallback = Some(addr);
        }
        let public_tls = outrelay_relay::upgrade::listeners(
            &mut inherited,
            FdKind::PublicTls,
            settings.public_tls_listen,
            settings.workers,
        )?;
        let public_copies = outrelay_relay::upgrade::hold_group(&sockets, FdKind::PublicTls, &public_tls)?;
        let public_tls_bound = public_tls[0].local_addr()?;
        // Optional eBPF steering: CPU-local accept on both groups, the lease port range through
        // one socket per worker. `auto` falls back to plain listeners with one log line.
        let lease_range = (settings.leases.tcp.feature_enabled
            || settings.leases.udp.feature_enabled)
            .then_some(LeaseRange {
                ports: settings.leases.min_port..=settings.leases.max_port,
                bind_ip: ingress_config.lease_bind_ip,
                tcp: settings.leases.tcp.feature_enabled,
                udp: settings.leases.udp.feature_enabled,
            })
            .filter(|r| r.ports.start() <= r.ports.end() && *r.ports.start() != 0);
        let busy_at = u32::try_from(outrelay_relay::steer::busy_at(
            ingress_config.pending_conn_max,
            settings.workers,
        ))
        .unwrap_or(u32::MAX);
        // A new process at a hand-over attaches CPU-local accept only after the old one
        // detached its programs from the same groups (RELEASED).
        let (steering, range_sockets) = Steering::start(
            &settings.ebpf,
            Inputs {
                workers: settings.workers,
                public: if upgrading { &[] } else { &public_tls },
                reverse: if upgrading { &[] } else { &reverse },
                lease_range,
                busy_at,
                inherited: inherited.as_mut().map(|i| {
                    i.take_range(
                        Instant::now() + Duration::from_millis(ingress_config.claim_timeout_ms),
                    )
                }),
            },
        )?;
        {
            use std::os::fd::AsFd;
            for l in &range_sockets.tcp {
                sockets.hold(FdKind::RangeTcp, l.as_fd(), l.local_addr()?)?;
            }
            for u in &range_sockets.udp {
                sockets.hold(FdKind::RangeUdp, u.as_fd(), u.local_addr()?)?;
            }
        }
        let steering = Arc::new(steering);
        quic.serve_steering(steering.clone());
        if !range_sockets.udp.is_empty() {
            udp.serve_range(range_sockets.udp)?;
        }
        let claim_timeout_ms = ingress_config.claim_timeout_ms;
        let ingress = Ingress::new(ingress_config, shared.clone(), settings.workers);
        ingress.set_handover(sockets.clone());
        if let Some(i) = &inherited {
            ingress.expect_leases(&i.leases, claim_timeout_ms);
        }
        quic.serve_ingress(ingress.clone());
        // Agents whose UDP is blocked: their QUIC inside TLS on the public TLS port.
        ingress.serve_fallback(quic.fallback_acceptor()?);
        // The budgets (pipes, copy path, spills) are the whole relay's (the kernel's pipe
        // limit is per user, not per thread): each worker's engine gets an equal share.
        let engine = EngineConfig {
            backend: settings.io_backend,
            ..settings.engine.per_worker(settings.workers)
        };
        let beats = (0..settings.workers)
            .map(|i| {
                let beat = watchdog.register(&format!("worker-{i}"));
                Box::new(move || beat.beat()) as Box<dyn Fn() + Send>
            })
            .collect();
        let _workers = outrelay_relay::worker::start(
            &ingress,
            WorkerOptions {
                engine,
                sni: public_tls,
                reverse,
                runtime: tokio::runtime::Handle::current(),
                beats,
                steering: steering.clone(),
                lease_range: range_sockets.tcp,
            },
        )?;
        let generation = Arc::new(outrelay_relay::reload::ConfigGeneration::default());
        let live_settings = outrelay_relay::reload::LiveSettings {
            ingress: ingress.clone(),
            quic: quic.reloader(),
            mesh: mesh.clone(),
            udp: udp.clone(),
            generation: generation.clone(),
        };
        let sources = Arc::new(outrelay_relay::metrics::Sources {
            ingress: ingress.clone(),
            udp: udp.stats.clone(),
            quic: quic.stats(),
            mesh: mesh.stats.clone(),
            services: mesh.clone(),
            backend: settings.io_backend,
            shared,
            steering: steering.clone(),
            drain: quic.drain_handle(),
            config: generation,
        });
        let upgrader = exe.map(|exe| {
            Upgrader::new(UpgraderParts {
                exe,
                args,
                sockets: sockets.clone(),
                relay: quic.handle(),
                drain: quic.drain_handle(),
                ingress: ingress.clone(),
                steering: steering.clone(),
            })
        });
        // After the upgrader: the dashboard's status.json carries its state, as the admin
        // socket's `status` does.
        let metrics_addr = match settings.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let bound = listener.local_addr()?;
                tokio::spawn(outrelay_relay::metrics::serve_with(
                    listener,
                    metrics_handle,
                    sources.clone(),
                    upgrader.clone(),
                ));
                Some(bound.to_string())
            }
            None => None,
        };
        if let Some(path) = &settings.admin_socket {
            let listener = outrelay_relay::admin::bind(path)
                .map_err(|e| anyhow::anyhow!("admin socket {}: {e}", path.display()))?;
            tokio::spawn(outrelay_relay::admin::serve_with(
                listener,
                sources,
                upgrader.clone(),
            ));
        }
        let ready = serde_json::json!({
            "pid": std::process::id(),
            "quic": quic_addr.to_string(),
            "reverse": reverse_bound.to_string(),
            "public_tls": public_tls_bound.to_string(),
            "metrics": metrics_addr,
            "admin_socket": settings.admin_socket.as_ref().map(|p| p.display().to_string()),
            "io_backend": settings.io_backend.name(),
            "workers": settings.workers,
            "ebpf": steering.programs().iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect::<Vec<_>>(),
        });
        if !steering.lookup_active() {
            // Without the lookup program every TCP lease port is a listener per worker.
            ingress.serve_maintenance();
        }
        let mut server = tokio::spawn(quic.run());
        if let Some(path) = ready_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, ready.to_string())?;
            std::fs::rename(&tmp, &path)?;
        }
        tracing::info!(%ready, "relay ready");
        match inherited.take() {
            Some(i) => {
                let pid = std::process::id();
                let old_pid = i.old_pid;
                let channel = i.ready(pid)?;

                tracing::info!(old_pid, "upgrade: READY sent; waiting for RELEASED");
                let steering = steering.clone();
                let ebpf = settings.ebpf.clone();
                tokio::spawn(async move {
                    let released = tokio::task::spawn_blocking(move || {
                        let wait =
                            Duration::from_millis(outrelay_relay::upgrade::RELEASED_WAIT_MS);
                        channel.wait_released(wait)
                    })
                    .await
                    .unwrap_or(false);
                    tracing::info!(released, "upgrade: the old process let go of its sockets");
                    // The old process named this one the main process (MAINPID) before it
                    // said RELEASED: READY=1 now comes from the main process.
                    outrelay_lifecycle::notify_ready();
                    if let Some((rebind, socket)) = rebind_quic
                        && let Err(e) = rebind(socket)
                    {
                        tracing::error!(error = %e, "upgrade: the QUIC endpoint cannot take the inherited socket");
                    }
                    steering.attach_reuseport(&ebpf, &public_copies, &reverse_copies, busy_at);
                });
            }
            None => {
                drop((public_copies, reverse_copies));
                outrelay_lifecycle::notify_ready();
            }
        }
        watchdog.start("relay-control");
        // Without an upgrader the channel never changes (its sender lives here).
        let (_no_upgrader, idle) = tokio::sync::watch::channel(None);
        let mut handed_over = upgrader.as_ref().map_or(idle, |u| u.handed_over());
        let new_pid = loop {
            tokio::select! {
                signal = signals.next() => {
                    if signal != outrelay_lifecycle::Signal::Reload {
                        break None;
                    }
                }
                Ok(()) = handed_over.changed() => {
                    let pid = *handed_over.borrow();
                    if pid.is_some() {
                        break pid;
                    }
                    continue;
                }
            }
            let outcome = match reload() {
                Ok(new) => {
                    let level = new.log_level.clone();
                    let applied = live_settings.apply(new).await;
                    if applied.is_ok() {
                        set_log_level(level.as_deref());
                    }
                    applied
                }
                Err(e) => Err(e),
            };
            reloader.reload(|| outcome);
            match live.reload() {
                Ok(changed) => {
                    metrics::counter!("outrelay_relay_cert_reloads_total", "result" => "ok")
                        .increment(1);
                    tracing::info!(changed, "certificate files reloaded");
                }
                Err(e) => {
                    metrics::counter!("outrelay_relay_cert_reloads_total", "result" => "refused")
                        .increment(1);
                    tracing::warn!(error = %e, "certificate reload refused; serving the previous one");
                }
            }
        };
        // No reload after this; its `[quic]` side holds an endpoint handle, and after a
        // hand-over the endpoint must be dropped so this process stops reading the shared
        // QUIC socket.
        drop(live_settings);
        let grace = reloader.shutdown_grace();
        let started = Instant::now();
        let mut server_done = false;
        if let Some(new_pid) = new_pid {
            // Handed over: the listeners are closed here already and the new process is the
            // service's main process (no STOPPING=1). GOAWAY so agents move their QUIC
            // connections, leases and idle sessions over; the UDP lease tasks stop reading.
            tracing::info!(
                new_pid,
                grace_ms = grace.as_millis(),
                in_flight = ingress.in_flight(),
                "upgrade: GOAWAY to agents, UDP lease ports stopped, draining spliced pairs"
            );
            udp.stop();
            shutdown.shutdown(
                outrelay_relay::upgrade::UPGRADE_REASON,
                outrelay_relay::upgrade::UPGRADE_RECONNECT_AFTER_MS,
            );
            // The endpoint closes its connections within the GOAWAY's delay and is dropped
            // with the server task; only then may the new process read the QUIC socket.
            let bound = Duration::from_millis(
                u64::from(outrelay_relay::upgrade::UPGRADE_RECONNECT_AFTER_MS) * 3,
            );
            server_done = tokio::time::timeout(bound, &mut server).await.is_ok();
            if let Some(u) = &upgrader {
                u.release();
            }
            tracing::info!(server_done, "upgrade: QUIC endpoint dropped, RELEASED sent");
        } else {
            // SIGTERM: no new connection, GOAWAY to agents, established ones get the grace.
            outrelay_lifecycle::notify_stopping();
            tracing::info!(
                grace_ms = grace.as_millis(),
                in_flight = ingress.in_flight(),
                "stopping: listeners closed, GOAWAY to agents, draining"
            );
            ingress.stop_accepting();
            steering.detach_reuseport();
            shutdown.shutdown("relay stopping", 1000);
        }
        let left = outrelay_lifecycle::drain(grace, || ingress.in_flight()).await;
        let drain_ms = started.elapsed().as_millis();
        if left == 0 {
            tracing::info!(drain_ms, "drained: every connection finished");
        } else {
            tracing::warn!(
                drain_ms,
                cut = left,
                "grace period over: cutting connections"
            );
        }
        let rest = grace.saturating_sub(started.elapsed());
        if !server_done {
            let _ = tokio::time::timeout(rest.max(Duration::from_secs(1)), server).await;
        }
        anyhow::Ok(())
    })
}
