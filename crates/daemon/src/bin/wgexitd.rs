//! `wgexitd`: the exit-node daemon. Thin: all logic is in `wgexitd`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgexitd::attribution::{command as attribution, Proto};
use wgexitd::config::Config;
use wgexitd::{daemon, status};

#[derive(Parser)]
#[command(
    name = "wgexitd",
    version,
    about = "wgexit exit-node daemon: static egress IPs over WireGuard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run in the foreground until SIGTERM/SIGINT (which leave tunnels and rules up).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove the WireGuard interfaces and the nftables table (leases stay in the store).
    Teardown {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config (and the token files it names), report stored leases it has no
    /// egress for, and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what each egress of the running daemon is doing: addresses, pool use, peers by
    /// handshake age, bytes; in a pool, its members, leaders and lease counts.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
        /// One row per lease (long on a busy exit node).
        #[arg(long)]
        peers: bool,
    },
    /// Which container held an egress IP and port, now or at a time: egress, container ID,
    /// host, owner, overlay address, and the flow's first and last time (from the running
    /// daemon's flow records; in a pool, every member's).
    Who {
        /// The egress IP and port, e.g. 203.0.113.77:40123 or [2001:db8::77]:40123.
        address: SocketAddr,
        /// tcp, udp or icmp (the port is then the echo identifier); tcp and udp when absent.
        #[arg(long, value_parser = attribution::parse_proto)]
        proto: Option<Proto>,
        /// An RFC 3339 time, e.g. 2026-12-05T12:03:00Z; now when absent.
        #[arg(long, value_parser = attribution::parse_time)]
        at: Option<u64>,
        /// The answer as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Every recorded flow that started at or after a time, as JSON lines (for a SIEM).
    Flows {
        /// An RFC 3339 time, e.g. 2026-12-05T00:00:00Z.
        #[arg(long, value_parser = attribution::parse_time)]
        since: u64,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Stored leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
}

#[derive(Subcommand)]
enum LeasesCommand {
    /// Delete the stored leases the config has no place for (egress renamed or removed,
    /// pool changed); they are kept until this is run.
    Prune {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let (Command::Serve { config }
    | Command::Teardown { config }
    | Command::CheckConfig { config }
    | Command::Leases {
        command: LeasesCommand::Prune { config },
    }
    | Command::Status { config, .. }
    | Command::Who { config, .. }
    | Command::Flows { config, .. }) = &cli.command;
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wgexitd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wgexitd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { .. } => daemon::serve(config).await,
            Command::Teardown { .. } => daemon::teardown(&config).await,
            Command::CheckConfig { .. } => daemon::check(&config).await.map(|misfits| {
                println!("{}: ok", config.path.display());
                for m in &misfits {
                    println!(
                        "stored lease without a place in this config (kept; `wgexitd leases prune` removes it): egress {} address {}{} key {} container {}",
                        m.lease.egress, m.lease.address,
                        m.lease.address6.map(|a| format!(" address6 {a}")).unwrap_or_default(),
                        m.lease.public_key, m.lease.attachment.container_id
                    );
                }
            }),
            Command::Leases { .. } => daemon::prune(&config).await.map(|pruned| {
                for m in &pruned {
                    println!(
                        "pruned: egress {} address {} key {}",
                        m.lease.egress, m.lease.address, m.lease.public_key
                    );
                }
                println!("{} stored lease(s) pruned", pruned.len());
            }),
            Command::Who {
                address,
                proto,
                at,
                json,
                ..
            } => attribution::who(&config.state_dir, address, proto, at, json)
                .await
                .map_err(Into::into),
            Command::Flows { since, .. } => attribution::flows(&config.state_dir, since)
                .await
                .map_err(Into::into),
            Command::Status { json, peers, .. } => {
                status::print(&config.state_dir, config.cluster.as_ref(), json, peers)
                    .await
                    .map_err(Into::into)
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgexitd: {e}");
            ExitCode::FAILURE
        }
    }
}
