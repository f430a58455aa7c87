//! The `blockwise` binary: see [`cli`].

mod bench;
mod cli;
mod restore_cmd;
mod schedule_cmd;
mod service;
mod simulate;

fn main() -> std::process::ExitCode {
    cli::main()
}
