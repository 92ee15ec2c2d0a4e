//! `wgexit`: the CNI plugin, and `wgexit oci-hook add|del` for OCI runtime hooks. Thin: all
//! logic is in `wgexit::cni`.

use std::io::{Read, Write};
use std::path::PathBuf;

use wgexit::cni::{self, env::CniEnv, error::CniError, oci_hook};

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("oci-hook") {
        std::process::exit(oci_hook_main(&args[1..]));
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
