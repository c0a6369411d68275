//! The `quiver` binary: parse flags, set up logging, run a subcommand.

mod cli;
mod client;
mod demo;
mod listener;
mod metrics;
mod serve;
mod tls;

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc: less fragmentation than glibc's malloc under many threads freeing each
/// other's Arrow buffers, and statistics the metrics endpoint exports.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (before `main`). By default it
/// serves allocations of 8 MiB and more from an arena of their own that gives their
/// pages back to the kernel as soon as they are freed, so each new one faults its pages
/// in again: scans of wide string columns allocate such buffers for every batch (88,000
/// page faults and 150 ms of system time per query on the events dataset's `url`,
/// docs/benchmarks.md). `oversize_threshold:0` serves them from the ordinary arenas,
/// which keep freed pages for reuse until `dirty_decay_ms` (10 s) passes. Operators can
/// still override it with `_RJEM_MALLOC_CONF`, read after this.
#[allow(unsafe_code)] // the C symbol jemalloc reads (tikv-jemalloc-sys `malloc_conf`)
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a NUL-terminated static string.
    Some(unsafe { &*c"oversize_threshold:0".as_ptr() });

/// The client subcommands make one call: one thread is plenty.
fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A client subcommand's failure is one line on stderr and exit status 1: users read
/// it, so no backtrace.
fn exit_on_error<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1)
    })
}

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log_filter)?)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        cli::Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("quiver-io")
            .build()?
            .block_on(serve::run(*args)),
        cli::Command::Query(args) => {
            exit_on_error(client_runtime()?.block_on(client::query(args)));
            Ok(())
        }
        cli::Command::Tables(args) => {
            exit_on_error(client_runtime()?.block_on(client::tables(args)));
            Ok(())
        }
        cli::Command::Health(args) => {
            if !exit_on_error(client_runtime()?.block_on(client::health(args))) {
                std::process::exit(1);
            }
            Ok(())
        }
        cli::Command::Demo(args) => demo::write(&args.out, args.rows),
        cli::Command::Auth(cli::AuthCommand::HashPassword) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "no password on stdin");
            println!("{}", quiver::flight::auth::hash_password(password));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    /// jemalloc took the options of [`super::MALLOC_CONF`] (its default threshold is 8 MiB),
    /// unless the environment overrides them.
    #[test]
    fn jemalloc_serves_large_allocations_from_its_ordinary_arenas() {
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        // SAFETY: `opt.oversize_threshold` is a `size_t` option, read as a `usize`.
        #[allow(unsafe_code)]
        let threshold: usize =
            unsafe { tikv_jemalloc_ctl::raw::read(b"opt.oversize_threshold\0") }.unwrap();
        assert_eq!(threshold, 0);
    }
}
