//! `quiver serve`: tables, engine, listener, refresh loop, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use prometheus::Registry;
use quiver::audit::AuditLog;
use quiver::catalog::{
    CatalogFile, RowGroupAdmission, TableDefinition, TableLocation, parse_table_flag,
    tables_in_data_dir,
};
use quiver::cluster::{
    ClusterChannels, ClusterMetrics, ClusterMetricsLayer, ClusterSecret, TaskAdmission,
    TaskAdmissionOptions, WorkerSource, Workers, worker_routes,
};
use quiver::flight::auth::{Authenticator, LoginLimits};
use quiver::flight::{
    CompressionType, Http2Settings, MessageLimits, PreparedLimits, QuiverFlightService, SendOptions,
};
use quiver::io::remote::{BlockCache, CacheOptions, RemoteStores, StoreOptions, parse_s3_url};
use quiver::io::{IoOptions, MmapLimits};
use quiver::metrics::RpcMetrics;
use quiver::query::spawn;
use quiver::query::{
    AdmissionOptions, MemoryOptions, PoolKind, QueryEngine, QueryLimits, QueryOptions, SqlLimits,
};
use quiver::query::{ClusterPlanning, CpuRuntime, FilterPushdown, NodeLocations};
use quiver::wire::views::ViewTypes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic_health::server::HealthReporter;

