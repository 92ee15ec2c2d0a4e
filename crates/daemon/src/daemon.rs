//! `wgexitd serve`, `teardown` and `check-config` (`status` is [`crate::status`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::auth::Authorizer;
use crate::api::tls::{self, TlsError};
use crate::api::tokens::TokenError;
use crate::api::{http, limits, ApiState};
use crate::attribution::{self, AttributionError};
use crate::cluster::election::{groups, Leading};
use crate::cluster::floating::Floating;
use crate::cluster::led::Led;
use crate::cluster::{member, ClusterError};
use crate::config::{Config, ConfigError};
use crate::control::{self, ControlError};
use crate::dataplane::Changes;
use crate::dataplane::{DataplaneError, HostDataplane};
use crate::dns::server::{self as dns_server, DnsError, Resolvers};
use crate::identity::{Identities, IdentityError};
use crate::leases::collect::Activity;
use crate::leases::redb::RedbStore;
use crate::leases::registry::Registry;
use crate::leases::service::LeaseService;
use crate::leases::store::{LeaseStore, StoreError, StoredLease};
use crate::metrics;
use crate::space::Space;
use wgexit::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Attribution(#[from] AttributionError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Checks what `serve` would read before touching anything (the token files), and reports
/// the stored leases this config would leave without an egress.
pub async fn check(config: &Config) -> Result<Vec<StoredLease>, DaemonError> {
    Authorizer::load(config)?;
    let misfits = control::misfits(config).await?;
    report_misfits(&misfits);
    Ok(misfits)
}

/// `wgexitd leases prune`: deletes the stored leases that do not fit the config.
pub async fn prune(config: &Config) -> Result<Vec<StoredLease>, DaemonError> {
    Ok(control::prune(config).await?)
}

/// The lease registry over the store, and the stored leases the config has no place for:
/// kept in the store (restoring the config brings them back) and reported.
fn open_leases(config: &Config) -> Result<(Registry, Vec<StoredLease>), DaemonError> {
    let store: Arc<dyn LeaseStore> =
        Arc::new(RedbStore::open(&config.state_dir.join("leases.redb"))?);
    let (registry, misfits) = Registry::load_with_networks(&config.egress, &config.network, store)?;
    report_misfits(&misfits);
    Ok((registry, misfits))
}

fn report_misfits(misfits: &[StoredLease]) {
    for m in misfits {
        tracing::warn!(
            egress = %m.lease.egress, address = %m.lease.address, address6 = ?m.lease.address6, public_key = %m.lease.public_key,
            container_id = %m.lease.attachment.container_id,
            "stored lease does not fit the config (egress renamed or removed, or pool or pool6 changed); kept: restore the config to bring it back, or remove it with `wgexitd leases prune`"
        );
    }
}

/// What [`start`] set up: the API's state and TLS, the pool membership (in a pool), and the
/// private networks' resolvers (which answer while this is kept).
pub struct Started {
    pub api: Arc<ApiState>,
    pub tls: Arc<rustls::ServerConfig>,
    pub pool: Option<member::Pool>,
    pub resolvers: Resolvers,
}

/// Everything `serve` sets up before it answers requests, in order: config (read already)
/// → tokens → store → identities → dataplane → API's TLS. Nothing is written before the
/// token files have been read, and the network is touched last (the private networks and
/// their resolvers after the egresses).
pub async fn start(config: Config) -> Result<Started, DaemonError> {
    let auth = Authorizer::load(&config)?;
    fsutil::private_dir(&config.state_dir).map_err(|source| DaemonError::Io {
        path: config.state_dir.clone(),
        source,
    })?;
    // Alone: the embedded store and local keys. In a pool: all three from etcd.
    let (leases, identities, pool) = match &config.cluster {
        None => (
            open_leases(&config)?,
            (
                Identities::load_or_create(&config.state_dir, &config.egress)?,
                Identities::load_or_create_networks(&config.state_dir, &config.network)?,
            ),
            None,
        ),
        Some(cluster) => {
            let opened = member::open(&config, cluster).await?;
            (
                (opened.registry, Vec::new()),
                opened.identities,
                Some(opened.pool),
            )
        }
    };
    let (cert, key) = match &config.api.tls_files {
        Some((c, k)) => (c.clone(), k.clone()),
        None => tls::ensure_generated(&config.state_dir, &config.api)?,
    };
    let tls_config = tls::server_config(&cert, &key)?;

    let dataplane = HostDataplane::open(config.backend)?;
    tracing::info!(backend = ?dataplane.backend().kind(), "WireGuard backend");
    let service = Arc::new(LeaseService::new(config, leases, dataplane, identities));
    service.metrics.register(
        "wgexit_auth_failures",
        "API requests refused for their token.",
        auth.failures.clone(),
    );
    for (egress, changes) in service.reconcile().await {
        let changes = changes?;
        tracing::info!(%egress, ?changes, "WireGuard device reconciled");
        service.metrics.reconciled(&egress, &changes);
    }
    let config = &service.config;
    for repair in service
        .dataplane()
        .apply_rules(&config.egress, &config.network)
        .await?
    {
        tracing::info!("firewall: {repair}");
    }
    service.metrics.firewall_applies.inc();
    if pool.is_none() {
        for led in Led::all(&service.config) {
            // One node: it holds every space's addresses.
            service.metrics.set_leader(&led.space(), true);
        }
    }
    let resolvers = start_networks(&service).await?;
    let api = ApiState { service, auth };
    Ok(Started {
        api: Arc::new(api),
        tls: tls_config,
        pool,
        resolvers,
    })
}

/// The private networks, after the egresses (their rules and forwarding are in place
/// already): devices (matching the store) → directories → resolvers on the addresses the
/// devices now hold.
async fn start_networks(networks: &LeaseService) -> Result<Resolvers, DaemonError> {
    for (network, changes) in networks.reconcile_networks().await {
        let changes = changes?;
        tracing::info!(%network, ?changes, "network WireGuard device reconciled");
    }
    networks.publish_all().await;
    let mut resolvers = Vec::new();
    for n in networks.networks() {
        let (directory, counts) = (networks.directory(&n.name), networks.dns_counts(&n.name));
        resolvers.push(dns_server::start(n, directory, counts).await?);
        tracing::info!(network = %n.name, dns = %n.dns(), "resolver ready");
    }
    Ok(resolvers)
}

/// Runs the daemon until SIGTERM or SIGINT. Interfaces and rules stay in place on exit.
pub async fn serve(config: Config) -> Result<(), DaemonError> {
    match crate::descriptors::raise_limit() {
        Ok(limit) => tracing::info!(limit, "file descriptors"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let listen = config.api.listen;
    let Started {
        api,
        tls: tls_config,
        pool,
        resolvers: _resolvers,
    } = start(config).await?;

    let listener = std::net::TcpListener::bind(listen).map_err(|source| DaemonError::Listen {
        addr: listen,
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        })?;
    let handle = axum_server::Handle::new();
    let server = api_server(listener, tls_config, &api, handle.clone()).map_err(|source| {
        DaemonError::Listen {
            addr: listen,
            source,
        }
    })?;

    let tasks = background_tasks(&api, pool)?;

    tracing::info!(%listen, "wgexitd ready");
    let mut server = tokio::spawn(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = wait_for_signal() => {
            tracing::info!("shutting down; WireGuard interfaces and rules stay up (use `wgexitd teardown` to remove them)");
            handle.graceful_shutdown(Some(Duration::from_secs(5)));
            server.await
        }
    };
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(control::socket_path(&api.service.config.state_dir));
    match served {
        Ok(r) => r.map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        }),
        Err(e) => Err(DaemonError::Listen {
            addr: listen,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Everything that runs beside the API until shutdown: the control socket, token reloads,
/// the reconcile and collection loops (of every space), a pool member's loops, the metrics
/// listener.
fn background_tasks(
    api: &Arc<ApiState>,
    pool: Option<member::Pool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, DaemonError> {
    let service = &api.service;
    // In a pool only an egress's leader sees its peers' traffic, so only it collects.
    let leading = pool.as_ref().map(member::Pool::leading);
    let (attribution, attribution_tasks) = attribution::start(service)?;
    let mut tasks = vec![
        tokio::spawn(control::serve(
            control::bind(&service.config.state_dir)?,
            service.clone(),
            attribution,
        )),
        tokio::spawn(token_reload_loop(api.clone())),
        tokio::spawn(reconcile_loop(api.clone())),
        tokio::spawn(collect_loop(api.clone(), leading)),
    ];
    tasks.extend(attribution_tasks);
    if let Some(p) = pool {
        tasks.extend(p.spawn(service.clone())?);
    }
    tasks.extend(side_listeners(service)?);
    Ok(tasks)
}

/// The HTTPS API on `listener`, with its limits (see [`limits`]).
fn api_server(
    listener: std::net::TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    api: &Arc<ApiState>,
    handle: axum_server::Handle<std::net::SocketAddr>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let limits = &api.service.config.api;
    let (max, header, idle) = (
        limits
            .max_connections
            .min(crate::descriptors::api_connections(
                crate::descriptors::limit(),
            )),
        limits.header_timeout,
        limits.idle_timeout,
    );
    let mut server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(tls_config),
    )?
    .map(|tls| {
        // Without TCP_NODELAY a response written in two TLS records waits for the client's
        // delayed ACK (40 ms) before its second half goes out.
        let tls = tls
            .handshake_timeout(header)
            .acceptor(axum_server::accept::NoDelayAcceptor::new());
        limits::CappedAcceptor::new(tls, max, idle)
    })
    .handle(handle);
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header);
    Ok(server.serve(
        http::router(api.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    ))
}

/// How often token files are checked for changes.
const TOKEN_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Re-reads token files on SIGHUP, and those that changed every [`TOKEN_CHECK_INTERVAL`].
async fn token_reload_loop(api: Arc<ApiState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(TOKEN_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        api.auth.reload(forced);
    }
}

/// Every `reconcile_interval`: repairs devices that drifted from the store, and a firewall
/// that was flushed or changed.
/// The listeners beside the API: `/metrics` on `[metrics] listen` (when configured) and the
/// status socket in `state_dir`.
fn side_listeners(
    service: &Arc<LeaseService>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, DaemonError> {
    let mut tasks = Vec::new();
    if let Some(m) = &service.config.metrics {
        let task = metrics::server::spawn(m.listen, service.clone()).map_err(|source| {
            DaemonError::Listen {
                addr: m.listen,
                source,
            }
        })?;
        tracing::info!(listen = %m.listen, "metrics served at /metrics");
        tasks.push(task);
    }
    Ok(tasks)
}

/// Every `reconcile_interval`: repairs the devices of every space that drifted from the
/// store, then a firewall that was flushed or changed.
async fn reconcile_loop(api: Arc<ApiState>) {
    let service = &api.service;
    let mut tick = tokio::time::interval(service.config.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        for (egress, changes) in service.reconcile().await {
            if let Ok(c) = &changes {
                service.metrics.reconciled(&egress, c);
            }
            report_reconciled(&Space::Egress(egress), changes);
        }
        for (network, changes) in service.reconcile_networks().await {
            report_reconciled(&Space::Network(network), changes);
        }
        let config = &service.config;
        match service
            .dataplane()
            .apply_rules(&config.egress, &config.network)
            .await
        {
            Ok(repairs) => {
                if !repairs.is_empty() {
                    service.metrics.firewall_applies.inc();
                }
                for repair in repairs {
                    tracing::warn!("firewall had drifted: {repair}");
                }
            }
            Err(e) => tracing::error!(error = %e, "firewall check failed"),
        }
    }
}

fn report_reconciled(space: &Space, changes: Result<Changes, DataplaneError>) {
    match changes {
        Ok(c) if c != Changes::default() => {
            tracing::warn!(%space, changes = ?c, "WireGuard device had drifted; repaired")
        }
        Ok(_) => {}
        // E.g. a wireguard-go too busy to answer: its device and sessions are left alone,
        // and the next round looks again.
        Err(e) => tracing::warn!(%space, error = %e, "cannot reconcile this round; skipped"),
    }
}

/// Every `collect_interval`: releases the leases of peers that have gone away, in every
/// space (in a pool, of the spaces this member leads: only their leader sees their peers'
/// traffic); a private network's peers (laptops) are never collected.
async fn collect_loop(api: Arc<ApiState>, leading: Option<Leading>) {
    let service = &api.service;
    let mut activity = Activity::default();
    let mut tick = tokio::time::interval(service.config.collect_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let which = |space: &Space| leading.as_ref().is_none_or(|l| l.leads(space));
    let mut terms = std::collections::HashMap::new();
    loop {
        tick.tick().await;
        // A space taken over since the last look: its peers' clocks start now.
        for space in leading.iter().flat_map(|l| l.taken_over(&mut terms)) {
            activity.restart(&space.store_key());
        }
        for (lease, why) in service.collect_where(&mut activity, which).await {
            tracing::info!(
                space = %Space::from_store_key(&lease.egress), address = %lease.address, public_key = %lease.public_key,
                container_id = %lease.attachment.container_id, host = %lease.attachment.host,
                "idle lease collected: {why}"
            );
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Removes the nftables tables and every egress's and network's WireGuard interface.
/// Leases stay in the store, so a later `serve` brings the same tunnels back.
pub async fn teardown(config: &Config) -> Result<(), DaemonError> {
    HostDataplane::open(config.backend)?
        .teardown(&config.egress, &config.network)
        .await?;
    // A pool member also lets go of the floating addresses it may hold.
    if let Some(cluster) = &config.cluster {
        let floating = Floating::new(cluster.float.clone(), &cluster.node)?;
        for group in groups(Led::all(config)) {
            floating.release(&group).await?;
        }
    }
    Ok(())
}
