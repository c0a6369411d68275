//! The client subcommands: `quiver query`, `quiver tables` and `quiver health`.
//!
//! Each connects (plain or TLS), logs in when asked (Basic handshake or a static token),
//! makes one call and prints the answer. Failures name what went wrong and what to
//! check: the address, the certificate, the credentials or the SQL.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::util::pretty::pretty_format_batches;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightClient, FlightInfo, HandshakeRequest, Ticket};
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parquet::arrow::ArrowWriter;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cli::{ClientArgs, HealthArgs, OutputFormat, QueryArgs, TablesArgs};

/// `quiver query`: runs the SQL and writes its result as it arrives.
pub async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let sql = if args.sql == "-" {
        let mut sql = String::new();
        std::io::stdin()
            .read_to_string(&mut sql)
            .context("reading the SQL from stdin")?;
        sql
    } else {
        args.sql.clone()
    };
    if sql.trim().is_empty() {
        bail!("the SQL statement is empty");
    }
    if args.format == OutputFormat::Parquet && args.output.is_none() {
        bail!("--format parquet writes a file: add --output FILE");
    }

    let mut client = connect(&args.client).await?;
    if !args.timeout.is_zero() {
        client
            .metadata_mut()
            .insert("grpc-timeout", grpc_timeout(args.timeout).parse()?);
    }
    let started = Instant::now();
    let mut stream = client
        .do_get(Ticket::new(sql))
        .await
        .map_err(|e| call_error("the query", e))?;

    // A file appears under its name only once the whole result is in it.
    let pending = args
        .output
        .as_deref()
        .map(PendingFile::create)
        .transpose()?;
    let out: Box<dyn Write + Send> = match &pending {
        Some(file) => Box::new(BufWriter::new(file.file.try_clone()?)),
        None => Box::new(BufWriter::new(std::io::stdout())),
    };
    let mut sink = Sink::new(args.format, out, args.max_rows);
    let mut progress = Progress::new(args.quiet);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| call_error("the query", e))?;
        if sink.schema.is_none() {
            sink.start(batch.schema_ref())?;
        }
        progress.add(&batch);
        sink.write(batch)?;
    }
    // A result with no rows has no batches; its schema still arrived first.
    if sink.schema.is_none()
        && let Some(schema) = stream.schema()
    {
        sink.start(schema)?;
    }
    let rows = progress.finish(started);
    sink.finish(rows)?;
    if let Some(file) = pending {
        file.commit()?;
    }
    Ok(())
}

