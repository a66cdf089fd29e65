use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baton_cli::cli::Cli::parse();
    match baton_cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("baton: {err:#}");
            baton_cli::exit_code_for(&err)
        }
    }
}
