//! Image preprocessing identical to transformers' slow, PIL-based `CLIPImageProcessor`.
//!
//! Steps, as in `CLIPImageProcessor.preprocess` (and `LlavaImageProcessor` for `do_pad`):
//! convert to RGB the way PIL's `convert("RGB")` does, optionally pad to a square with the mean
//! colour (the original LLaVA `expand2square`), resize the shortest edge with PIL's resampling
//! (`super::resample`, bit-exact; the `image` crate's resize is not), centre-crop (padding with
//! zeros when the image is smaller), rescale in f64 then cast to f32, and normalise in f32.
//! Output is channels-first f32, `[3, crop_h, crop_w]`.

use image::{DynamicImage, RgbImage};
use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use serde_json::Value;

use super::resample::{self, Filter, Region};

/// transformers' `OPENAI_CLIP_MEAN`, the default `image_mean`.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`, the default `image_std`.
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Parsed preprocessor_config.json (transformers' defaults for missing fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PreprocessorConfig {
    /// Whether to resize as `size` says.
    pub do_resize: bool,
    /// Resize target; an int means the shortest edge, as transformers reads it for `size`.
    #[serde(deserialize_with = "de_size")]
    pub size: ResizeTarget,
    /// PIL resampling filter id (`3` bicubic); ids without an implementation are rejected.
    #[serde(deserialize_with = "de_filter")]
    pub resample: Filter,
    /// Whether to centre-crop to `crop_size`.
    pub do_center_crop: bool,
    /// Centre-crop size; an int means a square.
    #[serde(deserialize_with = "de_crop_size")]
    pub crop_size: CropSize,
    /// Whether to multiply pixel values by `rescale_factor`.
    pub do_rescale: bool,
    /// Rescale multiplier, 1/255 by default.
    pub rescale_factor: f64,
    /// Whether to apply `(x - image_mean) / image_std`.
    pub do_normalize: bool,
    /// Per-channel mean (a single number applies to all three channels).
    #[serde(deserialize_with = "de_mean")]
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (a single number applies to all three channels).
    #[serde(deserialize_with = "de_std")]
    pub image_std: [f64; 3],
    /// Recorded for completeness; images are always converted, since the vision tower needs RGB.
    pub do_convert_rgb: bool,
    /// `LlavaImageProcessor`'s pad-to-square, the same as the `pad_to_square` option.
    pub do_pad: bool,
}

/// What `size` asks the resize step for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Scale so the shorter side has this length, keeping the aspect ratio.
    ShortestEdge(u32),
    /// Scale to exactly this size.
    Exact {
        /// Output height in pixels.
        height: u32,
        /// Output width in pixels.
        width: u32,
    },
}

/// Centre-crop size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropSize {
    /// Crop height in pixels.
    pub height: u32,
    /// Crop width in pixels.
    pub width: u32,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: CropSize { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            do_pad: false,
        }
    }
}

impl PreprocessorConfig {
    /// Parses preprocessor_config.json text; errors name the offending field.
    pub fn from_json_str(s: &str) -> Result<Self, PreprocessError> {
        let config_error = |field: String, message: String| PreprocessError::Config { field, message };
        let mut de = serde_json::Deserializer::from_str(s);
        let cfg: Self = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| config_error(e.path().to_string(), e.inner().to_string()))?;
        de.end().map_err(|e| config_error(".".into(), e.to_string()))?;
        Ok(cfg)
    }
}

