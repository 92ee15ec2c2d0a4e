//! `wgexitd serve` and `wgexitd teardown`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::exit::collect::Activity;
use crate::exit::config::{Config, ConfigError};
use crate::exit::firewall::{
    EgressRules, Firewall, FirewallError, RoutingGuard, Verification, DEFAULT_TABLE,
};
use crate::exit::http;
use crate::exit::reconcile::ReconcileError;
use crate::exit::registry::Registry;
use crate::exit::service::{rules_for, Exit};
use crate::exit::store::{LeaseStore, RedbStore, StoreError};
use crate::exit::sysctl::{self, SysctlError};
use crate::exit::tls::{self, TlsError};
use crate::exit::tokens::{TokenError, Tokens};
use crate::fsutil;
use crate::keys::Key;
use crate::net::{LinkError, Netlink};
use crate::wg::{Backend, WgError, WireGuard};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error(transparent)]
    Tls(#[from] TlsError),
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The egress's WireGuard private key, made on first start and kept in `state_dir/keys`.
fn egress_private_key(state_dir: &Path, egress: &str) -> Result<Key, DaemonError> {
    let dir = state_dir.join("keys");
    fsutil::private_dir(&dir).map_err(io_err(&dir))?;
    let path = dir.join(format!("{egress}.key"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Key::from_base64(&text).map_err(|e| DaemonError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate_private().map_err(|e| DaemonError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            fsutil::write_private(&path, format!("{key}\n").as_bytes()).map_err(io_err(&path))?;
            Ok(key)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Checks what `serve` would read before touching anything: the token files.
pub fn check(config: &Config) -> Result<(), DaemonError> {
    load_tokens(config).map(|_| ())
}

fn load_tokens(config: &Config) -> Result<HashMap<String, Tokens>, DaemonError> {
    let mut tokens = HashMap::new();
    for e in &config.egress {
        tokens.insert(e.name.clone(), Tokens::load(&e.token_file)?);
    }
    Ok(tokens)
}

/// Everything `serve` sets up before it answers requests: nothing is written before the
/// token files have been read, and the network is touched last.
pub async fn start(config: Config) -> Result<(Arc<Exit>, Arc<rustls::ServerConfig>), DaemonError> {
    let tokens = load_tokens(&config)?;
    fsutil::private_dir(&config.state_dir).map_err(io_err(&config.state_dir))?;
    let mut keys = HashMap::new();
    for e in &config.egress {
        keys.insert(
            e.name.clone(),
            egress_private_key(&config.state_dir, &e.name)?,
        );
    }
    let (cert, key) = match &config.api.tls_files {
        Some((c, k)) => (c.clone(), k.clone()),
        None => tls::ensure_generated(&config.state_dir, &config.api)?,
    };
    let tls_config = tls::server_config(&cert, &key)?;

    let store: Arc<dyn LeaseStore> =
        Arc::new(RedbStore::open(&config.state_dir.join("leases.redb"))?);
    let (registry, misfits) = Registry::load(&config.egress, store.clone())?;
    for m in misfits {
        tracing::warn!(
            egress = %m.lease.egress, address = %m.lease.address, public_key = %m.lease.public_key,
            "stored lease does not fit the current config (egress gone or pool changed); dropping it"
        );
        store.remove(&m.lease.egress, &m.lease.public_key)?;
    }

    let backend = Backend::open(config.backend)?;
    tracing::info!(backend = ?backend.kind(), "WireGuard backend");
    let netlink = Netlink::current()?;
    // Rules first, forwarding last: no tunnel packet is ever forwarded unfiltered or unNATed.
    let rules: Vec<_> = config.egress.iter().map(rules_for).collect();
    for repair in ensure_firewall(&netlink, &rules).await? {
        tracing::info!("firewall: {repair}");
    }
    let exit = Arc::new(Exit::new(config, registry, backend, netlink, keys, tokens));

    for (egress, changes) in exit.reconcile().await? {
        tracing::info!(%egress, ?changes, "WireGuard device reconciled");
    }
    sysctl::ensure(&["net", "ipv4", "ip_forward"], "1")?;
    for e in &exit.config.egress {
        sysctl::prepare_exit(&e.wg_interface, &e.interface)?;
    }
    Ok((exit, tls_config))
}

/// Makes the nftables table and the fail-closed routing rules match `egresses`; returns what
/// it had to repair (nothing when both were in place).
async fn ensure_firewall(
    netlink: &Netlink,
    egresses: &[EgressRules],
) -> Result<Vec<String>, DaemonError> {
    let firewall = Firewall::new(DEFAULT_TABLE);
    let mut repairs = Vec::new();
    match firewall.verify(egresses)? {
        Verification::Matches => {}
        Verification::Missing => repairs.push(format!(
            "table inet {DEFAULT_TABLE} was missing; applied it"
        )),
        Verification::Differs(what) => repairs.push(format!(
            "table inet {DEFAULT_TABLE} differed from the config ({what}); replaced it"
        )),
    }
    if !repairs.is_empty() {
        firewall.apply(egresses)?;
    }
    let wg: Vec<String> = egresses.iter().map(|e| e.wg_interface.clone()).collect();
    let (added, removed) = RoutingGuard::default()
        .ensure(netlink, &wg)
        .await
        .map_err(FirewallError::from)?;
    for rule in added {
        repairs.push(format!("added fail-closed routing rule {rule:?}"));
    }
    for rule in removed {
        repairs.push(format!("removed stale routing rule {rule:?}"));
    }
    Ok(repairs)
}

/// Runs the daemon until SIGTERM or SIGINT. Interfaces and rules stay in place on exit.
pub async fn serve(config: Config) -> Result<(), DaemonError> {
    let listen = config.api.listen;
    let (exit, tls_config) = start(config).await?;

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
    .serve(
        http::router(exit.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    );

    let reconciler = tokio::spawn(reconcile_loop(exit.clone()));
    let collector = tokio::spawn(collect_loop(exit.clone()));

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

/// Every `reconcile_interval`: repairs devices that drifted from the store.
async fn reconcile_loop(exit: Arc<Exit>) {
    let mut tick = tokio::time::interval(exit.config.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match exit.reconcile().await {
            Ok(changes) => {
                for (egress, c) in changes {
                    if c != Default::default() {
                        tracing::warn!(%egress, changes = ?c, "WireGuard device had drifted; repaired");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reconcile failed"),
        }
        match ensure_firewall(exit.netlink(), &exit.firewall_rules()).await {
            Ok(repairs) => {
                for repair in repairs {
                    tracing::warn!("firewall had drifted: {repair}");
                }
            }
            Err(e) => tracing::error!(error = %e, "firewall check failed"),
        }
    }
}

/// Every `collect_interval`: releases the leases of peers that have gone away.
async fn collect_loop(exit: Arc<Exit>) {
    let mut activity = Activity::default();
    let mut tick = tokio::time::interval(exit.config.collect_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (lease, why) in exit.collect(&mut activity).await {
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
    Firewall::new(DEFAULT_TABLE).teardown()?;
    let backend = Backend::open(config.backend)?;
    let netlink = Netlink::current()?;
    for e in &config.egress {
        backend.delete(&e.wg_interface).await?;
        netlink.delete_link(&e.wg_interface).await?;
    }
    RoutingGuard::default()
        .remove(&netlink)
        .await
        .map_err(FirewallError::from)?;
    Ok(())
}
