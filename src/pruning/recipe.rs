//! Pruning recipes: how many visual tokens each decoder layer deletes, for which model and
//! visual-token count they were fitted, and the JSON form the API and files use.

use serde::{Deserialize, Serialize};

use super::flops::FlopsModel;
use crate::model::config::ModelType;

/// What a recipe is checked against: the loaded model's identity and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// `model::fingerprint::fingerprint` of the model directory.
    pub fingerprint: String,
    /// Visual tokens of a typical image (`LlavaModel::nominal_image_tokens`).
    pub visual_tokens: usize,
    /// Decoder FLOPs model (layer count included).
    pub flops: FlopsModel,
}

impl ModelShape {
    /// The shape of a loaded model with its fingerprint.
    pub fn of(model: &crate::model::LlavaModel, fingerprint: String) -> Self {
        Self {
            fingerprint,
            visual_tokens: model.nominal_image_tokens(),
            flops: FlopsModel::from_config(&model.config().text_config),
        }
    }
}
use super::PruneError;

/// Most visual tokens a recipe may be fitted for: far above any family (LLaVA-NeXT's largest grid
/// is under 3,000 per image) and small enough to store as SQLite's signed 64-bit integer.
pub const MAX_VISUAL_TOKENS: usize = 1 << 20;

/// Most calibration samples a recipe may claim (stored as a signed 64-bit integer).
pub const MAX_SAMPLES_FIELD: usize = 1 << 32;

/// A fitted (or imported) pruning recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Stable id (assigned by the store; empty until then).
    #[serde(default)]
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Fingerprint of the model it was fitted for.
    #[serde(default)]
    pub model_fingerprint: String,
    /// Requested fraction of visual-token FLOPs to remove.
    #[serde(default)]
    pub budget: f64,
    /// Fraction the recipe removes under the FLOPs model.
    #[serde(default)]
    pub achieved_reduction: f64,
    /// Tokens deleted at each decoder layer.
    pub deletions: Vec<usize>,
    /// The alpha the search settled on (`None` for imported recipes).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Visual tokens per prompt it was fitted for (N).
    #[serde(default)]
    pub visual_tokens: usize,
    /// Calibration samples used.
    #[serde(default)]
    pub samples: usize,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created_at: String,
    /// Calibration job that produced it, if any.
    #[serde(default)]
    pub job_id: Option<String>,
}

impl Recipe {
    /// Checks the recipe against a decoder: one entry per layer and no more deletions than tokens.
    pub fn validate(&self, layers: usize) -> Result<(), PruneError> {
        if self.deletions.len() != layers {
            return Err(PruneError::InvalidRecipe(format!(
                "deletions has {} entries but the model has {layers} decoder layers",
                self.deletions.len()
            )));
        }
        if self.visual_tokens == 0 || self.visual_tokens > MAX_VISUAL_TOKENS {
            return Err(PruneError::InvalidRecipe(format!(
                "visual_tokens must be in [1, {MAX_VISUAL_TOKENS}], got {}",
                self.visual_tokens
            )));
        }
        // Checked: a plain sum wraps (`[2^63, 2^63, 0, 0]` sums to 0 in release builds) and
        // would pass as a recipe that deletes nothing while every layer deletes everything.
        let total = self.deletions.iter().try_fold(0usize, |acc, &d| acc.checked_add(d)).ok_or_else(|| {
            PruneError::InvalidRecipe(format!("deletions sum to more than the {} visual tokens", self.visual_tokens))
        })?;
        if total > self.visual_tokens {
            return Err(PruneError::InvalidRecipe(format!(
                "deletions sum to {total}, more than the {} visual tokens",
                self.visual_tokens
            )));
        }
        if !(0.0..1.0).contains(&self.budget) {
            return Err(PruneError::InvalidRecipe(format!("budget {} is outside [0, 1)", self.budget)));
        }
        Ok(())
    }

