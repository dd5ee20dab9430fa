//! The SQLite store as the server's [`RecipeSource`]: the loaded model's recipes are cached in
//! memory and reloaded after any change, so a deleted recipe stops applying with the next request.

use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use sqlx::SqlitePool;

use crate::engine::recipes::{FileRecipes, RecipeError, RecipeSource};
use crate::engine::ModelInfo;
use crate::pruning::Recipe;

use super::recipes;

/// Recipes from the database (plus an optional `--recipes` file), cached per model fingerprint.
pub struct DbRecipes {
    pool: SqlitePool,
    file: Option<Arc<FileRecipes>>,
    cache: RwLock<Option<(String, Vec<Arc<Recipe>>)>>,
}

impl DbRecipes {
    /// A source over `pool`.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool, file: None, cache: RwLock::new(None) }
    }

    /// Also serves the recipes of a `--recipes` file (listed before the stored ones).
    pub fn with_file(mut self, file: Arc<FileRecipes>) -> Self {
        self.file = Some(file);
        self
    }

    /// The pool (admin handlers write through it, then call [`Self::invalidate`]).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Forgets the cache after a write.
    pub fn invalidate(&self) {
        if let Ok(mut c) = self.cache.write() {
            *c = None;
        }
    }

    fn cached(&self, fingerprint: &str) -> Option<Vec<Arc<Recipe>>> {
        let c = self.cache.read().ok()?;
        c.as_ref().filter(|(fp, _)| fp == fingerprint).map(|(_, r)| r.clone())
    }
}

impl RecipeSource for DbRecipes {
    fn for_model<'a>(&'a self, model: &'a ModelInfo) -> BoxFuture<'a, Result<Vec<Arc<Recipe>>, RecipeError>> {
        Box::pin(async move {
            if let Some(hit) = self.cached(&model.fingerprint) {
                return Ok(hit);
            }
            let rows = recipes::list(&self.pool, Some(&model.fingerprint))
                .await
                .map_err(|e| RecipeError::Store(e.to_string()))?;
            // Rows that no longer fit the model (e.g. edited by hand) are skipped, not fatal.
            let mut usable: Vec<Arc<Recipe>> = self.file.as_ref().map(|f| f.resolve(model).0).unwrap_or_default();
            usable.extend(rows.into_iter().filter(|r| r.validate(model.layers).is_ok()).map(Arc::new));
            if let Ok(mut c) = self.cache.write() {
                *c = Some((model.fingerprint.clone(), usable.clone()));
            }
            Ok(usable)
        })
    }
}
