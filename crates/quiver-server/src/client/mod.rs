//! The client subcommands: `quiver query`, `quiver tables` and `quiver health`.
//!
//! Each connects (plain or TLS), logs in when asked (Basic handshake or a static token),
//! makes one call and prints the answer. Failures name what went wrong and what to
//! check: the address, the certificate, the credentials or the SQL. The connection is in
//! `connection`, how results are written in `output`.

mod connection;
mod output;

use std::io::{BufWriter, Read, Write};
use std::time::Instant;

use anyhow::{Context, bail};
use arrow_flight::{FlightInfo, Ticket};
use futures::{StreamExt, TryStreamExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cli::{HealthArgs, OutputFormat, QueryArgs, TablesArgs};
use connection::{call_error, channel, connect, describe_status, grpc_timeout};
use output::{PendingFile, Progress, Sink, count_or_unknown, human_bytes, indent, write_aligned};

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
        if !sink.started() {
            sink = sink.start(batch.schema_ref())?;
        }
        progress.add(&batch);
        sink.write(batch)?;
    }
    // A result with no rows has no batches; its schema still arrived first.
    if !sink.started()
        && let Some(schema) = stream.schema()
    {
        sink = sink.start(schema)?;
    }
    let rows = progress.finish(started);
    sink.finish(rows)?;
    if let Some(file) = pending {
        file.commit()?;
    }
    Ok(())
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
