//! `fitprune demo-model`: writes a random-weight checkpoint.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::model::config::FeatureSelect;
use crate::model::demo::{write_demo_model, DemoBackbone, DemoFamily, DemoOptions, Preset};
use crate::model::weights::TensorLayout;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Layout {
    /// `language_model.model.*` as on the hub.
    Hub,
    /// `model.language_model.*` as transformers ≥ 4.52 saves.
    Nested,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Select {
    Default,
    Full,
}

/// Arguments of `demo-model`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory (created if needed).
    dir: PathBuf,
    /// Seed for all weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size preset.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// Model family: LLaVA-1.5, LLaVA-NeXT (anyres tiles) or LLaVA-HR (CLIP + ConvNeXt, the
    /// original-LLaVA layout; --backbone, --select-strategy and --layout do not apply).
    #[arg(long, value_enum, default_value = "llava")]
    family: DemoFamily,
    /// Decoder architecture.
    #[arg(long, value_enum, default_value = "llama")]
    backbone: DemoBackbone,
    /// Mistral's sliding attention window in tokens (default: none).
    #[arg(long)]
    sliding_window: Option<usize>,
    /// Key/value heads of the decoder (GQA/MQA variants).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// vision_feature_select_strategy.
    #[arg(long, value_enum, default_value = "default")]
    select_strategy: Select,
    /// Tensor naming.
    #[arg(long, value_enum, default_value = "hub")]
    layout: Layout,
    /// Number of safetensors shards (more than 1 writes an index).
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let opts = DemoOptions {
        family: args.family,
        backbone: args.backbone,
        sliding_window: args.sliding_window,
        preset: args.preset,
        seed: args.seed,
        kv_heads: args.kv_heads,
        select: match args.select_strategy {
            Select::Default => FeatureSelect::Default,
            Select::Full => FeatureSelect::Full,
        },
        layout: match args.layout {
            Layout::Hub => TensorLayout::Hub,
            Layout::Nested => TensorLayout::Nested,
        },
        shards: args.shards,
    };
    let s = write_demo_model(&args.dir, &opts)?;
    println!(
        "wrote a random-weight LLaVA demo checkpoint to {} ({:.1}M parameters, {} image tokens, vocab {})",
        args.dir.display(),
        s.parameters as f64 / 1e6,
        s.image_tokens,
        s.vocab_size
    );
    Ok(())
}