use crate::cli::{
    FilterPushdownArg, Http2Args, IpcCompression, MemoryPoolArg, RowGroupAdmitArg, SendPath,
    ServeArgs, TlsArgs, ViewTypesArg,
};
use crate::demo;
use crate::listener;
use crate::metrics;
use crate::tls::{TlsReloader, TlsSettings};

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Everything that can be wrong with the flags fails before the tables load.
    let http2 = http2_settings(&args.http2)?;
    let tls = tls_reloader(&args.tls)?;
    let auth = match &args.auth_file {
        Some(path) => Some(Arc::new(Authenticator::load(
            path,
            args.session_ttl,
            LoginLimits {
                concurrency: args
                    .auth_concurrency
                    .map_or_else(|| LoginLimits::default().concurrency, |n| n as usize),
                queue: args.auth_queue,
                failures_before_backoff: args.auth_failures_before_backoff,
                backoff_max: args.auth_backoff_max,
            },
        )?)),
        None => None,
    };
    let (tables, remote) = table_definitions(&args).await?;
    let cluster = Cluster::from_args(&args).await?;
    let cpu_threads = args
        .cpu_threads
        .unwrap_or_else(|| QueryOptions::default().cpu_threads);
    let options = QueryOptions {
        cpu_threads,
        datafusion_config: args
            .datafusion_config
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .with_context(|| format!("--datafusion-config expects KEY=VALUE, got '{kv}'"))
            })
            .collect::<anyhow::Result<_>>()?,
        memory: MemoryOptions {
            limit: args.memory_limit.bytes(),
            pool: match args.memory_pool {
                MemoryPoolArg::Fair => PoolKind::Fair,
                MemoryPoolArg::Greedy => PoolKind::Greedy,
            },
            spill_dir: args.spill_dir.clone(),
            max_spill_bytes: args.max_spill_size.0 as u64,
        },
        admission: AdmissionOptions {
            max_concurrent: args
                .max_concurrent_queries
                .map_or(4 * cpu_threads.max(1), |n| n as usize),
            max_queued: args.max_queued_queries,
            queue_timeout: args.queue_timeout,
        },
        limits: QueryLimits {
            query_timeout: args.query_timeout,
            planning_timeout: args.planning_timeout,
            first_batch_timeout: args.first_batch_timeout,
            stream_idle_timeout: args.stream_idle_timeout,
        },
        io: IoOptions {
            mode: args.io,
            mmap: MmapLimits {
                max_files: args.mmap_max_files,
                max_bytes: args.mmap_max_bytes.0 as u64,
            },
            chunk_cache_size: args.chunk_cache_size.0 as u64,
        },
        max_message_size: args.max_flight_data_size.0,
        view_types: match args.view_types {
            ViewTypesArg::Expand => ViewTypes::Expand,
            ViewTypesArg::Keep => ViewTypes::Keep,
        },
        sql: SqlLimits {
            max_bytes: args.max_sql_size.0,
            max_depth: args.max_sql_depth,
            max_set_operations: args.max_sql_set_operations,
            max_relations: args.max_sql_relations,
        },
        stack_size: args.query_stack_size.0,
        max_function_output: args.max_function_output.0,
        audit: args
            .audit_log
            .as_deref()
            .map(|spec| AuditLog::open(spec).map(Arc::new))
            .transpose()
            .context("--audit-log")?,
        remote,
        cluster: cluster.as_ref().and_then(|c| c.planning.clone()),
        endpoints_per_query: args.endpoints_per_query as usize,
        result_cache_size: args.result_cache_size.0,
        row_group_cache_size: args
            .row_group_cache_size
            .map_or(args.memory_limit.bytes() as u64 / 4, |size| size.0 as u64),
        row_group_cache_admission: match args.row_group_cache_admit {
            RowGroupAdmitArg::Lookups => RowGroupAdmission::Lookups,
            RowGroupAdmitArg::All => RowGroupAdmission::All,
        },
        plan_cache_entries: args.plan_cache_entries,
        filter_pushdown: match args.filter_pushdown {
            FilterPushdownArg::Runtime => FilterPushdown::Runtime,
            FilterPushdownArg::All => FilterPushdown::All,
            FilterPushdownArg::None => FilterPushdown::None,
        },
    };
    let _audit_reopen = options.audit.clone().map(audit_reopen_loop);
    let memory_hard_limit = match args.memory_hard_limit {
        Some(limit) => limit.bytes(),
        None => {
            let machine = crate::cli::available_memory() as usize;
            (options
                .memory
                .limit
                .saturating_mul(2)
                .saturating_add(256 << 20))
            .min(machine / 10 * 9)
        }
    };
    tracing::info!(
        memory_limit = options.memory.limit,
        pool = ?options.memory.pool,
        max_concurrent_queries = options.admission.max_concurrent,
        max_queued_queries = options.admission.max_queued,
        memory_hard_limit,
        max_function_output = options.max_function_output,
        row_group_cache_size = options.row_group_cache_size,
        "limits"
    );
    let engine = Arc::new(QueryEngine::new(tables, options).await?);
    for name in engine.catalog().table_names() {
        if let Some(t) = engine.catalog().get(&name) {
            tracing::info!(table = %name, files = t.num_files(), rows = t.num_rows(), "serving");
        }
    }

    // One registry for everything, filled before the first scrape can arrive.
    let registry = Registry::new();
    engine.register_metrics(&registry)?;
    if let Some(cluster) = &cluster {
        cluster.metrics.register(&registry)?;
        if let Some((workers, _)) = &cluster.workers {
            workers.register(&registry)?;
        }
    }
    let rpc_metrics = RpcMetrics::register(&registry)?;
    metrics::register_process_metrics(&registry)?;
    if let Some(tls) = &tls {
        registry.register(Box::new(tls.expiry_gauge()))?;
    }
    if let Some(auth) = &auth {
        auth.register_metrics(&registry)?;
    }
    let shutdown = CancellationToken::new();
    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--metrics-listen)",
                args.metrics_listen
            )
        })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let _metrics = metrics::serve(metrics_listener, registry, shutdown.clone());
    if let Some(file) = &args.metrics_addr_file {
        write_atomically(file, &format!("{metrics_addr}\n"))?;
    }
    tracing::info!(addr = %metrics_addr, "metrics endpoint listening (/metrics, /healthz)");

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
    let _worker = match cluster {
        Some(cluster) => {
            let flight_url = flight_url(&args, addr, tls.is_some());
            Some(
                cluster
                    .serve_worker(&engine, &args, flight_url, tls.clone(), shutdown.clone())
                    .await?,
            )
        }
        None => None,
    };

    if auth.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no --auth-file: every client that can reach this address can query");
    }
    let _tls_reload = tls
        .as_ref()
        .map(|tls| tls_reload_loop(Arc::clone(tls), args.tls.tls_reload_interval));

    let mut service = QuiverFlightService::new(
        Arc::clone(&engine),
        SendOptions {
            max_flight_data_size: args.max_flight_data_size.0,
            compression: ipc_compression(args.ipc_compression),
            keepalive: args.stream_keepalive,
            path: match args.send_path {
                SendPath::ZeroCopy => quiver::flight::SendPath::ZeroCopy,
                SendPath::Standard => quiver::flight::SendPath::Standard,
            },
            ..SendOptions::default()
        },
        PreparedLimits {
            max_statements: usize::try_from(args.max_prepared_statements).unwrap_or(usize::MAX),
            max_bytes: args.max_prepared_statement_bytes.0,
        },
    )?;
    if let Some(auth) = auth {
        service = service.with_auth(auth);
    }
    let (port, health) = quiver::flight::stack(
        Arc::new(service),
        rpc_metrics,
        MessageLimits {
            max_decoding_message_size: args.max_decoding_message_size.0,
            max_encoding_message_size: args.max_encoding_message_size.0,
        },
    )
    .await;

    let _memory_guard = (memory_hard_limit > 0).then(|| {
        let engine = Arc::clone(&engine);
        spawn(async move {
            engine
                .guard_memory(
                    Arc::new(metrics::allocated_bytes),
                    memory_hard_limit,
                    Duration::from_millis(10),
                )
                .await;
        })
    });
    let _stall = stall_watch(
        Arc::clone(&engine),
        health.clone(),
        args.cpu_stall_threshold,
    );
    let signal = shutdown_on_signal(shutdown.clone(), health);
    let (incoming, _accept) = listener::incoming(
        listener,
        tls,
        args.tls.tls_handshake_timeout,
        shutdown.clone(),
    );
    tokio::select! {
        () = quiver::flight::serve(incoming, port, &http2, shutdown.clone()) => {}
        () = drain(&engine, &shutdown, args.shutdown_grace) => {
            tracing::warn!("connections still open after the shutdown grace period; closing them");
        }
    }
    drop(signal);
    tracing::info!("stopped");
    Ok(())
}

