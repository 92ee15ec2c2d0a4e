//! `wgexit`: the CNI plugin, `wgexit oci-hook add|del` for OCI runtime hooks, and
//! `wgexit peer create|list|remove` for laptops joining a private network. Thin: all logic
//! is in `wgexit::cni` and `wgexit_plugin::peer`.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use wgexit_plugin::cni::{self, env::CniEnv, error::CniError, oci_hook};
use wgexit_plugin::peer;

/// Configs are small; refuse to buffer more than this from a runtime.
const MAX_STDIN: u64 = 1 << 20;

const HOOK_USAGE: &str = "usage: wgexit oci-hook add|del --config FILE [--ifname NAME]
  add  in the createRuntime (or prestart) hook, del in the poststop hook;
  FILE holds the plugin's network config or a conflist with a wgexit plugin;
  NAME is the interface in the container (default eth0).";

fn read_stdin() -> Vec<u8> {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    stdin
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(cni::error::Code::Io, format!("cannot start: {e}")))
}

fn hook_args(args: &[String]) -> Result<(oci_hook::Phase, PathBuf, String), String> {
    let phase = match args.first().map(String::as_str) {
        Some("add") => oci_hook::Phase::Add,
        Some("del") => oci_hook::Phase::Del,
        _ => return Err("the first argument must be add or del".into()),
    };
    let (mut config, mut ifname) = (None, "eth0".to_string());
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match (a.as_str(), rest.next()) {
            ("--config", Some(v)) => config = Some(PathBuf::from(v)),
            ("--ifname", Some(v)) => ifname = v.clone(),
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    Ok((phase, config.ok_or("--config is required")?, ifname))
}

fn oci_hook_main(args: &[String]) -> i32 {
    let (phase, config, ifname) = match hook_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wgexit oci-hook: {e}\n{HOOK_USAGE}");
            return 2;
        }
    };
    let stdin = read_stdin();
    let result =
        runtime().and_then(|rt| rt.block_on(oci_hook::run(phase, &config, &ifname, &stdin)));
    match result {
        Ok(Some(v)) => {
            eprintln!("wgexit oci-hook: {v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("wgexit oci-hook: error {}: {e}", e.code as u32);
            1
        }
    }
}

/// `wgexit peer`: WireGuard configs for laptops joining a private network.
#[derive(Parser)]
#[command(
    name = "wgexit peer",
    about = "WireGuard peers (laptops) of a private network"
)]
struct PeerCli {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(Args)]
struct GatewayArgs {
    /// The gateway's API, e.g. https://198.51.100.2:7443
    #[arg(long)]
    server: String,
    /// The gateway's CA certificate (its state_dir/tls/ca.pem)
    #[arg(long)]
    ca_file: PathBuf,
    /// A file holding a token of the network
    #[arg(long)]
    token_file: PathBuf,
    /// The private network
    #[arg(long)]
    network: String,
}

impl GatewayArgs {
    fn gateway(self) -> peer::Gateway {
        peer::Gateway {
            server: self.server,
            ca_file: self.ca_file,
            token_file: self.token_file,
            network: self.network,
        }
    }
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Makes a key pair here, joins the network with its public key, and writes a
    /// wg-quick config (0600; an existing file is never overwritten)
    Create {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// The peer's name: it answers as <name>._peer.internal
        #[arg(long)]
        name: String,
        /// Where to write the config (default: ./<network>.conf; wg-quick names the
        /// interface after the file)
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Lists the network's peers: name, address, public key
    List {
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Takes a peer out of the network
    Remove {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[arg(long)]
        name: String,
    },
}

fn peer_main(args: &[String]) -> i32 {
    let cli = match PeerCli::try_parse_from(
        std::iter::once("wgexit peer".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        PeerCommand::Create { gateway, name, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.conf", gateway.network)));
            peer::create(&gateway.gateway(), &name, &out).map(|grant| {
                println!(
                    "wrote {}: {} joins {} as {} ({name}._peer.internal); bring it up with `wg-quick up {}`",
                    out.display(),
                    name,
                    grant.member.network,
                    grant.address.addr(),
                    out.display()
                );
            })
        }
        PeerCommand::List { gateway } => peer::list(&gateway.gateway()).map(|l| print!("{l}")),
        PeerCommand::Remove { gateway, name } => peer::remove(&gateway.gateway(), &name),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wgexit peer: {e}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("oci-hook") {
        std::process::exit(oci_hook_main(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("peer") {
        std::process::exit(peer_main(&args[1..]));
    }
    let env = CniEnv::from_env();
    if env.command.is_empty() {
        eprint!("{}", cni::about());
        return;
    }
    let stdin = read_stdin();
    let outcome = match runtime() {
        Ok(rt) => rt.block_on(cni::run(&env, &stdin)),
        Err(e) => cni::Outcome {
            stdout: e.to_json(&cni::config::version_of(&stdin)),
            exit_code: 1,
        },
    };
    let mut out = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(out, "{}", outcome.stdout);
    }
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
