//! `wgexitd`'s command line: what the binary parses and what `wgexitd(8)` is generated from
//! (`crates/man`), so the manual cannot drift from the program.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::attribution::{command as attribution, Proto};

/// The parsed command line.
#[derive(Parser)]
#[command(
    name = "wgexitd",
    version,
    about = "wgexit exit-node daemon: static egress IPs over WireGuard",
    long_about = "wgexit's exit node and gateway: per egress a WireGuard interface, its overlay \
                  pool and SNAT to static egress IPs; per private network a WireGuard interface \
                  and a resolver for .internal names; an HTTPS control API that leases overlay \
                  addresses to the wgexit plugin. The config is described in wgexitd.toml(5)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `wgexitd`'s subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run in the foreground until SIGTERM/SIGINT (which leave tunnels and rules up).
    Serve {
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
    /// Remove the WireGuard interfaces and the nftables table (leases stay in the store).
    Teardown {
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
    /// Check a config (and the token files it names), report stored leases it has no
    /// egress for, and exit.
    CheckConfig {
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
    /// Show what each egress of the running daemon is doing: addresses, pool use, peers by
    /// handshake age, bytes; in a pool, its members, leaders and lease counts.
    Status {
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
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
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
    /// Every recorded flow that started at or after a time, as JSON lines (for a SIEM).
    Flows {
        /// An RFC 3339 time, e.g. 2026-12-05T00:00:00Z.
        #[arg(long, value_parser = attribution::parse_time)]
        since: u64,
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
    /// Stored leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
}

/// `wgexitd leases …`.
#[derive(Subcommand)]
pub enum LeasesCommand {
    /// Delete the stored leases the config has no place for (egress renamed or removed,
    /// pool changed); they are kept until this is run.
    Prune {
        /// The config, e.g. /etc/wgexitd/wgexitd.toml (see wgexitd.toml(5)).
        #[arg(long, short, value_name = "PATH")]
        config: PathBuf,
    },
}

impl Command {
    /// The config file every subcommand names.
    pub fn config(&self) -> &PathBuf {
        let (Command::Serve { config }
        | Command::Teardown { config }
        | Command::CheckConfig { config }
        | Command::Leases {
            command: LeasesCommand::Prune { config },
        }
        | Command::Status { config, .. }
        | Command::Who { config, .. }
        | Command::Flows { config, .. }) = self;
        config
    }
}

/// The whole command line as clap describes it: for the man page and for tests.
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        super::command().debug_assert();
    }
}
