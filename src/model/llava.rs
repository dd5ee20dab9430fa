//! A loaded LLaVA model (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning";
//! transformers' `LlavaForConditionalGeneration` + `LlavaProcessor`, and the NeXT family's
//! `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`, and LLaVA-HR's
//! `LlavaLlamaForCausalLM` with its multi-path tower): prompt building, image features merged
//! into the token embeddings, prefill and decode steps.
//!
//! The family seam is the private [`Family`]: it decides how an image becomes pixels, which
//! tower turns them into features and how many tokens it takes; everything after the merge
//! (decoder, pruning hooks, caches) is shared, so callers never name a family.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use tokenizers::Tokenizer;

use super::config::{LlavaConfig, ModelType};
use super::hr::HrTower;
use super::hr_config::{is_hr_config, load_hr_config, HrSpec};
use super::hr_prompt::{tokenize_chunks, vicuna_v1, HR_IMAGE_TOKEN};
use super::hr_weights::HrWeights;
use super::llama::{DecoderHook, DecoderOutput, KvCache, Llama};
use super::llama_batch::BatchSequence;
use super::next::NextHead;
use super::preprocess::{ImagePreprocessor, PreprocessorConfig};
use super::projector::Projector;
use super::prompt::{expand_image_tokens_each, image_token_from_dir, ChatMessage, ChatTemplate};
use super::vision::VisionTower;
use super::weights::{self, TensorLayout};
use super::{ModelError, Result};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where tensors live.
    pub device: Device,
    /// Compute dtype (f32 on CPU; f16/bf16 on CUDA).
    pub dtype: DType,
    /// Pad images to a square with the mean colour before resizing (original LLaVA).
    pub pad_to_square: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, pad_to_square: false }
    }
}

/// A tokenized prompt with its preprocessed images.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// The rendered chat template before image-token expansion.
    pub text: String,
    /// Token ids with every image placeholder expanded to one id per image feature.
    pub input_ids: Vec<u32>,
    /// (tiles, 3, H, W) pixel values, `None` for a text-only prompt: one tile per image for
    /// LLaVA-1.5; for NeXT each image's base tile and then its grid tiles, image after image.
    pub pixel_values: Option<Tensor>,
    /// Token ranges occupied by each image's features, in order (a NeXT image's whole packed
    /// span: base, grid and newline tokens).
    pub image_spans: Vec<Range<usize>>,
    /// Original (height, width) of each image, which NeXT's feature packing needs.
    pub image_sizes: Vec<(u32, u32)>,
}

/// A prompt's tokens before its images are decoded ([`LlavaModel::tokenize`]).
#[derive(Debug, Clone)]
pub struct TokenizedPrompt {
    /// The rendered chat template before image-token expansion.
    pub text: String,
    /// Token ids, image placeholders expanded.
    pub input_ids: Vec<u32>,
    /// Token ranges of each image's features, in order.
    pub image_spans: Vec<Range<usize>>,
    /// (height, width) of each image the prompt was counted for.
    pub image_sizes: Vec<(u32, u32)>,
}

impl PreparedPrompt {
    /// Number of visual tokens over all images.
    pub fn visual_tokens(&self) -> usize {
        self.image_spans.iter().map(|r| r.len()).sum()
    }
}

/// One prompt of a batched prefill, with the cache it fills and the hook that may prune it.
pub struct PrefillItem<'a> {
    /// The prompt.
    pub prompt: &'a PreparedPrompt,
    /// An empty cache.
    pub cache: &'a mut KvCache,
    /// Observes attention; may remove rows.
    pub hook: &'a mut dyn DecoderHook,
}

/// The result of a prefill.
#[derive(Debug)]
pub struct Prefill {
    /// Logits of the last prompt token, (vocab,) f32.
    pub logits: Tensor,
    /// Rows that reached the last layer and their positions.
    pub output: DecoderOutput,
}

