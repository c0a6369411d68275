//! The worker side: the tasks other nodes send to this one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::execution::cache::cache_manager::FileMetadataCache;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_datasource::file_groups::FileGroup;
use datafusion_datasource::file_scan_config::{FileScanConfig, FileScanConfigBuilder};
use datafusion_datasource::source::DataSourceExec;
use datafusion_datasource_parquet::source::ParquetSource;
use datafusion_distributed::{
    ChannelResolver, DistributedExt, Worker, WorkerPlanRewriteEvent,
    WorkerPlanRewriteEventResponse, WorkerPlanRewriteHandler, WorkerQueryContext,
};
use object_store::ObjectMeta;
use tokio_util::task::AbortOnDropHandle;
use tonic::service::Routes;

use super::{Admitted, ClusterSecret, SECRET_HEADER, TaskAdmission};
use crate::catalog::Catalog;
use crate::error::Error;
use crate::io::Io;

/// The worker service of this node, behind the secret check and `admission`, as routes
/// for the cluster port, and the task that frees ended tasks' plans (see
/// `release_ended_tasks`; it stops when the handle is dropped). Tasks run with `base`'s
/// runtime env (so they draw on this node's memory pool and find its object stores) and
/// functions (with their limits), and read through this node's reader, checked against
/// its own listing.
pub fn worker_routes(
    base: &SessionState,
    catalog: Arc<Catalog>,
    io: Arc<Io>,
    channels: Arc<dyn ChannelResolver + Send + Sync>,
    secret: ClusterSecret,
    admission: Arc<TaskAdmission>,
    node: String,
) -> (Worker, Routes, AbortOnDropHandle<()>) {
    let readers: Arc<dyn WorkerPlanRewriteHandler> = Arc::new(ReinstallReaders {
        catalog,
        io,
        metadata_cache: base.runtime_env().cache_manager.get_file_metadata_cache(),
        node,
    });
    let scalar: Vec<_> = base.scalar_functions().values().cloned().collect();
    let aggregate: Vec<_> = base.aggregate_functions().values().cloned().collect();
    let window: Vec<_> = base.window_functions().values().cloned().collect();
    let worker = Worker::from_session_builder(move |ctx: WorkerQueryContext| {
        let (readers, channels) = (Arc::clone(&readers), Arc::clone(&channels));
        let (scalar, aggregate, window) = (scalar.clone(), aggregate.clone(), window.clone());
        async move {
            let builder = ctx
                .builder
                .with_scalar_functions(scalar)
                .with_aggregate_functions(aggregate)
                .with_window_functions(window)
                .with_distributed_channel_resolver(channels)
                .with_distributed_worker_plan_rewrite_handler(readers);
            Ok(builder.build())
        }
    })
    .with_runtime_env(Arc::clone(base.runtime_env()));
    let check = move |request: tonic::Request<()>| {
        let presented = request.metadata().get(SECRET_HEADER);
        match presented {
            Some(value) if secret.matches(value.as_bytes()) => Ok(request),
            Some(_) => Err(tonic::Status::unauthenticated(
                "wrong cluster secret: every node needs the same --cluster-secret-file",
            )),
            None => Err(tonic::Status::unauthenticated(
                "this is a Quiver cluster port: calls need the cluster secret \
                 (--cluster-secret-file); clients query the Flight port",
            )),
        }
    };
    let admission_for_sweep = Arc::clone(&admission);
    // datafusion-distributed accepts messages of any size; bound them.
    let server = worker
        .clone()
        .into_worker_server()
        .max_decoding_message_size(admission.max_message());
    let service = tonic::service::interceptor::InterceptedService::new(
        Admitted::new(server, admission),
        check,
    );
    // Not behind the secret: it tells whether the port serves, and (in the answer's
    // headers, see `ClusterMetricsLayer`) where the node's Flight port is.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let release = crate::query::spawn(release_ended_tasks(worker.clone(), admission_for_sweep));
    (worker, Routes::new(service).add_service(health), release)
}

/// The id of the task [`release_ended_tasks`] looks up; no query has it (coordinators
/// draw random v4 ids).
const SWEEP_TASK: uuid::Uuid = uuid::Uuid::from_u128(0x71756976_6572_0000_8000_737765657000);

