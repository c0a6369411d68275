//! Which workers a query may use: a static list (`--workers`) or a DNS name re-resolved
//! (`--workers-dns`, a Kubernetes headless Service), less the ones that do not answer.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use datafusion::error::Result as DfResult;
use datafusion_distributed::WorkerResolver;
use parking_lot::RwLock;
use prometheus::{IntGaugeVec, Opts};
use tokio_util::task::AbortOnDropHandle;
use url::Url;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{ClusterChannels, FLIGHT_URL_HEADER};
use crate::error::{Error, Result};
use crate::query::{NodeLocations, spawn};

/// Where the worker list comes from.
#[derive(Debug, Clone)]
pub enum WorkerSource {
    /// `http://HOST:PORT` URLs.
    Static(Vec<Url>),
    /// `HOST:PORT`: every address the name resolves to.
    Dns {
        /// The name.
        host: String,
        /// The workers' port.
        port: u16,
        /// `https` when the workers speak TLS, else `http`.
        scheme: &'static str,
    },
}

impl WorkerSource {
    /// Parses `--workers` URLs: `http://HOST:PORT`, or `https://HOST:PORT` for workers
    /// that speak TLS.
    pub fn urls(urls: &[String]) -> Result<Self> {
        urls.iter()
            .map(|u| {
                let url = Url::parse(u).map_err(|e| Error::Config {
                    message: format!(
                        "--workers: '{u}' is not a URL ({e}); give http://HOST:PORT (https:// with TLS)"
                    ),
                })?;
                if !matches!(url.scheme(), "http" | "https")
                    || url.host().is_none()
                    || url.port().is_none()
                {
                    return Err(Error::Config {
                        message: format!(
                            "--workers: '{u}' must be http://HOST:PORT (https:// with TLS)"
                        ),
                    });
                }
                Ok(url)
            })
            .collect::<Result<Vec<_>>>()
            .map(Self::Static)
    }

    /// Parses `--workers-dns HOST:PORT`; `tls`: the workers speak TLS.
    pub fn dns(spec: &str, tls: bool) -> Result<Self> {
        let bad = || Error::Config {
            message: format!("--workers-dns: '{spec}' must be HOST:PORT"),
        };
        let (host, port) = spec.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self::Dns {
            host: host.to_string(),
            port,
            scheme: if tls { "https" } else { "http" },
        })
    }

    async fn candidates(&self) -> Vec<Url> {
        match self {
            Self::Static(urls) => urls.clone(),
            Self::Dns { host, port, scheme } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => {
                        let mut urls: Vec<Url> = addrs
                            .filter_map(|a| Url::parse(&format!("{scheme}://{a}")).ok())
                            .collect();
                        urls.sort();
                        urls.dedup();
                        urls
                    }
                    Err(e) => {
                        tracing::warn!(name = %host, error = %e, "cannot resolve the workers (--workers-dns)");
                        vec![]
                    }
                }
            }
        }
    }
}

/// The workers that answered the last probe; what the planner spreads stages over.
pub struct Workers {
    up: RwLock<Vec<Url>>,
    gauge: IntGaugeVec,
    /// Asks each worker that is up where its Flight port is (a health check).
    channels: Option<Arc<ClusterChannels>>,
    /// Each worker's Flight URL, as its last health check answered.
    flight_urls: RwLock<HashMap<Url, String>>,
    /// This node's, once its Flight port is bound.
    own_flight_url: OnceLock<String>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("up", &*self.up.read())
            .field("flight_urls", &*self.flight_urls.read())
            .finish_non_exhaustive()
    }
}

impl NodeLocations for Workers {
    fn flight_urls(&self) -> Vec<Option<String>> {
        let own = self.own_flight_url.get();
        let known = self.flight_urls.read();
        let workers = self.up.read();
        // This node may be one of its own workers: it is listed once.
        let workers = workers
            .iter()
            .filter_map(|url| known.get(url))
            .filter(|url| Some(*url) != own);
        std::iter::once(own.cloned())
            .chain(workers.cloned().map(Some))
            .collect()
    }
}

impl WorkerResolver for Workers {
    fn get_urls(&self) -> DfResult<Vec<Url>> {
        Ok(self.up.read().clone())
    }
}

