//! Stall records in, OTLP spans out: a stall's span is made when it ends, from when its poll
//! began to when it ended, with a `loopwatch.stall.detected` event at the moment it was reported
//! running. Its attributes come in groups, one function each: the stall, the task (with the
//! semantic conventions' `code.*` for its site), the worker, the cause, the stack, the victims.

use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SpanData, SpanEvents};

use crate::diagnose::Cause;
use crate::stall::{Stall, StallState};

/// Running stalls remembered until they end (for their detection event), at most.
const MAX_RUNNING: usize = 4096;

/// The stalls seen so far and the spans ready to export.
#[derive(Debug)]
pub(crate) struct StallSpans {
    scope: InstrumentationScope,
    ids: RandomIdGenerator,
    /// Running stalls by id: their latest record and when it was first reported.
    running: HashMap<u64, (Stall, SystemTime)>,
    batch: Vec<SpanData>,
}

impl StallSpans {
    pub(crate) fn new(scope: InstrumentationScope) -> StallSpans {
        StallSpans {
            scope,
            ids: RandomIdGenerator::default(),
            running: HashMap::new(),
            batch: Vec::new(),
        }
    }

    /// Spans ready to export.
    pub(crate) fn ready(&self) -> usize {
        self.batch.len()
    }

    /// A stall report: a running one is remembered; an ended one becomes a span.
    pub(crate) fn add(&mut self, s: Stall) {
        match s.state {
            StallState::Running => {
                let detected = s.started_at + s.duration;
                if let Some((old, _)) = self.running.get_mut(&s.id) {
                    *old = s; // a later report of the same stall (its stack came in)
                } else if self.running.len() < MAX_RUNNING {
                    self.running.insert(s.id, (s, detected));
                }
            }
            _ => {
                let (prev, detected) = match self.running.remove(&s.id) {
                    Some((p, d)) => (Some(p), Some(d)),
                    None => (None, None),
                };
                let mut s = s;
                if s.stack.is_none() {
                    if let Some(p) = prev {
                        s.stack = p.stack;
                    }
                }
                let span = self.span(&s, detected);
                self.batch.push(span);
            }
        }
    }

    /// The spans ready to export.
    pub(crate) fn take(&mut self) -> Vec<SpanData> {
        std::mem::take(&mut self.batch)
    }

    /// The stalls still running, as spans ending now.
    pub(crate) fn running_now(&mut self) -> Vec<SpanData> {
        let open: Vec<_> = self.running.drain().map(|(_, v)| v).collect();
        let now = SystemTime::now();
        open.into_iter()
            .map(|(mut s, detected)| {
                s.duration = now.duration_since(s.started_at).unwrap_or(s.duration);
                self.span(&s, Some(detected))
            })
            .collect()
    }

