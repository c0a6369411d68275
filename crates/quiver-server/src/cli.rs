//! Command line: every flag has an environment variable and a documented default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use quiver::io::{IoMode, MmapLimits};

use crate::tls::{ClientAuth, TlsVersion};

/// Quiver: SQL over Hive-partitioned Parquet directories, served over Arrow Flight.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Log filter in `tracing` EnvFilter syntax, e.g. `info`, `quiver=debug,info`.
    #[arg(long, env = "QUIVER_LOG_FILTER", default_value = "info", global = true)]
    pub log_filter: String,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve tables over Arrow Flight.
    Serve(Box<ServeArgs>),
    /// Write the demo dataset (request logs partitioned by day and service) and exit.
    Demo(DemoArgs),
    /// Authentication helpers.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Run one SQL statement on a server and print the result.
    Query(QueryArgs),
    /// List a server's tables with their sizes and schemas.
    Tables(TablesArgs),
    /// Check a server's gRPC health (grpc.health.v1): exit 0 when it is SERVING, 1 if not.
    /// For container health checks and probes; needs no credentials.
    Health(HealthArgs),
}

/// How the client subcommands reach a server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server: `grpc://HOST:PORT` (plain) or `grpc+tls://HOST:PORT` (TLS).
    #[arg(long, env = "QUIVER_SERVER", default_value = "grpc://127.0.0.1:50051")]
    pub server: String,

    /// CA certificates (PEM) to verify the server's certificate with [default: the
    /// system's roots].
    #[arg(long, env = "QUIVER_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Name to check the server's certificate against, when it is not the URL's host
    /// (e.g. probing `localhost` with a certificate for `quiver.example.com`).
    #[arg(long, env = "QUIVER_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Client certificate (PEM) for servers that require mutual TLS.
    #[arg(
        long,
        env = "QUIVER_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// Private key (PEM) of --client-cert.
    #[arg(
        long,
        env = "QUIVER_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,

    /// User to log in as (a Basic handshake). The password comes from $QUIVER_PASSWORD,
    /// or else the first line of stdin.
    #[arg(long, env = "QUIVER_USER", conflicts_with = "token")]
    pub user: Option<String>,

    /// API token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "QUIVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Longest to wait for the connection (TCP and TLS).
    #[arg(long, env = "QUIVER_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Largest gRPC message accepted from the server.
    #[arg(long, env = "QUIVER_MAX_MESSAGE_SIZE", default_value = "64MiB")]
    pub max_message_size: ByteSize,
}

/// `quiver query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Output format: an aligned `table`, `csv` (with a header), `json` (one object per
    /// line) or `parquet` (needs --output).
    #[arg(long, short, default_value = "table")]
    pub format: OutputFormat,

    /// Write the result to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Most rows `table` prints; the rest are counted, not shown (csv, json and parquet
    /// write every row, batch by batch). `0`: no limit.
    #[arg(long, default_value_t = 1000)]
    pub max_rows: usize,

    /// Longest the query may run (sent as the gRPC deadline). `0s`: no limit.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// No progress or summary on stderr.
    #[arg(long, short)]
    pub quiet: bool,

    /// The SQL statement; `-` reads it from stdin.
    pub sql: String,
}

/// Output formats of `quiver query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned text table.
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// Newline-delimited JSON objects.
    Json,
    /// A Parquet file.
    Parquet,
}

/// `quiver tables`.
#[derive(Debug, Args)]
pub struct TablesArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Only the summary line of each table, without its columns.
    #[arg(long)]
    pub no_schema: bool,
}

/// `quiver health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The gRPC service whose status to ask for; empty for the whole server.
    #[arg(long, default_value = "")]
    pub service: String,

    /// Longest to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `quiver auth`.
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Read a password from the first line of stdin and print its argon2id PHC string,
    /// for the `password` of a `[[users]]` entry in the auth file.
    HashPassword,
}