    /// Per-layer deletions for a prompt with `n` visual tokens.
    ///
    /// A recipe is fitted for `visual_tokens` tokens (N); for `n` tokens layer l deletes
    /// `floor(d_l * n / N)`, the authors' LLaVA_NEXT rule, for every family: the same share of
    /// tokens at the same depths, never more (two images double every count; a NeXT image of
    /// another size scales by its own count). Exact integer arithmetic, no float rounding.
    pub fn deletions_for(&self, n: usize) -> Vec<usize> {
        if n == self.visual_tokens || self.visual_tokens == 0 {
            return self.deletions.clone();
        }
        let (n, big_n) = (n as u128, self.visual_tokens as u128);
        self.deletions.iter().map(|&d| (d as u128 * n / big_n) as usize).collect()
    }

    /// Completes an imported recipe for the loaded model: fills the fingerprint, the visual-token
    /// count (when absent), a name, the creation time and the achieved reduction, then validates.
    /// Recipes fitted for another model are refused rather than silently re-labelled.
    pub fn for_import(mut self, model: &ModelShape, id: String, now: String) -> Result<Self, PruneError> {
        if !self.model_fingerprint.is_empty() && self.model_fingerprint != model.fingerprint {
            return Err(PruneError::InvalidRecipe(format!(
                "it was fitted for model {} but the loaded model is {}",
                self.model_fingerprint, model.fingerprint
            )));
        }
        if self.visual_tokens == 0 {
            self.visual_tokens = model.visual_tokens;
        }
        if self.samples > MAX_SAMPLES_FIELD {
            return Err(PruneError::InvalidRecipe(format!("samples must be at most {MAX_SAMPLES_FIELD}")));
        }
        self.model_fingerprint = model.fingerprint.clone();
        self.id = id;
        if self.name.is_empty() {
            self.name = format!("imported-{:.0}", self.budget * 100.0);
        }
        if self.created_at.is_empty() {
            self.created_at = now;
        }
        self.validate(model.flops.layers)?;
        Ok(self.with_reduction(&model.flops))
    }

    /// Fills `achieved_reduction` from the FLOPs model.
    pub fn with_reduction(mut self, flops: &FlopsModel) -> Self {
        self.achieved_reduction = flops.reduction(self.visual_tokens as u64, &self.deletions);
        self
    }
}

/// The recipe with the largest budget at or below `budget` (ties: the later one), if any.
/// Works on plain recipes and on shared ones (`Arc<Recipe>`).
pub fn select_by_budget<R: std::borrow::Borrow<Recipe>>(recipes: &[R], budget: f64) -> Option<&R> {
    recipes
        .iter()
        .filter(|r| r.borrow().budget <= budget + 1e-9)
        .max_by(|a, b| a.borrow().budget.total_cmp(&b.borrow().budget))
}

/// Parses a recipes file or body: one recipe object or a list of them.
pub fn parse_recipes(text: &str) -> Result<Vec<Recipe>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<Recipe>),
        One(Box<Recipe>),
    }
    Ok(match serde_json::from_str::<OneOrMany>(text)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(r) => vec![*r],
    })
}

