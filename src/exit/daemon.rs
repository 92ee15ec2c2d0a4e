//! `wgexitd serve`, `teardown` and `check-config` (`status` is [`crate::exit::status`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::exit::api::auth::Authorizer;
use crate::exit::api::tls::{self, TlsError};
use crate::exit::api::tokens::TokenError;
use crate::exit::api::{http, ApiState};
use crate::exit::config::{Config, ConfigError};
use crate::exit::dataplane::{Dataplane, DataplaneError, HostDataplane};
use crate::exit::identity::{Identities, IdentityError};
use crate::exit::leases::collect::Activity;
use crate::exit::leases::redb::RedbStore;
use crate::exit::leases::registry::Registry;
use crate::exit::leases::service::LeaseService;
use crate::exit::leases::store::{LeaseStore, StoreError, Write};
use crate::exit::status::StatusError;
use crate::exit::{metrics, status};
use crate::fsutil;

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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Checks what `serve` would read before touching anything: the token files.
pub fn check(config: &Config) -> Result<(), DaemonError> {
    Authorizer::load(config)?;
    Ok(())
}

/// The lease registry over the store, with the stored leases that no longer fit the config
/// (egress gone, pool changed) removed from the store and reported.
fn open_leases(config: &Config) -> Result<Registry, DaemonError> {
    let store: Arc<dyn LeaseStore> =
        Arc::new(RedbStore::open(&config.state_dir.join("leases.redb"))?);
    let (registry, misfits) = Registry::load(&config.egress, store.clone())?;
    let mut removals = Vec::new();
    for m in misfits {
        tracing::warn!(
            egress = %m.lease.egress, address = %m.lease.address, public_key = %m.lease.public_key,
            "stored lease does not fit the current config (egress gone or pool changed); dropping it"
        );
        removals.push(Write::Delete {
            egress: m.lease.egress,
            public_key: m.lease.public_key,
            owner: None,
        });
    }
    if !removals.is_empty() {
        store.apply(&removals)?;
    }
    Ok(registry)
}

/// Everything `serve` sets up before it answers requests, in order: config (read already)
/// → tokens → store → identities → dataplane → API's TLS. Nothing is written before the
/// token files have been read, and the network is touched last.
pub async fn start(
    config: Config,
) -> Result<(Arc<ApiState>, Arc<rustls::ServerConfig>), DaemonError> {
    let auth = Authorizer::load(&config)?;
    fsutil::private_dir(&config.state_dir).map_err(|source| DaemonError::Io {
        path: config.state_dir.clone(),
        source,
    })?;
    let registry = open_leases(&config)?;
    let identities = Identities::load_or_create(&config.state_dir, &config.egress)?;
    let (cert, key) = match &config.api.tls_files {
        Some((c, k)) => (c.clone(), k.clone()),
        None => tls::ensure_generated(&config.state_dir, &config.api)?,
    };
    let tls_config = tls::server_config(&cert, &key)?;

    let dataplane = HostDataplane::open(config.backend)?;
    tracing::info!(backend = ?dataplane.backend().kind(), "WireGuard backend");
    let service = Arc::new(LeaseService::new(config, registry, dataplane, identities));
    service.metrics.register(
        "wgexit_auth_failures",
        "API requests refused for their token.",
        auth.failures.clone(),
    );
    for (egress, changes) in service.reconcile().await? {
        tracing::info!(%egress, ?changes, "WireGuard device reconciled");
        service.metrics.reconciled(&egress, &changes);
    }
    service
        .dataplane()
        .apply_rules(&service.config.egress)
        .await?;
    service.metrics.firewall_applies.inc();
    for e in &service.config.egress {
        // One node: it holds every egress's addresses.
        service.metrics.set_leader("egress", &e.name, true);
    }
    Ok((Arc::new(ApiState { service, auth }), tls_config))
}

/// Runs the daemon until SIGTERM or SIGINT. Interfaces and rules stay in place on exit.
pub async fn serve(config: Config) -> Result<(), DaemonError> {
    let listen = config.api.listen;
    let (api, tls_config) = start(config).await?;

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
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(tls_config),
    )
    .map_err(|source| DaemonError::Listen {
        addr: listen,
        source,
    })?
    // Without TCP_NODELAY a response written in two TLS records waits for the client's
    // delayed ACK (40 ms) before its second half goes out.
    .map(|tls| tls.acceptor(axum_server::accept::NoDelayAcceptor::new()))
    .handle(handle.clone())
    .serve(http::router(api.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>());

    let reconciler = tokio::spawn(reconcile_loop(api.service.clone()));
    let collector = tokio::spawn(collect_loop(api.service.clone()));
    let side = side_listeners(&api.service)?;

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
    reconciler.abort();
    collector.abort();
    for task in side {
        task.abort();
    }
    let _ = std::fs::remove_file(status::server::socket_path(&api.service.config.state_dir));
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
    let state_dir = &service.config.state_dir;
    let task =
        status::server::spawn(state_dir, service.clone()).map_err(|source| DaemonError::Io {
            path: status::server::socket_path(state_dir),
            source,
        })?;
    tasks.push(task);
    Ok(tasks)
}

/// Every `reconcile_interval`: repairs devices that drifted from the store.
async fn reconcile_loop(service: Arc<LeaseService>) {
    let mut tick = tokio::time::interval(service.config.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match service.reconcile().await {
            Ok(changes) => {
                for (egress, c) in changes {
                    service.metrics.reconciled(&egress, &c);
                    if c != Default::default() {
                        tracing::warn!(%egress, changes = ?c, "WireGuard device had drifted; repaired");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reconcile failed"),
        }
    }
}

/// Every `collect_interval`: releases the leases of peers that have gone away.
async fn collect_loop(service: Arc<LeaseService>) {
    let mut activity = Activity::default();
    let mut tick = tokio::time::interval(service.config.collect_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (lease, why) in service.collect(&mut activity).await {
            tracing::info!(
                egress = %lease.egress, address = %lease.address, public_key = %lease.public_key,
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

/// Removes the nftables table and every egress's WireGuard interface. Leases stay in the
/// store, so a later `serve` brings the same tunnels back.
pub async fn teardown(config: &Config) -> Result<(), DaemonError> {
    HostDataplane::open(config.backend)?
        .teardown(&config.egress)
        .await?;
    Ok(())
}