/// Frees the plans of tasks whose query has ended here, soon after it ends.
///
/// datafusion-distributed keeps a task's plan in a moka cache and invalidates it when
/// the coordinator's channel for it closes; moka drops an invalidated value only at its
/// next maintenance, which runs on a later cache access at least 300 ms after the
/// previous one. A query cancelled while its tasks start (or reset mid-stream) can be
/// the last access for a long time, and its plans then hold their operators' memory
/// reservations (hash tables, shuffle buffers, unread remote streams) until another
/// query comes. So after a query's last call here ends, look up a task id no query has
/// (a cache read, which runs the maintenance when it is due) a few times, past the
/// 300 ms and past the invalidations that follow the calls' end.
async fn release_ended_tasks(worker: Worker, admission: Arc<TaskAdmission>) {
    use datafusion_distributed::{ExecuteTaskRequest, ProducerHead, TaskKey};

    loop {
        admission.query_ended().await;
        for delay_ms in [400, 1_000, 3_000] {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let lookup = worker.execute_task(ExecuteTaskRequest {
                task_key: TaskKey {
                    query_id: SWEEP_TASK,
                    stage_id: 0,
                    task_number: 0,
                },
                target_partition_start: 0,
                target_partition_end: 0,
                producer_head: ProducerHead::None,
            });
            // The lookup is done at once; it then waits for a plan that never comes.
            let _ = tokio::time::timeout(Duration::from_millis(50), lookup).await;
        }
    }
}

/// Puts Quiver's reader back on every Parquet scan of a task's plan: DataFusion's plan
/// serialization rebuilds a `ParquetSource` with the default reader, which would read
/// without memory maps, the object cache or file identity checks. Each file must be
/// the version this node listed (same size and modification time as the coordinator
/// planned on); an S3 object is then read as this node's listed version (its ETag,
/// which the plan does not carry).
#[derive(Debug)]
pub struct ReinstallReaders {
    catalog: Arc<Catalog>,
    io: Arc<Io>,
    /// Footers and page indexes, read once per file version (shared with the queries
    /// this node coordinates).
    metadata_cache: Arc<FileMetadataCache>,
    /// This node, for errors.
    node: String,
}

impl WorkerPlanRewriteHandler for ReinstallReaders {
    fn rewrite_worker_plan(
        &self,
        ev: WorkerPlanRewriteEvent,
    ) -> DfResult<WorkerPlanRewriteEventResponse> {
        let plan = ev.plan.transform_up(|node| self.reinstall(node))?.data;
        Ok(WorkerPlanRewriteEventResponse::new(plan))
    }
}

impl ReinstallReaders {
    fn reinstall(
        &self,
        node: Arc<dyn ExecutionPlan>,
    ) -> DfResult<Transformed<Arc<dyn ExecutionPlan>>> {
        let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
            return Ok(Transformed::no(node));
        };
        let Some(parquet) = config.file_source().downcast_ref::<ParquetSource>() else {
            return Ok(Transformed::no(node));
        };
        let bucket = match url::Url::parse(config.object_store_url.as_str()) {
            Ok(url) if url.scheme() == "s3" => {
                let name = url.host_str().unwrap_or_default();
                let remote = self.io.remote().ok_or_else(|| Error::Cluster {
                    message: format!(
                        "node {}: a task reads s3://{name} but this node serves no S3 table",
                        self.node
                    ),
                })?;
                Some(remote.bucket(name).map_err(|e| Error::Cluster {
                    message: format!("node {}: {e}", self.node),
                })?)
            }
            _ => None,
        };
        let groups = self.as_listed(&config.file_groups)?;
        let readers = self
            .io
            .reader_factory(Arc::clone(&self.metadata_cache), bucket);
        let source = parquet
            .clone()
            .with_parquet_file_reader_factory(Arc::new(readers));
        let config = FileScanConfigBuilder::from(config.clone())
            .with_source(Arc::new(source))
            .with_file_groups(groups)
            .build();
        Ok(Transformed::yes(DataSourceExec::from_data_source(config)))
    }

    /// `groups` with each file's listing on this node (its ETag); an error names the
    /// first file this node has not listed or listed differently.
    fn as_listed(&self, groups: &[FileGroup]) -> DfResult<Vec<FileGroup>> {
        let wanted: HashSet<_> = groups
            .iter()
            .flat_map(|g| g.files())
            .map(|f| &f.object_meta.location)
            .collect();
        let listed: HashMap<_, ObjectMeta> = self.catalog.listed(&wanted);
        groups
            .iter()
            .map(|group| {
                let files = group
                    .files()
                    .iter()
                    .map(|file| {
                        let planned = &file.object_meta;
                        let differs = |here: String| Error::Cluster {
                            message: format!(
                                "node {}: its copy of {} differs from what the coordinator \
                                 listed (coordinator: {} bytes modified {}; {here}): every \
                                 node must serve the same files; refresh them",
                                self.node, planned.location, planned.size, planned.last_modified,
                            ),
                        };
                        let Some(mine) = listed.get(&planned.location) else {
                            return Err(DataFusionError::from(differs(
                                "this node has not listed it".into(),
                            )));
                        };
                        if mine.size != planned.size || mine.last_modified != planned.last_modified
                        {
                            return Err(DataFusionError::from(differs(format!(
                                "this node: {} bytes modified {}",
                                mine.size, mine.last_modified
                            ))));
                        }
                        let mut file = file.clone();
                        file.object_meta.e_tag = mine.e_tag.clone();
                        Ok(file)
                    })
                    .collect::<DfResult<Vec<_>>>()?;
                Ok(FileGroup::new(files))
            })
            .collect()
    }
}