/// `quiver serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address the Flight (gRPC) server listens on. Port 0 picks a free port.
    #[arg(long, env = "QUIVER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// After binding, write the bound Flight address as `host:port` on one line to this file
    /// (written to a temporary name and renamed, so readers never see it half-written).
    #[arg(long, env = "QUIVER_LISTEN_ADDR_FILE")]
    pub listen_addr_file: Option<PathBuf>,

    /// Address of the HTTP endpoint serving Prometheus metrics (`/metrics`) and a liveness
    /// check (`/healthz`). Plain HTTP: keep it on loopback or a private network. Port 0
    /// picks a free port.
    #[arg(long, env = "QUIVER_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// After binding, write the bound metrics address as `host:port` on one line to this
    /// file, like --listen-addr-file.
    #[arg(long, env = "QUIVER_METRICS_ADDR_FILE")]
    pub metrics_addr_file: Option<PathBuf>,

    /// A table to serve, as NAME=PATH (a directory of Parquet files, Hive-partitioned or
    /// not, or one file; or an `s3://bucket/prefix/`, configured from the standard AWS
    /// environment: AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, ...). Repeatable.
    #[arg(
        long = "table",
        env = "QUIVER_TABLES",
        value_delimiter = ',',
        value_name = "NAME=PATH"
    )]
    pub tables: Vec<String>,

    /// Hold this table's rows in memory and serve it from there (hot dashboards; also
    /// isolates the transport in benchmarks). Loaded at start and again after each
    /// refresh that changes its files; its size is reserved from --memory-limit (start-up
    /// fails if it does not fit) and shown in quiver_catalog_pinned_bytes. Repeatable;
    /// the catalog file's `pin = true` does the same.
    #[arg(
        long = "pin-table",
        env = "QUIVER_PIN_TABLES",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub pin_tables: Vec<String>,

    /// Serve every immediate subdirectory of DIR (or every "subdirectory" of an
    /// `s3://bucket/prefix/`) as a table named after it.
    #[arg(long, env = "QUIVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML catalog: `[tables.NAME] path = "..."`, with optional `[tables.NAME.partitions]`
    /// `column = "bigint" | "date" | "string"` to override inferred partition types.
    #[arg(long, env = "QUIVER_CATALOG", value_name = "FILE")]
    pub catalog: Option<PathBuf>,

    /// How often every table is re-listed: new files and partitions become queryable
    /// within this interval. `0s` turns periodic refresh off (DoAction "refresh" still works).
    #[arg(long, env = "QUIVER_REFRESH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub refresh_interval: Duration,

    /// Serve the demo dataset, generating it on first use into the cache directory.
    #[arg(long, env = "QUIVER_DEMO")]
    pub demo: bool,

    /// Rows of the demo dataset used by --demo.
    #[arg(long, env = "QUIVER_DEMO_ROWS", default_value_t = 3_000_000)]
    pub demo_rows: u64,

    /// Where the object cache of S3 tables (`objects/`) and the --demo data live
    /// [default: $XDG_CACHE_HOME/quiver or ~/.cache/quiver].
    #[arg(long, env = "QUIVER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// A DataFusion setting as KEY=VALUE, applied after Quiver's defaults, e.g.
    /// `datafusion.execution.batch_size=16384`. Repeatable.
    #[arg(
        long = "datafusion-config",
        env = "QUIVER_DATAFUSION_CONFIG",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub datafusion_config: Vec<String>,

    /// How Parquet files are read: `mmap` serves reads as slices of memory maps (no copy,
    /// no system call per read once mapped); `pread` reads into fresh buffers, for NFS,
    /// FUSE and any file system where files might be truncated in place (a truncated
    /// mapped file crashes the process with SIGBUS; see README, Operations).
    #[arg(
        long,
        env = "QUIVER_IO",
        default_value = "mmap",
        value_name = "mmap|pread"
    )]
    pub io: IoMode,

    /// Most files kept memory-mapped between queries (mmap mode). Each mapping uses one
    /// of the process's vm.max_map_count (65530 by default) entries; files beyond this
    /// are unmapped, least recently used first, once no query is reading them.
    #[arg(long, env = "QUIVER_MMAP_MAX_FILES", default_value_t = MmapLimits::default().max_files)]
    pub mmap_max_files: usize,

    /// Most bytes kept memory-mapped between queries (mmap mode). Mapped pages are page
    /// cache the kernel can reclaim, but count in RSS while resident.
    #[arg(long, env = "QUIVER_MMAP_MAX_BYTES", default_value = "64GiB")]
    pub mmap_max_bytes: ByteSize,

    /// Bytes of decompressed Parquet column chunks kept in memory (mmap mode; `0`, the
    /// default, off). A chunk is decompressed into it on its second read, and later scans
    /// decode it without decompressing: for repeated small reads of hot files (key
    /// ranges, point lookups), whose CPU goes mostly to decompressing dictionary and data
    /// pages. Reserved from --memory-limit; least recently used chunks go first, a chunk
    /// over an eighth of it is never kept. Metrics: quiver_chunk_cache_*
    #[arg(
        long,
        env = "QUIVER_CHUNK_CACHE_SIZE",
        value_name = "SIZE",
        default_value = "0"
    )]
    pub chunk_cache_size: ByteSize,

    /// Bytes of decoded row groups of local Parquet files kept in memory; `0` turns the
    /// cache off [default: a quarter of --memory-limit]. A row group is decoded whole
    /// into Arrow batches the second time a scan the cache admits reads it (see
    /// --row-group-cache-admit), in the background while that scan reads it from the
    /// file (two at a time); later scans take its rows from memory like a pinned
    /// table's (batches skipped by their min/max, sorted columns cut to a key range) and
    /// the Parquet scan skips it. Kept per table version (a refresh that publishes files
    /// starts afresh). Reserved from --memory-limit and given back to queries that need
    /// it, so it only holds memory no query asks for; least recently used row groups go
    /// first, one over an eighth of it is never kept. Metrics: quiver_row_group_cache_*
    #[arg(long, env = "QUIVER_ROW_GROUP_CACHE_SIZE", value_name = "SIZE")]
    pub row_group_cache_size: Option<ByteSize>,

    /// Which scans fill and use the row group cache. `lookups`: scans whose filters
    /// leave at most an eighth of a file's row groups (key ranges and point lookups on a
    /// column the file is ordered by; repeated, they are served from memory); every
    /// other scan reads its files as without the cache. `all`: every scan (dashboards
    /// repeating whole-table queries; each row group read twice is decoded whole, all
    /// its columns, in the background).
    #[arg(
        long,
        env = "QUIVER_ROW_GROUP_CACHE_ADMIT",
        value_name = "SCANS",
        default_value = "lookups"
    )]
    pub row_group_cache_admit: RowGroupAdmitArg,

    /// Most bytes of S3 object blocks the local cache keeps on disk (in `--cache-dir`,
    /// least recently used evicted first); `0` turns the cache off (every read is a GET)
    /// [default: 10GiB, at most half the free space of the cache directory's file system].
    #[arg(long, env = "QUIVER_CACHE_MAX_SIZE", value_name = "SIZE")]
    pub cache_max_size: Option<ByteSize>,

    /// The unit the object cache fetches, stores and evicts: reads of S3 objects are
    /// rounded out to whole aligned blocks. Smaller fetches less for selective queries;
    /// larger makes fewer GETs and files.
    #[arg(
        long,
        env = "QUIVER_CACHE_BLOCK_SIZE",
        default_value = "1MiB",
        value_name = "SIZE"
    )]
    pub cache_block_size: ByteSize,

    /// Most cached blocks kept memory-mapped between reads (each mapping uses one of the
    /// process's vm.max_map_count entries).
    #[arg(long, env = "QUIVER_CACHE_MAX_MAPPED_BLOCKS", default_value_t = 4096)]
    pub cache_max_mapped_blocks: usize,

    /// Retries of an object store request that timed out, could not connect, or was
    /// answered with a 5xx or throttling error (with exponential backoff).
    #[arg(long, env = "QUIVER_STORE_MAX_RETRIES", default_value_t = 5)]
    pub store_max_retries: usize,

    /// No retry of an object store request starts this long after its first attempt.
    #[arg(long, env = "QUIVER_STORE_RETRY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub store_retry_timeout: Duration,

    /// First wait before retrying an object store request; doubles per retry.
    #[arg(long, env = "QUIVER_STORE_RETRY_BACKOFF", default_value = "100ms", value_parser = parse_duration)]
    pub store_retry_backoff: Duration,

    /// Longest wait between retries of an object store request.
    #[arg(long, env = "QUIVER_STORE_RETRY_MAX_BACKOFF", default_value = "5s", value_parser = parse_duration)]
    pub store_retry_max_backoff: Duration,

    /// Time limit of one object store request.
    #[arg(long, env = "QUIVER_STORE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub store_request_timeout: Duration,

    /// Time limit of connecting to an object store.
    #[arg(long, env = "QUIVER_STORE_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub store_connect_timeout: Duration,

    /// Serve this node's cluster worker on this address (its own port, speaking
    /// datafusion-distributed's worker protocol): other nodes then send it tasks of their
    /// queries. Off by default (a single node). Needs --cluster-secret-file.
    #[arg(long, env = "QUIVER_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,

    /// After binding --cluster-listen, write the bound address as `host:port` to this file.
    #[arg(long, env = "QUIVER_CLUSTER_ADDR_FILE")]
    pub cluster_addr_file: Option<PathBuf>,

    /// Workers this node spreads its queries over, as `http://HOST:PORT` of their
    /// --cluster-listen (comma-separated; may include this node's own). Needs
    /// --cluster-secret-file.
    #[arg(long, env = "QUIVER_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// Find the workers by resolving this `HOST:PORT` (every address it resolves to is a
    /// worker; a Kubernetes headless Service), again every --cluster-probe-interval.
    /// Instead of --workers.
    #[arg(long, env = "QUIVER_WORKERS_DNS", conflicts_with = "workers")]
    pub workers_dns: Option<String>,

    /// How often the workers are probed (and --workers-dns resolved): a worker whose port
    /// does not accept a connection within --cluster-connect-timeout gets no tasks until
    /// it does again.
    #[arg(long, env = "QUIVER_CLUSTER_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub cluster_probe_interval: Duration,

    /// File whose first line is the secret every node of the cluster shares (at least 32
    /// printable characters: `openssl rand -hex 32`); sent and checked on every call
    /// between nodes. Required with --cluster-listen, --workers or --workers-dns.
    #[arg(long, env = "QUIVER_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// Whether queries are spread over --workers: `auto` when a scan reads more than
    /// --distributed-bytes-per-task, `on` always (every scan over every worker), `off`
    /// never.
    #[arg(long, env = "QUIVER_DISTRIBUTED", default_value = "auto")]
    pub distributed: quiver::query::Distribution,

    /// With `--distributed auto`: bytes of Parquet files each scan task reads; a scan
    /// of fewer bytes stays on this node.
    #[arg(
        long,
        env = "QUIVER_DISTRIBUTED_BYTES_PER_TASK",
        default_value = "128MiB"
    )]
    pub distributed_bytes_per_task: ByteSize,

    /// CA bundle (PEM) that workers' certificates must chain to: connects to workers over
    /// TLS, presenting --tls-cert/--tls-key when given (for workers that require client
    /// certificates). Workers are then `https://` URLs. A node's own cluster port speaks
    /// TLS whenever its Flight port does (same certificate, reloads and client CA).
    #[arg(long, env = "QUIVER_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,

    /// The Flight URL clients reach this node at (grpc://HOST:PORT, grpc+tls:// with
    /// TLS), in a cluster: the slices of a split result (--endpoints-per-query) this node
    /// serves are located there, so clients pull them straight from it [default: the
    /// bound --listen address, unless it is a wildcard].
    #[arg(long, env = "QUIVER_ADVERTISE_URL", value_parser = parse_flight_url)]
    pub advertise_url: Option<String>,

    /// Other nodes' queries this node runs tasks for at once (admission on the worker
    /// port: a query takes one slot for all its tasks here). A query that finds none
    /// free within --cluster-queue-timeout fails with UNAVAILABLE naming this node (a
    /// node listed among its own --workers takes a slot here for its own queries too).
    #[arg(long, env = "QUIVER_MAX_CLUSTER_QUERIES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_cluster_queries: u32,

    /// Longest wait of another node's query for a slot (--max-cluster-queries).
    #[arg(long, env = "QUIVER_CLUSTER_QUEUE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub cluster_queue_timeout: Duration,

    /// Largest message another node may send to this node's worker port (a task's plan,
    /// which lists the files it reads, is one). Larger ones are refused with
    /// RESOURCE_EXHAUSTED before they are read; raise it on every node for queries over
    /// very many files.
    #[arg(
        long,
        env = "QUIVER_MAX_CLUSTER_MESSAGE_SIZE",
        default_value = "256MiB"
    )]
    pub max_cluster_message_size: ByteSize,

    /// Compression of the Arrow batches this node's queries move between nodes (stage
    /// outputs over the network; tasks a node runs for itself move none): `none` spends
    /// no CPU (right for loopback and LANs, where compressing costs more time than it
    /// saves), `lz4` or `zstd` for slow or metered links.
    #[arg(long, env = "QUIVER_CLUSTER_COMPRESSION", default_value = "none")]
    pub cluster_compression: IpcCompression,

    /// Joins whose build side is small send that side whole to every task of the probe
    /// side (each task builds the same hash table; the probe side stays where it is read)
    /// instead of shuffling both sides by key. `false` suits nodes that share CPUs, where
    /// building the table once per task costs more than the shuffle.
    #[arg(long, env = "QUIVER_CLUSTER_BROADCAST_JOINS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cluster_broadcast_joins: bool,

    /// Time limit of connecting to a worker.
    #[arg(long, env = "QUIVER_CLUSTER_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub cluster_connect_timeout: Duration,

    /// Memory all running queries may reserve together (sorts, joins, aggregations):
    /// a size like `4GiB`, or a share of the machine's (or cgroup's) memory like `50%`.
    /// Beyond it operators spill to disk, or the query fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "QUIVER_MEMORY_LIMIT", default_value = "50%")]
    pub memory_limit: MemoryLimit,

    /// Bytes the whole process may have allocated (jemalloc's count, which includes
    /// what the pool does not see: batches in flight, function results, connections).
    /// Past it new queries are refused with UNAVAILABLE and the query holding the most
    /// memory is cancelled with RESOURCE_EXHAUSTED, checked every 10 ms (up to 100 ms
    /// apart while far below it); `0` turns the guard off. A size or a share of memory, like --memory-limit [default: twice
    /// --memory-limit plus 256 MiB, at most 90% of the machine's or cgroup's memory].
    #[arg(long, env = "QUIVER_MEMORY_HARD_LIMIT")]
    pub memory_hard_limit: Option<MemoryLimit>,

    /// Most bytes one call of a function that can make far more than it is given
    /// (`repeat`, `lpad`, `rpad`, `range`, `generate_series`, `array_repeat`,
    /// `replace`, `concat`, `||`, ...) may produce, estimated from its arguments before
    /// the call, per batch of rows; more fails with RESOURCE_EXHAUSTED. A call on
    /// constants only, folded while planning, may make 1/256 of it (1 MiB by default).
    #[arg(long, env = "QUIVER_MAX_FUNCTION_OUTPUT", default_value = "256MiB")]
    pub max_function_output: ByteSize,

    /// How queries share the pool: `fair` splits it among spilling operators so one
    /// query cannot starve the rest; `greedy` serves whoever asks first.
    #[arg(long, env = "QUIVER_MEMORY_POOL", default_value = "fair")]
    pub memory_pool: MemoryPoolArg,

    /// Directory for spill files [default: the OS temporary directory].
    #[arg(long, env = "QUIVER_SPILL_DIR")]
    pub spill_dir: Option<PathBuf>,

    /// Most bytes of spill files at once; `0` turns spilling off.
    #[arg(long, env = "QUIVER_MAX_SPILL_SIZE", default_value = "100GiB")]
    pub max_spill_size: ByteSize,

    /// Threads that run queries (DataFusion's CPU runtime) [default: number of CPUs].
    #[arg(long, env = "QUIVER_CPU_THREADS")]
    pub cpu_threads: Option<usize>,

    /// Queries planning or streaming at once; more wait in the queue
    /// [default: 4 per CPU thread].
    #[arg(long, env = "QUIVER_MAX_CONCURRENT_QUERIES", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_queries: Option<u32>,

    /// Queries waiting for a slot; a query that finds the queue full fails at once with
    /// UNAVAILABLE (retryable). `0` rejects every query beyond the running ones.
    #[arg(long, env = "QUIVER_MAX_QUEUED_QUERIES", default_value_t = 256)]
    pub max_queued_queries: usize,

    /// Most endpoints a GetFlightInfo splits a query's result over (plain and Flight SQL
    /// statements, prepared or not), each a slice of the scanned files that clients such
    /// as ADBC fetch in parallel. Only results that scan, filter and project split;
    /// aggregates, joins, sorts and limits keep one endpoint. 1 (the default)
    /// keeps scripts that read only the first endpoint correct. With a cluster, slices
    /// are located at the nodes that serve them (--advertise-url).
    #[arg(long, env = "QUIVER_ENDPOINTS_PER_QUERY", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=quiver::query::MAX_SLICES as u64))]
    pub endpoints_per_query: u64,

    /// Memory for answers of repeated queries (dashboards), served without running them
    /// again; `0` (the default) turns the cache off. An answer is kept under its
    /// statement, its parameters and the versions of the tables it read, so files that
    /// land make a new answer; answers of statements with now(), random() or any other
    /// function whose value is not fixed by its arguments are never kept. Reserved from
    /// --memory-limit; the least recently used answers go first. A ticket can opt out
    /// (QueryTicket.no_result_cache).
    #[arg(long, env = "QUIVER_RESULT_CACHE_SIZE", default_value = "0")]
    pub result_cache_size: ByteSize,

    /// Plans of repeated statements kept, so that a statement sent again (a dashboard's,
    /// or a Flight SQL client's DoGet after its GetFlightInfo) skips parsing and logical
    /// optimization; `0` turns it off. Kept under the statement, its parameters and the
    /// caller's table access, and planned again when a table it reads gets a new
    /// version; statements over 4 KiB (text and parameters) and those with now(),
    /// random() or similar functions are never kept. Plans made for the cluster are not
    /// kept. Room for this many plans of a small query's size (256 units of ~100 bytes;
    /// a unit is a schema field, an expression node or 64 bytes of statement): about
    /// 6 MiB at the default; a plan over 4096 units is never kept. A kept plan whose
    /// scans all read pinned tables keeps its physical plan too (each query runs a fresh
    /// copy), unless it joins, has a top-k or holds over 1024 arrays.
    #[arg(long, env = "QUIVER_PLAN_CACHE_ENTRIES", default_value_t = quiver::query::DEFAULT_PLAN_CACHE_ENTRIES)]
    pub plan_cache_entries: u64,

    /// Flight SQL prepared statements each user keeps open at once (all clients
    /// together when authentication is off); creating one more closes that user's least
    /// recently used one, whose handle then fails with INVALID_ARGUMENT ("prepare it
    /// again"). Other users' statements are never closed.
    #[arg(long, env = "QUIVER_MAX_PREPARED_STATEMENTS", default_value_t = quiver::flight::DEFAULT_MAX_PREPARED_STATEMENTS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_prepared_statements: u64,

    /// Bytes of prepared statements (SQL text and bound values) each user keeps, closing
    /// that user's least recently used ones beyond it; one statement larger than this
    /// fails with INVALID_ARGUMENT.
    #[arg(
        long,
        env = "QUIVER_MAX_PREPARED_STATEMENT_BYTES",
        default_value = "64MiB"
    )]
    pub max_prepared_statement_bytes: ByteSize,

    /// Longest SQL statement accepted, in bytes, on every path (tickets, Flight SQL
    /// statements, prepared statements); longer ones fail with INVALID_ARGUMENT.
    #[arg(long, env = "QUIVER_MAX_SQL_SIZE", default_value = "1MiB")]
    pub max_sql_size: ByteSize,

    /// Deepest expression nesting a statement may have; each term of a chain like
    /// `a OR b OR ...` or `1 + 2 + ...` is one level. Deeper statements fail with
    /// INVALID_ARGUMENT before planning (planning recurses once per level). Raise it
    /// together with --query-stack-size.
    #[arg(long, env = "QUIVER_MAX_SQL_DEPTH", default_value_t = quiver::query::SqlLimits::default().max_depth)]
    pub max_sql_depth: usize,

    /// Most UNION/INTERSECT/EXCEPT operations chained in one query.
    #[arg(long, env = "QUIVER_MAX_SQL_SET_OPERATIONS", default_value_t = quiver::query::SqlLimits::default().max_set_operations)]
    pub max_sql_set_operations: usize,

    /// Most relations in one statement: SELECT blocks, CTEs, and every table, subquery
    /// or table function in a FROM clause (each joins the plan one level deeper).
    #[arg(long, env = "QUIVER_MAX_SQL_RELATIONS", default_value_t = quiver::query::SqlLimits::default().max_relations)]
    pub max_sql_relations: usize,

    /// Stack of each thread that plans and runs queries. Only the pages a statement
    /// uses become resident; the default fits every statement within the --max-sql-*
    /// limits with a wide margin.
    #[arg(long, env = "QUIVER_QUERY_STACK_SIZE", default_value = "256MiB")]
    pub query_stack_size: ByteSize,

    /// Longest a query waits in the queue before failing with UNAVAILABLE.
    #[arg(long, env = "QUIVER_QUEUE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub queue_timeout: Duration,

    /// Longest a query may take from arrival to its last message, unless the client's
    /// own deadline (grpc-timeout) is shorter; then DEADLINE_EXCEEDED. `0s`: no limit.
    #[arg(long, env = "QUIVER_QUERY_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub query_timeout: Duration,

    /// Longest parsing and planning may take. `0s`: no limit.
    #[arg(long, env = "QUIVER_PLANNING_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub planning_timeout: Duration,

    /// Longest from a query's arrival to its first record batch. `0s`: no limit.
    #[arg(long, env = "QUIVER_FIRST_BATCH_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub first_batch_timeout: Duration,

    /// A stream whose client takes no message for this long is stopped and its query's
    /// resources freed (the client gets DEADLINE_EXCEEDED if it reads on). `0s`: never.
    #[arg(long, env = "QUIVER_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,

    /// While a query computes without producing rows for this long, an empty record
    /// batch is sent, so proxies and load balancers with idle timeouts (60s is common)
    /// keep the stream open; clients read it as a batch of zero rows. `0s`: never.
    #[arg(long, env = "QUIVER_STREAM_KEEPALIVE", default_value = "20s", value_parser = parse_duration)]
    pub stream_keepalive: Duration,

    /// When an empty probe task waits this long to run on the query runtime (every
    /// query thread busy in work that does not yield), the server logs it, sets
    /// quiver_cpu_runtime_stalled, reports NOT_SERVING to gRPC health checks and refuses
    /// new queries with UNAVAILABLE until the runtime recovers. `0s` turns the probe off.
    #[arg(long, env = "QUIVER_CPU_STALL_THRESHOLD", default_value = "10s", value_parser = parse_duration)]
    pub cpu_stall_threshold: Duration,

    /// On SIGTERM or SIGINT, how long running streams may finish before they are
    /// cancelled (with UNAVAILABLE, so clients retry elsewhere) and the process exits.
    #[arg(long, env = "QUIVER_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Largest gRPC message the server accepts (tickets, descriptors). Larger requests get
    /// OUT_OF_RANGE from the transport.
    #[arg(long, env = "QUIVER_MAX_DECODING_MESSAGE_SIZE", default_value = "4MiB")]
    pub max_decoding_message_size: ByteSize,

    /// Target size of one FlightData message sent; larger batches are split.
    #[arg(long, env = "QUIVER_MAX_FLIGHT_DATA_SIZE", default_value = "2MiB")]
    pub max_flight_data_size: ByteSize,

    /// Largest gRPC message the server sends; keep it above --max-flight-data-size
    /// (one row wider than the target is still sent whole).
    #[arg(
        long,
        env = "QUIVER_MAX_ENCODING_MESSAGE_SIZE",
        default_value = "64MiB"
    )]
    pub max_encoding_message_size: ByteSize,

    /// Compress record batch bodies in the Arrow IPC stream (pyarrow decodes either
    /// transparently). Costs server CPU; pays off on slow links, not on loopback or LANs.
    #[arg(long, env = "QUIVER_IPC_COMPRESSION", default_value = "none")]
    pub ipc_compression: IpcCompression,

    /// How query results are written to the socket: `zero-copy` hands the Arrow buffers
    /// themselves to HTTP/2 (vectored writes, no copy of batch bodies); `standard` is
    /// arrow-flight's encoder and prost into one buffer per message, as tonic's codec
    /// does (two copies per byte), kept for comparison. Compressed results always take
    /// the standard path. Every ticket, plain or Flight SQL, is sent the same way.
    #[arg(long, env = "QUIVER_SEND_PATH", default_value = "zero-copy")]
    pub send_path: SendPath,

    /// How string and binary columns DataFusion holds as views (`Utf8View`) are sent:
    /// `expand` sends `Utf8`/`Binary`, the types pyarrow reads from Parquet and every
    /// driver knows (a copy of each batch's values); `keep` sends the views themselves
    /// (clients need Arrow 15+), untouched, or compacted when a batch references under
    /// ~90% of what its view buffers hold (after a selective filter), so bytes on the wire
    /// stay within 1.1x of the compacted views.
    #[arg(long, env = "QUIVER_VIEW_TYPES", default_value = "expand")]
    pub view_types: ViewTypesArg,

    /// Which filters Parquet scans evaluate inside the decoder (late materialisation:
    /// other columns decoded only for the rows that pass). `runtime`: the filters joins
    /// and TopK build at run time, on scans the query does not filter itself, each
    /// measured while it runs and no longer evaluated there while it passes over 2% of
    /// the rows (the join or TopK still drops them); and query filters that the table's
    /// statistics estimate to pass under 0.5% of the rows (point lookups, narrow key
    /// ranges, an equality of a string column whose local files' dictionaries show over
    /// 200 distinct values). Every other filter after decoding, which is faster when filters are
    /// cheap or pass rows on every page. `all`: every filter, always. `none`: none. Every
    /// filter prunes files, row groups and pages by statistics either way.
    #[arg(long, env = "QUIVER_FILTER_PUSHDOWN", default_value = "runtime")]
    pub filter_pushdown: FilterPushdownArg,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub http2: Http2Args,

    /// Users and API tokens (TOML; see README, Authentication). Without it the server
    /// accepts every client, and warns when listening beyond loopback.
    #[arg(long, env = "QUIVER_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Audit log: one JSON line per query and per authentication decision (who, from
    /// where, which SQL cut at 4 KiB, which tables, outcome, rows, bytes, duration, peak
    /// memory), appended to PATH, or `-` for stderr. Reopened on SIGHUP (logrotate).
    /// Never holds passwords or tokens.
    #[arg(long, env = "QUIVER_AUDIT_LOG", value_name = "PATH|-")]
    pub audit_log: Option<String>,

    /// Password checks (argon2id, ~19 MiB and tens of milliseconds each) running at
    /// once; one of them is kept for known users without recent failures, so a valid
    /// login gets through a flood of bad ones [default: number of CPUs].
    #[arg(long, env = "QUIVER_AUTH_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_concurrency: Option<u32>,

    /// Logins waiting for a password check, per lane (known users without recent
    /// failures; everyone else); beyond it a Handshake fails at once with UNAVAILABLE.
    #[arg(long, env = "QUIVER_AUTH_QUEUE", default_value_t = 64)]
    pub auth_queue: usize,

    /// Failed logins for one user before its logins back off: each further failure
    /// doubles the wait (from 0.5 s, up to --auth-backoff-max) during which that user's
    /// logins are refused without a password check.
    #[arg(long, env = "QUIVER_AUTH_FAILURES_BEFORE_BACKOFF", default_value_t = 5)]
    pub auth_failures_before_backoff: u32,

    /// Longest backoff of a user after failed logins.
    #[arg(long, env = "QUIVER_AUTH_BACKOFF_MAX", default_value = "60s", value_parser = parse_duration)]
    pub auth_backoff_max: Duration,

    /// Lifetime of the bearer token a Handshake returns.
    #[arg(long, env = "QUIVER_SESSION_TTL", default_value = "12h", value_parser = parse_duration)]
    pub session_ttl: Duration,
}

