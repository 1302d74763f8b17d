//! Every bad `LOOPWATCH_*` value and every out-of-range setter gives a named error that says
//! which variable or setter and why; good values are applied. (One test: the environment is
//! process-wide.)

use std::time::Duration;

use loopwatch::Error;

fn env_error(var: &str, value: &str) -> (String, String, String) {
    std::env::set_var(var, value);
    let r = loopwatch::builder().config();
    std::env::remove_var(var);
    match r {
        Err(e @ Error::InvalidEnv { .. }) => {
            let shown = e.to_string();
            let Error::InvalidEnv { var, value, reason } = e else {
                unreachable!()
            };
            assert!(shown.contains(var), "{shown}");
            (var.to_string(), value, reason)
        }
        other => panic!("{var}={value:?}: expected InvalidEnv, got {other:?}"),
    }
}

#[test]
fn environment_and_setters_are_checked() {
    for v in [
        "LOOPWATCH_THRESHOLD",
        "LOOPWATCH_TICK",
        "LOOPWATCH_ENABLE",
        "LOOPWATCH_SAMPLE_EVERY",
    ] {
        std::env::remove_var(v);
    }

    let cases: &[(&str, &str, &str)] = &[
        ("LOOPWATCH_THRESHOLD", "fast", "no number"),
        ("LOOPWATCH_THRESHOLD", "10", "no unit"),
        ("LOOPWATCH_THRESHOLD", "10 parsecs", "unknown unit"),
        ("LOOPWATCH_THRESHOLD", "", "empty"),
        ("LOOPWATCH_THRESHOLD", "50us", "between"),
        ("LOOPWATCH_THRESHOLD", "7200s", "between"),
        ("LOOPWATCH_TICK", "abc", "no number"),
        ("LOOPWATCH_TICK", "10us", "at least"),
        ("LOOPWATCH_TICK", "20ms", "not be longer than the threshold"),
        ("LOOPWATCH_ENABLE", "maybe", "expected one of"),
        ("LOOPWATCH_SAMPLE_EVERY", "3", "power of two"),
        ("LOOPWATCH_SAMPLE_EVERY", "-1", "whole number"),
        ("LOOPWATCH_SAMPLE_EVERY", "131072", "power of two"),
        ("LOOPWATCH_PROMETHEUS_ADDR", "localhost", "with a port"),
        ("LOOPWATCH_PROMETHEUS_ADDR", "127.0.0.1", "with a port"),
    ];
    for (var, value, why) in cases {
        let (got_var, got_value, reason) = env_error(var, value);
        assert_eq!(&got_var, var);
        assert_eq!(&got_value, value);
        assert!(reason.contains(why), "{var}={value:?}: {reason}");
    }

    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        std::env::set_var(
            "LOOPWATCH_THRESHOLD",
            std::ffi::OsStr::from_bytes(b"10\xffms"),
        );
        let r = loopwatch::builder().config();
        std::env::remove_var("LOOPWATCH_THRESHOLD");
        assert!(
            matches!(&r, Err(Error::InvalidEnv { var: "LOOPWATCH_THRESHOLD", reason, .. }) if reason.contains("UTF-8")),
            "{r:?}"
        );
    }

    // The Prometheus address: applied over the builder's; `off` turns the listener off.
    std::env::set_var("LOOPWATCH_PROMETHEUS_ADDR", "127.0.0.1:9999");
    let cfg = loopwatch::builder()
        .metrics(loopwatch::MetricsExport::GlobalRecorder)
        .config()
        .unwrap();
    assert_eq!(
        cfg.metrics,
        loopwatch::MetricsExport::Prometheus("127.0.0.1:9999".parse().unwrap())
    );
    std::env::set_var("LOOPWATCH_PROMETHEUS_ADDR", "off");
    let cfg = loopwatch::builder().config().unwrap();
    std::env::remove_var("LOOPWATCH_PROMETHEUS_ADDR");
    assert_eq!(cfg.metrics, loopwatch::MetricsExport::Off);
    let r = loopwatch::builder()
        .ignore_env()
        .export_interval(Duration::from_millis(10))
        .config();
    assert!(
        matches!(
            &r,
            Err(Error::InvalidConfig {
                setting: "export_interval",
                ..
            })
        ),
        "{r:?}"
    );

    // Good values are applied, and override the builder's.
    std::env::set_var("LOOPWATCH_THRESHOLD", "250us");
    let cfg = loopwatch::builder()
        .threshold(Duration::from_millis(50))
        .config()
        .unwrap();
    std::env::remove_var("LOOPWATCH_THRESHOLD");
    assert_eq!(cfg.threshold, Duration::from_micros(250));
    assert_eq!(
        cfg.tick,
        Duration::from_nanos(62_500),
        "the default tick follows the threshold (a quarter of it)"
    );

    // ignore_env() leaves the environment out.
    std::env::set_var("LOOPWATCH_THRESHOLD", "bogus");
    let cfg = loopwatch::builder().ignore_env().config().unwrap();
    std::env::remove_var("LOOPWATCH_THRESHOLD");
    assert_eq!(cfg.threshold, loopwatch::DEFAULT_THRESHOLD);

    // LOOPWATCH_ENABLE=0: the layer does nothing and no thread starts.
    std::env::set_var("LOOPWATCH_ENABLE", "off");
    let (_layer, guard) = loopwatch::builder().build().unwrap();
    std::env::remove_var("LOOPWATCH_ENABLE");
    assert!(!guard.is_running());
    assert_eq!(guard.snapshot().polls, 0);

    // Setters are range-checked too, and name the setter.
    let cases: Vec<(loopwatch::Builder, &str)> = vec![
        (
            loopwatch::builder().threshold(Duration::from_micros(99)),
            "threshold",
        ),
        (loopwatch::builder().tick(Duration::from_secs(1)), "tick"),
        (loopwatch::builder().sample_every(0), "sample_every"),
        (loopwatch::builder().report_queue(0), "report_queue"),
        (loopwatch::builder().max_threads(0), "max_threads"),
        (loopwatch::builder().max_task_kinds(0), "max_task_kinds"),
        // Sizes allocated at start are capped (1 << 24 took gigabytes and could abort the
        // process from build()).
        (loopwatch::builder().report_queue(1 << 24), "report_queue"),
        (loopwatch::builder().max_threads(1 << 24), "max_threads"),
        (
            loopwatch::builder().max_task_kinds(1 << 24),
            "max_task_kinds",
        ),
        (
            loopwatch::builder().report_queue(loopwatch::REPORT_QUEUE_LIMIT + 1),
            "report_queue",
        ),
    ];
    for (b, setting) in cases {
        match b.ignore_env().config() {
            Err(e @ Error::InvalidConfig { .. }) => {
                assert!(e.to_string().contains(setting), "{e}");
            }
            other => panic!("{setting}: expected InvalidConfig, got {other:?}"),
        }
    }
    // The limits themselves are accepted.
    loopwatch::builder()
        .ignore_env()
        .report_queue(loopwatch::REPORT_QUEUE_LIMIT)
        .max_threads(loopwatch::MAX_THREADS_LIMIT)
        .max_task_kinds(loopwatch::MAX_TASK_KINDS_LIMIT)
        .config()
        .expect("the limits are valid");
    // The defaults are valid.
    let cfg = loopwatch::builder().ignore_env().config().unwrap();
    assert_eq!(cfg.threshold, Duration::from_millis(10));
    assert_eq!(cfg.tick, Duration::from_micros(2500));
}
