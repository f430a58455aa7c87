//! The `blockwise` binary: see [`cli`].

mod bench;
mod cli;
mod service;
mod simulate;

fn main() -> std::process::ExitCode {
    cli::main()
}