/// Bytes free for unprivileged users on the file system holding `path`.
pub fn free_space(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stat`
    // points to writable memory of the right type, initialised by a successful call.
    #[allow(unsafe_code)]
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Memory pool policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryPoolArg {
    /// Fair share among spilling operators.
    Fair,
    /// First come, first served.
    Greedy,
}

/// `--memory-limit`: bytes, or a percentage of the memory available to the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryLimit {
    /// A fixed size.
    Bytes(usize),
    /// A share (0-100] of the cgroup limit, or of physical memory without one.
    Percent(f64),
}

impl MemoryLimit {
    /// The limit in bytes.
    pub fn bytes(&self) -> usize {
        match *self {
            Self::Bytes(n) => n,
            Self::Percent(p) => (available_memory() as f64 * p / 100.0) as usize,
        }
    }
}

impl FromStr for MemoryLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{s}' is not a percentage like 50%"))?;
                if p > 0.0 && p <= 100.0 {
                    Ok(Self::Percent(p))
                } else {
                    Err(format!("'{s}': a percentage must be in (0, 100]"))
                }
            }
            None => Ok(Self::Bytes(s.parse::<ByteSize>()?.0)),
        }
    }
}

/// The cgroup v2 memory limit if there is one (containers), else physical memory.
pub fn available_memory() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let physical = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, physical) {
        (Some(c), Some(p)) => c.min(p),
        (Some(v), None) | (None, Some(v)) => v,
        // Unknown: a conservative 4 GiB.
        (None, None) => 4 << 30,
    }
}

/// IPC body compression of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpcCompression {
    /// Uncompressed.
    None,
    /// Zstandard: best ratio.
    Zstd,
    /// LZ4 frame: fastest.
    Lz4,
}

/// `--view-types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewTypesArg {
    /// As `Utf8`/`Binary`.
    Expand,
    /// As views, compacted when mostly unreferenced.
    Keep,
}

/// `--filter-pushdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FilterPushdownArg {
    /// Runtime filters (joins, TopK) of scans the query does not filter itself.
    Runtime,
    /// Every filter.
    All,
    /// No filter.
    None,
}

