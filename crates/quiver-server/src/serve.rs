//! `quiver serve`: tables, engine, listener, refresh loop, graceful shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_flight::flight_service_server::FlightServiceServer;
use quiver::catalog::{CatalogFile, TableDefinition, parse_table_flag, tables_in_data_dir};
use quiver::flight::{QuiverFlightService, SendOptions};
use quiver::io::{IoOptions, MmapLimits};
use quiver::query::{QueryEngine, QueryOptions};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::cli::ServeArgs;
use crate::demo;

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let tables = table_definitions(&args)?;
    let options = QueryOptions {
        cpu_threads: args
            .cpu_threads
            .unwrap_or_else(|| QueryOptions::default().cpu_threads),
        datafusion_config: args
            .datafusion_config
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .with_context(|| format!("--datafusion-config expects KEY=VALUE, got '{kv}'"))
            })
            .collect::<anyhow::Result<_>>()?,
        io: IoOptions {
            mode: args.io,
            mmap: MmapLimits {
                max_files: args.mmap_max_files,
                max_bytes: args.mmap_max_bytes.0 as u64,
            },
        },
    };
    let engine = Arc::new(QueryEngine::new(tables, options).await?);
    for name in engine.catalog().table_names() {
        if let Some(t) = engine.catalog().get(&name) {
            tracing::info!(table = %name, files = t.num_files(), rows = t.num_rows(), "serving");
        }
    }

    // Bind first: the address file is written only once clients can connect.
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(file) = &args.listen_addr_file {
        write_atomically(file, &format!("{addr}\n"))?;
    }
    tracing::info!(%addr, "Flight server listening");

    let _refresh = refresh_loop(Arc::clone(&engine), args.refresh_interval);

    let service = QuiverFlightService::new(
        Arc::clone(&engine),
        SendOptions {
            max_flight_data_size: args.max_flight_data_size.0,
            ..SendOptions::default()
        },
    );
    let flight = FlightServiceServer::new(service)
        .max_decoding_message_size(args.max_decoding_message_size.0)
        .max_encoding_message_size(args.max_encoding_message_size.0);

    let shutdown = CancellationToken::new();
    let signal = shutdown_on_signal(shutdown.clone());
    let incoming = TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(flight)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .context("the Flight server failed")?;
    drop(signal);
    tracing::info!("stopped");
    Ok(())
}

/// Collects tables from --table, --data-dir, --catalog and --demo (all combine).
fn table_definitions(args: &ServeArgs) -> anyhow::Result<Vec<TableDefinition>> {
    let mut tables = Vec::new();
    for flag in &args.tables {
        tables.push(parse_table_flag(flag)?);
    }
    if let Some(dir) = &args.data_dir {
        tables.extend(tables_in_data_dir(dir)?);
    }
    if let Some(file) = &args.catalog {
        tables.extend(CatalogFile::load(file)?);
    }
    if args.demo {
        let dir = demo::ensure(&cache_dir(args.cache_dir.as_deref()), args.demo_rows)?;
        tables.extend(tables_in_data_dir(&dir)?);
    }
    if tables.is_empty() {
        bail!(
            "no tables to serve: pass --table NAME=PATH, --data-dir DIR, --catalog FILE or --demo"
        );
    }
    Ok(tables)
}

fn cache_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("quiver");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("quiver"),
        None => std::env::temp_dir().join("quiver-cache"),
    }
}

/// Re-lists every table each `interval` (never, if zero). Aborted when dropped.
fn refresh_loop(engine: Arc<QueryEngine>, interval: Duration) -> Option<AbortOnDropHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    Some(AbortOnDropHandle::new(
        tokio::runtime::Handle::current().spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is immediate; tables were just loaded
            loop {
                ticker.tick().await;
                let summary = engine.refresh().await;
                if !summary.changed.is_empty() {
                    tracing::info!(tables = ?summary.changed, "refreshed");
                }
            }
        }),
    ))
}

/// Cancels `token` on SIGINT or SIGTERM. Aborted when dropped.
fn shutdown_on_signal(token: CancellationToken) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::runtime::Handle::current().spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
        token.cancel();
    }))
}

fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
