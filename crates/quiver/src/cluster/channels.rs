//! Connections from this node to the cluster's workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{
    ChannelResolver, CoordinatorToWorkerMsg, ExecuteTaskRequest, GetWorkerInfoRequest,
    GetWorkerInfoResponse, SetPlanRequest, WorkerChannel, WorkerToCoordinatorMsg,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tower::ServiceExt;
use url::Url;

use super::metrics::ClusterMetrics;
use super::{ClusterSecret, SECRET_HEADER};
use crate::error::Error;
use crate::query::spawn_on;

/// One HTTP/2 connection per worker, made on the network runtime (its tasks need an I/O
/// driver; queries run where there is none) and kept: tonic reconnects it when a call
/// finds it broken. Every call carries the cluster secret.
pub struct ClusterChannels {
    network: Handle,
    secret: ClusterSecret,
    connect_timeout: Duration,
    metrics: Arc<ClusterMetrics>,
    /// TLS to workers (`https://` URLs): the CA their certificates chain to, and this
    /// node's certificate for workers that require one.
    tls: Option<ClientTlsConfig>,
    connected: Mutex<HashMap<Url, BoxCloneSyncChannel>>,
}

impl std::fmt::Debug for ClusterChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterChannels")
            .field("workers", &self.connected.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ClusterChannels {
    /// Connections made on `network`, each within `connect_timeout`, over TLS with `tls`
    /// to `https://` workers.
    pub fn new(
        network: Handle,
        secret: ClusterSecret,
        connect_timeout: Duration,
        metrics: Arc<ClusterMetrics>,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        Self {
            network,
            secret,
            connect_timeout,
            metrics,
            tls,
            connected: Mutex::default(),
        }
    }

    async fn connect(&self, url: &Url) -> Result<BoxCloneSyncChannel, Error> {
        let unavailable = |message: String| Error::Cluster {
            message: format!("worker {url} is unavailable: {message}"),
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| unavailable(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        match (&self.tls, url.scheme()) {
            (Some(tls), "https") => {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| unavailable(transport_reason(&e)))?;
            }
            (None, "https") => {
                return Err(unavailable(
                    "an https:// worker needs --cluster-ca (the CA its certificate chains to)"
                        .into(),
                ));
            }
            _ => {}
        }
        let channel = spawn_on(&self.network, async move { endpoint.connect().await })
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(transport_reason(&e)))?;
        let (secret, sent, received) = (
            self.secret.header(),
            Arc::clone(&self.metrics),
            Arc::clone(&self.metrics),
        );
        let channel = channel
            .map_request(move |request: http::Request<tonic::body::Body>| {
                let mut request = request.map(|body| sent.sending(body));
                request.headers_mut().insert(SECRET_HEADER, secret.clone());
                request
            })
            .map_response(move |response: http::Response<tonic::body::Body>| {
                response.map(|body| received.receiving(body))
            });
        Ok(BoxCloneSyncChannel::new(channel))
    }
}

/// A transport error with its cause (tonic's own message is only "transport error").
fn transport_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    reason
}

impl ClusterChannels {
    /// The connection to `url`: the kept one, or a new one.
    pub(super) async fn channel(&self, url: &Url) -> Result<BoxCloneSyncChannel, Error> {
        let cached = self.connected.lock().get(url).cloned();
        match cached {
            Some(channel) => Ok(channel),
            None => {
                let channel = self.connect(url).await?;
                self.connected.lock().insert(url.clone(), channel.clone());
                Ok(channel)
            }
        }
    }
}

#[async_trait]
impl ChannelResolver for ClusterChannels {
    async fn get_worker_client_for_url(&self, url: &Url) -> DfResult<Box<dyn WorkerChannel>> {
        let channel = self.channel(url).await.map_err(DataFusionError::from)?;
        Ok(Box::new(NamedWorker {
            url: url.clone(),
            inner: create_worker_client(channel),
        }))
    }
}

/// A worker's client whose failures name the worker: a call the worker refused or could
/// not answer, a stream cut because it went away, or Quiver's own error on it (of which
/// only the message crosses the network). Errors of the query itself (bad input, memory)
/// keep their kind.
struct NamedWorker {
    url: Url,
    inner: Box<dyn WorkerChannel>,
}

impl NamedWorker {
    fn name(url: &Url, e: DataFusionError) -> DataFusionError {
        let DataFusionError::External(cause) = e.find_root() else {
            return e;
        };
        let message = if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            match status.code() {
                tonic::Code::Unauthenticated => {
                    format!("worker {url} refused this node: {}", status.message())
                }
                code => format!("worker {url} failed ({code:?}): {}", status.message()),
            }
        } else if format!("{cause:?}").starts_with("DistributedDataFusionGenericError") {
            // datafusion-distributed 4.0 carries a worker's non-DataFusion errors as their
            // message only, in a type it does not export: known by its name.
            format!("worker {url}: {cause}")
        } else {
            return e;
        };
        DataFusionError::from(Error::Cluster { message })
    }
}

#[async_trait]
impl WorkerChannel for NamedWorker {
    async fn coordinator_channel(
        &mut self,
        headers: http::HeaderMap,
        set_plan_request: SetPlanRequest,
        c2w_stream: BoxStream<'static, CoordinatorToWorkerMsg>,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> DfResult<BoxStream<'static, DfResult<WorkerToCoordinatorMsg>>> {
        let url = self.url.clone();
        let stream = self
            .inner
            .coordinator_channel(headers, set_plan_request, c2w_stream, metrics, task_ctx)
            .await
            .map_err(|e| Self::name(&url, e))?;
        Ok(stream.map_err(move |e| Self::name(&url, e)).boxed())
    }

    async fn execute_task(
        &mut self,
        headers: http::HeaderMap,
        request: ExecuteTaskRequest,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> DfResult<Vec<BoxStream<'static, DfResult<RecordBatch>>>> {
        let url = self.url.clone();
        let streams = self
            .inner
            .execute_task(headers, request, metrics, task_ctx)
            .await
            .map_err(|e| Self::name(&url, e))?;
        Ok(streams
            .into_iter()
            .map(|s| {
                let url = url.clone();
                s.map_err(move |e| Self::name(&url, e)).boxed()
            })
            .collect())
    }

    async fn get_worker_info(
        &mut self,
        request: GetWorkerInfoRequest,
    ) -> DfResult<GetWorkerInfoResponse> {
        let url = self.url.clone();
        self.inner
            .get_worker_info(request)
            .await
            .map_err(|e| Self::name(&url, e))
    }
}
