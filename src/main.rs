//! `fitprune` binary: parses the command line and runs the chosen command.

use clap::Parser;
use fitprune::config::LogFormat;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    drop_empty_settings();
    let cli = fitprune::cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format() {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).with_span_list(true).init(),
        LogFormat::Text => logs.init(),
    }
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Treats `FITPRUNE_X=` (empty, as compose files and charts often produce) as unset, so the flag's
/// default applies instead of a parse error. Runs before any other thread exists.
fn drop_empty_settings() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.to_str().is_some_and(|k| k.starts_with("FITPRUNE_")))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}