    fn span(&self, s: &Stall, detected: Option<SystemTime>) -> SpanData {
        let ctx = SpanContext::new(
            self.ids.new_trace_id(),
            self.ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut attrs = stall_attrs(s);
        task_attrs(s, &mut attrs);
        worker_attrs(s, &mut attrs);
        cause_attrs(s, &mut attrs);
        stack_attrs(s, &mut attrs);
        victim_attrs(s, &mut attrs);
        let mut events = SpanEvents::default();
        if let Some(at) = detected {
            events.events.push(detected_event(s, at));
        }
        SpanData {
            span_context: ctx,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "loopwatch.stall".into(),
            start_time: s.started_at,
            end_time: s.started_at + s.duration,
            attributes: attrs,
            dropped_attributes_count: 0,
            events,
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// The stall itself: id, state, layer, duration, threshold, and the attributes every stall has.
fn stall_attrs(s: &Stall) -> Vec<KeyValue> {
    let state = match s.state {
        StallState::Running => "running",
        _ => "ended",
    };
    vec![
        KeyValue::new("loopwatch.stall.id", s.id as i64),
        KeyValue::new("loopwatch.stall.state", state),
        KeyValue::new("loopwatch.layer", s.layer.as_str()),
        KeyValue::new(
            "loopwatch.stall.duration_ms",
            s.duration.as_secs_f64() * 1e3,
        ),
        KeyValue::new(
            "loopwatch.stall.threshold_ms",
            s.threshold.as_secs_f64() * 1e3,
        ),
        KeyValue::new("loopwatch.stall.exact_end", s.exact_end),
        KeyValue::new(
            "loopwatch.stall.uncertainty_ms",
            s.uncertainty.as_secs_f64() * 1e3,
        ),
        KeyValue::new("loopwatch.stall.caught_at_end", s.caught_at_end),
        KeyValue::new("loopwatch.task.kind", s.task_label().to_string()),
        KeyValue::new("loopwatch.cause", s.cause.kind()),
        KeyValue::new("loopwatch.worker.index", s.worker.index as i64),
        KeyValue::new("loopwatch.stack.status", s.stack_status.as_str()),
    ]
}

/// The task: name, id, site (`loopwatch.task.site`: where it was spawned, which is not the
/// code that stalled), and the innermost span.
fn task_attrs(s: &Stall, attrs: &mut Vec<KeyValue>) {
    if let Some(n) = &s.task.name {
        attrs.push(KeyValue::new("loopwatch.task.name", n.to_string()));
        if s.task.named_by_stack {
            attrs.push(KeyValue::new("loopwatch.task.named_by_stack", true));
        }
    }
    if let Some(id) = s.task.id {
        attrs.push(KeyValue::new("loopwatch.task.id", id as i64));
    }
    if let Some(site) = &s.task.site {
        attrs.push(KeyValue::new("loopwatch.task.site", site.to_string()));
    }
    if let Some(span) = &s.task.span {
        attrs.push(KeyValue::new("loopwatch.task.span", span.to_string()));
    }
}

/// The worker thread: `thread.name`, `thread.id`.
fn worker_attrs(s: &Stall, attrs: &mut Vec<KeyValue>) {
    if let Some(t) = &s.worker.thread_name {
        attrs.push(KeyValue::new("thread.name", t.to_string()));
    }
    if let Some(tid) = s.worker.tid {
        attrs.push(KeyValue::new("thread.id", tid as i64));
    }
}

/// The cause beyond its kind: the system call, the shares, the hint.
fn cause_attrs(s: &Stall, attrs: &mut Vec<KeyValue>) {
    if let Cause::Syscall(sc) = s.cause {
        attrs.push(KeyValue::new("loopwatch.cause.syscall", sc.to_string()));
    }
    if !s.cause_shares.is_empty() {
        let shares: Vec<String> = s
            .cause_shares
            .iter()
            .map(|c| format!("{}={:.2}", c.cause, c.share))
            .collect();
        attrs.push(KeyValue::new("loopwatch.cause.shares", shares.join(",")));
    }
    if let Some(c) = s.cpu {
        attrs.push(KeyValue::new("loopwatch.cpu_ms", c.cpu.as_secs_f64() * 1e3));
        attrs.push(KeyValue::new(
            "loopwatch.cpu_sampled_ms",
            c.sampled.as_secs_f64() * 1e3,
        ));
    }
    if let Some(h) = s.hint {
        attrs.push(KeyValue::new("loopwatch.hint", h));
    }
}

/// The stack: `code.stacktrace`; and the code that stalled, by OpenTelemetry's conventions
/// (`code.function.name`, `code.file.path`, `code.line.number`), all three from one frame: the
/// top frame of the application's own code (else the top named one).
fn stack_attrs(s: &Stall, attrs: &mut Vec<KeyValue>) {
    let Some(stack) = &s.stack else {
        return;
    };
    attrs.push(KeyValue::new("code.stacktrace", stack.to_string()));
    let top = stack
        .top_user_frame()
        .or_else(|| stack.frames.iter().find(|f| f.function.is_some()));
    let Some(frame) = top else {
        return;
    };
    if let Some(f) = frame.function_name() {
        attrs.push(KeyValue::new("code.function.name", f.to_string()));
    }
    if let Some((file, line)) = frame.location.as_deref().and_then(|l| l.rsplit_once(':')) {
        if let Ok(line) = line.parse::<i64>() {
            attrs.push(KeyValue::new("code.file.path", file.to_string()));
            attrs.push(KeyValue::new("code.line.number", line));
        }
    }
}

/// The tasks that waited behind the stall, where they are tracked.
fn victim_attrs(s: &Stall, attrs: &mut Vec<KeyValue>) {
    if !s.victims.tracked {
        return;
    }
    let v = &s.victims;
    attrs.push(KeyValue::new("loopwatch.victims.count", v.count as i64));
    // Of them, found queued with no measured wait (the waits below are the others').
    attrs.push(KeyValue::new(
        "loopwatch.victims.unmeasured",
        v.unmeasured as i64,
    ));
    attrs.push(KeyValue::new(
        "loopwatch.victims.total_wait_ms",
        v.total_wait.as_secs_f64() * 1e3,
    ));
    attrs.push(KeyValue::new(
        "loopwatch.victims.worst_wait_ms",
        v.worst_wait.as_secs_f64() * 1e3,
    ));
    let kinds: Vec<String> = v
        .top_kinds
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    attrs.push(KeyValue::new("loopwatch.victims.kinds", kinds.join(",")));
}

/// The moment the stall was reported running, with how old it was then.
fn detected_event(s: &Stall, at: SystemTime) -> Event {
    Event::new(
        "loopwatch.stall.detected",
        at,
        vec![KeyValue::new(
            "loopwatch.stall.duration_ms",
            at.duration_since(s.started_at)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
        )],
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn an_ended_stall_is_one_span_with_its_detection_event() {
        let mut spans = StallSpans::new(InstrumentationScope::builder("loopwatch").build());
        let mut s = crate::stall::tests_support::stall();
        s.task.site = Some("src/main.rs:12:5".into());
        s.duration = Duration::from_millis(20);
        spans.add(s.clone());
        assert_eq!(spans.ready(), 0, "a running stall is no span yet");
        s.state = StallState::Ended;
        s.duration = Duration::from_millis(80);
        spans.add(s);
        let out = spans.take();
        assert_eq!(out.len(), 1);
        let span = &out[0];
        assert_eq!(span.end_time, span.start_time + Duration::from_millis(80));
        assert_eq!(span.events.events.len(), 1);
        assert_eq!(
            attr(span, "loopwatch.task.site").map(|v| v.as_str().into_owned()),
            Some("src/main.rs:12:5".to_string())
        );
        // No stack: no `code.*` (the spawn site is not the code that stalled).
        assert!(attr(span, "code.file.path").is_none());
        assert!(
            attr(span, "loopwatch.victims.count").is_none(),
            "not tracked"
        );
    }

    #[test]
    fn code_attributes_are_all_from_the_top_frame_of_the_applications_code() {
        let frame = |f: &str, loc: &str, dependency| crate::diagnose::Frame {
            function: Some(f.into()),
            location: Some(loc.into()),
            ip: 0,
            dependency,
        };
        let mut s = crate::stall::tests_support::stall();
        s.task.site = Some("axum-0.8.9/src/serve/mod.rs:389:5".into());
        s.stack = Some(std::sync::Arc::new(crate::diagnose::Stack {
            frames: vec![
                frame("std::thread::sleep", "std/src/thread/mod.rs:50", true),
                frame(
                    "app::handlers::seed::{{closure}}",
                    "src/handlers.rs:88",
                    false,
                ),
                frame("app::main", "src/main.rs:10", false),
            ],
            ..Default::default()
        }));
        let mut attrs = Vec::new();
        stack_attrs(&s, &mut attrs);
        let get = |k: &str| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(
            get("code.function.name").as_deref(),
            Some("app::handlers::seed")
        );
        assert_eq!(get("code.file.path").as_deref(), Some("src/handlers.rs"));
        assert_eq!(get("code.line.number").as_deref(), Some("88"));
    }
}
