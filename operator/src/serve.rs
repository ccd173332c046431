//! What every ringmaster control-plane binary serves (`/healthz`, `/readyz`, `/metrics`)
//! and how it learns to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::warn;

type RenderMetrics = Box<dyn Fn() -> String + Send + Sync>;

/// Readiness (true only while leading) and the metrics renderer.
pub struct Endpoints {
    ready: AtomicBool,
    render_metrics: RenderMetrics,
}

impl Endpoints {
    pub fn new(render_metrics: impl Fn() -> String + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            render_metrics: Box::new(render_metrics),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Serves until the task is aborted; a port that cannot be bound is logged, not fatal.
pub async fn serve(addr: SocketAddr, endpoints: Arc<Endpoints>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<Endpoints>>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "leading")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "standby")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<Endpoints>>| async move { (s.render_metrics)() }),
        )
        .with_state(endpoints);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "health/metrics server stopped");
            }
        }
        Err(e) => warn!(error = %e, %addr, "cannot serve health/metrics"),
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Waits until this replica holds the lease (true), or until it must stop first: a
/// shutdown signal or the lease manager ending (false).
pub async fn until_leading(
    leader: &mut tokio::sync::watch::Receiver<bool>,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> bool {
    loop {
        if *leader.borrow_and_update() {
            return true;
        }
        tokio::select! {
            _ = &mut *shutdown => return false,
            changed = leader.changed() => if changed.is_err() {
                warn!("lease manager stopped");
                return false;
            }
        }
    }
}
