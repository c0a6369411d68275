//! Admission on the worker port: tasks of at most `--max-cluster-queries` other nodes'
//! queries run on this node at once.
//!
//! The unit is a query, not a task: a query's tasks on this node depend on each other
//! (a stage's task reads the one below it), so admitting some of them and not others
//! would leave the admitted ones waiting on the rest. The first call of a query (a
//! `CoordinatorChannel`, which sets a task's plan, or an `ExecuteTask`, which runs it)
//! takes a slot, waiting up to `--cluster-queue-timeout`; every later call of the query
//! shares it, and the slot is given back when the query's last call here ends. A query
//! that finds no slot in time is refused `UNAVAILABLE` on every call, before
//! datafusion-distributed's worker sees it (so nothing of it is planned or buffered
//! here), and its later calls are refused at once. The coordinator's query fails with
//! that message. A node that is one of its own workers reaches itself through this port
//! too, so its own queries take a slot here as well.
//!
//! The query id is read from the call's first gRPC message: `TaskKey.query_id`, field 1
//! of both `SetPlanRequest` and `ExecuteTaskRequest` (datafusion-distributed's
//! `worker.proto`, pinned at 4.0.0).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{Notify, OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

/// How long a refused query's later calls are refused without waiting.
const REFUSED_LINGER: Duration = Duration::from_secs(60);

/// Refused query ids remembered at most (oldest forgotten first).
const MAX_REFUSED: usize = 4096;

/// Bytes of a query id (a UUID).
const QUERY_ID_LEN: usize = 16;

/// Bytes read of a message over the size limit, to find its query id in.
const ID_PREFIX: usize = 64;

/// Limits on other nodes' queries.
#[derive(Debug, Clone, Copy)]
pub struct TaskAdmissionOptions {
    /// Other nodes' queries with tasks running here at once.
    pub max_queries: usize,
    /// Longest wait of a query's first call for a slot.
    pub queue_timeout: Duration,
    /// Largest message a call may send (a task's plan is one); the first is refused
    /// before it is read, the later ones by the worker service's decoder.
    pub max_message: usize,
}

impl Default for TaskAdmissionOptions {
    fn default() -> Self {
        Self {
            max_queries: 64,
            queue_timeout: Duration::from_secs(10),
            max_message: 256 << 20,
        }
    }
}

/// The slots, the queries holding them, and the queries refused lately.
#[derive(Debug)]
pub struct TaskAdmission {
    slots: Arc<Semaphore>,
    options: TaskAdmissionOptions,
    /// The queries with calls here, and how many calls each has open.
    queries: Mutex<HashMap<Bytes, (Arc<Query>, usize)>>,
    refused: Mutex<Refused>,
    active: IntGauge,
    refused_total: IntCounter,
    /// This node, for messages.
    node: String,
    /// Signalled when a query's last call here ends.
    ended: Notify,
}

/// A query with calls on this node.
#[derive(Debug, Default)]
struct Query {
    /// Its slot once the first call got it (shared by its other calls), or why not.
    slot: OnceCell<Result<OwnedSemaphorePermit, Status>>,
    /// Why the query was refused after some of its calls were admitted (one of its
    /// messages too large): those calls end with it rather than wait for a plan that
    /// will not come.
    refusal: OnceLock<Status>,
    refused: CancellationToken,
}

impl Query {
    /// Returns why the query was refused, once it is.
    async fn refusal(&self) -> Status {
        self.refused.cancelled().await;
        self.refusal
            .get()
            .cloned()
            .unwrap_or_else(|| Status::aborted("refused"))
    }
}

/// Queries refused lately, and why.
#[derive(Debug, Default)]
struct Refused {
    ids: HashMap<Bytes, Status>,
    order: VecDeque<(Instant, Bytes)>,
}

