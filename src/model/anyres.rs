//! LLaVA-NeXT "anyres" geometry (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world
//! knowledge"), as transformers' `LlavaNextImageProcessor`, `LlavaNextProcessor` and
//! `LlavaNextModel.pack_image_features` compute it: which grid resolution an image gets, how it
//! is resized and padded into that grid, and how many visual tokens it becomes.
//!
//! Pure integer/float arithmetic so the prompt side (token expansion) and the model side
//! (feature packing) share one definition and cannot disagree on a count.

/// Grid resolutions (`image_grid_pinpoints`), each (height, width) in pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyRes {
    /// Candidate (height, width) resolutions, in config order.
    pub pinpoints: Vec<(u32, u32)>,
    /// Tile side in pixels (`vision_config.image_size`, e.g. 336).
    pub tile: u32,
    /// Feature-map side of one tile (`image_size / patch_size`, e.g. 24).
    pub side: usize,
}

/// How one image is laid out: its grid resolution and the aspect-preserving resize into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Original (height, width).
    pub original: (u32, u32),
    /// The chosen pinpoint (height, width).
    pub best: (u32, u32),
    /// Size after the aspect-preserving resize, (height, width), each <= `best`.
    pub resized: (u32, u32),
    /// Tiles down and across (`best / tile`).
    pub grid: (usize, usize),
}

impl Layout {
    /// Zero padding (top, left) that centres the resized image in `best`; the bottom/right
    /// padding takes the odd pixel, as `_get_padding_size` (`divmod(diff, 2)`) does.
    pub fn padding(&self) -> (u32, u32) {
        ((self.best.0 - self.resized.0) / 2, (self.best.1 - self.resized.1) / 2)
    }

    /// Tiles through the vision tower: the base image plus the grid.
    pub fn tiles(&self) -> usize {
        1 + self.grid.0 * self.grid.1
    }
}

/// `select_best_resolution`: the pinpoint that maximises the effective resolution
/// `min(int(W*s) * int(H*s), W*H)` with `s = min(w/W, h/H)`; ties go to less wasted area, then
/// to the earlier pinpoint (strict comparisons, as in transformers).
pub fn select_best_resolution(original: (u32, u32), pinpoints: &[(u32, u32)]) -> Option<(u32, u32)> {
    let (oh, ow) = (f64::from(original.0), f64::from(original.1));
    let mut best = None;
    let (mut max_effective, mut min_wasted) = (0i64, i64::MAX);
    for &(h, w) in pinpoints {
        let scale = (f64::from(w) / ow).min(f64::from(h) / oh);
        // Python's int() truncates toward zero; these are non-negative.
        let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
        let effective = (dw * dh).min(i64::from(original.0) * i64::from(original.1));
        let wasted = i64::from(h) * i64::from(w) - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// `_get_patch_output_size`: scale to fit `target` keeping the aspect ratio; the fitted side is
/// exact, the other `min(ceil(side * scale), target)`.
pub fn patch_output_size(original: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (oh, ow) = (f64::from(original.0), f64::from(original.1));
    let (th, tw) = target;
    let scale_w = f64::from(tw) / ow;
    let scale_h = f64::from(th) / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as u32).min(tw))
    }
}

/// Python's `int(round(x, 7))` for non-negative `x`: truncation, except that a value within
/// 5e-8 below an integer rounds up to it (transformers added the `round(..., 7)` so that e.g.
/// 47.99999999 counts as 48; see transformers #33261 / PR #34522).
fn int_round7(x: f64) -> i64 {
    let nearest = x.round();
    if nearest >= x && nearest - x < 5e-8 {
        nearest as i64
    } else {
        x.floor() as i64
    }
}

/// `unpad_image` on a (rows, cols) feature grid for an image of `original` (height, width):
/// the (rows, cols) left after removing the padding rows or columns symmetrically.
pub fn unpadded_grid(original: (u32, u32), current: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (f64::from(original.0), f64::from(original.1));
    let (ch, cw) = current;
    let original_aspect = ow / oh;
    let current_aspect = cw as f64 / ch as f64;
    if original_aspect > current_aspect {
        let new_h = int_round7(oh * (cw as f64 / ow));
        let pad = ((ch as i64 - new_h) / 2).max(0) as usize;
        (ch - 2 * pad, cw)
    } else {
        let new_w = int_round7(ow * (ch as f64 / oh));
        let pad = ((cw as i64 - new_w) / 2).max(0) as usize;
        (ch, cw - 2 * pad)
    }
}

impl AnyRes {
    /// The layout of an image of `original` (height, width); `None` without pinpoints or for
    /// an empty image.
    pub fn layout(&self, original: (u32, u32)) -> Option<Layout> {
        if original.0 == 0 || original.1 == 0 || self.tile == 0 {
            return None;
        }
        let best = select_best_resolution(original, &self.pinpoints)?;
        let resized = patch_output_size(original, best);
        let grid = ((best.0 / self.tile) as usize, (best.1 / self.tile) as usize);
        Some(Layout { original, best, resized, grid })
    }

