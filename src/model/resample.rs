//! Pillow-exact `Image.resize` for 8-bit RGB images (re-implements `libImaging/Resample.c`).
//!
//! transformers' slow `CLIPImageProcessor` resizes through PIL, and logits are compared with
//! transformers to 1e-4, so the resized pixels must match PIL byte for byte. The `image` crate's
//! `resize` does not: it uses other filter windows and float accumulation, and is off by a few
//! levels per pixel. This module follows Pillow's algorithm instead: separable convolution,
//! horizontal pass first, with coefficients computed in f64, normalised to sum 1, then rounded to
//! fixed point; each pass rounds and clips to u8. Pillow 13 runs the vertical pass first when the
//! height shrinks by more than twice as many pixels as the width (`ImagingResampleInner`); the
//! intermediate rounding makes the order visible, so it is followed here too. Nearest neighbour
//! follows Pillow's affine
//! scaling path in `Geometry.c`. Matches Pillow's x86-64 builds (no fused multiply-add).
//! Pillow's `reducing_gap` pre-reduction is not implemented: transformers never passes it.

use std::borrow::Cow;
use std::ops::Range;

use image::RgbImage;

/// Fraction bits of the fixed-point coefficients: 8 bits of pixel value, 2 bits of headroom for
/// filters whose lobes sum past 1, and the sign bit leave 22 in an i32 accumulator.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A PIL resampling filter; `from_pil_id` takes the numbers used in `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Resampling.NEAREST` (0).
    Nearest,
    /// `Resampling.LANCZOS` (1): windowed sinc, support 3.
    Lanczos,
    /// `Resampling.BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// `Resampling.BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
    /// `Resampling.BOX` (4): support 0.5.
    Box,
    /// `Resampling.HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl Filter {
    /// Maps a PIL filter id to a filter, `None` for ids this module does not implement.
    pub fn from_pil_id(id: u64) -> Option<Self> {
        Some(match id {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the kernel at scale 1, in input pixels.
    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Nearest | Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// Kernel value at `x`; the expressions keep Pillow's operation order so f64 rounding agrees.
    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Self::Nearest | Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats, so they carry f32 rounding.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fixed-point taps for a run of output pixels on one axis: output `i` of the run reads
/// `len[i]` inputs from `start[i]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    /// Row-major `[outputs, ksize]`; only the first `len[i]` of each row are used.
    weights: Vec<i32>,
    ksize: usize,
}

impl Taps {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box, evaluated
    /// only for the outputs in `outputs` (each output's taps are independent of the others).
    fn new(in_size: usize, out_size: usize, outputs: Range<usize>, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        // Downscaling widens the kernel so every input pixel contributes; upscaling does not.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let one = f64::from(1u32 << PRECISION_BITS);

        let mut taps = Taps {
            start: Vec::with_capacity(outputs.len()),
            len: Vec::with_capacity(outputs.len()),
            weights: vec![0; outputs.len() * ksize],
            ksize,
        };
        let mut k = vec![0f64; ksize];
        for (i, xx) in outputs.enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's (int) cast; clamping afterwards is equivalent.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
                *kx = w;
                ww += w;
            }
            let row = &mut taps.weights[i * ksize..i * ksize + n];
            for (dst, &w) in row.iter_mut().zip(&k[..n]) {
                let w = if ww != 0.0 { w / ww } else { w };
                // Round half away from zero, then truncate, as Pillow does.
                *dst = if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 };
            }
            taps.start.push(xmin as usize);
            taps.len.push(n);
        }
        taps
    }

    /// First input and weights of the run's `i`-th output.
    fn row(&self, i: usize) -> (usize, &[i32]) {
        let base = i * self.ksize;
        (self.start[i], &self.weights[base..base + self.len[i]])
    }

    /// Inputs read by the whole run.
    fn span(&self) -> Range<usize> {
        let last = self.start.len().saturating_sub(1);
        match (self.start.first(), self.start.get(last)) {
            (Some(&first), Some(&s)) => first..s + self.len[last],
            _ => 0..0,
        }
    }
}

