//! Tables on S3-compatible object storage.
//!
//! ```text
//!  catalog: Bucket::list(prefix) ── ObjectMeta (key, size, ETag) per object
//!  reads:   VersionedObject (one listed object version, as an ObjectStore)
//!              │ footers, page indexes, data ranges
//!              ▼
//!           BlockCache (aligned blocks, memory-mapped files)  ── miss ──► Bucket::fetch
//!                                                                 ranged GET, If-Match: ETag
//! ```
//!
//! [`RemoteStores`] holds one [`Bucket`] (object_store's `AmazonS3`, configured from the
//! standard AWS environment and the catalog file's `[stores."s3://bucket"]`) per bucket,
//! the block cache and the store metrics. Every read names the object version the
//! catalog listed, so a replaced or deleted object fails the query as "changed since the
//! table was listed" instead of mixing versions.

mod cache;
pub(crate) mod object;

pub use cache::{BlockCache, CacheOptions, CacheStats, ObjectVersion};
pub use object::VersionedObject;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt,
    RetryConfig,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use serde::Deserialize;
use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

/// Why remote bytes could not be read. Clone: one failed fetch answers every reader
/// that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// The object is not the version the catalog listed (replaced, deleted, truncated).
    #[error("{url} changed since the table was listed ({reason})")]
    Changed {
        /// `s3://bucket/key`.
        url: String,
        /// What differs.
        reason: String,
    },
    /// The store did not answer, or answered with errors after every retry.
    #[error(
        "object store {store} is unavailable: {message}; the table's queries work again once \
         it answers"
    )]
    Unavailable {
        /// `s3://bucket`.
        store: String,
        /// The last error.
        message: String,
    },
    /// The store refused Quiver's credentials or permissions.
    #[error(
        "object store {store} refused access: {message}; check the credentials Quiver runs \
         with (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, web identity or \
         instance role, or the catalog file's [stores.\"{store}\"] entry) and that they may \
         s3:ListBucket and s3:GetObject on it"
    )]
    Denied {
        /// `s3://bucket`.
        store: String,
        /// What the store said.
        message: String,
    },
    /// A store setting is wrong.
    #[error("object store {store}: {message}")]
    Config {
        /// `s3://bucket`.
        store: String,
        /// What to fix.
        message: String,
    },
    /// The local cache directory cannot be used.
    #[error("object cache {path}: {message}")]
    Cache {
        /// The directory or file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl From<RemoteError> for crate::Error {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Changed { url, reason } => crate::Error::FileChanged { path: url, reason },
            RemoteError::Config { .. } | RemoteError::Cache { .. } => crate::Error::Config {
                message: e.to_string(),
            },
            RemoteError::Unavailable { ref store, .. } | RemoteError::Denied { ref store, .. } => {
                crate::Error::ObjectStore {
                    store: store.clone(),
                    message: e.to_string(),
                }
            }
        }
    }
}

/// How DataFusion and the Parquet reader see it: a storage error whose source is
/// Quiver's own, which `crate::error` finds again for the status code.
impl From<RemoteError> for object_store::Error {
    fn from(e: RemoteError) -> Self {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(crate::Error::from(e)),
        }
    }
}

/// Retries and timeouts of every store request (flags).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreOptions {
    /// Retries of a request that timed out, failed to connect, or got a 5xx or throttling answer.
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt.
    pub retry_timeout: Duration,
    /// First backoff; doubles per retry up to `max_backoff`.
    pub init_backoff: Duration,
    /// Longest backoff between retries.
    pub max_backoff: Duration,
    /// Time limit of one request.
    pub request_timeout: Duration,
    /// Time limit of connecting.
    pub connect_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_retries: 5,
            retry_timeout: Duration::from_secs(30),
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Where a bucket's credentials come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialSource {
    /// The AWS environment: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
    /// `AWS_SESSION_TOKEN`, web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`), ECS task roles,
    /// then instance metadata.
    #[default]
    Environment,
    /// Keys read from the environment variables the entry names (so the file holds no secret).
    Variables,
    /// Unsigned requests, for public buckets.
    Anonymous,
}

