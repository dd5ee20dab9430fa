//! The LLaVA-NeXT family's image path: `LlavaNextImageProcessor` (PIL path) turning an image into
//! tiles, and `LlavaNextModel.pack_image_features` turning the tiles' projected features into
//! the image's token sequence. Geometry (and so every count) comes from [`super::anyres`].

use candle_core::{Tensor, D};
use image::{DynamicImage, RgbImage};

use super::anyres::{AnyRes, Layout};
use super::config::LlavaConfig;
use super::preprocess::{self, ImagePreprocessor, PreprocessError, PreprocessorConfig, ResizeTarget};
use super::resample;
use super::{ModelError, Result};

/// What a NeXT model needs beyond LLaVA-1.5: the grid geometry and the learned row separator.
#[derive(Debug, Clone)]
pub(super) struct NextHead {
    pub(super) anyres: AnyRes,
    /// `image_newline`, (text hidden,): appended after every row of the unpadded grid.
    pub(super) newline: Tensor,
    /// (height, width) the base image is resized to (`size` as a tuple, e.g. 336x336).
    base: (u32, u32),
}

impl NextHead {
    /// Checks the preprocessor against the vision tower and builds the head.
    pub(super) fn new(cfg: &LlavaConfig, pre: &PreprocessorConfig, newline: Tensor) -> Result<Self> {
        let tile = cfg.vision_config.image_size as u32;
        let bad = |field: &str, message: String| {
            ModelError::Preprocess(PreprocessError::Config { field: field.into(), message })
        };
        // get_image_patches cuts tiles of crop_size["height"]; they must be what the tower takes.
        if pre.crop_size.height != tile || pre.crop_size.width != tile {
            return Err(bad(
                "crop_size",
                format!("{}x{} does not match the {tile}-px vision tower", pre.crop_size.height, pre.crop_size.width),
            ));
        }
        let base = match pre.size {
            ResizeTarget::ShortestEdge(s) => (s, s),
            ResizeTarget::Exact { height, width } => (height, width),
        };
        if base != (tile, tile) {
            return Err(bad("size", format!("{base:?} must resize the base image to the {tile}-px tile")));
        }
        let side = cfg.vision_config.image_size / cfg.vision_config.patch_size;
        let anyres = AnyRes { pinpoints: cfg.image_grid_pinpoints.clone(), tile, side };
        Ok(Self { anyres, newline, base })
    }

    /// The layout of an image of `size` (height, width).
    pub(super) fn layout(&self, size: (u32, u32)) -> Result<Layout> {
        self.anyres
            .layout(size)
            .ok_or_else(|| ModelError::Preprocess(PreprocessError::EmptyImage { width: size.1, height: size.0 }))
    }

    /// Visual tokens of an image of `size` (height, width).
    pub(super) fn token_count(&self, size: (u32, u32)) -> Result<usize> {
        Ok(self.anyres.token_count(&self.layout(size)?))
    }

    /// `get_image_patches` + `_preprocess`: the base image resized to the tile, then the image
    /// resized (aspect kept) into its best resolution, zero-padded to centre it, and cut into
    /// row-major tiles; each tile rescaled and normalised. Returns (tiles * 3 * tile * tile)
    /// channels-first values, base first.
    pub(super) fn tiles(&self, pre: &ImagePreprocessor, img: &DynamicImage) -> Result<Vec<f32>> {
        let rgb = preprocess::to_rgb_like_pil(img);
        let layout = self.layout((rgb.height(), rgb.width()))?;
        let filter = pre.config().resample;
        let t = self.anyres.tile;
        let mut out = Vec::with_capacity(layout.tiles() * 3 * (t * t) as usize);
        // PIL's resize returns a copy when the size is unchanged; skip the resampler then.
        let resize = |w: u32, h: u32| -> RgbImage {
            if (rgb.width(), rgb.height()) == (w, h) {
                rgb.clone()
            } else {
                resample::resize(&rgb, w, h, filter)
            }
        };
        // The base tile: an exact resize to `size`, which `_preprocess`'s own shortest-edge
        // resize and centre crop then leave unchanged.
        out.extend(pre.crop_and_normalize(&resize(self.base.1, self.base.0), 0, 0));
        let resized = resize(layout.resized.1, layout.resized.0);
        let (pad_top, pad_left) = layout.padding();
        for r in 0..layout.grid.0 {
            for c in 0..layout.grid.1 {
                // Tile (r, c) of the padded image reads the resized image shifted by the padding;
                // pixels outside it are the zero padding (level 0, normalised like any other).
                let top = i64::from(r as u32 * t) - i64::from(pad_top);
                let left = i64::from(c as u32 * t) - i64::from(pad_left);
                out.extend(pre.crop_and_normalize(&resized, top, left));
            }
        }
        Ok(out)
    }