/// Rounds a fixed-point accumulator to u8 (the rounding half was added up front).
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Accumulator start value: one half in fixed point, so the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A rectangle of the resized image, in its pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Resizes like PIL's `img.resize((width, height), resample=filter)` on an RGB image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let all = Region { x: 0, y: 0, width, height };
    resize_region(img, width, height, all, filter)
}

/// `region` of what `resize` returns, computing only those pixels: every output pixel depends
/// only on its own taps, so this equals cropping the full resize, without its time and memory
/// (a 1x5000 image resized to a 336 shortest edge would be 336x1680000). The part of `region`
/// outside `width` x `height` is dropped.
pub fn resize_region(img: &RgbImage, width: u32, height: u32, region: Region, filter: Filter) -> RgbImage {
    let xs = region.x.min(width) as usize..region.x.saturating_add(region.width).min(width) as usize;
    let ys = region.y.min(height) as usize..region.y.saturating_add(region.height).min(height) as usize;
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        // PIL returns a copy when the size is unchanged, whatever the filter.
        return image::imageops::crop_imm(img, xs.start as u32, ys.start as u32, xs.len() as u32, ys.len() as u32)
            .to_image();
    }
    if in_w == 0 || in_h == 0 || xs.is_empty() || ys.is_empty() {
        return RgbImage::new(xs.len() as u32, ys.len() as u32);
    }
    if filter == Filter::Nearest {
        return nearest(img, width, height, xs, ys);
    }
    convolve(img, (width as usize, height as usize), xs, ys, filter)
}

/// Pillow 13's pass order: vertical first when `(in_h - h) > 0 && (in_h - h) > (in_w - w) * 2`
/// (signed pixel counts), horizontal first otherwise.
fn vertical_first(in_w: usize, in_h: usize, width: usize, height: usize) -> bool {
    let dy = in_h as i64 - height as i64;
    let dx = in_w as i64 - width as i64;
    dy > 0 && dy > dx * 2
}

/// The two-pass convolution of `ImagingResampleInner`; a pass is skipped when its axis keeps
/// its size, as in Pillow.
fn convolve(
    img: &RgbImage,
    (width, height): (usize, usize),
    xs: Range<usize>,
    ys: Range<usize>,
    filter: Filter,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if width != in_w && height != in_h && vertical_first(in_w, in_h, width, height) {
        return convolve_vertical_first(img, width, height, xs, ys, filter);
    }
    let vert = (height != in_h).then(|| Taps::new(in_h, height, ys.clone(), filter));
    // Source rows the output needs: the vertical taps' reach, or the region's own rows.
    let rows = vert.as_ref().map_or(ys.clone(), Taps::span);
    let line = xs.len() * 3;

    // `src` row r holds source row `row_base + r`, columns from `col0` (in bytes).
    let (src, stride, row_base, col0): (Cow<[u8]>, usize, usize, usize) = if width != in_w {
        let horiz = Taps::new(in_w, width, xs.clone(), filter);
        let lines_in = img.as_raw().chunks_exact(in_w * 3).take(rows.end).skip(rows.start);
        let mut tmp = vec![0u8; rows.len() * line];
        for (line_in, line_out) in lines_in.zip(tmp.chunks_exact_mut(line)) {
            for (i, px) in line_out.chunks_exact_mut(3).enumerate() {
                let (xmin, k) = horiz.row(i);
                let mut ss = [HALF; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &line_in[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        ss[c] += i32::from(p[c]) * kx;
                    }
                }
                for c in 0..3 {
                    px[c] = clip8(ss[c]);
                }
            }
        }
        (Cow::Owned(tmp), line, rows.start, 0)
    } else {
        (Cow::Borrowed(img.as_raw().as_slice()), in_w * 3, 0, xs.start * 3)
    };

    let mut out = RgbImage::new(xs.len() as u32, ys.len() as u32);
    for (r, line_out) in out.chunks_exact_mut(line).enumerate() {
        let Some(vert) = &vert else {
            // Height unchanged: the horizontal pass's row is the answer.
            let at = (ys.start + r - row_base) * stride + col0;
            line_out.copy_from_slice(&src[at..at + line]);
            continue;
        };
        let (ymin, k) = vert.row(r);
        let first = (ymin - row_base) * stride + col0;
        for (i, dst) in line_out.iter_mut().enumerate() {
            let mut ss = HALF;
            for (y, &ky) in k.iter().enumerate() {
                ss += i32::from(src[first + y * stride + i]) * ky;
            }
            *dst = clip8(ss);
        }
    }
    out
}

