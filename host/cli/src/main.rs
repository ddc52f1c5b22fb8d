//! The `eventbroker` binary: parses the command line and hands over to the library.

mod cli;

/// mimalloc instead of the system allocator: the host allocates and frees small strings and
/// maps per event from several threads at once, where glibc's allocator spent a quarter of
/// the memory path's CPU (`cargo bench -p eventbroker-bench --bench all -- memory`, under
/// `perf`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
