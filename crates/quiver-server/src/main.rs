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
