//! `fitprune recipes list|show|import|export|delete`: the recipe store from the command line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::model::fingerprint::fingerprint;
use crate::model::llava::LoadOptions;
use crate::model::{source, LlavaModel};
use crate::pruning::recipe::{authors_scheme, authors_scheme_names, parse_recipes, ModelShape};
use crate::pruning::Recipe;
use crate::store::{self, recipes, DEFAULT_DATABASE_URL};

/// Arguments of `recipes`.
#[derive(Debug, Args)]
pub struct RecipesArgs {
    /// SQLite database (created if missing).
    #[arg(long, env = "FITPRUNE_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true)]
    database_url: String,
    #[command(subcommand)]
    command: RecipesCommand,
}

#[derive(Debug, Subcommand)]
enum RecipesCommand {
    /// List recipes (all models, or one model's fingerprint).
    List {
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Print one recipe as JSON.
    Show { id: String },
    /// Import recipes from a JSON file (one or a list) or a built-in authors' scheme, for a model.
    Import {
        /// JSON file as exported.
        file: Option<PathBuf>,
        /// A built-in scheme, e.g. authors-llava15-7b-50.
        #[arg(long, conflicts_with = "file")]
        authors: Option<String>,
        /// The model the recipes are for (directory or hub id; default: the demo model).
        #[arg(long, env = "FITPRUNE_MODEL")]
        model: Option<String>,
    },
    /// Write recipes as JSON (to stdout or --out).
    Export {
        #[arg(long)]
        fingerprint: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete a recipe.
    Delete { id: String },
}

pub fn run(args: RecipesArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RecipesArgs) -> anyhow::Result<()> {
    let db = store::open(&args.database_url).await?;
    match args.command {
        RecipesCommand::List { fingerprint } => {
            let all = recipes::list(&db, fingerprint.as_deref()).await?;
            println!(
                "{:<38} {:<22} {:>6} {:>8} {:>6}  {:<32} created",
                "id", "name", "budget", "achieved", "tokens", "model"
            );
            for r in all {
                println!(
                    "{:<38} {:<22} {:>6.2} {:>8.3} {:>6}  {:<32} {}",
                    r.id, r.name, r.budget, r.achieved_reduction, r.visual_tokens, r.model_fingerprint, r.created_at
                );
            }
        }
        RecipesCommand::Show { id } => match recipes::get(&db, &id).await? {
            Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
            None => bail!("no recipe {id}"),
        },
        RecipesCommand::Import { file, authors, model } => {
            let incoming: Vec<Recipe> = match (file, authors) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    parse_recipes(&text).with_context(|| format!("parsing {}", path.display()))?
                }
                (None, Some(name)) => vec![authors_scheme(&name).with_context(|| {
                    format!("unknown scheme {name}; built in: {}", authors_scheme_names().join(", "))
                })?],
                (None, None) => bail!("give a FILE or --authors NAME"),
            };
            let src = source::resolve(model.as_deref())?;
            let loaded = LlavaModel::load(&src.dir, LoadOptions::default())?;
            let shape = ModelShape::of(&loaded, fingerprint(&src.dir)?);
            for r in incoming {
                let r = r.for_import(&shape, store::new_id("rcp"), store::now())?;
                recipes::insert(&db, &r).await?;
                println!(
                    "imported {} ({}, budget {:.2}, reduction {:.3})",
                    r.id, r.name, r.budget, r.achieved_reduction
                );
            }
        }
        RecipesCommand::Export { fingerprint, out } => {
            let all = recipes::list(&db, fingerprint.as_deref()).await?;
            let json = serde_json::to_string_pretty(&all)? + "\n";
            match out {
                Some(path) => std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?,
                None => print!("{json}"),
            }
        }
        RecipesCommand::Delete { id } => {
            if !recipes::delete(&db, &id).await? {
                bail!("no recipe {id}");
            }
            println!("deleted {id}");
        }
    }
    db.close().await;
    Ok(())
}