impl Workers {
    /// Probes `source` now (so the first queries know their workers), then every
    /// `every` in the background until the handle is dropped: a worker whose port does
    /// not accept a connection within `timeout` is left out until it does again. With
    /// `channels`, each worker up is also asked where its Flight port is.
    pub async fn watch(
        source: WorkerSource,
        every: Duration,
        timeout: Duration,
        channels: Option<Arc<ClusterChannels>>,
    ) -> (Arc<Self>, AbortOnDropHandle<()>) {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "quiver_cluster_workers",
                "Workers this node may send tasks to, by state: up (answered the last probe) \
                 or down.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let workers = Arc::new(Self {
            up: RwLock::default(),
            gauge,
            channels,
            flight_urls: RwLock::default(),
            own_flight_url: OnceLock::new(),
        });
        workers.probe(&source, timeout).await;
        let watched = Arc::clone(&workers);
        let task = spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                watched.probe(&source, timeout).await;
            }
        });
        (workers, task)
    }

    /// Where clients reach this node's Flight port; the first call wins.
    pub fn set_own_flight_url(&self, url: String) {
        let _ = self.own_flight_url.set(url);
    }

    /// Asks each worker in `up` where its Flight port is: a gRPC health check, whose
    /// answer carries [`FLIGHT_URL_HEADER`]. A worker that does not say keeps no URL, and
    /// its slices go to the other nodes.
    async fn learn_flight_urls(&self, up: &[Url], timeout: Duration) {
        let Some(channels) = &self.channels else {
            return;
        };
        let answers = futures::future::join_all(up.iter().map(|url| async move {
            let channel = channels.channel(url).await.ok()?;
            let mut client = HealthClient::new(channel);
            let check = client.check(HealthCheckRequest {
                service: String::new(),
            });
            let answer = tokio::time::timeout(timeout, check).await.ok()?.ok()?;
            let flight = answer.metadata().get(FLIGHT_URL_HEADER)?.to_str().ok()?;
            Some((url.clone(), flight.to_string()))
        }))
        .await;
        *self.flight_urls.write() = answers.into_iter().flatten().collect();
    }

    /// The workers that answered, for this node's metrics.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.gauge.clone()))
    }

    async fn probe(&self, source: &WorkerSource, timeout: Duration) {
        let candidates = source.candidates().await;
        let answers = futures::future::join_all(candidates.iter().map(|url| async move {
            let addr = (
                url.host_str()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string(),
                url.port().unwrap_or(80),
            );
            matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            )
        }))
        .await;
        let up: Vec<Url> = candidates
            .iter()
            .zip(&answers)
            .filter(|(_, up)| **up)
            .map(|(u, _)| u.clone())
            .collect();
        let down: Vec<&Url> = candidates
            .iter()
            .zip(&answers)
            .filter(|(_, up)| !**up)
            .map(|(u, _)| u)
            .collect();
        self.learn_flight_urls(&up, timeout).await;
        let before = std::mem::replace(&mut *self.up.write(), up.clone());
        if before != up {
            let names = |urls: &[&Url]| {
                urls.iter()
                    .map(|u| u.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            tracing::info!(
                up = %names(&up.iter().collect::<Vec<_>>()),
                down = %names(&down),
                "cluster workers changed"
            );
        }
        self.gauge.with_label_values(&["up"]).set(up.len() as i64);
        self.gauge
            .with_label_values(&["down"])
            .set(down.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn url_of(addr: SocketAddr) -> std::result::Result<Url, url::ParseError> {
        Url::parse(&format!("http://{addr}"))
    }

    #[test]
    fn worker_sources_parse() {
        assert!(matches!(
            WorkerSource::urls(&["http://127.0.0.1:7001".into(), "http://node-2:7001".into()]),
            Ok(WorkerSource::Static(urls)) if urls.len() == 2
        ));
        assert!(WorkerSource::urls(&["https://node-1:7001".into()]).is_ok());
        for bad in ["127.0.0.1:7001", "http://127.0.0.1", "ftp://x:1"] {
            assert!(WorkerSource::urls(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(matches!(
            WorkerSource::dns("quiver-workers.default.svc:7001", false),
            Ok(WorkerSource::Dns { port: 7001, .. })
        ));
        for bad in ["quiver", ":7001", "quiver:port"] {
            assert!(WorkerSource::dns(bad, false).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn workers_that_do_not_answer_are_left_out_until_they_do() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive = listener.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let source = WorkerSource::Static(vec![url_of(alive).unwrap(), url_of(dead).unwrap()]);
        let (workers, _task) = Workers::watch(
            source,
            Duration::from_millis(50),
            Duration::from_secs(1),
            None,
        )
        .await;
        assert_eq!(workers.get_urls().unwrap(), vec![url_of(alive).unwrap()]);
        assert_eq!(workers.gauge.with_label_values(&["down"]).get(), 1);
        // The dead one comes back.
        let _revived = tokio::net::TcpListener::bind(dead).await.unwrap();
        for _ in 0..100 {
            if workers.get_urls().unwrap().len() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the worker that came back was not taken back");
    }
}
