//! The `fitprune` command line: argument definitions and dispatch (each command in its own file).

mod bench;
mod bench_serve;
mod bench_stages;
mod calibrate;
mod demo;
pub mod eval;
mod generate;
mod input;
mod recipes;
mod serve;

use clap::{Parser, Subcommand};

pub use input::{load_image, parse_device, parse_dtype};

/// The version line, with the accelerator backends built in (the device check reads it).
const VERSION: &str = if cfg!(feature = "flash-attn") {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda, flash-attn)")
} else if cfg!(feature = "cuda") {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu)")
};

/// fitprune: LLaVA inference with FitPrune visual-token pruning.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a deterministic random-weight LLaVA checkpoint (tests, demos, benchmarks).
    DemoModel(demo::DemoArgs),
    /// Run one prompt (with images) end to end and print the answer.
    Generate(generate::GenerateArgs),
    /// Fit FitPrune recipes to FLOPs budgets from a calibration dataset.
    Calibrate(calibrate::CalibrateArgs),
    /// Measure pruned vs unpruned prefill, TTFT and decode speed side by side.
    Bench(bench::BenchArgs),
    /// Measure accuracy and fidelity against FLOPs budgets: FitPrune vs random vs FastV deletion.
    Eval(eval::EvalArgs),
    /// Manage stored recipes: list, show, import, export, delete.
    Recipes(recipes::RecipesArgs),
    /// Serve the OpenAI-compatible HTTP API (chat completions with images, metrics).
    Serve(crate::config::ServeArgs),
}

impl Cli {
    /// The log format asked for (`serve --log-format`; text for every other command).
    pub fn log_format(&self) -> crate::config::LogFormat {
        match &self.command {
            Command::Serve(args) => args.log_format,
            _ => crate::config::LogFormat::Text,
        }
    }

    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::DemoModel(args) => demo::run(args),
            Command::Generate(args) => generate::run(args),
            Command::Calibrate(args) => calibrate::run(args),
            Command::Bench(args) => bench::run(args),
            Command::Eval(args) => eval::run(args),
            Command::Recipes(args) => recipes::run(args),
            Command::Serve(args) => serve::run(args),
        }
    }
}