/// The authors' published LLaVA-1.5-7B schemes (FitPrune `modeling_llama.py`), by percent.
pub const AUTHORS_LLAVA15_7B: [(u32, [usize; 32]); 10] = [
    (10, [0, 0, 1, 2, 1, 0, 1, 4, 5, 5, 11, 4, 2, 2, 0, 0, 1, 1, 2, 4, 2, 10, 1, 1, 1, 2, 1, 1, 0, 1, 0, 0]),
    (20, [0, 0, 3, 3, 1, 1, 4, 16, 14, 15, 24, 4, 2, 3, 2, 0, 6, 0, 5, 13, 4, 19, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0]),
    (30, [0, 0, 7, 6, 4, 5, 16, 40, 24, 21, 24, 4, 2, 3, 4, 0, 16, 0, 11, 26, 6, 32, 3, 1, 0, 1, 2, 2, 4, 0, 0, 0]),
    (40, [0, 1, 21, 13, 14, 11, 41, 53, 29, 15, 14, 5, 1, 4, 5, 1, 26, 1, 13, 28, 6, 27, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0]),
    (50, [3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0]),
    (55, [6, 17, 69, 31, 34, 19, 59, 30, 23, 6, 8, 7, 2, 5, 8, 2, 29, 4, 12, 25, 4, 19, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0]),
    (60, [14, 33, 89, 36, 36, 20, 55, 21, 18, 4, 7, 5, 2, 5, 7, 4, 26, 5, 11, 24, 4, 18, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0]),
    (70, [48, 79, 118, 41, 33, 17, 36, 9, 9, 2, 3, 2, 1, 3, 4, 8, 18, 7, 8, 20, 4, 13, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0]),
    (80, [128, 127, 118, 35, 26, 8, 13, 3, 2, 1, 0, 0, 0, 2, 1, 8, 7, 8, 5, 11, 2, 6, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0]),
    (90, [262, 153, 80, 19, 13, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
];

/// The authors' published LLaVA-NeXT-7B (Vicuna) schemes (FitPrune `LLaVA_NEXT`
/// `modeling_llama.py`), by percent, fitted at 2,880 visual tokens.
pub const AUTHORS_LLAVA_NEXT_7B: [(u32, [usize; 32]); 2] = [
    (
        40,
        [
            7, 73, 162, 124, 119, 148, 131, 151, 105, 26, 30, 17, 5, 19, 44, 10, 73, 60, 67, 61, 32, 39, 0, 3, 1, 5, 0,
            0, 0, 0, 0, 0,
        ],
    ),
    (
        60,
        [
            98, 313, 279, 218, 201, 221, 167, 132, 63, 12, 11, 5, 1, 8, 26, 13, 83, 57, 56, 58, 24, 42, 0, 2, 1, 5, 0,
            0, 0, 0, 0, 0,
        ],
    ),
];

/// The authors' published LLaVA-HR-7B schemes (FitPrune `LLaVA_HR` `modeling_llama.py`), by
/// percent, fitted at 1,024 visual tokens (`left_vtoken_num`, S = 1024).
pub const AUTHORS_LLAVA_HR_7B: [(u32, [usize; 32]); 2] = [
    (40, [3, 0, 91, 69, 34, 49, 70, 35, 1, 12, 31, 11, 0, 3, 2, 0, 1, 0, 1, 2, 8, 86, 0, 29, 0, 10, 1, 5, 0, 8, 17, 0]),
    (60, [42, 1, 207, 120, 64, 73, 76, 24, 1, 5, 18, 5, 0, 0, 1, 1, 5, 0, 2, 4, 16, 78, 1, 13, 0, 6, 0, 2, 0, 3, 5, 0]),
];

/// Published schemes: (percent, per-layer deletions of a 32-layer model).
type Schemes = &'static [(u32, [usize; 32])];

/// The built-in scheme families: name prefix, the model family they are for, the visual-token
/// count they were fitted at, and the schemes.
const SCHEMES: [(&str, ModelType, usize, Schemes); 3] = [
    ("authors-llava15-7b-", ModelType::Llava, 576, &AUTHORS_LLAVA15_7B),
    ("authors-llava-next-7b-", ModelType::LlavaNext, 2880, &AUTHORS_LLAVA_NEXT_7B),
    ("authors-llava-hr-7b-", ModelType::LlavaHr, 1024, &AUTHORS_LLAVA_HR_7B),
];

/// One of the authors' schemes as a recipe (`name` like `authors-llava15-7b-50` or
/// `authors-llava-next-7b-40`).
pub fn authors_scheme(name: &str) -> Option<Recipe> {
    SCHEMES.iter().find_map(|&(prefix, _, n, schemes)| {
        let percent: u32 = name.strip_prefix(prefix)?.parse().ok()?;
        let (_, d) = schemes.iter().find(|(p, _)| *p == percent)?;
        let recipe = Recipe {
            id: String::new(),
            name: name.to_string(),
            model_fingerprint: String::new(),
            budget: f64::from(percent) / 100.0,
            achieved_reduction: 0.0,
            deletions: d.to_vec(),
            alpha: None,
            visual_tokens: n,
            samples: 0,
            created_at: String::new(),
            job_id: None,
        };
        // All were fitted on Vicuna-7B decoders.
        Some(recipe.with_reduction(&FlopsModel::llava15_7b()))
    })
}

/// Names of all built-in schemes.
pub fn authors_scheme_names() -> Vec<String> {
    SCHEMES
        .iter()
        .flat_map(|&(prefix, _, _, schemes)| schemes.iter().map(move |(p, _)| format!("{prefix}{p}")))
        .collect()
}

/// The built-in schemes for one model family (what `--budget` without a recipe picks from).
pub fn authors_schemes_for(family: ModelType) -> Vec<Recipe> {
    SCHEMES
        .iter()
        .filter(|s| s.1 == family)
        .flat_map(|&(prefix, _, _, schemes)| {
            schemes.iter().filter_map(move |(p, _)| authors_scheme(&format!("{prefix}{p}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(deletions: Vec<usize>, n: usize) -> Recipe {
        Recipe {
            id: "r".into(),
            name: "t".into(),
            model_fingerprint: String::new(),
            budget: 0.5,
            achieved_reduction: 0.0,
            deletions,
            alpha: Some(0.5),
            visual_tokens: n,
            samples: 4,
            created_at: String::new(),
            job_id: None,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(recipe(vec![1, 2, 3], 10).validate(3).is_ok());
        let e = recipe(vec![1, 2], 10).validate(3).unwrap_err().to_string();
        assert!(e.contains("2 entries") && e.contains("3 decoder layers"), "{e}");
        let e = recipe(vec![5, 5, 5], 10).validate(3).unwrap_err().to_string();
        assert!(e.contains("sum to 15"), "{e}");
        let mut r = recipe(vec![0, 0, 0], 10);
        r.budget = 1.5;
        assert!(r.validate(3).unwrap_err().to_string().contains("budget"));
    }

    #[test]
    fn deletion_sums_that_overflow_are_refused() {
        let e = recipe(vec![1 << 63, 1 << 63, 0, 0], 144).validate(4).unwrap_err().to_string();
        assert!(e.contains("more than the 144 visual tokens"), "{e}");
        let e = recipe(vec![usize::MAX, 1, 0, 0], 144).validate(4).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let e = recipe(vec![0, 0, 0, 0], usize::MAX).validate(4).unwrap_err().to_string();
        assert!(e.contains("visual_tokens"), "{e}");
        assert!(recipe(vec![0, 0, 0, 0], MAX_VISUAL_TOKENS).validate(4).is_ok());
    }

    #[test]
    fn scaling_to_another_token_count_floors_per_layer() {
        let r = recipe(vec![10, 3, 0, 7], 576);
        assert_eq!(r.deletions_for(576), vec![10, 3, 0, 7]);
        assert_eq!(r.deletions_for(1152), vec![20, 6, 0, 14]);
        // 144/576 = 1/4: 2.5 -> 2, 0.75 -> 0, 1.75 -> 1 (round-to-nearest gave 3, 1, 2).
        assert_eq!(r.deletions_for(144), vec![2, 0, 0, 1]);
        // A NeXT recipe fitted at 2,880 applied to a 2,340-token photo: floor(d * 2340 / 2880).
        let r = recipe(vec![0, 1000, 577, 2880], 2880);
        assert_eq!(r.deletions_for(2340), vec![0, 812, 468, 2340]);
    }

    #[test]
    fn next_schemes_are_built_in_at_2880_tokens() {
        let r = authors_scheme("authors-llava-next-7b-40").unwrap();
        assert_eq!((r.visual_tokens, r.deletions.len(), r.deletions[2]), (2880, 32, 162));
        let r60 = authors_scheme("authors-llava-next-7b-60").unwrap();
        assert!(
            r60.achieved_reduction > r.achieved_reduction && r.achieved_reduction > 0.3,
            "{}",
            r.achieved_reduction
        );
        assert!(authors_scheme("authors-llava-next-7b-50").is_none());
        let names = authors_scheme_names();
        assert!(
            names.contains(&"authors-llava15-7b-90".to_string()) && names.contains(&"authors-llava-next-7b-60".into())
        );
        let next: Vec<String> = authors_schemes_for(ModelType::LlavaNext).into_iter().map(|r| r.name).collect();
        assert_eq!(next, ["authors-llava-next-7b-40", "authors-llava-next-7b-60"]);
        assert_eq!(authors_schemes_for(ModelType::Llava).len(), 10);
        // The authors scale by int(d * n / 2880): a 2,340-token photo at layer 2 deletes 131.
        assert_eq!(r.deletions_for(2340)[2], 131);
    }

    #[test]
    fn hr_schemes_are_built_in_at_1024_tokens() {
        let r40 = authors_scheme("authors-llava-hr-7b-40").unwrap();
        let r60 = authors_scheme("authors-llava-hr-7b-60").unwrap();
        assert_eq!((r40.visual_tokens, r40.deletions.len(), r40.deletions[2], r60.deletions[2]), (1024, 32, 91, 207));
        let hr: Vec<String> = authors_schemes_for(ModelType::LlavaHr).into_iter().map(|r| r.name).collect();
        assert_eq!(hr, ["authors-llava-hr-7b-40", "authors-llava-hr-7b-60"]);
        // The FLOPs model puts each scheme near its nominal budget.
        assert!((0.3..0.5).contains(&r40.achieved_reduction), "{}", r40.achieved_reduction);
        assert!((0.5..0.7).contains(&r60.achieved_reduction), "{}", r60.achieved_reduction);
        // At S = 1536 (2,304 tokens) layer 2 of the 60% scheme deletes int(207 * 2304 / 1024).
        assert_eq!(r60.deletions_for(2304)[2], 465);
    }

    #[test]
    fn json_round_trip_and_minimal_import() {
        let r = recipe(vec![1, 2, 3], 10);
        let back: Recipe = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let minimal: Recipe = serde_json::from_str(r#"{"deletions": [0, 4]}"#).unwrap();
        assert_eq!(minimal.deletions, vec![0, 4]);
        assert_eq!(minimal.alpha, None);
    }

    #[test]
    fn selection_takes_the_largest_budget_not_above_the_request() {
        let mk = |b: f64| Recipe { budget: b, ..recipe(vec![0], 1) };
        let rs = vec![mk(0.3), mk(0.7), mk(0.5)];
        assert_eq!(select_by_budget(&rs, 0.6).map(|r| r.budget), Some(0.5));
        assert_eq!(select_by_budget(&rs, 0.7).map(|r| r.budget), Some(0.7));
        assert_eq!(select_by_budget(&rs, 0.9).map(|r| r.budget), Some(0.7));
        assert!(select_by_budget(&rs, 0.2).is_none());
    }

    #[test]
    fn import_fills_the_loaded_model_and_refuses_foreign_recipes() {
        let shape = ModelShape {
            fingerprint: "fp".into(),
            visual_tokens: 10,
            flops: FlopsModel { layers: 3, hidden: 4, intermediate: 8, kv_dim: 4 },
        };
        let minimal: Recipe = serde_json::from_str(r#"{"deletions": [2, 1, 0], "budget": 0.3}"#).unwrap();
        let r = minimal.clone().for_import(&shape, "id1".into(), "now".into()).unwrap();
        assert_eq!(
            (r.id.as_str(), r.model_fingerprint.as_str(), r.visual_tokens, r.created_at.as_str()),
            ("id1", "fp", 10, "now")
        );
        assert!(r.achieved_reduction > 0.0);
        let foreign = Recipe { model_fingerprint: "other".into(), ..minimal.clone() };
        assert!(foreign.for_import(&shape, "x".into(), "now".into()).unwrap_err().to_string().contains("other"));
        let too_long = Recipe { deletions: vec![0, 0, 0, 0], ..minimal };
        assert!(too_long.for_import(&shape, "x".into(), "now".into()).is_err());
    }

    #[test]
    fn authors_schemes_are_valid_and_ordered() {
        let names = authors_scheme_names();
        assert_eq!(names.len(), 14);
        for family in [ModelType::Llava, ModelType::LlavaNext, ModelType::LlavaHr] {
            let mut last = 0.0;
            for r in authors_schemes_for(family) {
                r.validate(32).unwrap();
                assert!(r.achieved_reduction > last, "{}: {}", r.name, r.achieved_reduction);
                last = r.achieved_reduction;
            }
        }
        assert!(authors_scheme("authors-llava15-7b-45").is_none());
        assert!(authors_scheme("nope").is_none());
    }
}
