//! An OTLP receiver for the tests, on 127.0.0.1: opentelemetry-proto's generated gRPC trace
//! and metrics services (tonic), and an HTTP/1.1 endpoint taking protobuf bodies at
//! `/v1/traces` and `/v1/metrics`. It runs on a runtime of its own, never the watched one.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the receiver got, over either transport.
#[derive(Default, Debug)]
pub struct Received {
    pub spans: Vec<(Option<Resource>, Span)>,
    pub metrics: Vec<(Option<Resource>, Metric)>,
    pub trace_requests: usize,
    pub metric_requests: usize,
    /// TLS handshakes that failed (a client that did not trust the certificate).
    pub tls_refused: usize,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Received>>);

impl Sink {
    fn traces(&self, req: ExportTraceServiceRequest) {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        r.trace_requests += 1;
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    r.spans.push((rs.resource.clone(), s));
                }
            }
        }
    }

    fn metrics(&self, req: ExportMetricsServiceRequest) {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        r.metric_requests += 1;
        for rm in req.resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    r.metrics.push((rm.resource.clone(), m));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

pub enum Transport {
    Grpc,
    Http,
    /// gRPC over TLS, with this certificate.
    #[cfg(feature = "otlp-tls")]
    GrpcTls(tls::TestCa),
    /// HTTP/protobuf over TLS, with this certificate.
    #[cfg(feature = "otlp-tls")]
    HttpTls(tls::TestCa),
    /// Accepts connections and never answers (reads nothing, writes nothing).
    BlackHole,
}

pub struct Receiver {
    pub addr: SocketAddr,
    scheme: &'static str,
    got: Arc<Mutex<Received>>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start(transport: Transport) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), transport)
    }

    /// On a given address (to bring a collector back on the port it had).
    pub fn start_on(addr: SocketAddr, transport: Transport) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .unwrap();
        let sink = Sink::default();
        let got = sink.0.clone();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        #[cfg_attr(not(feature = "otlp-tls"), allow(unused_mut))]
        let mut scheme = "http";
        match transport {
            #[cfg(feature = "otlp-tls")]
            Transport::GrpcTls(ca) => {
                scheme = "https";
                let identity = tonic::transport::Identity::from_pem(&ca.leaf_pem, &ca.leaf_key_pem);
                rt.spawn(async move {
                    tonic::transport::Server::builder()
                        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                        .unwrap()
                        .add_service(TraceServiceServer::new(sink.clone()))
                        .add_service(MetricsServiceServer::new(sink))
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await
                        .unwrap();
                });
            }
            #[cfg(feature = "otlp-tls")]
            Transport::HttpTls(ca) => {
                scheme = "https";
                let acceptor = ca.acceptor();
                let handshakes = got.clone();
                rt.spawn(async move {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        let (sink, acceptor, handshakes) =
                            (sink.clone(), acceptor.clone(), handshakes.clone());
                        tokio::spawn(async move {
                            match acceptor.accept(conn).await {
                                Ok(tls) => {
                                    let _ = serve_http(tls, sink).await;
                                }
                                Err(_) => {
                                    handshakes.lock().unwrap().tls_refused += 1;
                                }
                            }
                        });
                    }
                });
            }
            Transport::Grpc => {
                rt.spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(sink.clone()))
                        .add_service(MetricsServiceServer::new(sink))
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await
                        .unwrap();
                });
            }
            Transport::Http => {
                rt.spawn(async move {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        let sink = sink.clone();
                        tokio::spawn(async move {
                            let _ = serve_http(conn, sink).await;
                        });
                    }
                });
            }
            Transport::BlackHole => {
                rt.spawn(async move {
                    let mut held = Vec::new();
                    loop {
                        if let Ok((conn, _)) = listener.accept().await {
                            held.push(conn);
                        }
                    }
                });
            }
        }
        Receiver {
            addr,
            scheme,
            got,
            _rt: rt,
        }
    }

    /// `http://` or `https://` (a TLS transport), then the address.
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.got.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until `pred` holds over what was received, or panics with `what`.
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Received) -> bool) {
        let deadline = Instant::now() + timeout;
        while !self.with(&pred) {
            if Instant::now() > deadline {
                self.with(|r| {
                    panic!(
                        "timed out waiting for {what}: {} trace and {} metric requests, spans: {:#?}",
                        r.trace_requests,
                        r.metric_requests,
                        r.spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.1 connection: requests in a row (keep-alive), each a protobuf body.
async fn serve_http(
    mut conn: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    sink: Sink,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let (status, reply) = match path.as_str() {
            "/v1/traces" => match ExportTraceServiceRequest::decode(&body[..]) {
                Ok(r) => {
                    sink.traces(r);
                    (
                        "200 OK",
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
                Err(_) => ("400 Bad Request", Vec::new()),
            },
            "/v1/metrics" => match ExportMetricsServiceRequest::decode(&body[..]) {
                Ok(r) => {
                    sink.metrics(r);
                    (
                        "200 OK",
                        ExportMetricsServiceResponse::default().encode_to_vec(),
                    )
                }
                Err(_) => ("400 Bad Request", Vec::new()),
            },
            _ => ("404 Not Found", Vec::new()),
        };
        let mut out = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        )
        .into_bytes();
        out.extend_from_slice(&reply);
        conn.write_all(&out).await?;
    }
}

/// An attribute's value as text (strings as they are, numbers and booleans formatted).
pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    value_text(v)
}

fn value_text(v: &AnyValue) -> Option<String> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        _ => return None,
    })
}

/// The resource attribute `key`.
pub fn resource_attr(r: &Option<Resource>, key: &str) -> Option<String> {
    attr(&r.as_ref()?.attributes, key)
}

/// Certificates made at test time: a CA, and a certificate it signed for 127.0.0.1 and
/// localhost, for the TLS receivers.
#[cfg(feature = "otlp-tls")]
pub mod tls {
    use std::sync::Arc;

    #[derive(Clone)]
    pub struct TestCa {
        /// The CA's certificate, PEM: what a client must trust.
        pub ca_pem: String,
        pub leaf_pem: String,
        pub leaf_key_pem: String,
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "loopwatch test CA");
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf_params =
                rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
                    .unwrap();
            let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
            TestCa {
                ca_pem: ca.pem(),
                leaf_pem: leaf.pem(),
                leaf_key_pem: leaf_key.serialize_pem(),
            }
        }

        /// Writes the CA certificate to a file of its own and returns its path.
        pub fn ca_file(&self, name: &str) -> std::path::PathBuf {
            let path = std::env::temp_dir().join(format!(
                "loopwatch-test-ca-{}-{name}.pem",
                std::process::id()
            ));
            std::fs::write(&path, &self.ca_pem).unwrap();
            path
        }

        pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
            use tokio_rustls::rustls::pki_types::pem::PemObject as _;
            use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let certs = vec![CertificateDer::from_pem_slice(self.leaf_pem.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(self.leaf_key_pem.as_bytes()).unwrap();
            let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        }
    }
}
