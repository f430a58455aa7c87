//! The `blockwise` binary: see [`cli`].

mod bench;
mod cli;
mod restore_cmd;
mod schedule_cmd;
mod service;
mod simulate;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (docs/decisions.md, "The binary allocates with jemalloc"): one arena; small
/// thread caches (only sizes up to 1 KiB, at most 32 of a size: tokio's blocking pool runs many
/// threads, and jemalloc's default caches and eight arenas held ~70 MiB of a 100k-object
/// backup); freed pages go back to the system within a quarter of a second, by a background
/// thread, with `MADV_DONTNEED` (pages only marked `MADV_FREE` stay in the resident count until
/// the kernel needs them; within a second, planning's freed scratch was still resident under its
/// next allocations: 260 against 252 MiB at a million objects, at no measured cost in seconds).
/// `_RJEM_MALLOC_CONF` overrides them at run time.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] = b"narenas:1,tcache_max:1024,tcache_nslots_small_max:32,\
background_thread:true,dirty_decay_ms:250,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    cli::main()
}
