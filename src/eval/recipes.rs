//! Where an evaluation's recipes come from: fitted on the spot from a calibration set (FitPrune's
//! calibration, `pruning::calibrate`), or given (a file or the store) and matched to each budget.

use image::DynamicImage;

use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::calibrate::{calibrate, CalibrateOptions, CalibrationObserver};
use crate::pruning::layers::LayerRunner;
use crate::pruning::recipe::select_by_budget;
use crate::pruning::Recipe;
use crate::validation::ImageLimits;

use super::dataset::EvalSample;
use super::run::prepare_sample;
use super::EvalError;

/// Decodes every sample's image with the server's decoder and its default limits.
pub fn load_images(samples: &[EvalSample]) -> Result<Vec<DynamicImage>, EvalError> {
    samples
        .iter()
        .map(|s| {
            let name = s.image.display().to_string();
            let bytes = std::fs::read(&s.image).map_err(|e| EvalError::Dataset(format!("{name}: {e}")))?;
            crate::validation::images::decode(&bytes, &name, &ImageLimits::default())
                .map_err(|e| EvalError::Dataset(format!("{name}: {e}")))
        })
        .collect()
}

/// Fits one recipe per positive budget on the calibration samples (their labels are ignored).
/// Budgets that even alpha = 1 cannot reach get no recipe.
pub fn calibrate_recipes(
    model: &LlavaModel,
    samples: &[EvalSample],
    budgets: &[f64],
    fingerprint: &str,
    observer: &mut dyn CalibrationObserver,
) -> Result<Vec<Recipe>, EvalError> {
    if budgets.iter().all(|&b| b <= 0.0) {
        return Ok(Vec::new());
    }
    let images = load_images(samples)?;
    let prompts =
        samples.iter().zip(&images).map(|(s, img)| prepare_sample(model, s, img)).collect::<Result<Vec<_>, _>>()?;
    fit_recipes(model, &prompts, budgets, fingerprint, observer)
}

/// [`calibrate_recipes`] on prepared prompts, every layer evaluation through `runner` (the
/// model itself, or the server's engine thread for admin jobs). The recipes are not stored:
/// their `id` is empty.
pub fn fit_recipes(
    runner: &dyn LayerRunner,
    prompts: &[PreparedPrompt],
    budgets: &[f64],
    fingerprint: &str,
    observer: &mut dyn CalibrationObserver,
) -> Result<Vec<Recipe>, EvalError> {
    let positive: Vec<f64> = budgets.iter().copied().filter(|&b| b > 0.0).collect();
    if positive.is_empty() {
        return Ok(Vec::new());
    }
    let opts = CalibrateOptions { budgets: positive, ..CalibrateOptions::default() };
    let result = calibrate(runner, prompts, &opts, observer)?;
    let created_at = crate::store::now();
    Ok(result
        .budgets
        .iter()
        .filter(|b| b.alpha.is_some())
        .map(|b| Recipe {
            id: String::new(),
            name: format!("fitprune-{:.0}", b.budget * 100.0),
            model_fingerprint: fingerprint.to_string(),
            budget: b.budget,
            achieved_reduction: b.achieved_reduction,
            deletions: b.deletions.clone(),
            alpha: b.alpha,
            visual_tokens: result.visual_tokens,
            samples: result.samples,
            created_at: created_at.clone(),
            job_id: None,
        })
        .collect())
}

/// Pairs each budget with its recipe: none for 0 (unpruned), else the recipe with the largest
/// budget at or below it. Budgets without one are returned separately (the caller reports them).
pub fn match_budgets(budgets: &[f64], recipes: &[Recipe]) -> (Vec<(f64, Option<Recipe>)>, Vec<f64>) {
    let mut planned = Vec::new();
    let mut missing = Vec::new();
    for &b in budgets {
        if b <= 0.0 {
            planned.push((b, None));
            continue;
        }
        match select_by_budget(recipes, b) {
            Some(r) => planned.push((b, Some(r.clone()))),
            None => missing.push(b),
        }
    }
    (planned, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(budget: f64) -> Recipe {
        Recipe {
            id: String::new(),
            name: format!("r{budget}"),
            model_fingerprint: String::new(),
            budget,
            achieved_reduction: budget,
            deletions: vec![1, 0],
            alpha: None,
            visual_tokens: 4,
            samples: 1,
            created_at: String::new(),
            job_id: None,
        }
    }

    #[test]
    fn budgets_take_the_largest_recipe_at_or_below() {
        let (plan, missing) = match_budgets(&[0.0, 0.3, 0.55, 0.2], &[recipe(0.3), recipe(0.5)]);
        assert_eq!(missing, vec![0.2]);
        let names: Vec<Option<String>> = plan.iter().map(|(_, r)| r.as_ref().map(|r| r.name.clone())).collect();
        assert_eq!(names, vec![None, Some("r0.3".into()), Some("r0.5".into())]);
    }
}