/// This node's part in a cluster: how it reaches workers, and its own worker port.
struct Cluster {
    secret: ClusterSecret,
    channels: Arc<ClusterChannels>,
    /// With --workers or --workers-dns.
    planning: Option<ClusterPlanning>,
    /// The workers, and the task that probes them.
    workers: Option<(Arc<Workers>, AbortOnDropHandle<()>)>,
    metrics: Arc<ClusterMetrics>,
}

/// What runs for the cluster until shutdown: the worker probe, and the worker port with
/// the runtime it runs on.
struct ClusterTasks {
    _probe: Option<AbortOnDropHandle<()>>,
    /// The worker port's server, its runtime, and the task freeing ended tasks' plans.
    _worker: Option<(AbortOnDropHandle<()>, CpuRuntime, AbortOnDropHandle<()>)>,
}

impl Cluster {
    async fn from_args(args: &ServeArgs) -> anyhow::Result<Option<Self>> {
        let source = match (&args.workers_dns, args.workers.is_empty()) {
            (Some(dns), _) => Some(WorkerSource::dns(dns, args.cluster_ca.is_some())?),
            (None, false) => Some(WorkerSource::urls(&args.workers)?),
            (None, true) => None,
        };
        if args.cluster_listen.is_none() && source.is_none() {
            return Ok(None);
        }
        let Some(path) = &args.cluster_secret_file else {
            bail!(
                "--cluster-secret-file is required with --cluster-listen, --workers or \
                 --workers-dns: every node of a cluster checks the secret on every call \
                 (openssl rand -hex 32 > FILE)"
            );
        };
        let secret = ClusterSecret::from_file(path)?;
        let tls = cluster_tls(args)?;
        let metrics = Arc::new(ClusterMetrics::default());
        let channels = Arc::new(ClusterChannels::new(
            tokio::runtime::Handle::current(),
            secret.clone(),
            args.cluster_connect_timeout,
            Arc::clone(&metrics),
            tls,
        ));
        let workers = match source {
            Some(source) => Some(
                Workers::watch(
                    source,
                    args.cluster_probe_interval,
                    args.cluster_connect_timeout,
                    Some(Arc::clone(&channels)),
                )
                .await,
            ),
            None => None,
        };
        let planning = workers.as_ref().map(|(workers, _)| ClusterPlanning {
            workers: Arc::clone(workers) as _,
            channels: Arc::clone(&channels) as _,
            distribution: args.distributed,
            bytes_per_task: args.distributed_bytes_per_task.0,
            locations: Some(Arc::clone(workers) as Arc<dyn NodeLocations>),
            compression: ipc_compression(args.cluster_compression),
            broadcast_joins: args.cluster_broadcast_joins,
        });
        Ok(Some(Self {
            secret,
            channels,
            planning,
            workers,
            metrics,
        }))
    }