/// Errors from parsing the config or preprocessing an image.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// A preprocessor_config.json field is malformed or unsupported (`.` is the whole document).
    #[error("preprocessor config field `{field}`: {message}")]
    Config {
        /// JSON path of the field, e.g. `size` or `resample`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The image has no pixels.
    #[error("image is empty ({width}x{height})")]
    EmptyImage {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

/// Turns images into the vision tower's `[3, height, width]` input as transformers would.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    cfg: PreprocessorConfig,
    /// Background of the pad-to-square step, when it is on.
    pad_colour: Option<[u8; 3]>,
    /// (height, width) of every output.
    output: (u32, u32),
    /// Output value of each u8 level per channel: rescale and normalise depend only on the level.
    lut: [[f32; 256]; 3],
}

impl ImagePreprocessor {
    /// Builds a preprocessor; `pad_to_square` (or the config's `do_pad`) pads before resizing.
    pub fn new(cfg: PreprocessorConfig, pad_to_square: bool) -> Result<Self, PreprocessError> {
        let output = match (cfg.do_center_crop, cfg.do_resize, cfg.size) {
            (true, _, _) => (cfg.crop_size.height, cfg.crop_size.width),
            (false, true, ResizeTarget::Exact { height, width }) => (height, width),
            _ => {
                return Err(PreprocessError::Config {
                    field: "do_center_crop".into(),
                    message: "must be true unless `size` gives both height and width: \
                              the vision tower needs a fixed input size"
                        .into(),
                })
            }
        };
        // LLaVA's expand2square colour: `tuple(int(x * 255) for x in image_mean)`; `as`
        // truncates toward zero like Python's int().
        let pad_colour = (pad_to_square || cfg.do_pad).then(|| cfg.image_mean.map(|m| (m * 255.0) as u8));
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (level, v) in table.iter_mut().enumerate() {
                *v = level_value(&cfg, c, level as u8);
            }
        }
        Ok(Self { cfg, pad_colour, output, lut })
    }

    /// The parsed config.
    pub fn config(&self) -> &PreprocessorConfig {
        &self.cfg
    }

    /// Output (height, width) in pixels.
    pub fn output_size(&self) -> (usize, usize) {
        (self.output.0 as usize, self.output.1 as usize)
    }

    /// Preprocesses one image into channels-first f32 of length `3 * height * width`.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Vec<f32>, PreprocessError> {
        if img.width() == 0 || img.height() == 0 {
            return Err(PreprocessError::EmptyImage { width: img.width(), height: img.height() });
        }
        let rgb = self.to_rgb(img);
        let (h, w) = self.resized_size(&rgb);
        let (out_h, out_w) = self.output;
        // Where the output's top-left corner falls in the resized image. Python's
        // `(orig - crop) // 2` floors, which also puts a too-small image at
        // `ceil((crop - orig) / 2)`, as transformers' zero-padding branch does.
        let (top, left) = if self.cfg.do_center_crop {
            ((i64::from(h) - i64::from(out_h)).div_euclid(2), (i64::from(w) - i64::from(out_w)).div_euclid(2))
        } else {
            (0, 0)
        };
        if !self.cfg.do_resize {
            return Ok(self.crop_and_normalize(&rgb, top, left));
        }
        // Resample only what survives the crop; `resize_region` trims it to the resized image.
        let region = Region { x: left.max(0) as u32, y: top.max(0) as u32, width: out_w, height: out_h };
        let resized = resample::resize_region(&rgb, w, h, region, self.cfg.resample);
        Ok(self.crop_and_normalize(&resized, top - i64::from(region.y), left - i64::from(region.x)))
    }

    /// The pre-resize u8 stages: RGB conversion, then the optional pad to square.
    fn to_rgb(&self, img: &DynamicImage) -> RgbImage {
        let rgb = to_rgb_like_pil(img);
        match self.pad_colour {
            Some(colour) => expand_to_square(&rgb, colour),
            None => rgb,
        }
    }

    /// (height, width) after the resize step (unchanged when `do_resize` is off).
    fn resized_size(&self, rgb: &RgbImage) -> (u32, u32) {
        if self.cfg.do_resize {
            resize_output_size(rgb.height(), rgb.width(), self.cfg.size)
        } else {
            (rgb.height(), rgb.width())
        }
    }

    /// transformers' `center_crop` with its zero padding where the crop overhangs, fused with
    /// the per-level rescale/normalise table, writing CHW. Output pixel (y, x) reads `rgb` at
    /// (y + top, x + left).
    pub(super) fn crop_and_normalize(&self, rgb: &RgbImage, top: i64, left: i64) -> Vec<f32> {
        let (out_h, out_w) = self.output_size();
        let (h, w) = (i64::from(rgb.height()), i64::from(rgb.width()));
        let src = rgb.as_raw();
        let mut out = vec![0f32; 3 * out_h * out_w];
        for (c, plane) in out.chunks_exact_mut(out_h * out_w).enumerate() {
            for (y, row) in plane.chunks_exact_mut(out_w).enumerate() {
                let sy = y as i64 + top;
                for (x, v) in row.iter_mut().enumerate() {
                    let sx = x as i64 + left;
                    let level = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                        src[((sy * w + sx) * 3) as usize + c]
                    } else {
                        0
                    };
                    *v = self.lut[c][usize::from(level)];
                }
            }
        }
        out
    }
}

