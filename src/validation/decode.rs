//! Decoding image bytes into pixels, strictly and within memory limits.
//!
//! - The format and pixel count come from the header, before anything is decoded, so a small
//!   file declaring a huge canvas is refused without allocating ([`inspect`]).
//! - Data must decode completely, as PIL's `Image.load()` requires: a truncated or corrupt file is
//!   a 400 naming the part, not a partly grey picture. JPEG decoders fill missing scan data
//!   silently, so a JPEG must also reach its end-of-image marker.
//! - EXIF orientation is applied, as transformers' `load_image` does with
//!   `PIL.ImageOps.exif_transpose`: a phone photo stored sideways with `Orientation = 6` reaches the
//!   model upright.
//! - Decoded pixels across concurrent requests are bounded by a server-wide [`DecodeBudget`]:
//!   a request reserves its images' decoded size (estimated from the headers) before decoding, and
//!   waits while others hold the budget.

use std::io::Cursor;
use std::sync::Arc;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ImageLimits, ValidationError};
use crate::protocol::ErrorCode;

/// What an image's header says, read without decoding its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// PNG, JPEG, WebP or GIF.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes the decoded pixels take (width × height × bytes per pixel of the stored colour type).
    pub decoded_bytes: u64,
    /// The EXIF orientation [`decode`] will apply.
    pub orientation: Orientation,
}

