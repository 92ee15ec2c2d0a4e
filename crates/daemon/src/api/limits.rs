//! The API cannot be held open: at most `max_connections` connections are served at once
//! (one more is answered `503 over_capacity` and closed), a client has `header_timeout` for
//! its TLS handshake and then for each request's headers, and a connection with no traffic
//! for `idle_timeout` is closed.
//!
//! [`CappedAcceptor`] wraps the TLS acceptor: it takes a permit for each connection before
//! the handshake and gives it back when the connection ends, and wraps the stream in an
//! [`IdleTimeout`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 103\r\n\r\n\
{\"error\":\"over_capacity\",\"message\":\"the exit node serves as many API connections as it may; try again\"}";

#[derive(Clone)]
pub struct CappedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl<A> CappedAcceptor<A> {
    pub fn new(inner: A, max_connections: usize, idle: Duration) -> CappedAcceptor<A> {
        CappedAcceptor {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            idle,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<A, I, S> Accept<I, S> for CappedAcceptor<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = IdleTimeout<A::Stream>;
    type Service = A::Service;
    type Future = BoxFuture<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let permit = self.permits.clone().try_acquire_owned().ok();
        let idle = self.idle;
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (mut stream, service) = accepted.await?;
            let Some(permit) = permit else {
                // Said over TLS, so the client sees why; the connection then goes.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    stream.write_all(OVER_CAPACITY).await?;
                    stream.shutdown().await
                })
                .await;
                return Err(io::Error::other("over the API's connection cap"));
            };
            Ok((IdleTimeout::new(stream, idle, permit), service))
        })
    }
}

/// A connection that fails its reads once nothing has moved for `idle`, and holds its
/// permit until dropped.
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration, permit: OwnedSemaphorePermit) -> IdleTimeout<S> {
        IdleTimeout {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _permit: permit,
        }
    }

    fn touched(&mut self) {
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touched();
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "API connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.touched();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_over_capacity_answer_is_well_formed() {
        let text = std::str::from_utf8(super::OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "over_capacity");
    }
}
