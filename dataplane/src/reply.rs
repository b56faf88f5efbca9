//! Whole responses the sidecar writes itself: its own routes, and errors in
//! OpenAI's JSON shape.

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use switchyard_wire::error::ApiError;

use crate::proxy::RequestCtx;

/// Writes a whole response; `HEAD` gets `GET`'s headers, Content-Length
/// included, and no body.
pub async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    content_type: &'static str,
    body: Bytes,
    retry_after: Option<u64>,
) -> pingora::Result<()> {
    ctx.status = status;
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header(header::CONTENT_TYPE, content_type)?;
    h.insert_header(header::CONTENT_LENGTH, body.len())?;
    if let Some(s) = retry_after {
        h.insert_header(header::RETRY_AFTER, s)?;
    }
    if ctx.attempts > 0 {
        h.insert_header("x-switchyard-attempts", u16::from(ctx.attempts))?;
    }
    if let Some(d) = ctx.degraded {
        h.insert_header("x-switchyard-degraded", d)?;
    }
    crate::drain::close_if_draining(session);
    if session.req_header().method == http::Method::HEAD {
        return session.write_response_header(Box::new(h), true).await;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answers an error in OpenAI's shape.
pub async fn error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &ApiError,
) -> pingora::Result<()> {
    respond(
        session,
        ctx,
        e.status,
        "application/json",
        e.body(),
        e.retry_after,
    )
    .await
}