/// `--output`: written under a temporary name beside the target, renamed over it when
/// complete, removed if the query fails.
struct PendingFile {
    file: File,
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PendingFile {
    fn create(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("--output {} names no file", target.display()))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".{}.partial", std::process::id()));
        let temporary = target.with_file_name(temporary_name);
        let file = File::create(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        Ok(Self {
            file,
            temporary,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    fn commit(mut self) -> anyhow::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.temporary, &self.target)
            .with_context(|| format!("renaming the result to {}", self.target.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// `quiver tables`: every table with its row count, size and columns.
pub async fn tables(args: TablesArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let infos: Vec<FlightInfo> = client
        .list_flights("")
        .await
        .map_err(|e| call_error("listing the tables", e))?
        .try_collect()
        .await
        .map_err(|e| call_error("listing the tables", e))?;

    let mut listed = Vec::with_capacity(infos.len());
    for info in infos {
        let name = info
            .flight_descriptor
            .as_ref()
            .map(|d| d.path.join("."))
            .unwrap_or_default();
        let schema = info
            .clone()
            .try_decode_schema()
            .with_context(|| format!("the schema of table {name} is malformed"))?;
        listed.push((name, info.total_records, info.total_bytes, schema));
    }
    listed.sort_by(|a, b| a.0.cmp(&b.0));

    let mut out = std::io::stdout().lock();
    let rows: Vec<[String; 4]> = listed
        .iter()
        .map(|(name, records, bytes, schema)| {
            [
                name.clone(),
                count_or_unknown(*records),
                if *bytes < 0 {
                    "?".into()
                } else {
                    human_bytes(*bytes as u64)
                },
                schema.fields().len().to_string(),
            ]
        })
        .collect();
    write_aligned(&mut out, ["TABLE", "ROWS", "SIZE", "COLUMNS"], &rows)?;
    if !args.no_schema {
        for (name, _, _, schema) in &listed {
            writeln!(out, "\n{name}")?;
            let columns: Vec<[String; 3]> = schema
                .fields()
                .iter()
                .map(|f| {
                    [
                        f.name().clone(),
                        f.data_type().to_string(),
                        if f.is_nullable() { "yes" } else { "no" }.into(),
                    ]
                })
                .collect();
            write_aligned(&mut out, ["  COLUMN", "TYPE", "NULLABLE"], &indent(columns))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `quiver health`: asks grpc.health.v1 for the status of `args.service`.
pub async fn health(args: HealthArgs) -> anyhow::Result<bool> {
    let channel = channel(&args.client).await?;
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    request.set_timeout(args.timeout);
    let status = client
        .check(request)
        .await
        .map_err(|e| anyhow::anyhow!("health check failed: {}", describe_status(&e)))?
        .into_inner()
        .status();
    let serving = status == ServingStatus::Serving;
    println!("{}", status.as_str_name());
    Ok(serving)
}

/// A Flight client for `args`, logged in when credentials are given.
async fn connect(args: &ClientArgs) -> anyhow::Result<FlightClient> {
    let channel = channel(args).await?;
    let inner = FlightServiceClient::new(channel.clone())
        .max_decoding_message_size(args.max_message_size.0);
    let mut client = FlightClient::new_from_inner(inner);
    if let Some(token) = &args.token {
        client.add_header("authorization", &format!("Bearer {token}"))?;
    } else if let Some(user) = &args.user {
        let password = password(user)?;
        let token = handshake(channel, args, user, &password).await?;
        client.add_header("authorization", &format!("Bearer {token}"))?;
    }
    Ok(client)
}

/// The gRPC channel to `args.server`, connected.
async fn channel(args: &ClientArgs) -> anyhow::Result<Channel> {
    let (tls, authority) = match args.server.split_once("://") {
        Some(("grpc" | "http", rest)) => (false, rest),
        Some(("grpc+tls" | "https", rest)) => (true, rest),
        _ => bail!(
            "--server {}: use grpc://HOST:PORT (plain) or grpc+tls://HOST:PORT (TLS)",
            args.server
        ),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
        .with_context(|| format!("--server {} is not a valid address", args.server))?
        .connect_timeout(args.connect_timeout)
        .tcp_nodelay(true);
    if tls {
        endpoint = endpoint.tls_config(tls_config(args)?)?;
    } else if args.tls_ca.is_some() || args.client_cert.is_some() {
        bail!(
            "TLS options were given but --server {} is plain gRPC: use grpc+tls://",
            args.server
        );
    }
    endpoint.connect().await.map_err(|e| {
        let hint = if tls {
            "is Quiver listening there with TLS, and does --tls-ca hold the CA that signed its certificate?"
        } else {
            "is Quiver listening there without TLS? (use grpc+tls:// for a TLS server)"
        };
        anyhow::anyhow!(
            "cannot connect to {}: {} ({hint})",
            args.server,
            error_chain(&e)
        )
    })
}

fn tls_config(args: &ClientArgs) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    config = match &args.tls_ca {
        Some(path) => config.ca_certificate(Certificate::from_pem(read(path, "--tls-ca")?)),
        None => config.with_native_roots(),
    };
    if let Some(name) = &args.tls_server_name {
        config = config.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        config = config.identity(Identity::from_pem(
            read(cert, "--client-cert")?,
            read(key, "--client-key")?,
        ));
    }
    Ok(config)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// The password of `user`: $QUIVER_PASSWORD, or else the first line of stdin.
fn password(user: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("QUIVER_PASSWORD") {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password for {user}: ");
    }
    let mut line = String::new();
    stdin.read_line(&mut line).context("reading the password")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("no password for --user {user}: set QUIVER_PASSWORD or pipe it on stdin");
    }
    Ok(password)
}

/// Basic handshake; returns the bearer token the server answers with.
async fn handshake(
    channel: Channel,
    args: &ClientArgs,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let mut client =
        FlightServiceClient::new(channel).max_decoding_message_size(args.max_message_size.0);
    let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {basic}").parse()?);
    let response = client
        .handshake(request)
        .await
        .map_err(|e| anyhow::anyhow!("logging in as {user} failed: {}", describe_status(&e)))?;
    let token = response
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    token.ok_or_else(|| {
        anyhow::anyhow!("the server accepted the login but sent no bearer token to use")
    })
}

/// An error from a call, with the status code and what to check.
fn call_error(what: &str, error: arrow_flight::error::FlightError) -> anyhow::Error {
    match error {
        arrow_flight::error::FlightError::Tonic(status) => {
            anyhow::anyhow!("{what} failed: {}", describe_status(&status))
        }
        other => anyhow::anyhow!("{what} failed: {other}"),
    }
}

fn describe_status(status: &Status) -> String {
    // tonic enforces the request's own `grpc-timeout` on the client side too, and reports
    // it as a cancellation.
    if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
        return "DeadlineExceeded: --timeout expired before the result was complete".into();
    }
    let hint = match status.code() {
        Code::Unauthenticated => " (log in with --user, or pass --token)",
        Code::PermissionDenied => " (this user may not do that)",
        Code::Unavailable => " (the server is unreachable, shutting down or overloaded: retry)",
        Code::DeadlineExceeded => " (a time limit expired: see --timeout and the server's)",
        _ => "",
    };
    let message = status.message();
    let message = if message.is_empty() {
        error_chain(status)
    } else {
        message.to_string()
    };
    format!("{:?}: {message}{hint}", status.code())
}

/// `error` and each of its causes, joined.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// `grpc-timeout` header value for `d` (milliseconds, at most 8 digits).
fn grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis().clamp(1, 99_999_999);
    format!("{ms}m")
}

/// Where result batches go, in the chosen format.
struct Sink {
    format: OutputFormat,
    out: Option<Box<dyn Write + Send>>,
    schema: Option<arrow::datatypes::SchemaRef>,
    csv: Option<arrow::csv::Writer<Box<dyn Write + Send>>>,
    json: Option<arrow::json::LineDelimitedWriter<Box<dyn Write + Send>>>,
    parquet: Option<ArrowWriter<Box<dyn Write + Send>>>,
    /// `table`: the rows kept to print, and the most to keep.
    kept: Vec<RecordBatch>,
    kept_rows: usize,
    max_rows: usize,
}

impl Sink {
    fn new(format: OutputFormat, out: Box<dyn Write + Send>, max_rows: usize) -> Self {
        Self {
            format,
            out: Some(out),
            schema: None,
            csv: None,
            json: None,
            parquet: None,
            kept: Vec::new(),
            kept_rows: 0,
            max_rows: if max_rows == 0 { usize::MAX } else { max_rows },
        }
    }

    fn start(&mut self, schema: &arrow::datatypes::SchemaRef) -> anyhow::Result<()> {
        self.schema = Some(schema.clone());
        let out = self.out.take().expect("started once");
        match self.format {
            OutputFormat::Table => self.out = Some(out),
            OutputFormat::Csv => {
                self.csv = Some(
                    arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(out),
                )
            }
            OutputFormat::Json => self.json = Some(arrow::json::LineDelimitedWriter::new(out)),
            OutputFormat::Parquet => {
                self.parquet = Some(ArrowWriter::try_new(out, schema.clone(), None)?)
            }
        }
        Ok(())
    }

    fn write(&mut self, batch: RecordBatch) -> anyhow::Result<()> {
        match self.format {
            OutputFormat::Table => {
                let room = self.max_rows.saturating_sub(self.kept_rows);
                if room > 0 {
                    let batch = batch.slice(0, batch.num_rows().min(room));
                    self.kept_rows += batch.num_rows();
                    self.kept.push(batch);
                }
            }
            OutputFormat::Csv => self.csv.as_mut().expect("started").write(&batch)?,
            OutputFormat::Json => self.json.as_mut().expect("started").write(&batch)?,
            OutputFormat::Parquet => self.parquet.as_mut().expect("started").write(&batch)?,
        }
        Ok(())
    }

    fn finish(mut self, rows: u64) -> anyhow::Result<()> {
        match self.format {
            OutputFormat::Table => {
                let mut out = self.out.take().expect("table output");
                let schema = self
                    .schema
                    .clone()
                    .unwrap_or_else(|| std::sync::Arc::new(Schema::empty()));
                if self.kept.is_empty() {
                    self.kept.push(RecordBatch::new_empty(schema));
                }
                writeln!(out, "{}", pretty_format_batches(&self.kept)?)?;
                let hidden = rows.saturating_sub(self.kept_rows as u64);
                if hidden > 0 {
                    writeln!(
                        out,
                        "({hidden} more rows not shown: raise --max-rows, or use --format csv)"
                    )?;
                }
                out.flush()?;
            }
            OutputFormat::Csv => self.csv.take().expect("started").into_inner().flush()?,
            OutputFormat::Json => {
                let mut writer = self.json.take().expect("started");
                writer.finish()?;
                writer.into_inner().flush()?;
            }
            OutputFormat::Parquet => {
                self.parquet
                    .take()
                    .expect("started")
                    .into_inner()?
                    .flush()?;
            }
        }
        Ok(())
    }
}

/// Rows received and their rate on stderr: live on a terminal, one summary line at the end.
struct Progress {
    bar: Option<ProgressBar>,
    rows: u64,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let bar = (!quiet).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {human_pos} rows ({per_sec})")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar, rows: 0 }
    }

    fn add(&mut self, batch: &RecordBatch) {
        self.rows += batch.num_rows() as u64;
        if let Some(bar) = &self.bar {
            bar.inc(batch.num_rows() as u64);
        }
    }

    /// Clears the live line and prints the summary; returns the rows received.
    fn finish(&self, started: Instant) -> u64 {
        let rows = self.rows;
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{rows} rows in {secs:.2}s ({:.0} rows/s)",
                rows as f64 / secs.max(1e-9)
            );
        }
        rows
    }
}

fn count_or_unknown(n: i64) -> String {
    if n < 0 { "?".into() } else { n.to_string() }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn indent<const N: usize>(rows: Vec<[String; N]>) -> Vec<[String; N]> {
    rows.into_iter()
        .map(|mut r| {
            r[0] = format!("  {}", r[0]);
            r
        })
        .collect()
}

/// Writes `header` and `rows` as left-aligned columns.
fn write_aligned<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", text.join("  ").trim_end())
    };
    line(out, header.to_vec())?;
    for row in rows {
        line(out, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn timeouts_fit_the_header() {
        assert_eq!(grpc_timeout(Duration::from_secs(2)), "2000m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(10_000_000)), "99999999m");
    }

    #[test]
    fn columns_align() {
        let mut out = Vec::new();
        let rows = [["requests".to_string(), "10".to_string()]];
        write_aligned(&mut out, ["TABLE", "ROWS"], &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "TABLE     ROWS\nrequests  10\n"
        );
    }
}
