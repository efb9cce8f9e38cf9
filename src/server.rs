//! Listeners, admission and the life of the process: binds every `[[listener]]`, admits connections
//! (global and per-IP limits answered with `421 4.7.0`), spawns one task per connection, serves metrics, and
//! drains on shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::audit::{AuditDestination, AuditSink};
use crate::client_key::{ClientKey, ClientKeys};
use crate::config::{Config, ListenerConfig, ListenerMode};
use crate::conn::{self, ListenerContext, ReverseDns};
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::smtp::session::SessionConfig;
use crate::smtp::Reply;
use crate::spool::SpoolBudget;
use crate::tls::ServerTls;
use crate::upstream::{Pool, UpstreamSettings};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} (listener {name:?})")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS")]
    Tls(#[source] crate::tls::TlsError),
    #[error("cannot start the metrics listener")]
    Metrics(#[source] std::io::Error),
    #[error("cannot set up the metrics listener's credentials")]
    MetricsAuth(#[source] crate::metrics::MetricsError),
    #[error("cannot set up DNS lists, sender authentication or DKIM signing: {0}")]
    DnsStages(String),
    #[error("cannot load the users file")]
    Auth(#[source] crate::auth::store::StoreError),
    #[error("cannot load the rules:\n{}", crate::rules::format_errors(.0))]
    Rules(Vec<crate::rules::RuleError>),
    #[error("cannot start the per-core threads")]
    Cores(#[source] std::io::Error),
    #[error("cannot set up the state store")]
    State(#[source] crate::state::redis::RedisSetupError),
}

/// A started server: its bound addresses and the means to stop it.
pub struct Running {
    /// Each listener's name and bound address (useful with port 0).
    pub listeners: Vec<(String, SocketAddr)>,
    /// The bound metrics address, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The shutdown state.
    pub shutdown: Shutdown,
    /// The TLS certificate store, for reloads.
    pub tls: Option<Arc<ServerTls>>,
    /// The credential checker (users file), for reloads; `None` when AUTH is off.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// The rule set, for reloads; `None` when `rules.directory` is empty.
    pub rules: Option<Arc<crate::rules::Rules>>,
    grace: Duration,
    audit: AuditSink,
    /// The per-core threads (`server.thread_per_core`).
    cores: Option<crate::cores::Cores>,
}

impl Running {
    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// Stops accepting, lets sessions finish within the grace period, then returns how it went.
    pub async fn stop(self) -> Stopped {
        info!(grace = ?self.grace, "shutting down");
        let cut_off = self.shutdown.drain(self.grace).await;
        if cut_off > 0 {
            // Their clients got no reply for the transaction in flight and will retry; nothing half-sent
            // was queued upstream. Still an operator wants to know (a grace period too short for the
            // traffic), so it is an error and the exit code says it too.
            error!(sessions = cut_off, grace = ?self.grace, "grace period over; sessions cut off");
        }
        if let Some(cores) = self.cores {
            cores.stop().await;
        }
        self.audit.close().await;
        info!("stopped");
        Stopped { cut_off }
    }
}

/// How a stop went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// Sessions still running when the grace period ended, dropped mid-transaction.
    pub cut_off: usize,
}

/// Per-client connection counts, by [`ClientKey`] (IPv6 per prefix); a [`IpSlot`] gives its count back
/// when dropped.
#[derive(Default)]
struct PerIp {
    keys: ClientKeys,
    counts: Mutex<HashMap<ClientKey, usize>>,
}

struct IpSlot {
    key: ClientKey,
    table: Arc<PerIp>,
}

impl PerIp {
    fn new(keys: ClientKeys) -> PerIp {
        PerIp { keys, counts: Mutex::default() }
    }

    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let key = self.keys.key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { key, table: self.clone() })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What every accept loop shares.
struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    max_per_ip: usize,
    /// Connection ids unique across the fleet and restarts.
    ids: crate::state::ids::ConnIds,
    /// The per-client limit across the fleet (leases in a shared store).
    fleet: crate::fleet::FleetAdmission,
    hostname: String,
    /// Refusals being written; a flood past this is closed without a reply rather than queueing tasks.
    refusals: Arc<Semaphore>,
}

/// Connections being told `421` at once; enough for bursts, bounded so a flood cannot pile up tasks.
const MAX_PENDING_REFUSALS: usize = 64;

/// Binds everything and starts serving. Blocking file reads (certificates) happen here, at start-up.
pub async fn start(config: &Config) -> Result<Running, ServerError> {
    let store = crate::state::open(&config.state).map_err(ServerError::State)?;
    start_with_store(config, store).await
}

/// [`start`] with a given state store (tests pass one with a [`crate::state::ManualClock`]).
pub async fn start_with_store(config: &Config, store: crate::state::SharedStore) -> Result<Running, ServerError> {
    let hostname = config.hostname();
    let shutdown = Shutdown::new();
    let metrics_handle = crate::metrics::install().ok();
    let metrics_auth = crate::metrics::http_auth(&config.metrics).map_err(ServerError::MetricsAuth)?;
    let ready = crate::metrics::Readiness::default();
    let tls = if config.listeners.iter().any(|l| l.mode != ListenerMode::Plain) {
        let t = ServerTls::load(&config.tls, &hostname).map_err(ServerError::Tls)?;
        let t = Arc::new(t);
        t.spawn_watcher(Duration::from_secs(5), shutdown.soft.clone());
        Some(t)
    } else {
        None
    };
    let auth = crate::auth::Authenticator::load(&config.auth).map_err(ServerError::Auth)?;
    if let Some(a) = &auth {
        a.spawn_watcher(Duration::from_secs(5), shutdown.soft.clone());
    }
    spawn_state_probe(store.clone(), ready.clone(), shutdown.soft.clone());
    if let Some(a) = &auth {
        a.use_state(store.clone(), &config.state, &config.auth);
    }
    let accounts = config
        .accounts
        .enabled
        .then(|| Arc::new(crate::pipeline::accounts::Accounts::new(store.clone(), &config.accounts)));
    let (rules, pipeline) = build_pipeline(config, &shutdown, &store, accounts.clone())?;
    let quarantine = rules.as_ref().map(|_| crate::quarantine::start(config, &hostname, shutdown.soft.clone()));
    let archive = crate::archive::Archive::start(&config.archive, &hostname, shutdown.soft.clone());
    let settings = UpstreamSettings::from_config(&config.upstream, &hostname).map_err(ServerError::Tls)?;
    let pool = Pool::new(settings);
    pool.report_health(ready.clone());
    // Bounded well below connect_timeout: start-up (binding the ports) must not wait on a slow upstream;
    // until a connection succeeds, sessions offer neither DSN nor SMTPUTF8, and the first one learns them.
    probe_upstream(&pool, config.upstream.connect_timeout.get().min(Duration::from_secs(2))).await;
    tokio::spawn(pool.clone().reap(shutdown.soft.clone()));
    // One bound for the whole server: the blocking threads that hanging lookups hold are shared too.
    let reverse_dns = config.server.reverse_dns.then(|| {
        let keys = ClientKeys::new(config.limits.ipv6_client_prefix);
        ReverseDns::new(config.server.reverse_dns_timeout.get(), config.server.max_reverse_dns_lookups, keys)
    });
    let spool_dir = (!config.spool.directory.as_os_str().is_empty()).then(|| config.spool.directory.clone());
    let spool = SpoolBudget::new(config.spool.memory_budget.bytes(), config.spool.memory_threshold.bytes(), spool_dir)
        .with_disk_budget(config.spool.disk_budget.bytes());
    // The audit writer outlives the drain (records of transactions finishing in the grace period must be
    // written); `Running::stop` closes it after the drain.
    let audit =
        AuditSink::start(audit_destination(&config.audit.destination), config.audit.queue, shutdown.hard.clone());
    let admission = Arc::new(Admission {
        global: Arc::new(Semaphore::new(config.limits.max_connections)),
        per_ip: Arc::new(PerIp::new(ClientKeys::new(config.limits.ipv6_client_prefix))),
        max_per_ip: config.limits.max_connections_per_ip,
        ids: crate::state::ids::ConnIds::new(&config.state.instance_id),
        fleet: crate::fleet::FleetAdmission::new(store.clone(), &config.state),
        hostname: hostname.clone(),
        refusals: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
    });
    let mut bound = Vec::new();
    // With a thread per core: each listener's sockets, one per core thread, and what each thread runs.
    let per_core = config.server.thread_per_core.then(crate::cores::count);
    let mut core_listeners: Vec<Vec<CoreListener>> = (0..per_core.unwrap_or(0)).map(|_| Vec::new()).collect();
    for l in &config.listeners {
        let bind_err = |source| ServerError::Bind { name: l.name.clone(), addr: l.address, source };
        // One listener on the shared runtime, or one socket per core thread.
        let (listener, sockets, addr) = match per_core {
            None => {
                let listener = TcpListener::bind(l.address).await.map_err(bind_err)?;
                let addr = listener.local_addr().unwrap_or(l.address);
                (Some(listener), Vec::new(), addr)
            }
            Some(n) => {
                let sockets = crate::cores::bind(l.address, n).map_err(bind_err)?;
                let addr = sockets.first().and_then(|s| s.local_addr().ok()).unwrap_or(l.address);
                (None, sockets, addr)
            }
        };
        let mut ctx = listener_context(
            config,
            l,
            &hostname,
            tls.as_deref(),
            pool.clone(),
            spool.clone(),
            audit.clone(),
            &shutdown,
            auth.clone(),
            pipeline.clone(),
            reverse_dns.clone(),
        );
        ctx.quarantine.clone_from(&quarantine);
        ctx.archive.clone_from(&archive);
        let ctx = Arc::new(ctx);
        info!(listener = %l.name, address = %addr, mode = ?l.mode, role = ?l.role, "listening");
        crate::metrics::listener_started(&l.name);
        bound.push((l.name.clone(), addr));
        let proxy = crate::fleet::ProxySettings::from_listener(l).map(Arc::new);
        for (core, socket) in core_listeners.iter_mut().zip(sockets) {
            core.push(CoreListener { socket, ctx: ctx.clone(), proxy: proxy.clone() });
        }
        if let Some(listener) = listener {
            tokio::spawn(accept_loop(listener, ctx, proxy, admission.clone(), shutdown.clone()));
        }
    }
    let cores = match per_core {
        Some(n) => {
            let work = core_listeners
                .into_iter()
                .map(|listeners| core_work(listeners, admission.clone(), shutdown.clone()))
                .collect();
            let cores = crate::cores::Cores::start(work).map_err(ServerError::Cores)?;
            info!(threads = n, "a thread per core, each accepting on every listener");
            Some(cores)
        }
        None => None,
    };
    let metrics = match (&metrics_handle, config.metrics.address.parse::<SocketAddr>()) {
        (Some(handle), Ok(addr)) => {
            let l = TcpListener::bind(addr).await.map_err(ServerError::Metrics)?;
            let local = l.local_addr().map_err(ServerError::Metrics)?;
            ready.set_listeners_bound(true);
            let check = crate::health::UpstreamCheck {
                address: config.upstream.address,
                timeout: config.upstream.connect_timeout.get(),
                proxy_v2: config.upstream.identity == crate::config::Identity::ProxyV2,
            };
            let every = config.metrics.upstream_check_interval.get();
            crate::health::spawn(check, every, ready.clone(), shutdown.soft.clone());
            let admin = accounts.map(|a| a as crate::pipeline::accounts::SharedAdmin);
            let serve =
                crate::metrics::serve_with_admin(l, handle.clone(), ready, metrics_auth, admin, shutdown.soft.clone());
            tokio::spawn(serve);
            info!(address = %local, "metrics listening");
            Some(local)
        }
        _ => None,
    };
    Ok(Running {
        listeners: bound,
        metrics,
        shutdown,
        tls,
        auth,
        rules,
        grace: config.shutdown.grace_period.get(),
        audit,
        cores,
    })
}

/// One listener's socket on one core thread, with what its accept loop needs.
struct CoreListener {
    socket: std::net::TcpListener,
    ctx: Arc<ListenerContext>,
    proxy: Option<Arc<crate::fleet::ProxySettings>>,
}

/// What a core thread runs: an accept loop per listener, its sockets registered with that thread's runtime.
fn core_work(listeners: Vec<CoreListener>, adm: Arc<Admission>, shutdown: Shutdown) -> crate::cores::Work {
    Box::new(move || {
        let mut tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = Vec::new();
        for l in listeners {
            match TcpListener::from_std(l.socket) {
                Ok(listener) => {
                    tasks.push(Box::pin(accept_loop(listener, l.ctx, l.proxy, adm.clone(), shutdown.clone())))
                }
                Err(e) => error!(error = %e, listener = %l.ctx.name, "cannot register a listening socket"),
            }
        }
        tasks
    })
}

/// Learns what the upstream offers (DSN, SMTPUTF8 are advertised to clients only if it does) before the
/// listeners open, waiting at most `limit`. An upstream that does not answer now only means neither is
/// advertised until a relay connection succeeds; it does not stop moat from starting.
async fn probe_upstream(pool: &Pool, limit: Duration) {
    match tokio::time::timeout(limit, pool.probe()).await {
        Ok(Ok(offers)) => info!(dsn = offers.dsn, smtputf8 = offers.smtputf8, "upstream extensions learnt"),
        Ok(Err(e)) => warn!(
            error = %e,
            source = ?std::error::Error::source(&e),
            "cannot reach the upstream at start-up; DSN and SMTPUTF8 are not offered until it answers"
        ),
        Err(_) => {
            warn!(?limit, "the upstream did not answer at start-up; DSN and SMTPUTF8 are not offered until it does")
        }
    }
}

/// Builds the pipeline: every stage, in the order its hooks run. A new stage is one more line here.
fn build_pipeline(
    config: &Config,
    shutdown: &Shutdown,
    store: &crate::state::SharedStore,
    accounts: Option<Arc<crate::pipeline::accounts::Accounts>>,
) -> Result<(Option<Arc<crate::rules::Rules>>, Pipeline), ServerError> {
    let mut stages: Vec<Arc<dyn crate::pipeline::Stage>> = Vec::new();
    let mut rules = None;
    crate::pipeline::limits::spawn_size_gauge(store.clone(), shutdown.soft.clone());
    let loaded = rules_stage(config, shutdown)?;
    if let Some((handle, _)) = &loaded {
        stages.push(Arc::new(crate::pipeline::limits::LimitsStage::new(handle.clone(), store.clone())));
    }
    stages.extend(crate::pipeline::dns_stages::stages(config, shutdown).map_err(ServerError::DnsStages)?);
    if let Some(a) = accounts {
        stages.push(a);
    }
    if let Some((handle, stage)) = loaded {
        stages.push(stage);
        stages.push(Arc::new(crate::pipeline::greylist::GreylistStage::new(handle.clone(), store.clone())));
        rules = Some(handle);
    }
    Ok((rules, Pipeline::new(stages)))
}

/// Loads the rule files (blocking, at start-up) and starts the rules watcher; `None` without rules.
#[allow(clippy::type_complexity)]
fn rules_stage(
    config: &Config,
    shutdown: &Shutdown,
) -> Result<Option<(Arc<crate::rules::Rules>, Arc<dyn crate::pipeline::Stage>)>, ServerError> {
    let rc = &config.rules;
    if rc.directory.as_os_str().is_empty() {
        return Ok(None);
    }
    let rules = crate::rules::Rules::load(&rc.directory, &config.relay.local_domains).map_err(ServerError::Rules)?;
    let rules = Arc::new(rules);
    info!(directory = %rc.directory.display(), rules = rules.snapshot().rules.len(), "rules loaded");
    rules.spawn_watcher(rc.watch_interval.get(), shutdown.soft.clone());
    let half_budget = config.spool.memory_budget.bytes() / 2;
    if rc.scan_window.bytes() > half_budget {
        // The scan's copy and its parse are reserved against the budget (docs/rules.md).
        warn!(
            scan_window = rc.scan_window.bytes(),
            effective = half_budget,
            "rules.scan_window is more than half of spool.memory_budget; messages are scanned up to half the budget"
        );
    }
    let stage = crate::pipeline::rules::RulesStage::new(rules.clone(), rc);
    Ok(Some((rules, Arc::new(stage))))
}

fn audit_destination(dest: &str) -> AuditDestination {
    match dest {
        "stdout" => AuditDestination::Stdout,
        "off" | "" => AuditDestination::Off,
        path => AuditDestination::File(path.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn listener_context(
    config: &Config,
    l: &ListenerConfig,
    hostname: &str,
    tls: Option<&ServerTls>,
    pool: Arc<Pool>,
    spool: SpoolBudget,
    audit: AuditSink,
    shutdown: &Shutdown,
    auth: Option<Arc<crate::auth::Authenticator>>,
    pipeline: Pipeline,
    reverse_dns: Option<ReverseDns>,
) -> ListenerContext {
    let lim = &config.limits;
    let acceptor = if l.mode == ListenerMode::Plain { None } else { tls.map(ServerTls::acceptor) };
    ListenerContext {
        name: l.name.as_str().into(),
        metrics: crate::metrics::ListenerMetrics::new(l.name.as_str().into()),
        session: Arc::new(SessionConfig {
            hostname: hostname.to_string(),
            greeting: config.server.greeting.clone(),
            role: l.role,
            mode: l.mode,
            starttls: l.mode == ListenerMode::Starttls && acceptor.is_some(),
            require_tls: l.require_tls,
            max_message_size: lim.max_message_size.bytes(),
            max_recipients: lim.max_recipients,
            max_errors: lim.max_errors,
            auth: auth.is_some(),
            auth_without_tls: l.auth_without_tls,
            local_domains: config.relay.local_domains.clone().into(),
        }),
        max_command_line: lim.max_command_line,
        max_text_line: lim.max_text_line,
        bare_line_endings: lim.bare_line_endings,
        idle_timeout: lim.idle_timeout.get(),
        data_timeout: lim.data_timeout.get(),
        session_timeout: lim.session_timeout.get(),
        tls_handshake_timeout: config.tls.handshake_timeout.get(),
        implicit_tls: l.mode == ListenerMode::ImplicitTls,
        tls: acceptor,
        received_header: config.trace.received_header,
        client_keys: ClientKeys::new(lim.ipv6_client_prefix),
        reverse_dns,
        pool,
        spool,
        pipeline,
        audit,
        shutdown: shutdown.soft.clone(),
        auth,
        quarantine: None,
        archive: None,
    }
}

/// Probes the state store every second (a Redis store: `PING`, bounded by its command timeout) and tells
/// `/readyz`, so an outage and the recovery show without traffic.
fn spawn_state_probe(store: crate::state::SharedStore, ready: crate::metrics::Readiness, stop: CancellationToken) {
    if store.backend() == "memory" {
        return;
    }
    tokio::spawn(async move {
        loop {
            ready.set_state_ok(store.probe().await.is_ok());
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}

/// Accepts until shutdown; each connection gets a task, or a `421` when a limit is reached.
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerContext>,
    proxy: Option<Arc<crate::fleet::ProxySettings>>,
    adm: Arc<Admission>,
    shutdown: Shutdown,
) {
    // A listener bound to one address accepts connections on that address only: their local address needs
    // no getsockname(2). A wildcard listener's connections each ask.
    let bound = listener.local_addr().ok().filter(|a| !a.ip().is_unspecified());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.soft.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                error!(error = %e, listener = %ctx.name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        admit(stream, peer, bound, &ctx, proxy.clone(), &adm, &shutdown);
    }
    debug!(listener = %ctx.name, "listener closed");
}

fn admit(
    mut stream: TcpStream,
    peer: SocketAddr,
    bound: Option<SocketAddr>,
    ctx: &Arc<ListenerContext>,
    proxy: Option<Arc<crate::fleet::ProxySettings>>,
    adm: &Arc<Admission>,
    shutdown: &Shutdown,
) {
    let permit: Option<OwnedSemaphorePermit> = adm.global.clone().try_acquire_owned().ok();
    let Some(permit) = permit else {
        crate::metrics::connection(&ctx.name, crate::metrics::ConnResult::RejectedLimit);
        crate::metrics::limit_hit(crate::metrics::Limit::MaxConnections);
        refuse(stream, Reply::too_many_connections(&adm.hostname), adm, shutdown);
        return;
    };
    // Behind a balancer the TCP peer is the balancer: the per-client count waits for the real address.
    let slot = if proxy.is_some() {
        None
    } else {
        let Some(slot) = adm.per_ip.acquire(peer.ip(), adm.max_per_ip) else {
            crate::metrics::connection(&ctx.name, crate::metrics::ConnResult::RejectedLimit);
            crate::metrics::limit_hit(crate::metrics::Limit::MaxConnectionsPerIp);
            refuse(stream, Reply::too_many_connections(&adm.hostname), adm, shutdown);
            return;
        };
        Some(slot)
    };
    let id = adm.ids.next_id();
    let local = bound.unwrap_or_else(|| stream.local_addr().unwrap_or(peer));
    // Behind a balancer the client's address is known only after the PROXY header: recorded then. Otherwise it
    // goes in with the span (one formatting pass instead of two).
    let span = if proxy.is_some() {
        tracing::info_span!("conn", id = %id, listener = %ctx.name, client.addr = tracing::field::Empty)
    } else {
        tracing::info_span!("conn", id = %id, listener = %ctx.name, client.addr = %peer)
    };
    let ctx = ctx.clone();
    let adm = adm.clone();
    let hard = shutdown.hard.clone();
    shutdown.tasks.spawn(
        async move {
            let (peer, local, slot) = match (proxy, slot) {
                (Some(proxy), _) => {
                    let Some((client, local)) = proxy.client(&mut stream, peer, local).await else {
                        return;
                    };
                    tracing::Span::current().record("client.addr", tracing::field::display(client));
                    let Some(slot) = adm.per_ip.acquire(client.ip(), adm.max_per_ip) else {
                        return refuse_now(stream, &ctx, &adm, crate::metrics::Limit::MaxConnectionsPerIp).await;
                    };
                    (client, local, slot)
                }
                (None, Some(slot)) => (peer, local, slot),
                (None, None) => return,
            };
            let lease = match adm.fleet.lease(adm.per_ip.keys.key(peer.ip()), &id, adm.max_per_ip).await {
                Ok(lease) => lease,
                Err(refusal) => {
                    debug!(?refusal, "refused by the fleet's per-client limit");
                    return refuse_now(stream, &ctx, &adm, crate::metrics::Limit::MaxConnectionsPerIp).await;
                }
            };
            ctx.metrics.connection(crate::metrics::ConnResult::Accepted);
            let _permits = (permit, slot, lease);
            let _active = ctx.metrics.connection_active();
            debug!("connected");
            let reason = tokio::select! {
                r = conn::serve(ctx.clone(), stream, peer, local, id) => r,
                _ = hard.cancelled() => crate::smtp::session::CloseReason::Shutdown,
            };
            ctx.metrics.session_closed(reason);
            debug!(reason = reason.as_str(), "closed");
        }
        .instrument(span),
    );
}

/// Answers `421` and closes, from the connection's own task (a limit found after accepting: behind a
/// balancer, or across the fleet).
async fn refuse_now(mut stream: TcpStream, ctx: &ListenerContext, adm: &Admission, limit: crate::metrics::Limit) {
    crate::metrics::connection(&ctx.name, crate::metrics::ConnResult::RejectedLimit);
    crate::metrics::limit_hit(limit);
    let reply = Reply::too_many_connections(&adm.hostname);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&reply.render()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Answers `421` and closes, without holding a connection permit; at most [`MAX_PENDING_REFUSALS`] at once,
/// each bounded by a short timeout. Past that the socket is simply closed.
fn refuse(mut stream: TcpStream, reply: Reply, adm: &Admission, shutdown: &Shutdown) {
    let Ok(slot) = adm.refusals.clone().try_acquire_owned() else {
        return;
    };
    shutdown.tasks.spawn(async move {
        let _slot = slot;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = stream.write_all(&reply.render()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_ip_cap_counts_ipv6_per_client_key() {
        let table = Arc::new(PerIp::default());
        let a = table.acquire("2001:db8:1:2::1".parse().unwrap(), 2);
        let b = table.acquire("2001:db8:1:2::2".parse().unwrap(), 2);
        assert!(a.is_some() && b.is_some());
        assert!(table.acquire("2001:db8:1:2::3".parse().unwrap(), 2).is_none(), "a third address of the /64");
        assert!(table.acquire("2001:db8:1:3::1".parse().unwrap(), 2).is_some(), "another /64");
        let mapped = table.acquire("::ffff:192.0.2.1".parse().unwrap(), 1);
        assert!(mapped.is_some());
        assert!(table.acquire("192.0.2.1".parse().unwrap(), 1).is_none(), "IPv4-mapped is IPv4");
        drop(a);
        assert!(table.acquire("2001:db8:1:2::4".parse().unwrap(), 2).is_some(), "a slot came back");
    }
}