/// `--row-group-cache-admit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RowGroupAdmitArg {
    /// Scans that read at most an eighth of a file's row groups.
    Lookups,
    /// Every scan.
    All,
}

/// `--send-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendPath {
    /// Arrow buffers to the socket without copies.
    ZeroCopy,
    /// arrow-flight's encoder and prost, as tonic's codec would.
    Standard,
}

/// TLS on the Flight port.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Certificate chain (PEM, leaf first). With --tls-key, turns TLS on.
    #[arg(long, env = "QUIVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, RSA or EC).
    #[arg(long, env = "QUIVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that client certificates must chain to: turns on mutual TLS.
    #[arg(long, env = "QUIVER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: `required` refuses clients without a valid certificate,
    /// `optional` also accepts clients that present none.
    #[arg(long, env = "QUIVER_TLS_CLIENT_AUTH", default_value = "required")]
    pub tls_client_auth: ClientAuth,

    /// Lowest TLS version accepted. `1.2` adds TLS 1.2 with AEAD cipher suites only.
    #[arg(long, env = "QUIVER_TLS_MIN_VERSION", default_value = "1.3")]
    pub tls_min_version: TlsVersion,

    /// How often the certificate, key and CA files are checked for changes; changed
    /// files are loaded for new connections (SIGHUP reloads at once). `0s` disables.
    #[arg(long, env = "QUIVER_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// A client must finish the TLS handshake within this time.
    #[arg(long, env = "QUIVER_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
}

