//! The API cannot be held open: at most `max_connections` connections are served at once
//! (and no more than the descriptor limit leaves room for, see [`crate::descriptors`]), one
//! source address holds at most half of them (or [`SOURCE_FLOOR`], when that is more), a client has `header_timeout` for its TLS
//! handshake and then for each request's headers, and a connection with no traffic for
//! `idle_timeout` is closed.
//!
//! [`CappedAcceptor`] wraps the TLS acceptor: it takes a permit for each connection before
//! the handshake and gives it back when the connection ends, and wraps the stream in an
//! [`IdleTimeout`]. A connection over the cap is told so (`503 over_capacity`, over TLS,
//! within [`REFUSAL_TIME`]) while at most [`REFUSALS`] such answers are under way; beyond
//! that it is closed at once, so a flood never holds a descriptor through a handshake.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::descriptors::{PerSource, SourceSlot};

const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 103\r\n\r\n\
{\"error\":\"over_capacity\",\"message\":\"the exit node serves as many API connections as it may; try again\"}";

/// Over-cap connections answered `503` at once; more are closed without a word.
pub const REFUSALS: usize = 32;
/// The time an over-cap connection has for its handshake and the answer.
pub const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Where an accepted stream comes from.
pub trait PeerAddress {
    fn peer_ip(&self) -> Option<IpAddr>;
}

impl PeerAddress for TcpStream {
    fn peer_ip(&self) -> Option<IpAddr> {
        self.peer_addr().ok().map(|a| a.ip())
    }
}

/// What a served connection holds until it ends.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _slot: Option<SourceSlot>,
}

#[derive(Clone)]
pub struct CappedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    per_source: usize,
    sources: Arc<PerSource>,
    refusals: Arc<Semaphore>,
    idle: Duration,
}

impl<A> CappedAcceptor<A> {
    pub fn new(inner: A, max_connections: usize, idle: Duration) -> CappedAcceptor<A> {
        CappedAcceptor {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            per_source: per_source(max_connections),
            sources: Arc::default(),
            refusals: Arc::new(Semaphore::new(REFUSALS)),
            idle,
        }
    }

    /// A place for a connection from `ip`: a permit, and a slot in its source's half.
    fn admit(&self, ip: Option<IpAddr>) -> Option<Admission> {
        let slot = match ip {
            Some(ip) => Some(self.sources.take(ip, self.per_source)?),
            None => None,
        };
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Admission {
            _permit: permit,
            _slot: slot,
        })
    }
}

/// What one source address may hold of `max_connections`: half, but no fewer than
/// [`SOURCE_FLOOR`] (a small cap is not split).
pub fn per_source(max_connections: usize) -> usize {
    (max_connections / 2).max(SOURCE_FLOOR.min(max_connections))
}

/// Connections one source may always hold, up to the cap.
pub const SOURCE_FLOOR: usize = 64;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn over_cap() -> io::Error {
    io::Error::other("over the API's connection cap")
}

impl<A, I, S> Accept<I, S> for CappedAcceptor<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A::Service: Send + 'static,
    I: PeerAddress,
{
    type Stream = IdleTimeout<A::Stream>;
    type Service = A::Service;
    type Future = BoxFuture<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let admission = self.admit(stream.peer_ip());
        let idle = self.idle;
        let Some(admission) = admission else {
            let Ok(refusal) = self.refusals.clone().try_acquire_owned() else {
                // Closed at once: no handshake, no descriptor held.
                drop(stream);
                return Box::pin(async { Err(over_cap()) });
            };
            let accepted = self.inner.accept(stream, service);
            return Box::pin(async move {
                // Said over TLS, so the client sees why; the connection then goes.
                let _ = tokio::time::timeout(REFUSAL_TIME, async {
                    let (mut stream, _) = accepted.await?;
                    stream.write_all(OVER_CAPACITY).await?;
                    stream.shutdown().await
                })
                .await;
                drop(refusal);
                Err(over_cap())
            });
        };
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((IdleTimeout::new(stream, idle, admission), service))
        })
    }
}

/// A connection that fails its reads once nothing has moved for `idle`, and holds its
/// permit until dropped.
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _admission: Admission,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration, admission: Admission) -> IdleTimeout<S> {
        IdleTimeout {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _admission: admission,
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
    fn one_source_holds_half_a_large_cap_and_all_of_a_small_one() {
        assert_eq!(super::per_source(384), 192);
        assert_eq!(super::per_source(1024), 512);
        assert_eq!(super::per_source(100), 64);
        assert_eq!(super::per_source(5), 5);
    }

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