    /// Serves the worker on --cluster-listen, on a runtime of its own, until `shutdown`;
    /// this node's Flight port is at `flight_url` (which its answers carry, and the
    /// slices it serves are located at).
    async fn serve_worker(
        self,
        engine: &QueryEngine,
        args: &ServeArgs,
        flight_url: Option<String>,
        tls: Option<Arc<TlsReloader>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ClusterTasks> {
        if let (Some((workers, _)), Some(url)) = (&self.workers, &flight_url) {
            workers.set_own_flight_url(url.clone());
        }
        let probe = self.workers.map(|(_, task)| task);
        let Some(addr) = args.cluster_listen else {
            return Ok(ClusterTasks {
                _probe: probe,
                _worker: None,
            });
        };
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} (--cluster-listen)"))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let threads = args
            .cpu_threads
            .unwrap_or_else(|| QueryOptions::default().cpu_threads);
        let runtime = CpuRuntime::with_io(threads, args.query_stack_size.0, "quiver-cluster")?;
        let admission = TaskAdmission::new(
            TaskAdmissionOptions {
                max_queries: args.max_cluster_queries as usize,
                queue_timeout: args.cluster_queue_timeout,
                max_message: args.max_cluster_message_size.0,
            },
            self.metrics.queries_active(),
            self.metrics.queries_refused(),
            bound.to_string(),
        );
        let (_worker, routes, release) = worker_routes(
            &engine.base_state(),
            Arc::clone(engine.catalog()),
            Arc::clone(engine.io()),
            self.channels,
            self.secret,
            Arc::new(admission),
            bound.to_string(),
        );
        let handshake_timeout = args.tls.tls_handshake_timeout;
        let mut metrics = ClusterMetricsLayer::new(self.metrics);
        if let Some(url) = &flight_url {
            metrics = metrics.with_flight_url(url);
        }
        let task = runtime.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot serve the cluster port");
                    return;
                }
            };
            let (incoming, _accept) =
                listener::incoming(listener, tls, handshake_timeout, shutdown.clone());
            let served = tonic::transport::Server::builder()
                .layer(metrics)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the cluster worker server failed");
            }
        });
        if let Some(file) = &args.cluster_addr_file {
            write_atomically(file, &format!("{bound}\n"))?;
        }
        tracing::info!(addr = %bound, "cluster worker listening");
        if !bound.ip().is_loopback() {
            tracing::info!(addr = %bound, "the cluster port is reachable from other machines; calls need the cluster secret");
        }
        Ok(ClusterTasks {
            _probe: probe,
            _worker: Some((task, runtime, release)),
        })
    }
}

/// The IPC body compression `choice` names.
fn ipc_compression(choice: IpcCompression) -> Option<CompressionType> {
    match choice {
        IpcCompression::None => None,
        IpcCompression::Zstd => Some(CompressionType::ZSTD),
        IpcCompression::Lz4 => Some(CompressionType::LZ4_FRAME),
    }
}

