//! Evaluation output: the stdout table, CSV and the PNG plot (accuracy, or agreement without
//! labels, against achieved FLOPs reduction; one line per method).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::run::{EvalReport, Method};
use super::EvalError;

/// DejaVu Sans Mono (Bitstream Vera licence, see `font/LICENSE`): plotters' bitmap backend draws
/// text only through a registered font, and a bundled one renders the same on every machine.
const FONT: &[u8] = include_bytes!("font/DejaVuSansMono.ttf");

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// A fixed-width table, one line per (budget, method).
pub fn table(report: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<8}  {:>8}  {:>9}  {:>9}  {:>8}  {:>9}  {:>6}  {:>8}",
        "budget", "method", "accuracy", "agreement", "top1 agr", "KL", "FLOPs red", "kept", "TTFT ms"
    );
    for r in &report.rows {
        let _ = writeln!(
            out,
            "{:>6.2}  {:<8}  {:>8}  {:>9}  {:>9}  {:>8.4}  {:>9}  {:>6.1}  {:>8.2}",
            r.budget,
            r.method.name(),
            r.accuracy.map_or("-".to_string(), pct),
            pct(r.agreement),
            pct(r.top1_agreement),
            r.kl_mean,
            pct(r.flops_reduction),
            r.visual_tokens_kept,
            r.ttft_ms
        );
    }
    let _ = writeln!(
        out,
        "{} samples ({} labelled), {:.0} visual tokens each; accuracy/agreement/FLOPs in %, KL in nats",
        report.samples, report.labelled, report.visual_tokens
    );
    out
}

/// CSV with a header line; empty accuracy when there are no labels.
pub fn csv(report: &EvalReport) -> String {
    let mut out = String::from(
        "method,budget,recipe,accuracy,agreement,top1_agreement,kl_mean,flops_reduction,visual_tokens_kept,ttft_ms\n",
    );
    for r in &report.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            r.method.name(),
            r.budget,
            r.recipe.as_deref().unwrap_or(""),
            r.accuracy.map_or(String::new(), |a| a.to_string()),
            r.agreement,
            r.top1_agreement,
            r.kl_mean,
            r.flops_reduction,
            r.visual_tokens_kept,
            r.ttft_ms
        );
    }
    out
}

fn colour(method: Method) -> RGBColor {
    match method {
        Method::Fitprune => RGBColor(31, 119, 180),
        Method::Random => RGBColor(127, 127, 127),
        Method::Fastv => RGBColor(214, 39, 40),
    }
}

/// Writes an 800x500 PNG: accuracy (or agreement) in % against FLOPs reduction in %.
pub fn plot(report: &EvalReport, path: &Path, title: &str) -> Result<(), EvalError> {
    let plot_err = |e: String| EvalError::Plot(format!("{}: {e}", path.display()));
    // Registering twice (several plots in one process) is harmless; the first font stays.
    register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| plot_err("bundled font rejected".into()))?;
    let labelled = report.labelled > 0;
    let metric = if labelled { "accuracy (%)" } else { "agreement with unpruned (%)" };
    let mut methods: Vec<Method> = Vec::new();
    for r in &report.rows {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let value = |r: &super::run::EvalRow| 100.0 * if labelled { r.accuracy.unwrap_or(0.0) } else { r.agreement };
    let lowest = report.rows.iter().map(value).fold(100.0f64, f64::min);
    let y_min = ((lowest - 5.0) / 10.0).floor().clamp(0.0, 9.0) * 10.0;
    let x_max = report.rows.iter().map(|r| r.flops_reduction * 100.0).fold(10.0f64, f64::max);
    let x_max = (x_max / 10.0).ceil() * 10.0;

    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, y_min..100.0)
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("achieved FLOPs reduction (%)")
        .y_desc(metric)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    for method in methods {
        let mut points: Vec<(f64, f64)> =
            report.rows.iter().filter(|r| r.method == method).map(|r| (r.flops_reduction * 100.0, value(r))).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = colour(method);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(|e| plot_err(e.to_string()))?
            .label(method.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(|e| plot_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}
