//! `fitprune serve`: validates the flags and runs the HTTP server on a tokio runtime.

use anyhow::Context;

use crate::config::ServeArgs;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(crate::server::run(cfg))
}
