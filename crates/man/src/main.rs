//! `wgexit-man DIR`: writes wgexit's command man pages into `DIR/man8/`. Thin: the pages are
//! made in the library.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: wgexit-man DIR (the pages go to DIR/man8/)");
        return ExitCode::from(2);
    };
    match wgexit_man::write_all(&dir) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "wgexit-man: cannot write the pages under {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
