//! `wgexitd`: the exit-node daemon. Thin: all logic is in `wgexitd`.

use std::process::ExitCode;

use clap::Parser;
use wgexitd::attribution::command as attribution;
use wgexitd::cli::{Cli, Command};
use wgexitd::config::Config;
use wgexitd::{daemon, status};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::load(cli.command.config()) {
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