/// Where clients reach this node's Flight port: --advertise-url, else the bound address
/// unless it is a wildcard (which names no host to connect to).
fn flight_url(args: &ServeArgs, bound: SocketAddr, tls: bool) -> Option<String> {
    if let Some(url) = &args.advertise_url {
        return Some(url.clone());
    }
    let scheme = if tls { "grpc+tls" } else { "grpc" };
    (!bound.ip().is_unspecified()).then(|| format!("{scheme}://{bound}"))
}

/// TLS to workers, with --cluster-ca: their CA, and this node's certificate (when it has
/// one) for workers that require client certificates.
fn cluster_tls(args: &ServeArgs) -> anyhow::Result<Option<ClientTlsConfig>> {
    let https = args.workers.iter().any(|w| w.starts_with("https://"));
    let Some(ca) = &args.cluster_ca else {
        if https {
            bail!("https:// workers need --cluster-ca: the CA their certificates chain to");
        }
        return Ok(None);
    };
    if !args.workers.is_empty() && args.workers.iter().any(|w| !w.starts_with("https://")) {
        bail!("with --cluster-ca, every --workers URL is https://HOST:PORT");
    }
    let read = |path: &Path, flag: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {} ({flag})", path.display()))
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--cluster-ca")?));
    if let (Some(cert), Some(key)) = (&args.tls.tls_cert, &args.tls.tls_key) {
        config = config.identity(Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ));
    }
    Ok(Some(config))
}

/// After shutdown begins, gives running streams `grace` to finish, then cancels every
/// query (its stream ends with UNAVAILABLE) and waits a little for the connections to
/// close. Completes only if they do not.
async fn drain(engine: &QueryEngine, shutdown: &CancellationToken, grace: Duration) {
    /// How long cancelled streams get to deliver their error and close.
    const CLOSE: Duration = Duration::from_secs(5);
    shutdown.cancelled().await;
    let running = engine.active_queries().len();
    if running > 0 {
        tracing::info!(running, grace = %humantime::format_duration(grace), "waiting for running queries");
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !engine.active_queries().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = engine.active_queries().len();
    if left > 0 {
        tracing::warn!(
            queries = left,
            "shutdown grace period over: cancelling the queries still running"
        );
    }
    engine.active_queries().shut_down();
    tokio::time::sleep(CLOSE).await;
}

/// The HTTP/2 flags, checked against the protocol's limits (h2 would panic on the first
/// connection otherwise).
fn http2_settings(h: &Http2Args) -> anyhow::Result<Http2Settings> {
    const MAX_WINDOW: usize = (1 << 31) - 1;
    anyhow::ensure!(
        (16_384..=16_777_215).contains(&h.http2_max_frame_size.0),
        "--http2-max-frame-size must be between 16KiB and 16MiB-1 (RFC 9113), got {} bytes",
        h.http2_max_frame_size.0
    );
    for (flag, value) in [
        ("--http2-stream-window", h.http2_stream_window.0),
        ("--http2-connection-window", h.http2_connection_window.0),
    ] {
        anyhow::ensure!(
            (65_535..=MAX_WINDOW).contains(&value),
            "{flag} must be between 64KiB-1 and 2GiB-1 (RFC 9113), got {value} bytes"
        );
    }
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let defaults = Http2Settings::default();
    // All checked above to fit in 31 bits.
    let fit = |v: usize| v as u32;
    Ok(Http2Settings {
        stream_window: fit(h.http2_stream_window.0),
        connection_window: fit(h.http2_connection_window.0),
        adaptive_window: h.http2_adaptive_window,
        max_frame_size: fit(h.http2_max_frame_size.0),
        max_concurrent_streams: h.http2_max_concurrent_streams,
        keepalive_interval: nonzero(h.http2_keepalive_interval),
        keepalive_timeout: nonzero(h.http2_keepalive_timeout).unwrap_or(defaults.keepalive_timeout),
        max_connection_age: nonzero(h.max_connection_age),
        max_connection_age_grace: h.max_connection_age_grace,
    })
}

/// The TLS config from the flags, when TLS is on.
fn tls_reloader(args: &TlsArgs) -> anyhow::Result<Option<Arc<TlsReloader>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let settings = TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
        client_auth: args.tls_client_auth,
        min_version: args.tls_min_version,
    };
    let reloader = TlsReloader::new(settings)?;
    tracing::info!(cert = %cert.display(), min_version = ?args.tls_min_version, mtls = args.tls_client_ca.is_some(), "TLS on");
    Ok(Some(Arc::new(reloader)))
}

