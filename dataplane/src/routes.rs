//! Routing by method and path: the operations relayed to providers (chat
//! completions, completions, embeddings: `request`), and the sidecar's own
//! routes: `/v1/models` (the models the table serves),
//! `/metrics`, `/healthz` (the process is up) and `/readyz` (a table is
//! applied). `HEAD` answers wherever `GET` does, for probes.

use bytes::Bytes;
use pingora::proxy::Session;

use crate::proxy::{RequestCtx, Sidecar};
use crate::reply::{error, respond};
use crate::request::errors::RequestError;
use switchyard_wire::operation::Operation;

/// Which route a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// An operation relayed to a provider.
    Api(Operation),
    Models,
    Metrics,
    Health,
    Ready,
    MethodNotAllowed,
    NotFound,
}

/// Routes by method and path. Pure.
pub fn route(method: &http::Method, path: &str) -> Route {
    let get = method == http::Method::GET || method == http::Method::HEAD;
    if let Some(op) = Operation::at(path) {
        return if method == http::Method::POST {
            Route::Api(op)
        } else {
            Route::MethodNotAllowed
        };
    }
    match path {
        "/v1/models" if get => Route::Models,
        "/metrics" if get => Route::Metrics,
        "/healthz" if get => Route::Health,
        "/readyz" if get => Route::Ready,
        "/v1/models" | "/metrics" | "/healthz" | "/readyz" => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Whether a scraper asked for OpenMetrics rather than Prometheus text.
pub fn wants_openmetrics(accept: Option<&[u8]>) -> bool {
    accept.is_some_and(|a| memchr::memmem::find(a, b"application/openmetrics-text").is_some())
}

/// Answers one of the sidecar's own routes (everything but `Api`).
pub async fn serve(
    sc: &Sidecar,
    route: Route,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> pingora::Result<()> {
    match route {
        Route::Api(_) => Ok(()),
        Route::Models => match sc.tables.load_full() {
            Some(t) => {
                let body = t.models_json.clone();
                respond(session, ctx, 200, "application/json", body, None).await
            }
            None => error(session, ctx, &RequestError::NotReady.to_api()).await,
        },
        Route::Metrics => {
            let accept = session
                .req_header()
                .headers
                .get(http::header::ACCEPT)
                .map(|v| v.as_bytes());
            let om = wants_openmetrics(accept);
            let body = Bytes::from(sc.metrics.render(om));
            let ct = if om {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            respond(session, ctx, 200, ct, body, None).await
        }
        Route::Health => {
            let body = Bytes::from_static(b"ok\n");
            respond(session, ctx, 200, "text/plain", body, None).await
        }
        Route::Ready => {
            // The pid tells a launcher that the process answering on this
            // port is the one it started, not an older sidecar still bound
            // there.
            let pid = std::process::id();
            let origin = &sc.live.origin;
            let (status, body) = match sc.tables.load_full() {
                Some(t) => (
                    200,
                    format!(
                        "ready: table version {}, from {}, weights {}, pid {pid}\n",
                        t.version,
                        origin.source().label(),
                        if origin.weights_expired() {
                            "expired (balancing on local signals)"
                        } else {
                            "trusted"
                        },
                    ),
                ),
                None => (
                    503,
                    format!("not ready: no routing table applied yet, pid {pid}\n"),
                ),
            };
            respond(session, ctx, status, "text/plain", Bytes::from(body), None).await
        }
        Route::MethodNotAllowed | Route::NotFound => {
            let h = session.req_header();
            let (method, path) = (h.method.to_string(), h.uri.path().to_string());
            let e = if route == Route::NotFound {
                RequestError::UnknownUrl { method, path }
            } else {
                RequestError::MethodNotAllowed { method, path }
            };
            error(session, ctx, &e.to_api()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn requests_route_by_method_and_path() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions"),
            Route::Api(Operation::Chat)
        );
        assert_eq!(
            route(&Method::POST, "/v1/embeddings"),
            Route::Api(Operation::Embeddings)
        );
        assert_eq!(
            route(&Method::POST, "/v1/completions"),
            Route::Api(Operation::Completions)
        );
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(&Method::GET, "/v1/models"), Route::Models);
        assert_eq!(route(&Method::HEAD, "/readyz"), Route::Ready);
        assert_eq!(route(&Method::HEAD, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::POST, "/healthz"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::DELETE, "/metrics"), Route::MethodNotAllowed);
        assert_eq!(
            route(&Method::GET, "/v1/completions"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(&Method::POST, "/v1/responses"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
    }

    #[test]
    fn openmetrics_is_served_to_whoever_asks_for_it() {
        assert!(wants_openmetrics(Some(
            b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some(b"text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
