//! The HTTP listener on `metrics_listen`: `GET /metrics` for Prometheus, the status
//! page at `/`, and what it reads: `/api/status` (exactly what `snapsync status --json`
//! prints) and `/api/chains?job=NAME`.
//!
//! HTTP/1.1 with hyper (already what `snapsync serve` runs on). Routing is one `match`
//! on method and path in [`respond`], and every answer is built from [`Routes`]: the
//! metrics, the [`Api`] through which the daemon's loop answers, and who may read the
//! page ([`web::Access`]), so a new route is one arm, no new state.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tracing::{debug, warn};

use crate::api::Api;
use crate::metrics::{Metrics, CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use crate::web::{self, Access, Denied};

/// What the routes answer from.
#[derive(Debug)]
pub struct Routes {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The daemon's loop.
    pub api: Api,
    /// Who may read the page and `/api/*`.
    pub web: Access,
}

/// Bind `addr` (port 0: any free port; [`TcpListener::local_addr`] says which).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve until the runtime stops.
pub async fn serve(listener: TcpListener, routes: Arc<Routes>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics listener: {e}");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics listener: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(respond(&routes, &req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, "metrics listener: {e}");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// The answer to `req`.
pub async fn respond<B>(routes: &Routes, req: &Request<B>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        // OpenMetrics for whoever asks for it (Prometheus does), Prometheus' text
        // format for everyone else, as client_golang negotiates.
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let openmetrics = req
                .headers()
                .get_all("accept")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            if openmetrics {
                text(StatusCode::OK, CONTENT_TYPE, routes.metrics.encode())
            } else {
                text(
                    StatusCode::OK,
                    PROMETHEUS_CONTENT_TYPE,
                    routes.metrics.encode_prometheus(),
                )
            }
        }
        (_, "/metrics") => text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into()),
        (_, "/" | "/index.html" | "/api/status" | "/api/chains") => page(routes, req).await,
        (_, path) => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!("{path}: not here; the snapsync daemon serves /, /api/status, /api/chains?job=NAME and /metrics\n"),
        ),
    }
}

/// The page and `/api/*`, for those [`Routes::web`] lets in.
async fn page<B>(routes: &Routes, req: &Request<B>) -> Response<Full<Bytes>> {
    if !matches!(req.method(), &Method::GET | &Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if let Err(denied) = web::check(&routes.web, authorization, req.uri().query()) {
        return refused(denied);
    }
    let mut r = match req.uri().path() {
        "/api/status" => match routes.api.status().await {
            Ok(s) => json(&s),
            Err(e) => gone(e),
        },
        "/api/chains" => chains(routes, req.uri().query()).await,
        _ => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            web::page().to_string(),
        ),
    };
    // Status changes by the second; the page runs its own script only, talks to where
    // it came from only, and is framed by no one.
    let h = r.headers_mut();
    for (name, value) in [
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("content-security-policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ] {
        h.insert(name, value.parse().expect("a valid header"));
    }
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_string(value).expect("serialisable");
    text(StatusCode::OK, "application/json", body)
}

fn gone(e: String) -> Response<Full<Bytes>> {
    text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{e}\n"))
}

/// 401 (with the scheme to use) or 403, saying what would open the page.
fn refused(denied: Denied) -> Response<Full<Bytes>> {
    let status = match denied {
        Denied::Token => StatusCode::UNAUTHORIZED,
        Denied::NotHere => StatusCode::FORBIDDEN,
    };
    let mut r = text(status, PLAIN, denied.message().into());
    if denied == Denied::Token {
        let challenge = "Bearer realm=\"snapsync\"".parse().expect("a valid header");
        r.headers_mut().insert("www-authenticate", challenge);
    }
    r
}

/// `/api/chains?job=NAME`.
async fn chains(routes: &Routes, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(job) = query.and_then(|q| web::query_value(q, "job")) else {
        return text(
            StatusCode::BAD_REQUEST,
            PLAIN,
            "/api/chains needs ?job=NAME\n".into(),
        );
    };
    match routes.api.chains(&job).await {
        Ok(Some(c)) => json(&c),
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!("no job named {job:?}\n"),
        ),
        Err(e) => gone(e),
    }
}

/// The address a listener is bound to, for the ready line and status.
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