impl Refused {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.front() {
            if now.duration_since(*at) < REFUSED_LINGER && self.order.len() <= MAX_REFUSED {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
    }
}

impl TaskAdmission {
    /// Slots for `options.max_queries` queries; `active` counts the queries holding one,
    /// `refused` those that got none.
    pub fn new(
        options: TaskAdmissionOptions,
        active: IntGauge,
        refused: IntCounter,
        node: String,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(options.max_queries.max(1))),
            options,
            queries: Mutex::default(),
            refused: Mutex::default(),
            active,
            refused_total: refused,
            node,
            ended: Notify::new(),
        }
    }

    /// The largest message a call may send.
    pub fn max_message(&self) -> usize {
        self.options.max_message
    }

    /// Returns once a query's last call on this node has ended (at once if one ended
    /// since the last wait).
    pub async fn query_ended(&self) {
        self.ended.notified().await;
    }

    /// Admits a call of query `id`: the guard holds the query's slot until dropped.
    async fn admit(self: &Arc<Self>, id: Bytes) -> Result<CallGuard, Status> {
        let refused_lately = {
            let mut refused = self.refused.lock();
            refused.forget_old(Instant::now());
            refused.ids.get(&id).cloned()
        };
        if let Some(status) = refused_lately {
            return Err(status);
        }
        let query = {
            let mut queries = self.queries.lock();
            let (query, calls) = queries.entry(id.clone()).or_default();
            *calls += 1;
            Arc::clone(query)
        };
        let guard = CallGuard {
            admission: Arc::clone(self),
            id,
            query,
        };
        let slot = guard
            .query
            .slot
            .get_or_init(|| async {
                let slots = Arc::clone(&self.slots);
                match tokio::time::timeout(self.options.queue_timeout, slots.acquire_owned()).await
                {
                    Ok(Ok(permit)) => {
                        self.active.inc();
                        Ok(permit)
                    }
                    _ => {
                        self.refused_total.inc();
                        Err(self.busy())
                    }
                }
            })
            .await;
        match slot {
            Ok(_) => Ok(guard),
            Err(status) => {
                self.remember_refused(guard.id.clone(), status.clone());
                Err(status.clone())
            }
        }
    }

    /// Refuses query `id` for `status`: its later calls at once, and those in progress
    /// unless the worker already answered them.
    fn refuse(&self, id: Bytes, status: Status) {
        if let Some((query, _)) = self.queries.lock().get(&id) {
            let _ = query.refusal.set(status.clone());
            query.refused.cancel();
        }
        if self.remember_refused(id, status) {
            self.refused_total.inc();
        }
    }

    /// Whether `id` was not refused lately.
    fn remember_refused(&self, id: Bytes, status: Status) -> bool {
        let mut refused = self.refused.lock();
        let new = refused.ids.insert(id.clone(), status).is_none();
        if new {
            refused.order.push_back((Instant::now(), id));
        }
        refused.forget_old(Instant::now());
        new
    }

    fn too_large(&self, len: usize) -> Status {
        Status::resource_exhausted(format!(
            "node {} accepts task messages of at most {} bytes (--max-cluster-message-size) \
             and was sent one of {len}: raise the limit on every node",
            self.node, self.options.max_message,
        ))
    }

    fn busy(&self) -> Status {
        Status::unavailable(format!(
            "node {} is running tasks of {} other queries (--max-cluster-queries) and none \
             ended within {} (--cluster-queue-timeout): retry later, or raise the limit",
            self.node,
            self.options.max_queries,
            humantime::format_duration(self.options.queue_timeout),
        ))
    }
}

/// One call of an admitted (or waiting) query; the last one of a query gives its slot
/// back.
struct CallGuard {
    admission: Arc<TaskAdmission>,
    id: Bytes,
    query: Arc<Query>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut queries = self.admission.queries.lock();
        let Some((_, calls)) = queries.get_mut(&self.id) else {
            return;
        };
        *calls -= 1;
        if *calls == 0 {
            queries.remove(&self.id);
            if matches!(self.query.slot.get(), Some(Ok(_))) {
                self.admission.active.dec();
            }
            self.admission.ended.notify_one();
        }
    }
}

/// datafusion-distributed's worker service behind [`TaskAdmission`].
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Arc<TaskAdmission>,
}

impl<S> Admitted<S> {
    /// `inner`, its task calls admitted by `admission`.
    pub fn new(inner: S, admission: Arc<TaskAdmission>) -> Self {
        Self { inner, admission }
    }
}