    /// The unpadded feature grid (rows, cols) of the tiles of `layout`.
    pub fn unpadded(&self, layout: &Layout) -> (usize, usize) {
        unpadded_grid(layout.original, (layout.grid.0 * self.side, layout.grid.1 * self.side))
    }

    /// Visual tokens of one image: base tile features, then the unpadded grid with one
    /// `image_newline` per row (`LlavaNextProcessor._get_number_of_features` with the default
    /// select strategy).
    pub fn token_count(&self, layout: &Layout) -> usize {
        let (rows, cols) = self.unpadded(layout);
        self.side * self.side + rows * cols + rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> AnyRes {
        AnyRes { pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)], tile: 336, side: 24 }
    }

    fn count(a: &AnyRes, h: u32, w: u32) -> usize {
        a.token_count(&a.layout((h, w)).unwrap())
    }

    #[test]
    fn design_counts_for_336_tiles() {
        // DESIGN §2: 336x336 -> 1176, 672x672 -> 2928.
        let a = hub();
        assert_eq!(count(&a, 336, 336), 1176);
        assert_eq!(count(&a, 672, 672), 2928);
        assert_eq!(a.layout((672, 672)).unwrap().tiles(), 5);
        // The NeXT bench input, a 640x480 photo: 2x2 grid, 36 of 48 rows survive unpadding.
        assert_eq!(count(&a, 480, 640), 576 + 36 * 48 + 36);
        assert!(count(&a, 480, 640) >= 2000);
    }

    #[test]
    fn best_resolution_follows_transformers() {
        let p = hub().pinpoints;
        // Square inputs: all square-ish candidates tie on effective area; 672x672 wastes least
        // of those that reach the full area.
        assert_eq!(select_best_resolution((500, 500), &p), Some((672, 672)));
        // 4:3 landscape photo: 672x672 holds 672x504 effective.
        assert_eq!(select_best_resolution((480, 640), &p), Some((672, 672)));
        // Very wide and very tall go to the 1x3 and 3x1 grids.
        assert_eq!(select_best_resolution((100, 1000), &p), Some((336, 1008)));
        assert_eq!(select_best_resolution((1000, 100), &p), Some((1008, 336)));
        // Small images: every candidate reaches W*H; least waste wins (first among equals).
        assert_eq!(select_best_resolution((20, 30), &p), Some((336, 672)));
        assert_eq!(select_best_resolution((30, 20), &p), Some((336, 672)));
        assert_eq!(select_best_resolution((10, 10), &[]), None);
    }

    #[test]
    fn resize_fits_one_side_exactly() {
        assert_eq!(patch_output_size((480, 640), (672, 672)), (504, 672));
        assert_eq!(patch_output_size((640, 480), (672, 672)), (672, 504));
        // ceil, capped at the target.
        assert_eq!(patch_output_size((100, 301), (336, 1008)), (335, 1008));
        assert_eq!(patch_output_size((336, 336), (672, 672)), (672, 672));
    }

    #[test]
    fn unpad_removes_symmetric_padding_with_rounding() {
        // 4:3 into a 48x48 grid: 48 * 480/640 = 36 rows.
        assert_eq!(unpadded_grid((480, 640), (48, 48)), (36, 48));
        assert_eq!(unpadded_grid((640, 480), (48, 48)), (48, 36));
        // An odd remainder: (48 - 35) // 2 = 6 per side leaves 36.
        assert_eq!(unpadded_grid((350, 480), (48, 48)), (36, 48));
        // 1x3 grid for a 100x1000 image: 72 * 100/1000 = 7.2 -> 7 rows, (24 - 7) // 2 = 8 -> 8 rows.
        assert_eq!(unpadded_grid((100, 1000), (24, 72)), (8, 72));
        // Python round(x, 7) before int(): 47.99999999... counts as 48.
        assert_eq!(int_round7(47.999_999_99), 48);
        assert_eq!(int_round7(47.9999), 47);
        assert_eq!(int_round7(48.0), 48);
    }

    #[test]
    fn extremes_follow_transformers_even_to_zero_rows() {
        let a = hub();
        // 1x2000: every candidate has effective area 0, the first wins; the unpadded grid has
        // int(48 / 2000) = 0 rows, so transformers appends no grid (and no newline) tokens.
        let l = a.layout((1, 2000)).unwrap();
        assert_eq!((l.best, l.resized, a.unpadded(&l)), ((336, 672), (1, 672), (0, 48)));
        assert_eq!(a.token_count(&l), 576);
        let l = a.layout((2000, 1)).unwrap();
        assert_eq!((l.best, l.resized, a.unpadded(&l)), ((336, 672), (336, 1), (24, 0)));
        assert_eq!(a.token_count(&l), 576 + 24);
        for (h, w) in [(1, 1), (3, 7), (335, 337), (1007, 333)] {
            let l = a.layout((h, w)).unwrap();
            let (rows, cols) = a.unpadded(&l);
            assert!(rows <= l.grid.0 * 24 && cols <= l.grid.1 * 24);
            assert_eq!(a.token_count(&l), 576 + rows * cols + rows);
        }
    }
}