/// Reloads the TLS material on SIGHUP, and when its files change (checked every
/// `interval`). Polling rather than inotify: Kubernetes updates secret volumes by
/// swapping a symlink, which file watches on the files themselves miss.
fn tls_reload_loop(tls: Arc<TlsReloader>, interval: Duration) -> AbortOnDropHandle<()> {
    spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        let poll = if interval.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            interval
        };
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = hup_recv => {
                    tracing::info!("SIGHUP: reloading TLS material");
                    tls.reload();
                }
                _ = ticker.tick(), if !interval.is_zero() => {
                    tls.reload_if_changed();
                }
            }
        }
    })
}

/// Collects tables from --table, --data-dir, --catalog and --demo (all combine), and
/// sets up the object stores and cache when any of them is on S3.
async fn table_definitions(
    args: &ServeArgs,
) -> anyhow::Result<(Vec<TableDefinition>, Option<Arc<RemoteStores>>)> {
    let mut tables = Vec::new();
    for flag in &args.tables {
        tables.push(parse_table_flag(flag)?);
    }
    let data_dir = args.data_dir.as_deref().map(Path::to_string_lossy);
    let remote_data_dir = data_dir.as_deref().filter(|d| d.starts_with("s3://"));
    if let Some(dir) = &args.data_dir
        && remote_data_dir.is_none()
    {
        tables.extend(tables_in_data_dir(dir)?);
    }
    let mut stores = Default::default();
    if let Some(file) = &args.catalog {
        let catalogued = CatalogFile::load(file)?;
        tables.extend(catalogued.tables);
        stores = catalogued.stores;
    }
    if args.demo {
        let dir = demo::ensure(&cache_dir(args.cache_dir.as_deref()), args.demo_rows)?;
        tables.extend(tables_in_data_dir(&dir)?);
    }

    let on_s3 = remote_data_dir.is_some()
        || tables
            .iter()
            .any(|t| matches!(t.location, TableLocation::S3 { .. }));
    let remote = if on_s3 {
        Some(Arc::new(remote_stores(args, stores)?))
    } else {
        None
    };
    if let (Some(url), Some(remote)) = (remote_data_dir, &remote) {
        let (bucket, prefix) = parse_s3_url(url)
            .with_context(|| format!("--data-dir {url}: use s3://BUCKET/PREFIX/"))?;
        let names = remote
            .bucket(&bucket)?
            .list_children(&prefix)
            .await
            .with_context(|| format!("listing the tables of --data-dir {url}"))?;
        for name in names.into_iter().filter(|n| !is_hidden_name(n)) {
            let table_url = format!("s3://{bucket}/{}", prefix.clone().join(name.as_str()));
            tables.push(TableDefinition::new(name, table_url)?);
        }
    }
    if tables.is_empty() {
        bail!(
            "no tables to serve: pass --table NAME=PATH, --data-dir DIR, --catalog FILE or --demo"
        );
    }
    for name in &args.pin_tables {
        let Some(table) = tables.iter_mut().find(|t| &t.name == name) else {
            bail!("--pin-table {name}: no such table (pin one of the tables being served)");
        };
        table.pinned = true;
    }
    Ok((tables, remote))
}

/// Names that are never tables or data: `.hidden`, `_staging`, `x.tmp`.
fn is_hidden_name(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_') || name.ends_with(".tmp")
}