/// What differs between the families: how images become tiles, features and tokens.
enum Family {
    /// LLaVA-1.5: one CLIP-preprocessed tile and `image_feature_count` tokens per image.
    V15(VisionTower),
    /// LLaVA-NeXT: anyres tiles and a packed, size-dependent token sequence per image.
    Next(VisionTower, NextHead),
    /// LLaVA-HR: one padded S-pixel image through the dual-branch tower, (F/14)^2 tokens;
    /// prompts are `vicuna_v1` tokenized chunk by chunk.
    Hr(Box<HrTower>),
}

/// LLaVA weights plus the tokenizer, chat template and image preprocessor that go with them.
pub struct LlavaModel {
    config: LlavaConfig,
    family: Family,
    projector: Projector,
    llama: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    preprocessor: ImagePreprocessor,
    image_token: String,
    layout: TensorLayout,
    options: LoadOptions,
    dir: PathBuf,
}

impl LlavaModel {
    /// Loads every file of a llava-hf model directory.
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Self> {
        let config_text = weights::read(&dir.join("config.json"))?;
        let value: serde_json::Value = serde_json::from_str(&config_text).map_err(|e| ModelError::Config {
            file: "config.json".into(),
            field: ".".into(),
            message: e.to_string(),
        })?;
        if is_hr_config(&value) {
            let (config, spec) = load_hr_config(dir, &value)?;
            return Self::load_hr(dir, options, config, spec);
        }
        let config = LlavaConfig::from_json_str(&config_text)?;
        let pre_path = dir.join("preprocessor_config.json");
        let pre_text = weights::read(&pre_path)?;
        let mut pre_cfg = PreprocessorConfig::from_json_str(&pre_text)?;
        if config.model_type == ModelType::LlavaNext {
            super::next::check_pinpoints(&pre_text, &config)?;
            // LlavaNextImageProcessor's `do_pad` pads the tile count across a batch, not the
            // image to a square; the packing below never reads padded tiles.
            pre_cfg.do_pad = false;
        }
        let preprocessor = ImagePreprocessor::new(pre_cfg.clone(), options.pad_to_square)?;
        let image_token = image_token_from_dir(dir)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(ModelError::MissingFile { path: tok_path, what: "the fast tokenizer".into() });
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        match tokenizer.token_to_id(&image_token) {
            Some(id) if id == config.image_token_index => {}
            other => {
                return Err(ModelError::Config {
                    file: "config.json".into(),
                    field: "image_token_index".into(),
                    message: format!(
                        "is {}, but tokenizer.json maps {image_token:?} to {other:?}",
                        config.image_token_index
                    ),
                })
            }
        }
        let template = ChatTemplate::from_dir(dir)?;

        let (vb, layout) = weights::open(dir, options.dtype, &options.device)?;
        let lm_head = if config.ties_word_embeddings() || !vb.contains_tensor(&format!("{}.weight", layout.lm_head())) {
            None
        } else {
            Some(vb.pp(layout.lm_head()))
        };
        let weights_err = |e: ModelError| match e {
            ModelError::Candle(c) => ModelError::Weights(format!("{}: {c}", dir.display())),
            other => other,
        };
        let llama = Llama::load(vb.pp(layout.text_model()), lm_head, &config.text_config).map_err(weights_err)?;
        let vision = VisionTower::load(vb.pp(layout.vision_model()), &config).map_err(weights_err)?;
        let projector = Projector::load(vb.pp(layout.projector()), &config).map_err(weights_err)?;
        let family = match config.model_type {
            ModelType::Llava => Family::V15(vision),
            ModelType::LlavaNext => {
                let newline = vb
                    .get(config.text_config.hidden_size, layout.image_newline())
                    .map_err(|e| ModelError::Weights(format!("{}: {e}", dir.display())))?;
                Family::Next(vision, NextHead::new(&config, &pre_cfg, newline)?)
            }
            ModelType::LlavaHr => {
                return Err(ModelError::Config {
                    file: "config.json".into(),
                    field: "is_multipath_encoder".into(),
                    message: "LLaVA-HR is recognised by is_multipath_encoder, not by model_type".into(),
                })
            }
        };
        Ok(Self {
            config,
            family,
            projector,
            llama,
            tokenizer,
            template,
            preprocessor,
            image_token,
            layout,
            options,
            dir: dir.to_path_buf(),
        })
    }

