//! Shared by the examples: a `main` that prints an error as a person reads it.

/// Runs `run` and prints its error, if any, with `Display` and its causes (not as `Debug`, which
/// is what `main` returning a `Result` shows).
pub(crate) fn main(run: fn() -> Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