impl<S: NamedService> NamedService for Admitted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Admitted<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let plan = path.ends_with("/CoordinatorChannel");
        let task = plan || path.ends_with("/ExecuteTask");
        // The service that was made ready serves this call; a clone for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !task {
            return Box::pin(inner.call(request));
        }
        let admission = Arc::clone(&self.admission);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let max_message = admission.options.max_message;
            let (first, body) = match first_message(body, max_message).await {
                Ok(read) => read,
                Err(status) => return Ok(status.into_http()),
            };
            let first = match first {
                FirstMessage::Read(message) => message,
                FirstMessage::TooLarge { len, prefix } => {
                    let status = admission.too_large(len);
                    if let Some(id) = query_id(&prefix, plan) {
                        admission.refuse(id, status.clone());
                    }
                    return Ok(status.into_http());
                }
                // Left to the worker to refuse.
                FirstMessage::Unreadable => {
                    return inner.call(Request::from_parts(parts, body)).await;
                }
            };
            let request = Request::from_parts(parts, body);
            let Some(id) = query_id(&first, plan) else {
                return inner.call(request).await;
            };
            let guard = match admission.admit(id).await {
                Ok(guard) => guard,
                Err(status) => return Ok(status.into_http()),
            };
            let query = Arc::clone(&guard.query);
            let response = tokio::select! {
                response = inner.call(request) => response?,
                status = query.refusal() => return Ok(status.into_http()),
            };
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _held = &guard;
                    frame
                }))
            }))
        })
    }
}

/// What [`first_message`] found at the start of a call.
#[derive(Debug, PartialEq)]
enum FirstMessage {
    /// The first message (its bytes, without the gRPC prefix).
    Read(Bytes),
    /// A first message of `len` bytes, over the limit: only its first bytes read.
    TooLarge { len: usize, prefix: Bytes },
    /// A compressed first message, or a body that ended (or sent trailers) before one.
    Unreadable,
}

/// The call's first gRPC message, read only if it is at most `max` bytes, and the body
/// to serve the call with: the same bytes and trailers.
async fn first_message(mut body: Body, max: usize) -> Result<(FirstMessage, Body), Status> {
    let mut read = BytesMut::new();
    // Once the gRPC prefix is read: the message's length, and where to stop reading (its
    // end, or over `max` enough of its start to find the query id in).
    let mut want = None;
    let found = loop {
        if want.is_none() && read.len() >= 5 {
            if read[0] != 0 {
                // Compressed.
                break None;
            }
            let len = u32::from_be_bytes([read[1], read[2], read[3], read[4]]) as usize;
            want = Some((len, 5 + if len > max { len.min(ID_PREFIX) } else { len }));
        }
        if let Some((len, end)) = want
            && read.len() >= end
        {
            break Some((len, end));
        }
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        read.extend_from_slice(chunk);
                        let n = chunk.len();
                        data.advance(n);
                    }
                }
                // Trailers before a whole message: the worker answers the short call.
                Err(_) => break None,
            },
            Some(Err(status)) => return Err(status),
            None => break None,
        }
    };
    let read = read.freeze();
    let message = match found {
        Some((len, end)) if len > max => FirstMessage::TooLarge {
            len,
            prefix: read.slice(5..end),
        },
        Some((_, end)) => FirstMessage::Read(read.slice(5..end)),
        None => FirstMessage::Unreadable,
    };
    let rest = BodyStream::new(body);
    let replay = futures::stream::once(async move { Ok(http_body::Frame::data(read)) }).chain(rest);
    Ok((message, Body::new(StreamBody::new(replay))))
}