/// HTTP/2 transport tuning. The window sizes bound data the server *receives* per
/// stream and connection; result streams are paced by the client's windows.
#[derive(Debug, Args)]
pub struct Http2Args {
    /// Initial HTTP/2 stream flow-control window.
    #[arg(long, env = "QUIVER_HTTP2_STREAM_WINDOW", default_value = "1MiB")]
    pub http2_stream_window: ByteSize,

    /// Initial HTTP/2 connection flow-control window.
    #[arg(long, env = "QUIVER_HTTP2_CONNECTION_WINDOW", default_value = "2MiB")]
    pub http2_connection_window: ByteSize,

    /// Size the windows by measuring bandwidth-delay (overrides the two above).
    #[arg(long, env = "QUIVER_HTTP2_ADAPTIVE_WINDOW", default_value_t = false)]
    pub http2_adaptive_window: bool,

    /// Largest HTTP/2 frame the server accepts (16KiB to 16MiB).
    #[arg(long, env = "QUIVER_HTTP2_MAX_FRAME_SIZE", default_value = "16KiB")]
    pub http2_max_frame_size: ByteSize,

    /// Concurrent streams (calls) per connection.
    #[arg(
        long,
        env = "QUIVER_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub http2_max_concurrent_streams: u32,

    /// Interval of HTTP/2 keepalive pings on idle connections; `0s` disables.
    #[arg(long, env = "QUIVER_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// A connection whose keepalive ping is not answered within this time is closed.
    #[arg(long, env = "QUIVER_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// Close connections after this age (GOAWAY), so clients rebalance across servers
    /// and pick up rotated certificates; `0s` keeps them forever.
    #[arg(long, env = "QUIVER_MAX_CONNECTION_AGE", default_value = "0s", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// After --max-connection-age, time given to calls still running before the
    /// connection is closed.
    #[arg(long, env = "QUIVER_MAX_CONNECTION_AGE_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,
}