    /// `pack_image_features` for one image: `feats` (tiles, side * side, hidden) of its base and
    /// grid tiles -> (tokens, hidden): the base features, then the grid viewed
    /// (nh, nw, side, side, C), permuted to (C, nh * side, nw * side), unpadded, with
    /// `image_newline` appended to every row, flattened row-major.
    pub(super) fn pack(&self, feats: &Tensor, size: (u32, u32)) -> Result<Tensor> {
        let layout = self.layout(size)?;
        let (tiles, per_tile, hidden) = feats.dims3()?;
        let p = self.anyres.side;
        let (nh, nw) = layout.grid;
        if tiles != layout.tiles() || per_tile != p * p {
            return Err(ModelError::InvalidInput(format!(
                "image {}x{}: {tiles} tiles of {per_tile} features, expected {} of {}",
                size.1,
                size.0,
                layout.tiles(),
                p * p
            )));
        }
        let base = feats.get(0)?;
        let (rows, cols) = self.anyres.unpadded(&layout);
        if rows == 0 {
            return Ok(base);
        }
        let newline = self.newline.to_dtype(feats.dtype())?;
        let grid = if cols == 0 {
            // Every row is just its newline: (rows, C).
            newline.unsqueeze(0)?.broadcast_as((rows, hidden))?.contiguous()?
        } else {
            let grid = feats
                .narrow(0, 1, nh * nw)?
                .reshape((nh, nw, p, p, hidden))?
                .permute((4, 0, 2, 1, 3))?
                .contiguous()?
                .reshape((hidden, nh * p, nw * p))?;
            // unpad_image: drop (current - kept) / 2 rows (or columns) on each side.
            let grid = grid.narrow(1, (nh * p - rows) / 2, rows)?.narrow(2, (nw * p - cols) / 2, cols)?;
            let nl = newline.reshape((hidden, 1, 1))?.broadcast_as((hidden, rows, 1))?;
            // (C, rows, cols + 1) -> (rows * (cols + 1), C)
            Tensor::cat(&[&grid, &nl.contiguous()?], D::Minus1)?.reshape((hidden, rows * (cols + 1)))?.t()?
        };
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }
}

/// transformers' processor tiles with preprocessor_config.json's `image_grid_pinpoints` and the
/// model packs with config.json's; both sides here use config.json's, so a checkpoint whose two
/// lists differ (transformers would fail on the count mismatch) is refused at load.
pub(super) fn check_pinpoints(preprocessor_json: &str, cfg: &LlavaConfig) -> Result<()> {
    let value: serde_json::Value = serde_json::from_str(preprocessor_json)
        .map_err(|e| ModelError::Preprocess(PreprocessError::Config { field: ".".into(), message: e.to_string() }))?;
    let Some(pins) = value.get("image_grid_pinpoints") else {
        return Ok(());
    };
    let parsed: Option<Vec<(u32, u32)>> = serde_json::from_value(pins.clone()).ok();
    if parsed.as_ref() != Some(&cfg.image_grid_pinpoints) {
        return Err(ModelError::Config {
            file: "preprocessor_config.json".into(),
            field: "image_grid_pinpoints".into(),
            message: format!("{pins} differs from config.json's {:?}", cfg.image_grid_pinpoints),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// A head with 2-px tiles of 1x1 patches: feature (r, c) of a tile is easy to trace.
    fn head() -> NextHead {
        let anyres = AnyRes { pinpoints: vec![(2, 4), (4, 2), (4, 4)], tile: 2, side: 2 };
        NextHead { anyres, newline: Tensor::new(&[-1f32, -2.0], &Device::Cpu).unwrap(), base: (2, 2) }
    }

    #[test]
    fn pack_orders_grid_rows_across_tiles_then_newline() {
        let h = head();
        // A 4x4 image: grid 2x2 tiles, no unpadding. Feature value = 100*tile + 10*row + col.
        let mut data = Vec::new();
        for tile in 0..5 {
            for r in 0..2 {
                for c in 0..2 {
                    let v = (100 * tile + 10 * r + c) as f32;
                    data.extend([v, v]);
                }
            }
        }
        let feats = Tensor::from_vec(data, (5, 4, 2), &Device::Cpu).unwrap();
        let packed = h.pack(&feats, (4, 4)).unwrap();
        assert_eq!(packed.dims(), &[4 + 4 * 5, 2]);
        let col0: Vec<f32> = packed.i((.., 0)).unwrap().to_vec1().unwrap();
        // base (tile 0), then grid row 0: tile1 r0 c0, tile1 r0 c1, tile2 r0 c0, tile2 r0 c1, newline...
        let want = [
            0., 1., 10., 11., //
            100., 101., 200., 201., -1., //
            110., 111., 210., 211., -1., //
            300., 301., 400., 401., -1., //
            310., 311., 410., 411., -1.,
        ];
        assert_eq!(col0, want);
        assert_eq!(packed.i((8, 1)).unwrap().to_scalar::<f32>().unwrap(), -2.0);
    }

    #[test]
    fn preprocessor_pinpoints_must_match_the_config() {
        let cfg = LlavaConfig::from_json_str(r#"{"model_type": "llava_next"}"#).unwrap();
        assert!(check_pinpoints("{}", &cfg).is_ok());
        let same = r#"{"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}"#;
        assert!(check_pinpoints(same, &cfg).is_ok());
        let e = check_pinpoints(r#"{"image_grid_pinpoints": [[336, 672]]}"#, &cfg).unwrap_err().to_string();
        assert!(e.contains("preprocessor_config.json") && e.contains("image_grid_pinpoints"), "{e}");
    }

    #[test]
    fn pack_unpads_and_matches_the_token_count() {
        let h = head();
        // Wide, tall, odd and extreme sizes (some unpad to zero rows or columns): the packed
        // length is the prompt-side count.
        for size in [(4, 8), (8, 4), (3, 9), (9, 3), (1, 50), (50, 1), (4, 4)] {
            let layout = h.layout(size).unwrap();
            let feats = Tensor::zeros((layout.tiles(), 4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
            let packed = h.pack(&feats, size).unwrap();
            assert_eq!(packed.dim(0).unwrap(), h.token_count(size).unwrap(), "{size:?}");
        }
    }
}