/// `TaskKey.query_id` at the start of a `CoordinatorToWorkerMsg` (`plan`:
/// `set_plan_request = 1 { task_key = 1 { query_id = 1 } }`) or an `ExecuteTaskRequest`
/// (`task_key = 1 { query_id = 1 }`), each field first in its message (prost writes
/// fields in tag order), so the start of a message is enough; `None` if it is not there
/// or not a UUID's 16 bytes (the worker refuses those).
fn query_id(message: &[u8], plan: bool) -> Option<Bytes> {
    use prost::encoding::decode_varint;

    // Field 1, length-delimited.
    const FIELD_1: u64 = 1 << 3 | 2;
    let mut rest = message;
    let mut len = 0;
    for _ in 0..if plan { 3 } else { 2 } {
        if decode_varint(&mut rest).ok()? != FIELD_1 {
            return None;
        }
        len = decode_varint(&mut rest).ok()?;
    }
    let id = rest.get(..QUERY_ID_LEN)?;
    (len == QUERY_ID_LEN as u64).then(|| Bytes::copy_from_slice(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf length-delimited field.
    fn field(number: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    /// `TaskKey { query_id, stage_id: 3, task_number: 1 }`, encoded by hand from
    /// datafusion-distributed's worker.proto.
    fn task_key(id: &[u8]) -> Vec<u8> {
        let mut key = field(1, id);
        key.extend_from_slice(&[2 << 3, 3, 3 << 3, 1]);
        key
    }

    #[test]
    fn the_query_id_is_read_from_either_call() {
        let id = [7u8; 16];
        // ExecuteTaskRequest { task_key, target_partition_start: 0, target_partition_end: 2,
        // none: {} }
        let mut execute = field(1, &task_key(&id));
        execute.extend_from_slice(&[2 << 3, 0, 3 << 3, 2]);
        execute.extend_from_slice(&field(6, &[]));
        assert_eq!(query_id(&execute, false).as_deref(), Some(&id[..]));
        // CoordinatorToWorkerMsg { set_plan_request: { task_key, task_count: 2, plan_proto } }
        let mut set_plan = field(1, &task_key(&id));
        set_plan.extend_from_slice(&[2 << 3, 2]);
        set_plan.extend_from_slice(&field(3, b"plan bytes"));
        let channel = field(1, &set_plan);
        assert_eq!(query_id(&channel, true).as_deref(), Some(&id[..]));
        // A work unit batch first, garbage, an empty or over-long id: not a query.
        assert_eq!(query_id(&field(2, &[]), true), None);
        assert_eq!(query_id(&[0xff, 0xff, 0xff], false), None);
        assert_eq!(query_id(&field(1, &task_key(&[])), false), None);
        assert_eq!(query_id(&field(1, &task_key(&[7u8; 100])), false), None);
    }

    /// A body sending `bytes` in frames of `chunk` bytes.
    fn body(bytes: &[u8], chunk: usize) -> Body {
        let frames: Vec<Result<_, Status>> = bytes
            .chunks(chunk)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn replayed(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    /// A gRPC message: uncompressed, its length, its bytes.
    fn grpc(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[tokio::test]
    async fn the_first_message_is_read_across_frames_and_replayed() {
        let mut call = grpc(b"first message");
        call.extend_from_slice(&grpc(b"second"));
        let (first, rest) = first_message(body(&call, 3), 1 << 20).await.unwrap();
        assert_eq!(
            first,
            FirstMessage::Read(Bytes::from_static(b"first message"))
        );
        assert_eq!(replayed(rest).await, call);
    }

    #[tokio::test]
    async fn a_first_message_over_the_limit_is_not_read() {
        // An ExecuteTaskRequest declared 1 MiB long, of which only the start is sent:
        // found out from the prefix, its query id read from its first bytes.
        let id = [9u8; 16];
        let mut call = vec![0];
        call.extend_from_slice(&(1u32 << 20).to_be_bytes());
        call.extend_from_slice(&[1 << 3 | 2, 0x80, 0x80, 0x40]);
        call.extend_from_slice(&task_key(&id));
        call.extend_from_slice(&[1; 100]);
        let (first, rest) = first_message(body(&call, 1), 1024).await.unwrap();
        let FirstMessage::TooLarge { len, prefix } = first else {
            panic!("{first:?}");
        };
        assert_eq!((len, prefix.len()), (1 << 20, ID_PREFIX));
        assert_eq!(query_id(&prefix, false).as_deref(), Some(&id[..]));
        assert_eq!(replayed(rest).await, call, "nothing lost");
        // Compressed, or cut short: left to the worker.
        let mut compressed = grpc(b"x");
        compressed[0] = 1;
        let (first, _) = first_message(body(&compressed, 8), 1024).await.unwrap();
        assert_eq!(first, FirstMessage::Unreadable);
        let (first, _) = first_message(body(&grpc(b"cut")[..6], 8), 1024)
            .await
            .unwrap();
        assert_eq!(first, FirstMessage::Unreadable);
        let (first, _) = first_message(body(&grpc(b""), 8), 1024).await.unwrap();
        assert_eq!(first, FirstMessage::Read(Bytes::new()));
    }

    #[tokio::test]
    async fn a_refused_query_ends_its_admitted_calls() {
        let admission = admission(4, Duration::from_secs(1));
        let id = Bytes::from_static(&[3; 16]);
        let call = admission.admit(id.clone()).await.unwrap();
        let waiting = {
            let query = Arc::clone(&call.query);
            crate::query::spawn(async move { query.refusal().await })
        };
        let status = admission.too_large(1 << 30);
        admission.refuse(id.clone(), status);
        let ended = waiting.await.unwrap();
        assert_eq!(ended.code(), tonic::Code::ResourceExhausted);
        assert!(
            ended.message().contains("--max-cluster-message-size"),
            "{}",
            ended.message()
        );
        let later = admission.admit(id).await.err().unwrap();
        assert_eq!(
            later.code(),
            tonic::Code::ResourceExhausted,
            "its later calls too"
        );
    }

    fn admission(max_queries: usize, queue_timeout: Duration) -> Arc<TaskAdmission> {
        let options = TaskAdmissionOptions {
            max_queries,
            queue_timeout,
            ..Default::default()
        };
        let gauge = IntGauge::new("active", "test").unwrap();
        let refused = IntCounter::new("refused", "test").unwrap();
        Arc::new(TaskAdmission::new(options, gauge, refused, "node-1".into()))
    }

    #[tokio::test]
    async fn a_query_holds_one_slot_for_all_its_calls() {
        let admission = admission(1, Duration::from_millis(50));
        let (a, b, c) = (
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
        );
        let first = admission.admit(a.clone()).await.unwrap();
        let second = admission.admit(a.clone()).await.unwrap();
        assert_eq!(admission.active.get(), 1);
        // Another query waits, then is refused, and its later calls at once.
        let refused = admission.admit(b.clone()).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(
            refused.message().contains("node-1"),
            "{}",
            refused.message()
        );
        assert!(refused.message().contains("--max-cluster-queries"));
        assert_eq!(admission.refused_total.get(), 1);
        drop(first);
        assert_eq!(
            admission.active.get(),
            1,
            "a call of the query is still open"
        );
        drop(second);
        assert_eq!(admission.active.get(), 0);
        assert!(admission.queries.lock().is_empty());
        assert!(admission.admit(b).await.is_err(), "refused lately");
        assert_eq!(admission.refused_total.get(), 1, "counted once per query");
        // A new query gets the slot back.
        let third = admission.admit(c).await.unwrap();
        assert_eq!(admission.active.get(), 1);
        drop(third);
        assert_eq!(admission.active.get(), 0);
    }

    #[tokio::test]
    async fn a_waiting_query_gets_the_slot_when_it_frees() {
        let admission = admission(1, Duration::from_secs(30));
        let first = admission.admit(Bytes::from_static(b"a")).await.unwrap();
        let waiting = {
            let admission = Arc::clone(&admission);
            crate::query::spawn(
                async move { admission.admit(Bytes::from_static(b"b")).await.is_ok() },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn refused_ids_are_bounded() {
        let mut refused = Refused::default();
        let now = Instant::now();
        for i in 0..MAX_REFUSED + 10 {
            let id = Bytes::from(i.to_le_bytes().to_vec());
            refused.ids.insert(id.clone(), Status::unavailable("busy"));
            refused.order.push_back((now, id));
            refused.forget_old(now);
        }
        assert_eq!(refused.order.len(), MAX_REFUSED);
        assert_eq!(refused.ids.len(), MAX_REFUSED);
        refused.forget_old(now + REFUSED_LINGER);
        assert!(refused.ids.is_empty());
    }
}
