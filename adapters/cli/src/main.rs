//! The `blockwise` binary: see [`cli`].

mod bench;
mod cli;
mod simulate;

fn main() -> std::process::ExitCode {
    cli::main()
}
