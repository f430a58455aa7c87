//! The `blockwise` binary: see `blockwise_adapters::cli`.

fn main() -> std::process::ExitCode {
    blockwise_adapters::cli::main()
}