/// A bucket's settings in the catalog file: `[stores."s3://bucket"]`. Each one overrides
/// the AWS environment for that bucket only. Holds no secret, only the names of the
/// variables that do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Endpoint URL of an S3-compatible store (MinIO, Ceph, R2), e.g. `http://minio:9000`.
    pub endpoint: Option<String>,
    /// Region (`us-east-1` when neither this nor the environment says).
    pub region: Option<String>,
    /// Allow `http://` endpoints.
    pub allow_http: Option<bool>,
    /// `https://bucket.endpoint` instead of `https://endpoint/bucket` (path style, the default).
    pub virtual_hosted_style: Option<bool>,
    /// Where credentials come from.
    #[serde(default)]
    pub credentials: CredentialSource,
    /// With `credentials = "variables"`: the variable holding the access key id.
    pub access_key_id_env: Option<String>,
    /// With `credentials = "variables"`: the variable holding the secret access key.
    pub secret_access_key_env: Option<String>,
    /// With `credentials = "variables"`: the variable holding a session token, if any.
    pub session_token_env: Option<String>,
}

/// Operation labels of the store metrics.
const OPS: [&str; 2] = ["get", "list"];
/// Outcome labels of the store metrics.
const OUTCOMES: [&str; 5] = ["ok", "changed", "not_found", "denied", "error"];

/// Requests, bytes and latency of every store, for the metrics endpoint.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    requests: IntCounterVec,
    bytes: IntCounter,
    duration: HistogramVec,
}

impl StoreMetrics {
    fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "quiver_object_store_requests_total",
                "Object store requests by operation and outcome (one per ranged GET; one per \
                 listing, which S3 answers in pages of 1000 keys).",
            ),
            &["op", "outcome"],
        )
        .expect("valid metric");
        let bytes = IntCounter::new(
            "quiver_object_store_bytes_total",
            "Bytes fetched from object stores.",
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "quiver_object_store_request_duration_seconds",
                "Time of object store requests, retries included.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        for op in OPS {
            duration.with_label_values(&[op]);
            for outcome in OUTCOMES {
                requests.with_label_values(&[op, outcome]);
            }
        }
        Self {
            requests,
            bytes,
            duration,
        }
    }

    /// Adds the families to `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.duration.clone()))
    }

    fn record(&self, op: &str, started: Instant, outcome: &str) {
        self.duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        self.requests.with_label_values(&[op, outcome]).inc();
    }
}

/// Every bucket the tables read, the cache and the metrics.
#[derive(Debug)]
pub struct RemoteStores {
    /// The runtime store requests run on (see [`Bucket`]).
    io: Handle,
    options: StoreOptions,
    settings: BTreeMap<String, StoreSettings>,
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    cache: Option<Arc<BlockCache>>,
    metrics: StoreMetrics,
}

impl RemoteStores {
    /// Stores configured by `options` and the per-bucket `settings` (keyed
    /// `s3://bucket`), reading through `cache` when given. Their requests run on `io`:
    /// the runtime that serves the network, not the CPU runtime that decodes.
    pub fn new(
        io: Handle,
        options: StoreOptions,
        settings: BTreeMap<String, StoreSettings>,
        cache: Option<Arc<BlockCache>>,
    ) -> Self {
        Self {
            io,
            options,
            settings,
            buckets: Mutex::default(),
            cache,
            metrics: StoreMetrics::new(),
        }
    }

    /// The metrics of every store.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// The block cache, if on.
    pub fn cache(&self) -> Option<&Arc<BlockCache>> {
        self.cache.as_ref()
    }

    /// The store of `bucket`, built on first use (no network I/O: a wrong setting
    /// fails here, an unreachable store on the first request).
    pub fn bucket(&self, bucket: &str) -> Result<Arc<Bucket>, RemoteError> {
        if let Some(b) = self.buckets.lock().get(bucket) {
            return Ok(Arc::clone(b));
        }
        let url = format!("s3://{bucket}");
        let settings = self.settings.get(&url).cloned().unwrap_or_default();
        let store = build_s3(bucket, &url, &settings, &self.options)?;
        let built = Arc::new(Bucket {
            io: self.io.clone(),
            url,
            store: Arc::new(store),
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
        });
        Ok(Arc::clone(
            self.buckets
                .lock()
                .entry(bucket.to_owned())
                .or_insert(built),
        ))
    }
}

