//! The tower layer on a real tonic gRPC server (the OTLP trace service opentelemetry-proto
//! generates), stable tokio, called by tonic's own client: a method that holds its worker is
//! a stall named by its method path.
#![cfg(feature = "otlp")]

use crate::common;

use std::time::Duration;

use loopwatch::StallState;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use super::tower_layer::server_runtime;

const THRESHOLD: Duration = Duration::from_millis(20);
const HOLD: Duration = Duration::from_millis(60);

/// A collector whose export computes on its worker.
struct Slow;

#[tonic::async_trait]
impl TraceService for Slow {
    async fn export(
        &self,
        _req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        common::spin_for(HOLD);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn a_grpc_method_that_holds_its_worker_is_reported_under_its_path() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD).stacks(false));
    let rt = server_runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .layer(loopwatch::tower::WatchLayer::new().by_path(true))
            .add_service(TraceServiceServer::new(Slow))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .export(ExportTraceServiceRequest::default())
            .await
            .unwrap();
    });
    let method = "POST /opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.state == StallState::Ended && s.task.name.as_deref() == Some(method)
        })
        .unwrap_or_else(|| panic!("no stall under the method: {:#?}", h.seen.lock().unwrap()));
    eprintln!("{s}");
    assert!(s.duration + s.uncertainty >= HOLD, "{s}");
    assert!(!s.probe_free);
    rt.shutdown_timeout(Duration::from_secs(1));
}
