//! Tests for `preprocess`: parity with transformers on committed fixtures, config parsing.

use super::*;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    procedural: Vec<Procedural>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    image: String,
    pad_to_square: bool,
    config: Value,
    resized: Option<Resized>,
    pixel_values: Pixels,
}

#[derive(Deserialize)]
struct Resized {
    height: u32,
    width: u32,
    hex: String,
}

#[derive(Deserialize)]
struct Pixels {
    shape: Vec<usize>,
    f32_hex: String,
}

#[derive(Deserialize)]
struct Procedural {
    name: String,
    width: u32,
    height: u32,
    config: Value,
    pad_to_square: bool,
    resized_height: u32,
    resized_width: u32,
    resized_fnv1a64: String,
    shape: Vec<usize>,
    sum: f64,
    sample_indices: Vec<usize>,
    sample_f32_hex: String,
}

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

fn f32s(hex: &str) -> Vec<f32> {
    let bytes = unhex(hex);
    bytes.chunks_exact(4).map(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// Mirrors `procedural()` in tests/reference/preprocess_reference.py.
fn procedural_image(width: u32, height: u32) -> DynamicImage {
    let img = RgbImage::from_fn(width, height, |x, y| {
        let (x, y) = (u64::from(x), u64::from(y));
        image::Rgb([0u64, 1, 2].map(|c| ((x * x * 3 + y * 5 + x * y + c * 71 + ((x ^ y) & 31) * 4) % 256) as u8))
    });
    DynamicImage::ImageRgb8(img)
}

fn preprocessor(config: &Value, pad_to_square: bool) -> ImagePreprocessor {
    let cfg = PreprocessorConfig::from_json_str(&config.to_string()).unwrap();
    ImagePreprocessor::new(cfg, pad_to_square).unwrap()
}

/// The whole PIL-resize stage, which `preprocess` itself only computes inside the crop.
fn full_resize(pre: &ImagePreprocessor, img: &DynamicImage) -> RgbImage {
    let rgb = pre.to_rgb(img);
    let (h, w) = pre.resized_size(&rgb);
    resample::resize(&rgb, w, h, pre.cfg.resample)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn matches_transformers_on_fixture_images() {
    let fixture = fixture();
    assert!(fixture.cases.len() >= 15);
    for case in &fixture.cases {
        let pre = preprocessor(&case.config, case.pad_to_square);
        let img = image::open(fixture_dir().join(&case.image)).unwrap();
        if let Some(expected) = &case.resized {
            let resized = full_resize(&pre, &img);
            assert_eq!(resized.dimensions(), (expected.width, expected.height), "{}", case.name);
            assert!(resized.as_raw() == &unhex(&expected.hex), "{}: PIL resize differs", case.name);
        }
        let shape = &case.pixel_values.shape;
        assert_eq!(pre.output_size(), (shape[1], shape[2]), "{}", case.name);
        let out = pre.preprocess(&img).unwrap();
        let diff = max_abs_diff(&out, &f32s(&case.pixel_values.f32_hex));
        assert!(diff <= 1e-6, "{}: max abs diff {diff}", case.name);
    }
}

#[test]
fn matches_transformers_at_llava_scale() {
    for case in &fixture().procedural {
        let pre = preprocessor(&case.config, case.pad_to_square);
        let img = procedural_image(case.width, case.height);
        let resized = full_resize(&pre, &img);
        assert_eq!(resized.dimensions(), (case.resized_width, case.resized_height));
        assert_eq!(fnv1a64(resized.as_raw()), case.resized_fnv1a64, "{}", case.name);
        let out = pre.preprocess(&img).unwrap();
        assert_eq!(out.len(), case.shape.iter().product::<usize>(), "{}", case.name);
        let sampled: Vec<f32> = case.sample_indices.iter().map(|&i| out[i]).collect();
        let diff = max_abs_diff(&sampled, &f32s(&case.sample_f32_hex));
        assert!(diff <= 1e-6, "{}: max abs diff {diff}", case.name);
        let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - case.sum).abs() < 1e-3, "{}: sum {sum} vs {}", case.name, case.sum);
    }
}

#[test]
fn missing_fields_take_transformers_defaults() {
    let cfg = PreprocessorConfig::from_json_str("{}").unwrap();
    assert_eq!(cfg.size, ResizeTarget::ShortestEdge(224));
    assert_eq!(cfg.crop_size, CropSize { height: 224, width: 224 });
    assert_eq!(cfg.resample, Filter::Bicubic);
    assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
    // Python writes 1/255 as 0.00392156862745098; it must parse back to the same f64.
    let written = PreprocessorConfig::from_json_str(r#"{"rescale_factor": 0.00392156862745098}"#);
    assert_eq!(written.unwrap().rescale_factor, 1.0 / 255.0);
    assert_eq!((cfg.image_mean, cfg.image_std), (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD));
    assert!(cfg.do_resize && cfg.do_center_crop && cfg.do_rescale && cfg.do_normalize);
    assert!(cfg.do_convert_rgb && !cfg.do_pad);
    let pre = ImagePreprocessor::new(cfg, false).unwrap();
    assert_eq!(pre.output_size(), (224, 224));
}

#[test]
fn sizes_accept_ints_lists_and_dicts() {
    let parse = |s: &str| PreprocessorConfig::from_json_str(s).unwrap();
    let legacy = parse(r#"{"size": 336, "crop_size": 336}"#);
    assert_eq!(legacy.size, ResizeTarget::ShortestEdge(336));
    assert_eq!(legacy.crop_size, CropSize { height: 336, width: 336 });
    let dicts = parse(r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 300, "width": 320}}"#);
    assert_eq!(dicts.size, ResizeTarget::ShortestEdge(336));
    assert_eq!(dicts.crop_size, CropSize { height: 300, width: 320 });
    let exact = parse(r#"{"size": {"height": 10, "width": 20}, "crop_size": [7, 9]}"#);
    assert_eq!(exact.size, ResizeTarget::Exact { height: 10, width: 20 });
    assert_eq!(exact.crop_size, CropSize { height: 7, width: 9 });
    let scalar = parse(r#"{"image_mean": 0.5, "image_std": [1, 2, 3], "resample": 2}"#);
    assert_eq!((scalar.image_mean, scalar.image_std), ([0.5; 3], [1.0, 2.0, 3.0]));
    assert_eq!(scalar.resample, Filter::Bilinear);
    assert_eq!(resize_output_size(23, 37, ResizeTarget::ShortestEdge(16)), (16, 25));
    assert_eq!(resize_output_size(80, 50, ResizeTarget::ShortestEdge(16)), (25, 16));
}

#[test]
fn errors_name_the_offending_field() {
    let field = |s: &str| match PreprocessorConfig::from_json_str(s) {
        Err(PreprocessError::Config { field, message }) => format!("{field}: {message}"),
        other => panic!("expected a config error, got {other:?}"),
    };
    assert!(field(r#"{"resample": 7}"#).starts_with("resample: unsupported PIL resampling filter 7"));
    assert!(field(r#"{"size": {"longest_edge": 5}}"#).starts_with("size: "));
    assert!(field(r#"{"crop_size": 0}"#).starts_with("crop_size: expected a positive integer"));
    assert!(field(r#"{"image_mean": [0.1, 0.2]}"#).starts_with("image_mean: "));
    assert!(field(r#"{"image_std": [0.1, 0, 0.2]}"#).starts_with("image_std: must not contain 0"));
    assert!(field(r#"{"do_resize": "yes"}"#).starts_with("do_resize: invalid type"));
    let err = PreprocessorConfig::from_json_str(r#"{"resample": 9}"#).unwrap_err();
    assert!(err.to_string().contains("`resample`"), "{err}");
    let cfg = PreprocessorConfig::from_json_str(r#"{"do_center_crop": false}"#).unwrap();
    let err = ImagePreprocessor::new(cfg, false).unwrap_err();
    assert!(err.to_string().contains("`do_center_crop`"), "{err}");
}

#[test]
fn pad_to_square_centres_on_the_mean_colour() {
    // 5x2 landscape: rows 1..3 of a 5x5 canvas, like expand2square's (w - h) // 2.
    let img = RgbImage::from_pixel(5, 2, image::Rgb([1, 2, 3]));
    let colour = PreprocessorConfig::default().image_mean.map(|m| (m * 255.0) as u8);
    assert_eq!(colour, [122, 116, 104]);
    let sq = expand_to_square(&img, colour);
    assert_eq!(sq.dimensions(), (5, 5));
    let rows: Vec<bool> = (0..5).map(|y| sq.get_pixel(0, y).0 == [1, 2, 3]).collect();
    assert_eq!(rows, [false, true, true, false, false]);
    assert_eq!(sq.get_pixel(4, 4).0, colour);
    // 2x7 portrait: columns 2..4 of a 7x7 canvas.
    let tall = expand_to_square(&RgbImage::from_pixel(2, 7, image::Rgb([9, 9, 9])), colour);
    let cols: Vec<bool> = (0..7).map(|x| tall.get_pixel(x, 3).0 == [9, 9, 9]).collect();
    assert_eq!(cols, [false, false, true, true, false, false, false]);
    // The option and the config's `do_pad` both switch it on.
    let pre = ImagePreprocessor::new(PreprocessorConfig::default(), true).unwrap();
    assert_eq!(pre.pad_colour, Some(colour));
    let cfg = PreprocessorConfig::from_json_str(r#"{"do_pad": true}"#).unwrap();
    assert_eq!(ImagePreprocessor::new(cfg, false).unwrap().pad_colour, Some(colour));
}

#[test]
fn extreme_aspect_ratios_only_resample_the_crop() {
    // 2x6000 would resize to 336x1008000 (1 GB); only the 336x336 crop is computed.
    let cfg = PreprocessorConfig::from_json_str(r#"{"size": 336, "crop_size": 336}"#).unwrap();
    let pre = ImagePreprocessor::new(cfg, false).unwrap();
    let img =
        DynamicImage::ImageRgb8(RgbImage::from_fn(2, 6000, |x, y| image::Rgb([(y % 256) as u8, (x * 200) as u8, 7])));
    assert_eq!(pre.preprocess(&img).unwrap().len(), 3 * 336 * 336);
}

#[test]
fn empty_images_are_rejected() {
    let pre = ImagePreprocessor::new(PreprocessorConfig::default(), false).unwrap();
    let err = pre.preprocess(&DynamicImage::new_rgb8(0, 4)).unwrap_err();
    assert!(matches!(err, PreprocessError::EmptyImage { width: 0, height: 4 }));
}
