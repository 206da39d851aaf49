//! `/metrics` (Prometheus text format) and `/healthz`, served with hyper on their own address so
//! that scraping never shares a port with SSH.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::future::Future;
use tokio::net::{TcpListener, TcpStream};

use crate::shared::Shared;

/// Serves until the gateway stops (run under its `tasks`, as is each scrape's connection).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = accept(&listener).await;
        let shared = shared.clone();
        let tasks = shared.tasks.clone();
        tasks.spawn_until_stopped(serve_connection(stream, move |req| {
            answer(req, shared.clone())
        }));
    }
}

/// Serves `/metrics` from `registry` and `/healthz` until the task is dropped: the endpoint of
/// a process of `shale gateway` other than the SSH process (the supervisor's settler).
pub async fn serve_registry(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let stream = accept(&listener).await;
        let registry = registry.clone();
        tokio::spawn(serve_connection(stream, move |req| {
            let page = (req.method() == Method::GET && req.uri().path() == "/metrics").then(|| {
                let mut text = String::new();
                // Writing into a String cannot fail.
                let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                text
            });
            std::future::ready(respond(req.method(), req.uri().path(), page))
        }));
    }
}

/// The next scrape's connection; a failed accept (out of descriptors) is retried shortly.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one scrape connection, each request answered by `answer`.
async fn serve_connection<F, Fut>(stream: TcpStream, answer: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
        .await
    {
        tracing::debug!(error = %e, "metrics connection ended");
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let page = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        shared.refresh_metrics().await;
        Some(shared.metrics.render())
    } else {
        None
    };
    respond(req.method(), req.uri().path(), page)
}

/// The response to `method path`, with `page` the rendered metrics when it asked for them.
fn respond(
    method: &Method,
    path: &str,
    page: Option<String>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (method, path, page) {
        (_, _, Some(page)) => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            page,
        ),
        (&Method::GET, "/healthz", None) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid");
    Ok(response)
}
