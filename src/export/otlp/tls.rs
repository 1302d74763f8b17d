//! TLS for `https://` collectors (feature `otlp-tls`): rustls with the `ring` provider, the
//! built-in Mozilla roots (`webpki-roots`) and the user's CA file, for both transports.
//!
//! gRPC: tonic's own TLS settings on the channel. HTTP/protobuf: opentelemetry-http's hyper
//! client over a hyper-rustls connector. Neither reads the system's certificate store, so the
//! export works the same in a scratch image as on a full distribution.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use rustls::pki_types::{pem::PemObject as _, CertificateDer};

/// The HTTP/protobuf client for an https collector.
pub(super) type HttpsClient = HyperClient<HttpsConnector<HttpConnector>>;

/// The gRPC channel's TLS settings: the built-in roots, and the user's CAs.
pub(super) fn grpc(ca_pem: Option<&[u8]>) -> tonic::transport::ClientTlsConfig {
    let tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
    match ca_pem {
        Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        None => tls,
    }
}

/// An HTTP/1.1 client that speaks https (and plain http) with the built-in roots and the
/// user's CAs, on the `ring` provider whatever provider the process installed as its default.
pub(super) fn http(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the CA certificates: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("a CA certificate: {e}"))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(HyperClient::new(connector, timeout, None))
}

/// The endpoint one signal's exporter will use, resolved as opentelemetry-otlp resolves it:
/// the builder's, else the signal's variable, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub(super) fn endpoint_of(given: Option<&str>, signal_var: &str) -> Option<String> {
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.trim().is_empty());
    given
        .map(str::to_owned)
        .or_else(|| env(signal_var))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}