fn build_s3(
    bucket: &str,
    url: &str,
    settings: &StoreSettings,
    options: &StoreOptions,
) -> Result<object_store::aws::AmazonS3, RemoteError> {
    let config = |message: String| RemoteError::Config {
        store: url.to_owned(),
        message,
    };
    // The environment first (AWS_ENDPOINT, AWS_REGION / AWS_DEFAULT_REGION, keys, web
    // identity, ...; us-east-1 when no region is set), then the bucket's own settings.
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &settings.region {
        builder = builder.with_region(region);
    }
    if let Some(allow) = settings.allow_http {
        builder = builder.with_allow_http(allow);
    }
    if let Some(virtual_hosted) = settings.virtual_hosted_style {
        builder = builder.with_virtual_hosted_style_request(virtual_hosted);
    }
    match settings.credentials {
        CredentialSource::Environment => {}
        CredentialSource::Anonymous => builder = builder.with_skip_signature(true),
        CredentialSource::Variables => {
            let read =
                |field: &str, name: &Option<String>| -> Result<Option<String>, RemoteError> {
                    let Some(name) = name else { return Ok(None) };
                    std::env::var(name).map(Some).map_err(|_| {
                        config(format!(
                            "{field} names the variable {name}, which is not set"
                        ))
                    })
                };
            let key = read("access_key_id_env", &settings.access_key_id_env)?;
            let secret = read("secret_access_key_env", &settings.secret_access_key_env)?;
            let (Some(key), Some(secret)) = (key, secret) else {
                return Err(config(
                    "credentials = \"variables\" needs access_key_id_env and secret_access_key_env"
                        .into(),
                ));
            };
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
            if let Some(token) = read("session_token_env", &settings.session_token_env)? {
                builder = builder.with_token(token);
            }
        }
    }
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    builder = builder
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            duration(options.request_timeout),
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            duration(options.connect_timeout),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: options.init_backoff,
                max_backoff: options.max_backoff,
                base: 2.0,
            },
            max_retries: options.max_retries,
            retry_timeout: options.retry_timeout,
        });
    // object_store's messages name the setting, never a secret's value.
    builder.build().map_err(|e| config(e.to_string()))
}

/// One bucket: listing and versioned ranged reads, metered.
///
/// Every request runs as a task on the I/O runtime: query plans are polled on the CPU
/// runtime, which has no I/O driver, and a GET must not wait behind decoding work. The
/// task is owned by the read that started it (aborted if the query goes away).
#[derive(Debug)]
pub struct Bucket {
    io: Handle,
    url: String,
    store: Arc<dyn ObjectStore>,
    cache: Option<Arc<BlockCache>>,
    metrics: StoreMetrics,
}

impl Bucket {
    /// `s3://bucket`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object_store client, to register with DataFusion's runtime for `s3://bucket`.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// Every object under `prefix` (all depths). An object named exactly `prefix` (a
    /// table that is one object) is found with a HEAD when the listing is empty.
    pub async fn list(&self, prefix: &ObjectPath) -> Result<Vec<ObjectMeta>, RemoteError> {
        let (store, owned) = (Arc::clone(&self.store), prefix.clone());
        let (started, listed) = self
            .on_io(async move {
                let started = Instant::now();
                let listed: object_store::Result<Vec<ObjectMeta>> =
                    store.list(Some(&owned)).try_collect().await;
                (started, listed)
            })
            .await?;
        let listed = self.outcome("list", started, listed, prefix)?;
        if !listed.is_empty() || prefix.as_ref().is_empty() {
            return Ok(listed);
        }
        let (store, owned) = (Arc::clone(&self.store), prefix.clone());
        let (started, head) = self
            .on_io(async move { (Instant::now(), store.head(&owned).await) })
            .await?;
        match head {
            Ok(meta) => {
                self.metrics.record("list", started, "ok");
                Ok(vec![meta])
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.record("list", started, "not_found");
                Ok(vec![])
            }
            Err(e) => self.outcome("list", started, Err(e), prefix),
        }
    }

