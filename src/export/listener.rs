//! loopwatch's own `/metrics` listener, on the export thread's runtime. It exists because the
//! service's file descriptors are the service's: at most [`MAX_CONNECTIONS`] connections are
//! open at once (a new one closes the oldest: idle clients cannot keep a real scrape out), a
//! client that sends nothing or reads nothing is dropped after [`CLIENT_TIMEOUT`], an accept
//! error (the process out of descriptors, say) backs off instead of spinning, and what goes
//! wrong is counted, with at most one WARN a second about it.
//!
//! It speaks just enough HTTP/1.1 for a scraper: one `GET` per connection, answered with the
//! Prometheus text format and `Connection: close`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use std::future::poll_fn;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::shared::Shared;

/// Connections open at once, at most.
pub(crate) const MAX_CONNECTIONS: usize = crate::config::PROMETHEUS_MAX_CONNECTIONS;
/// A client has this long to send its request, and again to read the answer.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request head longer than this is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// The longest pause after accept errors in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// At most one line per `every` nanoseconds; the ones in between are counted and said with the
/// next line.
#[derive(Debug)]
pub(crate) struct LogLimit {
    every_ns: u64,
    last_ns: Option<u64>,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn new(every: Duration) -> LogLimit {
        LogLimit {
            every_ns: u64::try_from(every.as_nanos()).unwrap_or(u64::MAX),
            last_ns: None,
            suppressed: 0,
        }
    }

    /// Should a line be logged at `now_ns`? `Some(n)`: yes, and `n` were suppressed since the
    /// last one.
    pub(crate) fn allow(&mut self, now_ns: u64) -> Option<u64> {
        if self
            .last_ns
            .is_some_and(|t| now_ns.saturating_sub(t) < self.every_ns)
        {
            self.suppressed += 1;
            return None;
        }
        self.last_ns = Some(now_ns);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Serves `/metrics` from `handle` on `listener` until the runtime stops.
/// What goes wrong is counted in `shared.export` (`listener_accept_errors`,
/// `listener_client_errors`).
pub(crate) async fn serve(listener: TcpListener, handle: PrometheusHandle, shared: Arc<Shared>) {
    let mut open: VecDeque<JoinHandle<()>> = VecDeque::with_capacity(MAX_CONNECTIONS);
    let epoch = std::time::Instant::now();
    let mut log = LogLimit::new(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                backoff = Duration::from_millis(5);
                open.retain(|c| !c.is_finished());
                if open.len() >= MAX_CONNECTIONS {
                    // The oldest connection goes (its descriptor is closed when its task is
                    // dropped): a flood of idle clients cannot hold the listener.
                    if let Some(oldest) = open.pop_front() {
                        oldest.abort();
                        shared
                            .export
                            .listener_client_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                let handle = handle.clone();
                let shared = shared.clone();
                open.push_back(tokio::spawn(async move {
                    if answer(conn, &handle).await.is_err() {
                        shared
                            .export
                            .listener_client_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            Err(e) => {
                shared
                    .export
                    .listener_accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if let Some(suppressed) = log.allow(now) {
                    tracing::warn!(
                        target: "loopwatch",
                        error = %e,
                        suppressed,
                        "loopwatch's /metrics listener cannot accept connections: {e} (retrying \
                         in {backoff:?}; {suppressed} more errors since the last line)"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One request on `conn`: its head within [`CLIENT_TIMEOUT`], then the answer within it too.
async fn answer(mut conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut conn, &mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = match head {
        Head::Get(path) if path == "/metrics" || path.starts_with("/metrics?") => {
            let body = render(handle);
            response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body)
        }
        Head::Get(_) => response("404 Not Found", "text/plain", "not found: try /metrics\n"),
        Head::Other => response("405 Method Not Allowed", "text/plain", "GET /metrics\n"),
    };
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        write_all(&mut conn, response.as_bytes()).await?;
        poll_fn(|cx| Pin::new(&mut conn).poll_shutdown(cx)).await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    Get(String),
    Other,
}

/// Reads a request head (up to the blank line) into `buf`.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Head> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(head) = parse_head(buf) {
            return Ok(head);
        }
        if buf.len() >= MAX_REQUEST {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidData));
        }
        let n = read(conn, &mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One read into `chunk` (tokio's core traits: the `io-util` extensions would add a crate).
async fn read(conn: &mut TcpStream, chunk: &mut [u8]) -> std::io::Result<usize> {
    let mut buf = ReadBuf::new(chunk);
    poll_fn(|cx| Pin::new(&mut *conn).poll_read(cx, &mut buf)).await?;
    Ok(buf.filled().len())
}

/// Writes all of `bytes` to `conn`.
async fn write_all(conn: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *conn).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// The request in `buf`, once its head is complete.
fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok();
    let line = head.and_then(|h| h.lines().next()).unwrap_or("");
    let mut parts = line.split(' ');
    Some(match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Head::Get(path.to_string()),
        _ => Head::Other,
    })
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The Prometheus text of loopwatch's own recorder, each counter of seconds typed `counter`
/// (recorded as gauges: see [`MetricKind::Counter`](super::table::MetricKind::Counter)).
pub(crate) fn render(handle: &metrics_exporter_prometheus::PrometheusHandle) -> String {
    let mut text = handle.render();
    for m in super::table::METRICS
        .iter()
        .filter(|m| m.is_float_counter())
    {
        let gauge = format!("# TYPE {} gauge\n", m.name);
        if let Some(at) = text.find(&gauge) {
            text.replace_range(
                at..at + gauge.len(),
                &format!("# TYPE {} counter\n", m.name),
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_is_read_to_its_blank_line() {
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"), None);
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Head::Get("/metrics".into()))
        );
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\n\r\n"), Some(Head::Other));
        assert_eq!(parse_head(b"\xff\xfe\r\n\r\n"), Some(Head::Other));
    }

    #[test]
    fn errors_are_logged_at_most_once_a_second_with_the_rest_counted() {
        let mut l = LogLimit::new(Duration::from_secs(1));
        assert_eq!(l.allow(0), Some(0));
        for t in 1..=1000 {
            assert_eq!(l.allow(t * 900_000), None, "{t}");
        }
        // 1,000 errors in 0.9 s: one line, then the next says how many were left out.
        assert_eq!(l.allow(1_000_000_000), Some(1000));
        assert_eq!(l.allow(1_500_000_000), None);
        assert_eq!(l.allow(2_000_000_000), Some(1));
    }
}
