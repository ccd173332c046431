//! The HTTP side of `ringmaster serve`: health and metadata, the three inference routes,
//! admission (429 past `max_concurrency`), body limits (413), per-request timeouts (504),
//! readiness only once the model is loaded and warmed up, metrics per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::batcher::{Batcher, Pending};
use super::classifier::Classifier;
use super::metrics::{Metrics, RequestLabels};
use super::protocol::{self, BadRequest, Payload, PlainRequest, Prediction};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrency: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

/// The loaded model and the queue in front of it.
pub struct Loaded {
    pub classifier: Arc<Classifier>,
    pub batcher: Batcher,
}

pub struct Server {
    pub name: String,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub pending: Arc<Pending>,
    model: OnceLock<Loaded>,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Server {
    pub fn new(name: String, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name,
            limits,
            metrics: Arc::new(Metrics::default()),
            pending: Arc::new(Pending::default()),
            model: OnceLock::new(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// Installs the warmed-up model and starts answering readiness probes with 200.
    pub fn set_loaded(&self, loaded: Loaded) {
        if self.model.set(loaded).is_ok() && !self.draining.load(Ordering::SeqCst) {
            self.ready.store(true, Ordering::SeqCst);
        }
    }

    /// Readiness fails from here on (shutting down, or the model thread died), while
    /// in-flight requests finish.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/v2/health/ready", get(server_ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route("/v1/models/{target}", get(v1_model).post(v1_predict))
        .route("/predict", post(plain_predict))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see GET /v2 and POST /v2/models/{name}/infer, \
                 /v1/models/{name}:predict or /predict",
            )
        })
        .with_state(server)
}

/// A JSON body with the right content type.
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<BadRequest> for ApiError {
    fn from(bad: BadRequest) -> Self {
        Self::new(StatusCode::BAD_REQUEST, bad.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(protocol::error_body(&self.message))).into_response()
    }
}

async fn server_ready(State(s): State<Arc<Server>>) -> Response {
    let status = if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": s.is_ready()}))).into_response()
}

async fn server_metadata() -> Json {
    Json(json!({"name": "ringmaster", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
}

fn known_model<'a>(s: &'a Server, name: &str) -> Result<&'a Server, ApiError> {
    if name == s.name {
        Ok(s)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model {name:?} is not served here; this server serves {:?}",
                s.name
            ),
        ))
    }
}

fn loaded(s: &Server) -> Result<&Loaded, ApiError> {
    match s.model.get() {
        Some(loaded) if s.is_ready() => Ok(loaded),
        Some(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading; poll GET /v2/health/ready",
        )),
    }
}

