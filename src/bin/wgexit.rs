//! `wgexit`: the CNI plugin. Thin: all logic is in `wgexit::cni`.

use std::io::{Read, Write};

use wgexit::cni::{self, env::CniEnv};

/// Configs are small; refuse to buffer more than this from a runtime.
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    let env = CniEnv::from_env();
    if env.command.is_empty() {
        eprint!("{}", cni::about());
        return;
    }
    let mut stdin = Vec::new();
    let _ = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let err = cni::error::CniError::new(cni::error::Code::Io, format!("cannot start: {e}"));
            println!("{}", err.to_json(&cni::config::version_of(&stdin)));
            std::process::exit(1);
        }
    };
    let outcome = runtime.block_on(cni::run(&env, &stdin));
    let mut out = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(out, "{}", outcome.stdout);
    }
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
