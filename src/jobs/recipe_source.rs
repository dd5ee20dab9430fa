//! The SQLite store as the server's [`RecipeSource`] (glue between `store` and the engine, so
//! neither depends on the other): the loaded model's recipes are cached in
//! memory and reloaded after any change, so a deleted recipe stops applying with the next request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use sqlx::SqlitePool;

use crate::engine::recipes::{FileRecipes, RecipeError, RecipeSource};
use crate::engine::ModelInfo;
use crate::pruning::Recipe;

use crate::store::recipes;

/// What the cache holds: the recipes of one model fingerprint.
type Cached = (String, Vec<Arc<Recipe>>);

/// Recipes from the database (plus an optional `--recipes` file), cached per model fingerprint.
///
/// A lookup that misses reads the database and then fills the cache, with an `await` in
/// between: a write plus [`Self::invalidate`] landing in that gap would be overwritten by the
/// rows read before it (a deleted recipe served on). Every invalidation bumps `generation`, and a
/// lookup only fills the cache if the generation it started under is still current.
pub struct DbRecipes {
    pool: SqlitePool,
    file: Option<Arc<FileRecipes>>,
    cache: RwLock<Option<Cached>>,
    generation: AtomicU64,
}

impl DbRecipes {
    /// A source over `pool`.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool, file: None, cache: RwLock::new(None), generation: AtomicU64::new(0) }
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

    /// Forgets the cache after a write, and stops lookups already in flight from refilling it
    /// with what they read before the write.
    pub fn invalidate(&self) {
        // Under the lock, so a fill cannot check the old generation and store after this clears.
        if let Ok(mut c) = self.cache.write() {
            self.generation.fetch_add(1, Ordering::SeqCst);
            *c = None;
        }
    }

    fn cached(&self, fingerprint: &str) -> Option<Vec<Arc<Recipe>>> {
        let c = self.cache.read().ok()?;
        c.as_ref().filter(|(fp, _)| fp == fingerprint).map(|(_, r)| r.clone())
    }

    /// Stores a lookup's result unless an invalidation happened since it began (`generation`).
    fn fill(&self, generation: u64, fingerprint: &str, recipes: &[Arc<Recipe>]) {
        if let Ok(mut c) = self.cache.write() {
            if self.generation.load(Ordering::SeqCst) == generation {
                *c = Some((fingerprint.to_string(), recipes.to_vec()));
            }
        }
    }
}

impl RecipeSource for DbRecipes {
    fn for_model<'a>(&'a self, model: &'a ModelInfo) -> BoxFuture<'a, Result<Vec<Arc<Recipe>>, RecipeError>> {
        Box::pin(async move {
            if let Some(hit) = self.cached(&model.fingerprint) {
                return Ok(hit);
            }
            let generation = self.generation.load(Ordering::SeqCst);
            let rows = recipes::list(&self.pool, Some(&model.fingerprint))
                .await
                .map_err(|e| RecipeError::Store(e.to_string()))?;
            // Rows that no longer fit the model (e.g. edited by hand) are skipped, not fatal.
            let mut usable: Vec<Arc<Recipe>> = self.file.as_ref().map(|f| f.resolve(model).0).unwrap_or_default();
            usable.extend(rows.into_iter().filter(|r| r.validate(model.layers).is_ok()).map(Arc::new));
            self.fill(generation, &model.fingerprint, &usable);
            Ok(usable)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pruning::FlopsModel;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            is_demo: true,
            fingerprint: "fp".into(),
            layers: 2,
            image_tokens: 10,
            max_context: 64,
            device: "cpu".into(),
            dtype: "f32".into(),
            flops: FlopsModel { layers: 2, hidden: 4, intermediate: 8, kv_dim: 4 },
            kv: crate::engine::kv::KvLayout::new(2, 1, 4, 4),
        }
    }

    fn recipe(id: &str) -> Recipe {
        Recipe {
            id: id.into(),
            name: id.into(),
            model_fingerprint: "fp".into(),
            budget: 0.3,
            achieved_reduction: 0.3,
            deletions: vec![1, 1],
            alpha: None,
            visual_tokens: 10,
            samples: 1,
            created_at: "t".into(),
            job_id: None,
        }
    }

    /// A one-connection pool, so a test can hold the connection and park a lookup mid-flight.
    async fn one_connection_pool(dir: &std::path::Path) -> SqlitePool {
        let opts = SqliteConnectOptions::new().filename(dir.join("t.db")).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
        crate::store::MIGRATOR.run(&pool).await.unwrap();
        pool
    }

    #[tokio::test]
    async fn an_invalidation_during_a_lookup_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let pool = one_connection_pool(dir.path()).await;
        recipes::insert(&pool, &recipe("old")).await.unwrap();
        let src = DbRecipes::new(pool.clone());
        let model = info();

        // Hold the only connection: the lookup starts (reads the generation) and parks on it.
        let conn = pool.acquire().await.unwrap();
        let lookup = src.for_model(&model);
        futures::pin_mut!(lookup);
        assert!(futures::poll!(&mut lookup).is_pending());
        // A write and its invalidation land while the lookup is parked.
        src.invalidate();
        drop(conn);
        let got = lookup.await.unwrap();
        assert_eq!(got.len(), 1, "the lookup itself answers what it read");
        assert!(src.cached("fp").is_none(), "a lookup that began before the invalidation must not fill the cache");

        // An undisturbed lookup fills it, and the next write's invalidation empties it.
        src.for_model(&model).await.unwrap();
        assert_eq!(src.cached("fp").map(|r| r.len()), Some(1));
        recipes::delete(&pool, "old").await.unwrap();
        src.invalidate();
        assert!(src.for_model(&model).await.unwrap().is_empty());
    }
}