async fn model_metadata(
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json, ApiError> {
    let model = &loaded(known_model(&s, &name)?)?.classifier;
    let (input, datatype) = if model.takes_text() {
        ("text", "BYTES")
    } else {
        ("image", "BYTES | UINT8 [N,H,W,C] | FP32 [N,3,H,W]")
    };
    Ok(Json(json!({
        "name": s.name,
        "versions": [model.version],
        "platform": "ringmaster-candle",
        "inputs": [{"name": input, "datatype": datatype, "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, model.labels.len()]},
        ],
        "parameters": {"labels": model.labels},
    })))
}

async fn model_ready(State(s): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    match known_model(&s, &name).and_then(loaded) {
        Ok(_) => Json(json!({"name": name, "ready": true})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models/{name}`: KServe v1's model status.
async fn v1_model(State(s): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    match known_model(&s, &name) {
        Ok(_) => Json(json!({"name": name, "ready": s.is_ready()})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<Arc<Server>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// An admitted inference request: counted in flight until dropped, and pending until
/// queued for the batcher (which then counts it out as it takes it).
struct Admission<'a> {
    server: &'a Server,
    queued: bool,
}

impl<'a> Admission<'a> {
    fn new(server: &'a Server) -> Result<Self, ApiError> {
        let metrics = &server.metrics;
        if metrics.in_flight.inc() as usize >= server.limits.max_concurrency {
            metrics.in_flight.dec();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} requests are already in flight (--max-concurrency); retry later",
                    server.limits.max_concurrency
                ),
            ));
        }
        server.pending.add(1);
        Ok(Self {
            server,
            queued: false,
        })
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.queued {
            self.server.pending.add(-1);
        }
        self.server.metrics.in_flight.dec();
    }
}

async fn read_body(s: &Server, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = s.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes (--max-body-bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    })
}

/// Admission, body, decoding, preprocessing, then the batcher, within the timeout.
async fn predict(
    s: &Server,
    headers: &HeaderMap,
    body: Body,
    decode: impl FnOnce(&[u8], bool) -> Result<Payload, BadRequest>,
) -> Result<(Vec<Prediction>, Arc<Classifier>), ApiError> {
    let model = loaded(s)?;
    let mut admission = Admission::new(s)?;
    let timeout = s.limits.request_timeout;
    // A slow upload must not hold its admission (and shutdown) forever.
    let bytes = tokio::time::timeout(timeout, read_body(s, headers, body))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} ms (--request-timeout-ms)",
                    timeout.as_millis()
                ),
            )
        })??;
    let classifier = model.classifier.clone();
    let payload = decode(&bytes, classifier.takes_text())?;
    let instances = classifier.prepare(&payload)?;
    let answer = model.batcher.submit(instances);
    admission.queued = true;
    let rows = match tokio::time::timeout(timeout, answer).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no answer within {} ms (--request-timeout-ms)",
                    timeout.as_millis()
                ),
            ));
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model thread stopped",
            ));
        }
        Ok(Ok(Err(e))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference failed: {e}"),
            ));
        }
        Ok(Ok(Ok(rows))) => rows,
    };
    let predictions = rows
        .into_iter()
        .map(|p| Prediction::new(p, &classifier.labels))
        .collect();
    Ok((predictions, classifier))
}

/// Counts the request and its latency under `protocol`.
fn record(s: &Server, protocol: &'static str, started: Instant, response: Response) -> Response {
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            protocol,
            code: response.status().as_u16(),
        })
        .inc();
    s.metrics.latency.observe(started.elapsed().as_secs_f64());
    response
}

async fn v2_infer(
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = async {
        known_model(&s, &name)?;
        let mut id = None;
        let (predictions, classifier) = predict(&s, &headers, body, |bytes, text| {
            let request = protocol::decode_v2(bytes, text)?;
            id = request.id;
            Ok(request.payload)
        })
        .await?;
        Ok::<_, ApiError>(Json(protocol::encode_v2(
            &s.name,
            &classifier.version,
            id.as_deref(),
            &predictions,
        )))
    }
    .await
    .into_response();
    record(&s, "v2", started, response)
}

async fn v1_predict(
    State(s): State<Arc<Server>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = async {
        let name = match target.rsplit_once(':') {
            Some((name, "predict")) => name,
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("POST /v1/models/{target}: the v1 verb is /v1/models/{{name}}:predict"),
                ));
            }
        };
        known_model(&s, name)?;
        let (predictions, classifier) = predict(&s, &headers, body, protocol::decode_v1).await?;
        Ok(Json(protocol::encode_v1(&predictions, &classifier.labels)))
    }
    .await
    .into_response();
    record(&s, "v1", started, response)
}

async fn plain_predict(State(s): State<Arc<Server>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = async {
        let mut one = false;
        let (predictions, classifier) = predict(&s, &headers, body, |bytes, text| {
            Ok(match protocol::decode_plain(bytes, text)? {
                PlainRequest::One(text) => {
                    one = true;
                    Payload::Texts(vec![text])
                }
                PlainRequest::Many(payload) => payload,
            })
        })
        .await?;
        Ok::<_, ApiError>(Json(if one {
            protocol::encode_plain(&predictions[0], &classifier.labels)
        } else {
            protocol::encode_v1(&predictions, &classifier.labels)
        }))
    }
    .await
    .into_response();
    record(&s, "predict", started, response)
}
