//! Where pruning recipes come from, behind [`RecipeSource`]: for now a JSON file read at startup
//! ([`FileRecipes`]); the SQLite store (issue 5) implements the same trait.
//!
//! A recipe applies to the loaded model when its `model_fingerprint` is empty or equal to the
//! model's, and it validates against the decoder (one entry per layer). Missing `id` and
//! `visual_tokens` are filled for the loaded model, as `POST /admin/recipes` will do.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::pruning::recipe::{parse_recipes, select_by_budget};
use crate::pruning::Recipe;

use super::loaded::ModelInfo;

/// Errors looking up recipes.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipes file could not be read or parsed.
    #[error("recipes file {path}: {message}")]
    File { path: String, message: String },
    /// The backing store failed.
    #[error("recipe store: {0}")]
    Store(String),
}

/// A source of recipes for the loaded model.
pub trait RecipeSource: Send + Sync + 'static {
    /// Every recipe that applies to `model`.
    fn for_model<'a>(&'a self, model: &'a ModelInfo) -> BoxFuture<'a, Result<Vec<Arc<Recipe>>, RecipeError>>;
}

/// What a request asked for in `pruning`, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum PruningChoice {
    /// `"off"`, or absent with no server default.
    Off,
    /// The recipe with the largest budget at or below this one.
    Budget(f64),
    /// A recipe by id.
    RecipeId(String),
}

/// The outcome of choosing a recipe.
#[derive(Debug, Clone, PartialEq)]
pub enum Selected {
    /// Prune with this recipe.
    Recipe(Arc<Recipe>),
    /// Do not prune, and why (reported in the response).
    Unpruned(&'static str),
    /// `recipe_id` names no recipe for this model.
    UnknownId(String),
}

/// Applies `choice` to the recipes of `source`.
pub async fn select(
    source: &dyn RecipeSource,
    model: &ModelInfo,
    choice: &PruningChoice,
) -> Result<Selected, RecipeError> {
    let budget_or_id = match choice {
        PruningChoice::Off => return Ok(Selected::Unpruned("off")),
        other => other,
    };
    let recipes = source.for_model(model).await?;
    Ok(match budget_or_id {
        PruningChoice::Budget(b) => match select_by_budget(&recipes, *b) {
            Some(r) => Selected::Recipe(r.clone()),
            None => Selected::Unpruned("no recipe applies"),
        },
        PruningChoice::RecipeId(id) => match recipes.iter().find(|r| &r.id == id) {
            Some(r) => Selected::Recipe(r.clone()),
            None => Selected::UnknownId(id.clone()),
        },
        PruningChoice::Off => Selected::Unpruned("off"),
    })
}

/// Recipes from a JSON file (one recipe object or a list), fixed at startup.
#[derive(Debug, Clone, Default)]
pub struct FileRecipes {
    recipes: Vec<Recipe>,
}

impl FileRecipes {
    /// No recipes (every request runs unpruned).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses `path`; fails on unreadable files or malformed recipes.
    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let err = |message: String| RecipeError::File { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_json(&text).map_err(|e| err(e.to_string()))
    }

    /// Parses one recipe or a list of them.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        Ok(Self { recipes: parse_recipes(text)? })
    }

    /// Recipes as filled in for `model`, with the reason each excluded one does not apply.
    pub fn resolve(&self, model: &ModelInfo) -> (Vec<Arc<Recipe>>, Vec<String>) {
        let mut ok = Vec::new();
        let mut skipped = Vec::new();
        for (i, r) in self.recipes.iter().enumerate() {
            let mut r = r.clone();
            if r.id.is_empty() {
                r.id = if r.name.is_empty() { format!("file-{i}") } else { r.name.clone() };
            }
            if !r.model_fingerprint.is_empty() && r.model_fingerprint != model.fingerprint {
                skipped.push(format!("{}: fitted for model {}, not {}", r.id, r.model_fingerprint, model.fingerprint));
                continue;
            }
            if r.visual_tokens == 0 {
                r.visual_tokens = model.image_tokens;
            }
            if let Err(e) = r.validate(model.layers) {
                skipped.push(format!("{}: {e}", r.id));
                continue;
            }
            if r.achieved_reduction == 0.0 {
                r = r.with_reduction(&model.flops);
            }
            ok.push(Arc::new(r));
        }
        (ok, skipped)
    }
}

impl RecipeSource for FileRecipes {
    fn for_model<'a>(&'a self, model: &'a ModelInfo) -> BoxFuture<'a, Result<Vec<Arc<Recipe>>, RecipeError>> {
        Box::pin(async move { Ok(self.resolve(model).0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pruning::FlopsModel;

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            is_demo: true,
            fingerprint: "abc".into(),
            layers: 2,
            image_tokens: 10,
            max_context: 100,
            device: "cpu".into(),
            dtype: "f32".into(),
            flops: FlopsModel::llava15_7b(),
            kv: crate::engine::kv::KvLayout::new(2, 1, 8, 4),
        }
    }

    #[test]
    fn file_recipes_fill_ids_skip_foreign_and_select_by_budget() {
        let text = r#"[
            {"name": "low", "budget": 0.2, "deletions": [1, 0]},
            {"id": "high", "budget": 0.6, "deletions": [3, 2]},
            {"id": "other", "budget": 0.4, "deletions": [1, 1], "model_fingerprint": "zzz"},
            {"id": "bad", "budget": 0.3, "deletions": [1, 1, 1]}
        ]"#;
        let file = FileRecipes::from_json(text).unwrap();
        let (ok, skipped) = file.resolve(&info());
        assert_eq!(ok.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["low", "high"]);
        assert_eq!(ok[0].visual_tokens, 10);
        assert!(ok[0].achieved_reduction > 0.0);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let rt = |c| futures::executor::block_on(select(&file, &info(), &c)).unwrap();
        assert!(matches!(rt(PruningChoice::Budget(0.5)), Selected::Recipe(r) if r.id == "low"));
        assert!(matches!(rt(PruningChoice::Budget(0.7)), Selected::Recipe(r) if r.id == "high"));
        assert_eq!(rt(PruningChoice::Budget(0.1)), Selected::Unpruned("no recipe applies"));
        assert!(matches!(rt(PruningChoice::RecipeId("high".into())), Selected::Recipe(_)));
        assert_eq!(rt(PruningChoice::RecipeId("other".into())), Selected::UnknownId("other".into()));
        assert_eq!(rt(PruningChoice::Off), Selected::Unpruned("off"));
    }

    #[test]
    fn a_single_recipe_object_is_accepted() {
        let file = FileRecipes::from_json(r#"{"id": "one", "deletions": [0, 1]}"#).unwrap();
        assert_eq!(file.resolve(&info()).0.len(), 1);
        assert!(FileRecipes::from_json(r#"{"id": "x"}"#).is_err());
    }
}