/// `quiver demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory to write into (tables `requests` and `services` are created inside).
    #[arg(long, env = "QUIVER_DEMO_OUT")]
    pub out: PathBuf,

    /// Approximate number of request rows.
    #[arg(long, env = "QUIVER_DEMO_ROWS", default_value_t = 3_000_000)]
    pub rows: u64,
}

/// A Flight URL clients can connect to: `grpc://HOST:PORT` or `grpc+tls://HOST:PORT`.
fn parse_flight_url(s: &str) -> Result<String, String> {
    let url = url::Url::parse(s).map_err(|e| format!("'{s}' is not a URL ({e})"))?;
    let scheme_ok = matches!(url.scheme(), "grpc" | "grpc+tcp" | "grpc+tls");
    if !scheme_ok || url.host().is_none() || url.port().is_none() {
        return Err(format!(
            "'{s}' must be grpc://HOST:PORT, or grpc+tls://HOST:PORT when clients use TLS"
        ));
    }
    Ok(s.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 10s or 1m: {e}"))
}

/// A byte count written as `4MiB`, `512KiB`, `1GB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: usize = digits
            .parse()
            .map_err(|_| format!("'{s}' is not a size like 4MiB or 1048576"))?;
        let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown unit '{other}' in '{s}' (use B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("'{s}' is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("4MiB".parse::<ByteSize>().unwrap(), ByteSize(4 << 20));
        assert_eq!("512 KiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 10));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("123".parse::<ByteSize>().unwrap(), ByteSize(123));
        assert!("4 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn memory_limits() {
        assert_eq!(
            "2MiB".parse::<MemoryLimit>().unwrap(),
            MemoryLimit::Bytes(2 << 20)
        );
        assert_eq!(
            "50%".parse::<MemoryLimit>().unwrap(),
            MemoryLimit::Percent(50.0)
        );
        for bad in ["0%", "150%", "half", "12 parsecs"] {
            assert!(bad.parse::<MemoryLimit>().is_err(), "{bad}");
        }
        let half = MemoryLimit::Percent(50.0).bytes();
        let all = MemoryLimit::Percent(100.0).bytes();
        assert!(
            half > 0 && half <= all && all.abs_diff(2 * half) <= 1,
            "{half} {all}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }
}
