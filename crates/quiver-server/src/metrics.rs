//! The metrics endpoint: one registry, created in `serve::run` and filled by each part,
//! served as Prometheus text on `/metrics`, beside a liveness check on `/healthz`.
//!
//! The process-level collectors live here because they describe the process, not the
//! library: jemalloc (the global allocator, see `main.rs`) and the standard `process_*`
//! metrics.

use parking_lot::Mutex;

use anyhow::Context;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use quiver::query::spawn;
use tikv_jemalloc_ctl::{epoch, stats};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Registers what describes the process: jemalloc, `process_*` and build info.
pub fn register_process_metrics(registry: &Registry) -> anyhow::Result<()> {
    registry.register(Box::new(JemallocCollector::new()?))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build = IntGaugeVec::new(
        Opts::new(
            "quiver_build_info",
            "Always 1; the labels say which build runs.",
        ),
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(build))?;
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `listener` until dropped. `/healthz` answers 503
/// once `shutdown` is cancelled, so a load balancer stops sending while calls drain.
pub fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: CancellationToken,
) -> AbortOnDropHandle<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(move || {
                let shutdown = shutdown.clone();
                async move {
                    if shutdown.is_cancelled() {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                    } else {
                        (StatusCode::OK, "ok\n")
                    }
                }
            }),
        )
        .with_state(registry);
    spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint failed");
        }
    })
}

async fn metrics(State(registry): State<Registry>) -> Response {
    match TextEncoder::new().encode_to_string(&registry.gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Bytes the process has allocated now (jemalloc `stats.allocated`, after advancing
/// its epoch), for the memory guard.
pub fn allocated_bytes() -> Option<usize> {
    epoch::advance().ok()?;
    stats::allocated::read().ok()
}

/// Reads one jemalloc statistic.
type ReadStat = fn() -> Result<usize, tikv_jemalloc_ctl::Error>;

/// jemalloc's statistics, refreshed at scrape time (advancing its epoch first).
struct JemallocCollector {
    scrape: Mutex<()>,
    gauges: Vec<(IntGauge, ReadStat)>,
}

impl JemallocCollector {
    fn new() -> anyhow::Result<Self> {
        let gauge = |name: &str, help: &str, read: ReadStat| {
            Ok::<_, prometheus::Error>((IntGauge::new(name, help)?, read))
        };
        let gauges = vec![
            gauge(
                "quiver_jemalloc_allocated_bytes",
                "Bytes the application has allocated and not freed (jemalloc stats.allocated).",
                stats::allocated::read,
            )?,
            gauge(
                "quiver_jemalloc_active_bytes",
                "Bytes in pages jemalloc holds for live allocations (stats.active).",
                stats::active::read,
            )?,
            gauge(
                "quiver_jemalloc_resident_bytes",
                "Bytes in physically resident pages jemalloc maps (stats.resident).",
                stats::resident::read,
            )?,
            gauge(
                "quiver_jemalloc_mapped_bytes",
                "Bytes in the chunks jemalloc has mapped in active extents (stats.mapped).",
                stats::mapped::read,
            )?,
            gauge(
                "quiver_jemalloc_retained_bytes",
                "Bytes of virtual memory jemalloc retains for reuse, not returned to the OS (stats.retained).",
                stats::retained::read,
            )?,
            gauge(
                "quiver_jemalloc_metadata_bytes",
                "Bytes jemalloc uses for its own metadata (stats.metadata).",
                stats::metadata::read,
            )?,
        ];
        // Fail at start-up, not at the first scrape, if the statistics are missing.
        epoch::advance().map_err(|e| anyhow::anyhow!("jemalloc statistics: {e}"))?;
        stats::allocated::read()
            .map_err(|e| anyhow::anyhow!("jemalloc statistics: {e}"))
            .context("is jemalloc the global allocator?")?;
        Ok(Self {
            scrape: Mutex::new(()),
            gauges,
        })
    }
}

impl Collector for JemallocCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges.iter().flat_map(|(g, _)| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scrape.lock();
        // The statistics are a snapshot taken at the last epoch advance.
        if let Err(e) = epoch::advance() {
            tracing::warn!(error = %e, "cannot refresh jemalloc statistics");
        }
        for (gauge, read) in &self.gauges {
            match read() {
                Ok(bytes) => gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX)),
                Err(e) => tracing::warn!(error = %e, "cannot read a jemalloc statistic"),
            }
        }
        self.gauges.iter().flat_map(|(g, _)| g.collect()).collect()
    }
}