/// The value transformers produces for u8 `level` in channel `c`: `rescale` multiplies in f64
/// and casts to f32; `normalize` then works in f32 with f32 mean and std.
fn level_value(cfg: &PreprocessorConfig, c: usize, level: u8) -> f32 {
    let mut v = if cfg.do_rescale { (f64::from(level) * cfg.rescale_factor) as f32 } else { f32::from(level) };
    if cfg.do_normalize {
        v = (v - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32;
    }
    v
}

/// `get_resize_output_image_size(default_to_square=False)`: returns (height, width).
fn resize_output_size(height: u32, width: u32, target: ResizeTarget) -> (u32, u32) {
    match target {
        ResizeTarget::Exact { height, width } => (height, width),
        ResizeTarget::ShortestEdge(s) => {
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            // `int(s * long / short)`: exact integer product, one f64 division, truncation.
            let new_long = ((u64::from(s) * u64::from(long)) as f64 / f64::from(short)) as u32;
            if width <= height {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// RGB conversion with PIL's results for what PIL would have decoded: 8-bit modes drop alpha
/// and replicate grey; 16-bit PNG colour keeps the high byte (PIL's `RGB;16B` unpacker), and
/// 16-bit grey clamps to 255 (PIL's `I;16` -> `RGB`), where `to_rgb8` would scale instead.
pub(super) fn to_rgb_like_pil(img: &DynamicImage) -> RgbImage {
    let high_byte = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma16(g) => map_pixels(img, |x, y| [g.get_pixel(x, y).0[0].min(255) as u8; 3]),
        DynamicImage::ImageLumaA16(g) => map_pixels(img, |x, y| [high_byte(g.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageRgb16(p) => map_pixels(img, |x, y| p.get_pixel(x, y).0.map(high_byte)),
        DynamicImage::ImageRgba16(p) => map_pixels(img, |x, y| {
            let [r, g, b, _] = p.get_pixel(x, y).0.map(high_byte);
            [r, g, b]
        }),
        other => other.to_rgb8(),
    }
}

fn map_pixels(img: &DynamicImage, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| image::Rgb(f(x, y)))
}

/// LLaVA's `expand2square`: centre the image on a square of `colour`, offset `(long - short) // 2`.
fn expand_to_square(img: &RgbImage, colour: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(colour));
    let (dx, dy) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    for (x, y, p) in img.enumerate_pixels() {
        out.put_pixel(x + dx, y + dy, *p);
    }
    out
}

fn positive_dim(v: &Value) -> Result<u32, String> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("expected a positive integer, got {v}"))
}

/// `[height, width]` or `{"height": h, "width": w}`, which every size field accepts.
fn height_width(v: &Value) -> Option<Result<(u32, u32), String>> {
    match v {
        Value::Array(a) if a.len() == 2 => Some(positive_dim(&a[0]).and_then(|h| Ok((h, positive_dim(&a[1])?)))),
        Value::Object(m) if m.len() == 2 && m.contains_key("height") && m.contains_key("width") => {
            Some(positive_dim(&m["height"]).and_then(|h| Ok((h, positive_dim(&m["width"])?))))
        }
        _ => None,
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<ResizeTarget, D::Error> {
    let v = Value::deserialize(d)?;
    let exact = |(height, width)| ResizeTarget::Exact { height, width };
    let parsed = match &v {
        Value::Null => Ok(PreprocessorConfig::default().size),
        Value::Number(_) => positive_dim(&v).map(ResizeTarget::ShortestEdge),
        // CLIPImageProcessor.resize reads only `shortest_edge`, ignoring any `longest_edge`.
        Value::Object(m)
            if m.contains_key("shortest_edge") && m.keys().all(|k| k == "shortest_edge" || k == "longest_edge") =>
        {
            positive_dim(&m["shortest_edge"]).map(ResizeTarget::ShortestEdge)
        }
        _ => height_width(&v).map(|r| r.map(exact)).unwrap_or_else(|| {
            Err(format!(
                "expected an integer, [height, width], or a map with `shortest_edge` \
                 or `height` and `width`, got {v}"
            ))
        }),
    };
    parsed.map_err(D::Error::custom)
}

fn de_crop_size<'de, D: Deserializer<'de>>(d: D) -> Result<CropSize, D::Error> {
    let v = Value::deserialize(d)?;
    let parsed = match &v {
        Value::Null => Ok(PreprocessorConfig::default().crop_size),
        Value::Number(_) => positive_dim(&v).map(|n| CropSize { height: n, width: n }),
        _ => height_width(&v)
            .map(|r| r.map(|(height, width)| CropSize { height, width }))
            .unwrap_or_else(|| Err(format!("expected an integer or height and width, got {v}"))),
    };
    parsed.map_err(D::Error::custom)
}

fn de_filter<'de, D: Deserializer<'de>>(d: D) -> Result<Filter, D::Error> {
    let id = u64::deserialize(d)?;
    Filter::from_pil_id(id).ok_or_else(|| {
        D::Error::custom(format!(
            "unsupported PIL resampling filter {id} \
             (supported: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
        ))
    })
}

fn channels(v: &Value, default: [f64; 3], nonzero: bool) -> Result<[f64; 3], String> {
    let values = match v {
        Value::Null => return Ok(default),
        Value::Number(n) => n.as_f64().map(|x| [x; 3]),
        Value::Array(a) if a.len() == 3 => {
            let xs: Option<Vec<f64>> = a.iter().map(Value::as_f64).collect();
            xs.map(|xs| [xs[0], xs[1], xs[2]])
        }
        _ => None,
    };
    let values = values.ok_or_else(|| format!("expected a number or 3 numbers, got {v}"))?;
    if nonzero && values.contains(&0.0) {
        return Err("must not contain 0".into());
    }
    Ok(values)
}

fn de_mean<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 3], D::Error> {
    channels(&Value::deserialize(d)?, OPENAI_CLIP_MEAN, false).map_err(D::Error::custom)
}

fn de_std<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 3], D::Error> {
    channels(&Value::deserialize(d)?, OPENAI_CLIP_STD, true).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests;