impl Header {
    /// (width, height) of the image as [`decode`] returns it: a quarter turn in the EXIF
    /// orientation swaps the stored sides, and NeXT's token count depends on which is which.
    pub fn upright_size(&self) -> (u32, u32) {
        match self.orientation {
            Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }
}

/// Reads the header of `bytes`: format, size and decoded size, checking the pixel limit.
pub fn inspect(bytes: &[u8], param: &str, limits: &ImageLimits) -> Result<Header, ValidationError> {
    let invalid = |code, message: String| ValidationError::invalid(param, code, message);
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(ErrorCode::InvalidImage, format!("unreadable image: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => f,
        Some(other) => {
            return Err(invalid(
                ErrorCode::UnsupportedImageFormat,
                format!("{other:?} images are not supported; use PNG, JPEG, WebP or GIF"),
            ))
        }
        None => return Err(invalid(ErrorCode::InvalidImage, "not a recognised image (PNG, JPEG, WebP or GIF)".into())),
    };
    let mut decoder =
        reader.into_decoder().map_err(|e| invalid(ErrorCode::InvalidImage, format!("unreadable image header: {e}")))?;
    let (w, h) = decoder.dimensions();
    // An unreadable EXIF block is treated as "no orientation", as PIL does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_pixels {
        return Err(invalid(
            ErrorCode::ImageTooManyPixels,
            format!("the image is {w}x{h} = {pixels} pixels; the limit is {}", limits.max_pixels),
        ));
    }
    let side = u64::from(w.max(h));
    if limits.pad_to_square && side * side > limits.max_pixels {
        return Err(invalid(
            ErrorCode::ImageTooManyPixels,
            format!(
                "the image is {w}x{h}; padded to a square (--pad-to-square) it would be {} pixels; the limit is {}",
                side * side,
                limits.max_pixels
            ),
        ));
    }
    let per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    Ok(Header { format, width: w, height: h, decoded_bytes: pixels * per_pixel, orientation })
}

/// Decodes an image after [`inspect`]ing it: complete data only, EXIF orientation applied.
pub fn decode(bytes: &[u8], param: &str, limits: &ImageLimits) -> Result<DynamicImage, ValidationError> {
    let header = inspect(bytes, param, limits)?;
    let corrupt = |why: String| {
        ValidationError::invalid(
            param,
            ErrorCode::InvalidImage,
            format!("the image data is truncated or corrupt: {why}"),
        )
    };
    if header.format == ImageFormat::Jpeg && !jpeg_reaches_end(bytes) {
        return Err(corrupt("the JPEG ends before its end-of-image marker".into()));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), header.format);
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(header.width);
    decode_limits.max_image_height = Some(header.height);
    // RGBA16 of the declared canvas, plus decoder scratch.
    decode_limits.max_alloc = Some(u64::from(header.width) * u64::from(header.height) * 8 + (64 << 20));
    reader.limits(decode_limits);
    let decoder = reader.into_decoder().map_err(|e| corrupt(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(e.to_string()))?;
    image.apply_orientation(header.orientation);
    Ok(image)
}

/// Whether a JPEG's entropy-coded data is followed by an end-of-image marker (`FF D9`).
///
/// Walks the marker segments up to the first start-of-scan (so an EXIF thumbnail's own `FF D9`
/// inside APP1 does not count), then looks for `FF D9` after it: inside scan data every `FF` is
/// followed by `00` or a restart marker, so the first `FF D9` there is the real end.
fn jpeg_reaches_end(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if marker == 0xDA {
            let scan = bytes.get(i + 2 + len..).unwrap_or(&[]);
            return scan.windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    false
}

/// The server-wide budget of decoded image bytes (`--max-decoded-image-mib`).
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    permits: Arc<Semaphore>,
    /// Capacity in KiB (semaphore permits are KiB so a u32 reservation covers 4 TiB).
    capacity_kib: u32,
}

impl DecodeBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: u64) -> Self {
        let capacity_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        Self { permits: Arc::new(Semaphore::new(capacity_kib as usize)), capacity_kib }
    }

    /// Waits until `bytes` of the budget are free and holds them until the permit is dropped. A
    /// request larger than the whole budget waits for all of it (it then decodes alone) rather
    /// than being refused, since every image in it passed the per-image limits.
    /// `None` only if the semaphore were closed, which nothing does.
    pub async fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.capacity_kib);
        self.permits.clone().acquire_many_owned(kib).await.ok()
    }

    /// KiB free now (for tests and metrics).
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_limit_reads_the_header_only() {
        // A PNG header declaring 100000 x 100000 pixels with no image data at all.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32fast::hash(&png[12..]);
        png.extend_from_slice(&crc.to_be_bytes());
        // An empty IDAT and IEND: the decoder stops reading the header at the first IDAT.
        for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
            png.extend_from_slice(&0u32.to_be_bytes());
            png.extend_from_slice(chunk);
            png.extend_from_slice(&crc32fast::hash(chunk).to_be_bytes());
        }
        let e = decode(&png, "p", &ImageLimits::default()).unwrap_err();
        assert!(matches!(e, ValidationError::Invalid { code: ErrorCode::ImageTooManyPixels, .. }), "{e:?}");
        // A 400 x 10 strip is fine as is but not padded to a 400 x 400 square.
        let mut strip = Cursor::new(Vec::new());
        image::RgbImage::new(400, 10).write_to(&mut strip, ImageFormat::Png).unwrap();
        let limits = ImageLimits { max_pixels: 100_000, ..Default::default() };
        assert!(decode(strip.get_ref(), "p", &limits).is_ok());
        let e = decode(strip.get_ref(), "p", &ImageLimits { pad_to_square: true, ..limits }).unwrap_err();
        assert!(e.to_string().contains("square"), "{e}");
        let e = decode(b"hello", "p", &ImageLimits::default()).unwrap_err();
        assert!(matches!(e, ValidationError::Invalid { code: ErrorCode::InvalidImage, .. }), "{e:?}");
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x * y) % 256) as u8])
        }))
    }

    #[test]
    fn truncated_images_of_every_format_are_refused_naming_the_part() {
        let limits = ImageLimits::default();
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Gif, ImageFormat::WebP] {
            let whole = encode(&gradient(64, 48), format);
            assert!(decode(&whole, "p", &limits).is_ok(), "{format:?}");
            let half = &whole[..whole.len() / 2];
            let e = decode(half, "messages[0].content[0].image_url.url", &limits).unwrap_err();
            assert!(
                matches!(&e, ValidationError::Invalid { code: ErrorCode::InvalidImage, param, .. }
                    if param == "messages[0].content[0].image_url.url"),
                "{format:?}: {e:?}"
            );
        }
        // Garbage after a complete JPEG (some cameras append data) is accepted, as PIL does.
        let mut padded = encode(&gradient(16, 16), ImageFormat::Jpeg);
        padded.extend_from_slice(b"trailing");
        assert!(decode(&padded, "p", &limits).is_ok());
    }

    /// A JPEG with an EXIF APP1 segment holding only an Orientation tag.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec(); // big-endian TIFF, IFD at 8, 1 entry
        tiff.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]); // Orientation, SHORT, count 1
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_like_exif_transpose() {
        let jpeg = encode(&gradient(40, 20), ImageFormat::Jpeg);
        let limits = ImageLimits::default();
        let plain = decode(&jpeg, "p", &limits).unwrap();
        assert_eq!((plain.width(), plain.height()), (40, 20));
        // 6 = "rotate 90 CW to view": the decoded image is upright, so 20 wide and 40 high.
        let rotated = decode(&with_orientation(&jpeg, 6), "p", &limits).unwrap();
        assert_eq!((rotated.width(), rotated.height()), (20, 40));
        // The header alone already gives the upright size (the context check counts tokens from it).
        assert_eq!(inspect(&with_orientation(&jpeg, 6), "p", &limits).unwrap().upright_size(), (20, 40));
        assert_eq!(inspect(&with_orientation(&jpeg, 3), "p", &limits).unwrap().upright_size(), (40, 20));
        assert_eq!(rotated.to_rgb8(), plain.rotate90().to_rgb8());
        // 1 = as stored.
        assert_eq!(decode(&with_orientation(&jpeg, 1), "p", &limits).unwrap().to_rgb8(), plain.to_rgb8());
    }

    #[test]
    fn headers_give_the_decoded_size_and_the_budget_makes_requests_wait() {
        let png16 = encode(&DynamicImage::ImageRgba16(image::ImageBuffer::new(10, 10)), ImageFormat::Png);
        assert_eq!(inspect(&png16, "p", &ImageLimits::default()).unwrap().decoded_bytes, 800);
        let rgb = encode(&gradient(10, 10), ImageFormat::Png);
        assert_eq!(inspect(&rgb, "p", &ImageLimits::default()).unwrap().decoded_bytes, 300);

        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let budget = DecodeBudget::new(10 << 10);
            let first = budget.reserve(8 << 10).await.unwrap();
            assert_eq!(budget.available_kib(), 2);
            // A second 8 KiB reservation waits until the first is released.
            let waiting = budget.reserve(8 << 10);
            futures::pin_mut!(waiting);
            assert!(futures::poll!(&mut waiting).is_pending());
            drop(first);
            let second = waiting.await.unwrap();
            drop(second);
            // More than the whole budget takes all of it instead of waiting forever.
            let all = budget.reserve(1 << 40).await.unwrap();
            assert_eq!(budget.available_kib(), 0);
            drop(all);
            assert_eq!(budget.available_kib(), 10);
        });
    }
}