/// The vertical pass over the source columns the horizontal taps of `xs` read, then the
/// horizontal pass: the order Pillow 13 takes for images whose height shrinks most.
fn convolve_vertical_first(
    img: &RgbImage,
    width: usize,
    height: usize,
    xs: Range<usize>,
    ys: Range<usize>,
    filter: Filter,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let vert = Taps::new(in_h, height, ys.clone(), filter);
    let horiz = Taps::new(in_w, width, xs.clone(), filter);
    let cols = horiz.span();
    let src = img.as_raw();
    // tmp: (ys rows, cols) RGB, the vertically resampled columns the horizontal taps need.
    let tmp_line = cols.len() * 3;
    let mut tmp = vec![0u8; ys.len() * tmp_line];
    for (r, line) in tmp.chunks_exact_mut(tmp_line).enumerate() {
        let (ymin, k) = vert.row(r);
        for (i, dst) in line.iter_mut().enumerate() {
            let at = cols.start * 3 + i;
            let mut ss = HALF;
            for (y, &ky) in k.iter().enumerate() {
                ss += i32::from(src[(ymin + y) * in_w * 3 + at]) * ky;
            }
            *dst = clip8(ss);
        }
    }
    let mut out = RgbImage::new(xs.len() as u32, ys.len() as u32);
    let line = xs.len() * 3;
    for (line_in, line_out) in tmp.chunks_exact(tmp_line).zip(out.chunks_exact_mut(line)) {
        for (i, px) in line_out.chunks_exact_mut(3).enumerate() {
            let (xmin, k) = horiz.row(i);
            let mut ss = [HALF; 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &line_in[(xmin - cols.start + x) * 3..(xmin - cols.start + x) * 3 + 3];
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * kx;
                }
            }
            for c in 0..3 {
                px[c] = clip8(ss[c]);
            }
        }
    }
    out
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`): sample positions are accumulated in
/// f64 from the first pixel centre, so they carry the same rounding drift as Pillow's.
fn nearest(img: &RgbImage, width: u32, height: u32, xs: Range<usize>, ys: Range<usize>) -> RgbImage {
    let (in_w, in_h) = (i64::from(img.width()), i64::from(img.height()));
    let ax = in_w as f64 / f64::from(width);
    let ay = in_h as f64 / f64::from(height);
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };

    // Columns outside [x_lo, x_hi) stay black; inside it, an unmapped column reads column 0.
    let mut xin = vec![0usize; width as usize];
    let (mut x_lo, mut x_hi) = (width as usize, 0);
    let mut xo = ax * 0.5;
    for (x, slot) in xin.iter_mut().enumerate() {
        let xi = coord(xo);
        if (0..in_w).contains(&xi) {
            *slot = xi as usize;
            x_hi = x + 1;
            x_lo = x_lo.min(x);
        }
        xo += ax;
    }
    let cols = x_lo.max(xs.start)..x_hi.min(xs.end);

    let mut out = RgbImage::new(xs.len() as u32, ys.len() as u32);
    let line = xs.len() * 3;
    let src = img.as_raw();
    let in_stride = img.width() as usize * 3;
    // Replay the accumulation over the rows above the region so `yo` drifts exactly as Pillow's.
    let mut yo = ay * 0.5;
    for _ in 0..ys.start {
        yo += ay;
    }
    for line_out in out.chunks_exact_mut(line) {
        let yi = coord(yo);
        yo += ay;
        if !(0..in_h).contains(&yi) {
            continue;
        }
        let line_in = &src[yi as usize * in_stride..(yi as usize + 1) * in_stride];
        for x in cols.clone() {
            let o = (x - xs.start) * 3;
            line_out[o..o + 3].copy_from_slice(&line_in[xin[x] * 3..xin[x] * 3 + 3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Fixture {
        resize: Vec<ResizeCase>,
    }

    #[derive(serde::Deserialize)]
    struct ResizeCase {
        image: String,
        filter: u64,
        width: u32,
        height: u32,
        hex: String,
    }

    fn fixture_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn matches_pillow_resize_byte_for_byte() {
        check_fixture("expected.json");
    }

    /// Pillow 13 runs the vertical pass first for images whose height shrinks most; both orders
    /// and the boundary of the rule, for every filter (tests/reference/resample_order_reference.py).
    #[test]
    fn follows_pillows_pass_order() {
        check_fixture("pass_order.json");
        assert!(vertical_first(50, 80, 45, 30) && !vertical_first(50, 80, 40, 60) && vertical_first(50, 80, 41, 60));
        assert!(vertical_first(37, 23, 60, 9) && !vertical_first(80, 50, 30, 45));
    }

    fn check_fixture(file: &str) {
        let text = std::fs::read_to_string(fixture_dir().join(file)).unwrap();
        let fixture: Fixture = serde_json::from_str(&text).unwrap();
        assert!(fixture.resize.len() >= 10);
        for case in &fixture.resize {
            let img = image::open(fixture_dir().join(&case.image)).unwrap().to_rgb8();
            let filter = Filter::from_pil_id(case.filter).unwrap();
            let out = resize(&img, case.width, case.height, filter);
            let expected = unhex(&case.hex);
            let diff = out.as_raw().iter().zip(&expected).filter(|(a, b)| a != b).count();
            assert_eq!(
                (out.as_raw().len(), diff),
                (expected.len(), 0),
                "{} {:?} -> {}x{}",
                case.image,
                filter,
                case.width,
                case.height
            );
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box] {
            for (inp, out) in [(37, 16), (16, 37), (1200, 336)] {
                let taps = Taps::new(inp, out, 0..out, filter);
                for i in 0..out {
                    let sum: i32 = taps.row(i).1.iter().sum();
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= 4, "{filter:?} {inp}->{out}");
                }
            }
        }
    }

    #[test]
    fn a_region_equals_the_crop_of_the_full_resize() {
        let img = RgbImage::from_fn(23, 17, |x, y| image::Rgb([(x * 11) as u8, (y * 15) as u8, ((x * y) % 256) as u8]));
        let filters = [Filter::Nearest, Filter::Bilinear, Filter::Bicubic, Filter::Lanczos];
        for filter in filters {
            // (20, 5) takes the vertical-first path.
            for (w, h) in [(9, 31), (40, 17), (23, 5), (20, 5), (23, 17)] {
                let full = resize(&img, w, h, filter);
                for (x, y, rw, rh) in [(0, 0, w, h), (2, 3, 5, 4), (w - 3, h - 2, 10, 10)] {
                    let region = Region { x, y, width: rw, height: rh };
                    let part = resize_region(&img, w, h, region, filter);
                    let (cw, ch) = (rw.min(w - x), rh.min(h - y));
                    let crop = image::imageops::crop_imm(&full, x, y, cw, ch).to_image();
                    assert_eq!(part, crop, "{filter:?} {w}x{h} {region:?}");
                }
            }
        }
    }

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let img = RgbImage::from_pixel(9, 7, image::Rgb([10, 200, 255]));
        assert_eq!(resize(&img, 9, 7, Filter::Bicubic), img);
        for filter in [Filter::Bicubic, Filter::Bilinear, Filter::Nearest, Filter::Lanczos] {
            let out = resize(&img, 4, 13, filter);
            assert!(out.pixels().all(|p| p.0 == [10, 200, 255]), "{filter:?}");
        }
    }

    #[test]
    fn unknown_filter_ids_are_rejected() {
        assert_eq!(Filter::from_pil_id(3), Some(Filter::Bicubic));
        assert_eq!(Filter::from_pil_id(6), None);
    }
}