/// The object stores of S3 tables, with the block cache in `<cache dir>/objects`.
fn remote_stores(
    args: &ServeArgs,
    stores: std::collections::BTreeMap<String, quiver::io::remote::StoreSettings>,
) -> anyhow::Result<RemoteStores> {
    let dir = cache_dir(args.cache_dir.as_deref()).join("objects");
    let block_size = args.cache_block_size.0 as u64;
    let max_bytes = match args.cache_max_size {
        Some(size) => size.0 as u64,
        None => default_cache_size(&dir),
    };
    let cache = if max_bytes == 0 {
        None
    } else {
        if max_bytes < block_size || block_size == 0 {
            bail!(
                "--cache-max-size ({max_bytes} bytes) must hold at least one block of \
                 --cache-block-size ({block_size} bytes); use 0 to turn the cache off"
            );
        }
        Some(Arc::new(
            BlockCache::open(CacheOptions {
                dir,
                max_bytes,
                block_size,
                max_maps: args.cache_max_mapped_blocks,
            })
            .context("--cache-dir")?,
        ))
    };
    let options = StoreOptions {
        max_retries: args.store_max_retries,
        retry_timeout: args.store_retry_timeout,
        init_backoff: args.store_retry_backoff,
        max_backoff: args.store_retry_max_backoff,
        request_timeout: args.store_request_timeout,
        connect_timeout: args.store_connect_timeout,
    };
    Ok(RemoteStores::new(
        tokio::runtime::Handle::current(),
        options,
        stores,
        cache,
    ))
}

/// 10 GiB, or half the free space of the file system holding `dir` when that is less.
fn default_cache_size(dir: &Path) -> u64 {
    const DEFAULT: u64 = 10 << 30;
    let mut probe = dir;
    // The directory may not exist yet: ask about its nearest existing ancestor.
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => return DEFAULT,
        }
    }
    match crate::cli::free_space(probe) {
        Some(free) => DEFAULT.min(free / 2),
        None => DEFAULT,
    }
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
    Some(spawn(async move {
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
    }))
}

/// Reopens the audit log on SIGHUP, after logrotate moved it away.
fn audit_reopen_loop(log: Arc<AuditLog>) -> AbortOnDropHandle<()> {
    spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the audit log will not be reopened");
                return;
            }
        };
        while hup.recv().await.is_some() {
            match log.reopen() {
                Ok(()) => tracing::info!("SIGHUP: audit log reopened"),
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: reopening the audit log failed; writing on to the old file")
                }
            }
        }
    })
}

/// Probes the query runtime (`CpuRuntime::watch_progress`) and reports NOT_SERVING to
/// health checks while it is stalled.
fn stall_watch(
    engine: Arc<QueryEngine>,
    health: HealthReporter,
    threshold: Duration,
) -> Option<AbortOnDropHandle<()>> {
    if threshold.is_zero() {
        return None;
    }
    // Probing 10 times per threshold notices a stall within a tenth of it.
    let every = (threshold / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    Some(spawn(async move {
        let probe = engine.cpu().watch_progress(every, threshold);
        let report = async {
            let mut stalled = false;
            loop {
                tokio::time::sleep(every).await;
                let now = engine.cpu().progress().stalled();
                if now == stalled {
                    continue;
                }
                stalled = now;
                let status = if stalled {
                    tonic_health::ServingStatus::NotServing
                } else {
                    tonic_health::ServingStatus::Serving
                };
                health
                    .set_service_status(
                        <arrow_flight::flight_service_server::FlightServiceServer<
                            QuiverFlightService,
                        > as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                health.set_service_status("", status).await;
            }
        };
        tokio::join!(probe, report);
    }))
}

/// On SIGINT or SIGTERM: reports NOT_SERVING to health checks, then cancels `token`,
/// which stops accepting and drains in-flight calls. Aborted when dropped.
fn shutdown_on_signal(token: CancellationToken, health: HealthReporter) -> AbortOnDropHandle<()> {
    spawn(async move {
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
        health
            .set_not_serving::<arrow_flight::flight_service_server::FlightServiceServer<QuiverFlightService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        token.cancel();
    })
}

fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
