//! `--io mmap` against `--io pread` on the same data, hot page cache, in one process.
//!
//! ```sh
//! cargo run --release -p quiver-benches --bin io -- --rows 3000000 --runs 7
//! ```
//!
//! Both engines read the same demo dataset (generated once into ~/.cache/quiver). Every
//! workload runs once per engine to warm the page cache and the footer cache, then `--runs`
//! times per engine, alternating which goes first. Results are drained on the engine's CPU
//! runtime, as the Flight path does, without the network: this measures the read path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use quiver::catalog::tables_in_data_dir;
use quiver::io::{IoMode, IoOptions};
use quiver::query::{QueryEngine, QueryOptions};
use quiver_benches::{demo_data, median, time};

#[derive(Debug, Parser)]
struct Args {
    /// Demo rows to generate (and cache) for the run.
    #[arg(long, default_value_t = 3_000_000)]
    rows: u64,
    /// Timed runs per workload and engine.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Queries in the many-small-queries workload.
    #[arg(long, default_value_t = 200)]
    small_queries: usize,
}

/// Runs `sql` to the end; returns the rows produced.
async fn run(engine: &Arc<QueryEngine>, sql: String) -> anyhow::Result<usize> {
    let execution = engine.execute(sql).await?;
    let mut stream = execution.stream;
    let report = execution.report;
    let rows = engine
        .cpu()
        .run(async move {
            let mut rows = 0;
            while let Some(batch) = stream.next().await {
                rows += batch?.num_rows();
            }
            drop(report);
            Ok(rows)
        })
        .await?;
    Ok(rows)
}

fn small_queries(n: usize) -> Vec<String> {
    let services = ["api", "web", "search", "auth", "billing"];
    (0..n)
        .map(|i| {
            format!(
                "SELECT request_id, status, latency_ms FROM requests \
                 WHERE day = DATE '2026-01-0{}' AND service = '{}' AND user_id = {}",
                1 + i % 7,
                services[i % services.len()],
                1 + (i * 7919) % 50_000
            )
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = demo_data(args.rows)?;
    let tables = tables_in_data_dir(&data)?;
    let mut engines = Vec::new();
    for mode in [IoMode::Mmap, IoMode::Pread] {
        let options = QueryOptions {
            io: IoOptions {
                mode,
                ..IoOptions::default()
            },
            ..QueryOptions::default()
        };
        engines.push((
            mode,
            Arc::new(QueryEngine::new(tables.clone(), options).await?),
        ));
    }

    let workloads: Vec<(&str, Vec<String>)> = vec![
        ("full scan: SELECT *", vec!["SELECT * FROM requests".into()]),
        (
            "selective: 1 partition, status = 503",
            vec![
                "SELECT request_id, latency_ms FROM requests \
                 WHERE day = DATE '2026-01-03' AND service = 'api' AND status = 503"
                    .into(),
            ],
        ),
        (
            "aggregate: GROUP BY day, service",
            vec![
                "SELECT day, service, count(*), avg(latency_ms), sum(response_bytes) \
             FROM requests GROUP BY day, service"
                    .into(),
            ],
        ),
        (
            "many small queries (point lookups)",
            small_queries(args.small_queries),
        ),
    ];

    let mut samples: BTreeMap<(usize, IoMode), Vec<Duration>> = BTreeMap::new();
    for (w, (name, queries)) in workloads.iter().enumerate() {
        // Warm-up: page cache, footer cache, mappings.
        let mut rows = Vec::new();
        for (_, engine) in &engines {
            let mut n = 0;
            for q in queries {
                n += run(engine, q.clone()).await.with_context(|| q.clone())?;
            }
            rows.push(n);
        }
        anyhow::ensure!(rows[0] == rows[1], "{name}: engines disagree: {rows:?}");
        for r in 0..args.runs {
            for i in 0..engines.len() {
                // Alternate which engine goes first.
                let (mode, engine) = &engines[(i + r) % engines.len()];
                let elapsed = time(async {
                    for q in queries {
                        run(engine, q.clone()).await?;
                    }
                    Ok(())
                })
                .await?;
                samples.entry((w, *mode)).or_default().push(elapsed);
            }
        }
        eprintln!("{name}: {} rows, done", rows[0]);
    }

    println!(
        "rows: {}, runs: {}, cpu threads: {}\n",
        args.rows,
        args.runs,
        QueryOptions::default().cpu_threads
    );
    println!("| workload | mmap (median) | pread (median) | pread / mmap |");
    println!("|---|---:|---:|---:|");
    for (w, (name, _)) in workloads.iter().enumerate() {
        let mmap = median(samples.get_mut(&(w, IoMode::Mmap)).context("samples")?);
        let pread = median(samples.get_mut(&(w, IoMode::Pread)).context("samples")?);
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.2}x |",
            mmap.as_secs_f64() * 1e3,
            pread.as_secs_f64() * 1e3,
            pread.as_secs_f64() / mmap.as_secs_f64()
        );
    }
    if let Some(stats) = engines[0].1.mmap_stats() {
        println!("\nmmap cache: {stats:?}");
    }
    Ok(())
}