    /// Loads an LLaVA-HR directory (original-LLaVA layout, see [`super::hr_config`]): no
    /// preprocessor or chat-template files, those come from the config and `vicuna_v1`.
    fn load_hr(dir: &Path, options: LoadOptions, config: LlavaConfig, spec: HrSpec) -> Result<Self> {
        // The reference builds its CLIPImageProcessor in code: CLIP mean/std, bicubic, size S.
        let s = spec.image_size;
        let pre_json = format!(r#"{{"size": {s}, "crop_size": {s}, "resample": 3}}"#);
        let pre_cfg = PreprocessorConfig::from_json_str(&pre_json)?;
        let preprocessor = ImagePreprocessor::new(pre_cfg, spec.pad_to_square)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(ModelError::MissingFile {
                path: tok_path,
                what: "the fast tokenizer (convert tokenizer.model once with transformers' AutoTokenizer)".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let layout = TensorLayout::Original;
        let weights = HrWeights::open(dir, options.dtype, &options.device)?;
        let vb = weights.vb();
        let weights_err = |e: ModelError| match e {
            ModelError::Candle(c) => ModelError::Weights(format!("{}: {c}", dir.display())),
            other => other,
        };
        let lm_head = (!config.ties_word_embeddings()).then(|| vb.pp(layout.lm_head()));
        let llama = Llama::load(vb.pp(layout.text_model()), lm_head, &config.text_config).map_err(weights_err)?;
        let tower = HrTower::load(vb.pp(layout.vision_model()), &config.vision_config, &spec).map_err(weights_err)?;
        let projector = Projector::load_named(vb.pp(layout.projector()), &config, ("0", "2")).map_err(weights_err)?;
        weights.check_all_read()?;
        Ok(Self {
            config,
            family: Family::Hr(Box::new(tower)),
            projector,
            llama,
            tokenizer,
            template: vicuna_v1()?,
            preprocessor,
            image_token: HR_IMAGE_TOKEN.to_string(),
            layout,
            options,
            dir: dir.to_path_buf(),
        })
    }

    /// The parsed config.json.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The decoder.
    pub fn llama(&self) -> &Llama {
        &self.llama
    }

    /// The tensor layout the checkpoint used.
    pub fn layout(&self) -> TensorLayout {
        self.layout
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Device and dtype the model runs with.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.config.text_config.eos_token_id.as_ref().map(|e| e.ids()).unwrap_or_default()
    }

    /// Visual tokens an image of `width` x `height` becomes (fixed for LLaVA-1.5; for NeXT it
    /// depends on the size, e.g. 1,176 at 336x336 and 2,928 at 672x672 for 336-px tiles).
    pub fn image_token_count(&self, width: u32, height: u32) -> Result<usize> {
        match &self.family {
            Family::V15(_) => Ok(self.config.image_feature_count()),
            Family::Next(_, head) => head.token_count((height, width)),
            Family::Hr(tower) => Ok(tower.token_count()),
        }
    }

    /// A typical image's visual tokens, the default `N` of an imported recipe: LLaVA-1.5's and
    /// LLaVA-HR's fixed count; for NeXT a square image of 2x2 tiles (2,928 for 336-px tiles).
    pub fn nominal_image_tokens(&self) -> usize {
        let side = 2 * self.config.vision_config.image_size as u32;
        self.image_token_count(side, side).unwrap_or_else(|_| self.config.image_feature_count())
    }

    /// Renders the chat template, checks images against placeholders, expands and tokenizes.
    pub fn prepare(&self, messages: &[ChatMessage], images: &[DynamicImage]) -> Result<PreparedPrompt> {
        let text = self.template.render(messages, true)?;
        self.prepare_rendered(text, images)
    }

    /// Like [`Self::prepare`] for an already rendered prompt containing image placeholders.
    pub fn prepare_rendered(&self, text: String, images: &[DynamicImage]) -> Result<PreparedPrompt> {
        let sizes: Vec<(u32, u32)> = images.iter().map(|i| (i.height(), i.width())).collect();
        let tokenized = self.tokenize_rendered(text, &sizes)?;
        self.prepare_tokenized(tokenized, images)
    }

    /// The prompt's tokens for images of the given (height, width), without their pixels: what
    /// a server needs to check the prompt against the context before decoding any image.
    pub fn tokenize(&self, messages: &[ChatMessage], image_sizes: &[(u32, u32)]) -> Result<TokenizedPrompt> {
        let text = self.template.render(messages, true)?;
        self.tokenize_rendered(text, image_sizes)
    }

    fn tokenize_rendered(&self, text: String, image_sizes: &[(u32, u32)]) -> Result<TokenizedPrompt> {
        let placeholders = text.matches(self.image_token.as_str()).count();
        if placeholders != image_sizes.len() {
            return Err(ModelError::InvalidInput(format!(
                "the prompt has {placeholders} image placeholders but {} images were given",
                image_sizes.len()
            )));
        }
        let counts = image_sizes.iter().map(|&(h, w)| self.image_token_count(w, h)).collect::<Result<Vec<usize>>>()?;
        let input_ids = if let Family::Hr(_) = self.family {
            tokenize_chunks(&self.tokenizer, &text, self.config.image_token_index, &counts)?
        } else {
            let expanded = expand_image_tokens_each(&text, &self.image_token, &counts);
            let encoding = self.tokenizer.encode(expanded, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            encoding.get_ids().to_vec()
        };
        let image_spans = image_spans(&input_ids, self.config.image_token_index, &counts)?;
        Ok(TokenizedPrompt { text, input_ids, image_spans, image_sizes: image_sizes.to_vec() })
    }

    /// Adds the pixels to a prompt [`Self::tokenize`]d for these images' sizes.
    pub fn prepare_tokenized(&self, prompt: TokenizedPrompt, images: &[DynamicImage]) -> Result<PreparedPrompt> {
        let sizes: Vec<(u32, u32)> = images.iter().map(|i| (i.height(), i.width())).collect();
        if sizes != prompt.image_sizes {
            return Err(ModelError::InvalidInput(format!(
                "the prompt was tokenized for images of (height, width) {:?}, but the images are {sizes:?}",
                prompt.image_sizes
            )));
        }
        let TokenizedPrompt { text, input_ids, image_spans, image_sizes } = prompt;
        let pixel_values = self.pixel_values(images)?;
        Ok(PreparedPrompt { text, input_ids, pixel_values, image_spans, image_sizes })
    }

    /// Preprocesses images into one (tiles, 3, H, W) tensor (one tile per image for LLaVA-1.5).
    pub fn pixel_values(&self, images: &[DynamicImage]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let (h, w) = self.preprocessor.output_size();
        let mut data = Vec::with_capacity(images.len() * 3 * h * w);
        for img in images {
            match &self.family {
                Family::V15(_) | Family::Hr(_) => data.extend(self.preprocessor.preprocess(img)?),
                Family::Next(_, head) => data.extend(head.tiles(&self.preprocessor, img)?),
            }
        }
        let tiles = data.len() / (3 * h * w);
        let t = Tensor::from_vec(data, (tiles, 3, h, w), &self.options.device)?;
        Ok(Some(t.to_dtype(self.options.dtype)?))
    }

    /// Token embeddings with image features in place of the image tokens: (1, tokens, hidden).
    pub fn input_embeds(&self, prompt: &PreparedPrompt) -> Result<Tensor> {
        let feats = prompt.pixel_values.as_ref().map(|p| self.image_features(p)).transpose()?;
        self.merge_features(prompt, feats)
    }

    /// [`Self::input_embeds`] for several prompts, with one vision-tower pass over all images.
    pub fn input_embeds_batch(&self, prompts: &[&PreparedPrompt]) -> Result<Vec<Tensor>> {
        let pixels: Vec<&Tensor> = prompts.iter().filter_map(|p| p.pixel_values.as_ref()).collect();
        let mut feats = if pixels.is_empty() { None } else { Some(self.image_features(&Tensor::cat(&pixels, 0)?)?) };
        let mut offset = 0;
        prompts
            .iter()
            .map(|p| {
                let own = match (&p.pixel_values, &mut feats) {
                    (Some(px), Some(all)) => {
                        let n = px.dim(0)?;
                        offset += n;
                        Some(all.narrow(0, offset - n, n)?)
                    }
                    _ => None,
                };
                self.merge_features(p, own)
            })
            .collect()
    }

    /// Projected tile features (tiles, tokens per tile, hidden) for pixels (tiles, 3, H, W).
    fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let feats = match &self.family {
            Family::V15(vision) | Family::Next(vision, _) => vision.forward(pixels)?,
            Family::Hr(tower) => tower.forward(pixels)?,
        };
        self.projector.forward(&feats)
    }

    /// Places `feats` (all of the prompt's images) at the prompt's image tokens.
    fn merge_features(&self, prompt: &PreparedPrompt, feats: Option<Tensor>) -> Result<Tensor> {
        let device = &self.options.device;
        // Image positions are looked up as id 0 and then replaced: LLaVA-HR's image id lies past
        // the vocabulary (the original code's -200 has no embedding either).
        let image_id = self.config.image_token_index;
        let lookup: Vec<u32> = prompt.input_ids.iter().map(|&t| if t == image_id { 0 } else { t }).collect();
        let ids = Tensor::new(lookup.as_slice(), device)?.unsqueeze(0)?;
        let text = self.llama.embed(&ids)?.squeeze(0)?;
        let Some(feats) = feats else {
            return Ok(text.unsqueeze(0)?);
        };
        let feats = match &self.family {
            Family::V15(_) | Family::Hr(_) => feats.flatten_to(1)?,
            Family::Next(_, head) => {
                // Split the prompt's tiles per image, then pack each image's features.
                let mut at = 0;
                let mut packed = Vec::with_capacity(prompt.image_sizes.len());
                for &size in &prompt.image_sizes {
                    let n = head.layout(size)?.tiles();
                    packed.push(head.pack(&feats.narrow(0, at, n)?, size)?);
                    at += n;
                }
                Tensor::cat(&packed, 0)?
            }
        }
        .to_dtype(text.dtype())?;
        if feats.dim(0)? != prompt.visual_tokens() {
            return Err(ModelError::InvalidInput(format!(
                "the images give {} features for {} image tokens",
                feats.dim(0)?,
                prompt.visual_tokens()
            )));
        }
        // One gather: row p takes text row p, or row (tokens + k) for the k-th image token.
        let tokens = prompt.input_ids.len() as u32;
        let mut k = 0u32;
        let index: Vec<u32> = prompt
            .input_ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                if id == self.config.image_token_index {
                    k += 1;
                    tokens + k - 1
                } else {
                    p as u32
                }
            })
            .collect();
        let all = Tensor::cat(&[&text, &feats], 0)?;
        let index = Tensor::new(index.as_slice(), device)?;
        Ok(all.index_select(&index, 0)?.unsqueeze(0)?)
    }

    /// Runs the prompt through the decoder, filling `cache`; `hook` may observe and prune.
    pub fn prefill(&self, prompt: &PreparedPrompt, cache: &mut KvCache, hook: &mut dyn DecoderHook) -> Result<Prefill> {
        let embeds = self.input_embeds(prompt)?;
        let positions: Vec<u32> = (0..prompt.input_ids.len() as u32).collect();
        let output = self.llama.forward(&embeds, &positions, cache, hook)?;
        let logits = self.llama.last_logits(&output.hidden)?.squeeze(0)?;
        Ok(Prefill { logits, output })
    }

    /// Prefills several prompts together (vision tower and each decoder layer run once for the
    /// batch); each prompt fills its own empty cache and is pruned by its own hook. Results match
    /// [`Self::prefill`] per prompt.
    pub fn prefill_batch(&self, items: &mut [PrefillItem<'_>]) -> Result<Vec<Prefill>> {
        let prompts: Vec<&PreparedPrompt> = items.iter().map(|i| i.prompt).collect();
        let embeds = self.input_embeds_batch(&prompts)?;
        let mut seqs: Vec<BatchSequence<'_>> = items
            .iter_mut()
            .zip(embeds)
            .map(|(item, embeds)| BatchSequence {
                embeds,
                positions: (0..item.prompt.input_ids.len() as u32).collect(),
                cache: &mut *item.cache,
                hook: &mut *item.hook,
            })
            .collect();
        let outputs = self.llama.forward_batch(&mut seqs)?;
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<Tensor> =
            outputs.iter().map(|o| Ok(o.hidden.narrow(1, o.positions.len() - 1, 1)?)).collect::<Result<_>>()?;
        let logits = self.llama.last_logits(&Tensor::cat(&last, 0)?)?;
        outputs.into_iter().enumerate().map(|(i, output)| Ok(Prefill { logits: logits.get(i)?, output })).collect()
    }

    /// One decode step for every sequence (token i at position i, appending to cache i) in one
    /// batched pass; returns (B, vocab) f32 logits.
    pub fn decode_batch(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.llama.decode_batch(tokens, positions, caches)
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.llama.num_layers())
    }

    /// A fresh KV cache whose layers reserve `growth` decode tokens beyond their prefill rows.
    pub fn new_cache_with_growth(&self, growth: usize) -> KvCache {
        KvCache::with_growth(self.llama.num_layers(), growth)
    }
}

/// Each image's token range: the image tokens of `ids`, in order, taken `counts[i]` at a time;
/// each image's tokens must be contiguous (adjacent images may touch).
fn image_spans(ids: &[u32], image_id: u32, counts: &[usize]) -> Result<Vec<Range<usize>>> {
    let at: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == image_id).map(|(i, _)| i).collect();
    let total: usize = counts.iter().sum();
    if at.len() != total {
        return Err(ModelError::InvalidInput(format!(
            "the tokenized prompt holds {} image tokens, but its {} images need {total}",
            at.len(),
            counts.len()
        )));
    }
    let mut spans = Vec::with_capacity(counts.len());
    let mut next = 0;
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            return Err(ModelError::InvalidInput(format!("image {i} has no visual tokens")));
        }
        let (first, last) = (at[next], at[next + n - 1]);
        if last - first + 1 != n {
            return Err(ModelError::InvalidInput(format!("image {i}'s {n} tokens are not contiguous in the prompt")));
        }
        spans.push(first..last + 1);
        next += n;
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::image_spans;

    #[test]
    fn spans_split_adjacent_images_by_their_counts() {
        let ids = [1, 9, 9, 9, 9, 9, 2, 9, 9, 3];
        assert_eq!(image_spans(&ids, 9, &[2, 3, 2]).unwrap(), vec![1..3, 3..6, 7..9]);
        // Counts that do not add up, and an image straddling text, are refused.
        assert!(image_spans(&ids, 9, &[2, 3]).is_err());
        assert!(image_spans(&ids, 9, &[4, 3]).is_err());
        assert!(image_spans(&ids, 9, &[2, 0, 5]).is_err());
    }
}
