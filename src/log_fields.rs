//! A short line for loopwatch's reports in `fmt` logs ([`LogFields`]).

use std::fmt;

use tracing_core::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;

/// The fields of a `fmt` log line: loopwatch's stall reports and notices as their message
/// alone (one line of about 200 characters: who, where, how long, cause, hint, victims), every
/// other event and span as tracing-subscriber's [`DefaultFields`] writes them.
///
/// A report's event carries every fact as a field (about 25, the stack among them) for JSON
/// logs and other layers; in a human-read log they would repeat the message at five times its
/// length. [`init`](crate::init) uses it; add it to your own `fmt` layer with
/// `tracing_subscriber::fmt::layer().fmt_fields(loopwatch::LogFields::default())`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogFields {
    _private: (),
}

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut ours = IsReport(false);
        fields.record(&mut ours);
        if !ours.0 {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut message = Message {
            writer: &mut writer,
            result: Ok(()),
        };
        fields.record(&mut message);
        message.result
    }
}

/// Whether the fields are a loopwatch report's (`stall.state`) or notice's (`notice`).
struct IsReport(bool);

impl Visit for IsReport {
    fn record_debug(&mut self, field: &Field, _: &dyn fmt::Debug) {
        if matches!(field.name(), "stall.state" | "notice") {
            self.0 = true;
        }
    }
}

/// Writes the `message` field only.
struct Message<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Visit for Message<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" && self.result.is_ok() {
            self.result = self.writer.write_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" && self.result.is_ok() {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}