    /// The names one level below `prefix` (`--data-dir s3://...`).
    pub async fn list_children(&self, prefix: &ObjectPath) -> Result<Vec<String>, RemoteError> {
        let (store, owned) = (Arc::clone(&self.store), prefix.clone());
        let (started, listed) = self
            .on_io(async move {
                let started = Instant::now();
                (started, store.list_with_delimiter(Some(&owned)).await)
            })
            .await?;
        let listed = self.outcome("list", started, listed, prefix)?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Bytes `range` of the object version `meta` describes, from the store.
    async fn fetch(&self, meta: &ObjectMeta, range: Range<u64>) -> Result<Bytes, RemoteError> {
        let options = GetOptions {
            range: Some(range.into()),
            // The version listed, or nothing: a replaced object answers 412.
            if_match: meta.e_tag.clone(),
            if_unmodified_since: meta.e_tag.is_none().then_some(meta.last_modified),
            ..GetOptions::default()
        };
        let (store, location) = (Arc::clone(&self.store), meta.location.clone());
        let (started, result) = self
            .on_io(async move {
                let started = Instant::now();
                let result = match store.get_opts(&location, options).await {
                    Ok(result) => result.bytes().await,
                    Err(e) => Err(e),
                };
                (started, result)
            })
            .await?;
        let bytes = self.outcome("get", started, result, &meta.location)?;
        self.metrics.bytes.inc_by(bytes.len() as u64);
        Ok(bytes)
    }

    /// Runs a request on the I/O runtime, owned by the caller.
    async fn on_io<T: Send + 'static>(
        &self,
        request: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, RemoteError> {
        // Owned like every task Quiver starts (clippy.toml): dropping the read aborts it.
        #[allow(clippy::disallowed_methods)]
        let task = AbortOnDropHandle::new(self.io.spawn(request));
        task.await.map_err(|e| RemoteError::Unavailable {
            store: self.url.clone(),
            message: format!("the request task failed: {e}"),
        })
    }

    /// Records a request and turns its error into what it means for the table.
    fn outcome<T>(
        &self,
        op: &str,
        started: Instant,
        result: object_store::Result<T>,
        location: &ObjectPath,
    ) -> Result<T, RemoteError> {
        let e = match result {
            Ok(v) => {
                self.metrics.record(op, started, "ok");
                return Ok(v);
            }
            Err(e) => e,
        };
        let url = format!("{}/{location}", self.url);
        let (outcome, error) = match e {
            object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. } => (
                "changed",
                RemoteError::Changed {
                    url,
                    reason: "the store holds another version of it now".into(),
                },
            ),
            // Listing a missing bucket: nothing was listed that could have changed.
            object_store::Error::NotFound { source, .. } if op == "list" => (
                "not_found",
                RemoteError::Unavailable {
                    store: self.url.clone(),
                    message: format!("the bucket was not found ({source})"),
                },
            ),
            object_store::Error::NotFound { .. } => (
                "not_found",
                RemoteError::Changed {
                    url,
                    reason: "it was deleted".into(),
                },
            ),
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => (
                "denied",
                RemoteError::Denied {
                    store: self.url.clone(),
                    message: source.to_string(),
                },
            ),
            // object_store reports a refused listing as a generic error around the
            // HTTP status; S3's status line and error codes say what it was.
            other if refused(&other) => (
                "denied",
                RemoteError::Denied {
                    store: self.url.clone(),
                    message: other.to_string(),
                },
            ),
            other => (
                "error",
                RemoteError::Unavailable {
                    store: self.url.clone(),
                    message: other.to_string(),
                },
            ),
        };
        self.metrics.record(op, started, outcome);
        Err(error)
    }
}

/// Whether a store error is S3 refusing the credentials or the permissions: a 401 or 403
/// status, or one of S3's error codes for it (as its response body names them).
fn refused(e: &object_store::Error) -> bool {
    const MARKERS: [&str; 7] = [
        "401 Unauthorized",
        "403 Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
    ];
    let text = e.to_string();
    MARKERS.iter().any(|m| text.contains(m))
}

/// Splits `s3://bucket/prefix` into the bucket and the prefix (as S3 keys spell it).
pub fn parse_s3_url(url: &str) -> Option<(String, ObjectPath)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || bucket.contains(['/', '%', '\\']) {
        return None;
    }
    Some((bucket.to_owned(), ObjectPath::parse(prefix).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_split_into_bucket_and_prefix() {
        let (bucket, prefix) = parse_s3_url("s3://lake/events/day=1/").unwrap();
        assert_eq!((bucket.as_str(), prefix.as_ref()), ("lake", "events/day=1"));
        let (bucket, prefix) = parse_s3_url("s3://lake").unwrap();
        assert_eq!((bucket.as_str(), prefix.as_ref()), ("lake", ""));
        assert!(parse_s3_url("s3:///x").is_none());
        assert!(parse_s3_url("s3://a/b//c").is_none());
        assert!(parse_s3_url("gs://a/b").is_none());
    }

    #[test]
    fn refusals_are_told_apart_from_outages() {
        let generic = |message: &str| object_store::Error::Generic {
            store: "S3",
            source: message.to_owned().into(),
        };
        assert!(refused(&generic(
            "Error performing list request: Server returned non-2xx status code: 403 Forbidden: \
             <Error><Code>InvalidAccessKeyId</Code></Error>"
        )));
        assert!(refused(&generic("<Code>SignatureDoesNotMatch</Code>")));
        assert!(!refused(&generic(
            "Error performing GET http://127.0.0.1:1/lake after 1 retries: error sending request: \
             connection refused"
        )));
        assert!(!refused(&generic(
            "Server returned non-2xx status code: 503 Service Unavailable"
        )));
    }
}
