//! `wgexit`: the CNI plugin (no arguments, `CNI_COMMAND` set), `wgexit oci-hook add|del` for
//! OCI runtime hooks, the netavark plugin's commands, and `wgexit peer create|list|remove` for
//! laptops joining a private network. Thin: the command line is `wgexit_plugin::cli`, the
//! logic `wgexit_plugin::cni`, `wgexit_plugin::netavark` and `wgexit_plugin::peer`.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Parser;
use wgexit_plugin::cli::{
    Cli, Command, GatewayArgs, HookArgs, HookPhase, PeerCommand, SparesCommand,
};
use wgexit_plugin::cni::{self, env::CniEnv, error::CniError, oci_hook, spares};
use wgexit_plugin::{netavark, peer};

/// Configs are small; refuse to buffer more than this from a runtime.
const MAX_STDIN: u64 = 1 << 20;

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

fn oci_hook_main(phase: HookPhase) -> i32 {
    let (phase, HookArgs { config, ifname }) = match phase {
        HookPhase::Add(args) => (oci_hook::Phase::Add, args),
        HookPhase::Del(args) => (oci_hook::Phase::Del, args),
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

fn gateway(args: GatewayArgs) -> peer::Gateway {
    peer::Gateway {
        server: args.server,
        ca_file: args.ca_file,
        token_file: args.token_file,
        network: args.network,
    }
}

fn peer_main(command: PeerCommand) -> i32 {
    let result = match command {
        PeerCommand::Create {
            gateway: args,
            name,
            out,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.conf", args.network)));
            peer::create(&gateway(args), &name, &out).map(|grant| {
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
        PeerCommand::List { gateway: args } => peer::list(&gateway(args)).map(|l| print!("{l}")),
        PeerCommand::Remove {
            gateway: args,
            name,
        } => peer::remove(&gateway(args), &name),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wgexit peer: {e}");
            1
        }
    }
}

/// `wgexit spares list|clear|refill`.
fn spares_main(command: SparesCommand) -> i32 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wgexit spares: {e}");
            return 1;
        }
    };
    let result = match command {
        SparesCommand::List(args) => {
            for (spare, serving) in spares::list(&args.data_dir) {
                let state = if serving { "serving" } else { "dead" };
                println!("{} pid={} {state}", spare.name, spare.pid);
            }
            Ok(())
        }
        SparesCommand::Clear(args) => {
            rt.block_on(spares::clear_all(&args.data_dir))
                .map(|removed| {
                    println!(
                        "removed {} spare link(s) {}",
                        removed.len(),
                        removed.join(" ")
                    )
                })
        }
        SparesCommand::Refill {
            dir,
            count,
            log_file,
            log_max_bytes,
        } => {
            let refilled = rt.block_on(spares::refill(&dir.data_dir, count));
            if let Err(e) = &refilled {
                let log = log_file.map(|file| cni::log::LogConfig {
                    file,
                    level: cni::log::LogLevel::Error,
                    max_bytes: log_max_bytes,
                });
                spares::log_error(log.as_ref(), &e.to_string());
            }
            refilled.map(|_| ())
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wgexit spares: {e}");
            1
        }
    }
}

/// The CNI plugin: the command in `CNI_COMMAND`, the config on stdin, the answer on stdout.
fn cni_main() -> i32 {
    let env = CniEnv::from_env();
    if env.command.is_empty() {
        eprint!("{}", cni::about());
        return 0;
    }
    let stdin = read_stdin();
    let outcome = match runtime() {
        Ok(rt) => rt.block_on(cni::run(&env, &stdin)),
        Err(e) => cni::Outcome {
            stdout: e.to_json(&cni::config::version_of(&stdin)),
            exit_code: 1,
        },
    };
    let code = print_outcome(&outcome);
    spares::start_scheduled_refill();
    code
}

fn print_outcome(outcome: &cni::Outcome) -> i32 {
    let mut out = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(out, "{}", outcome.stdout);
    }
    let _ = out.flush();
    outcome.exit_code
}

fn main() {
    let code = match Cli::parse().command {
        None => cni_main(),
        Some(Command::OciHook { phase }) => {
            let code = oci_hook_main(phase);
            spares::start_scheduled_refill();
            code
        }
        Some(Command::Peer { command }) => peer_main(command),
        Some(Command::Spares { command }) => spares_main(command),
        Some(Command::Info) => print_outcome(&netavark::info()),
        Some(Command::Create) => print_outcome(&netavark::answer(netavark::create(&read_stdin()))),
        Some(Command::Setup { netns }) => {
            let stdin = read_stdin();
            let result = runtime().and_then(|rt| rt.block_on(netavark::setup(&netns, &stdin)));
            let code = print_outcome(&netavark::answer(result));
            spares::start_scheduled_refill();
            code
        }
        Some(Command::Teardown { netns }) => {
            let stdin = read_stdin();
            let result = runtime().and_then(|rt| rt.block_on(netavark::teardown(&netns, &stdin)));
            // Success prints nothing.
            print_outcome(&netavark::answer(result.map(|()| None::<()>)))
        }
    };
    std::process::exit(code);
}
