//! The classifier's image preprocessing, on its own so that the native side
//! of `nn_bench` (crates/cli/examples) compiles this very code and does per
//! inference the work the function does per request.

/// Side of the square the model sees.
pub const SIDE: u32 = 224;
/// The shorter side is resized to this before the centre crop.
const RESIZE_SHORT: u32 = 256;
/// ImageNet's per-channel mean and deviation, in B, G, R order.
const MEAN_BGR: [f32; 3] = [0.485, 0.456, 0.406];
const STD_BGR: [f32; 3] = [0.229, 0.224, 0.225];

/// The model's input, `[1, 3, 224, 224]` row-major, channels B, G, R, as
/// the little-endian f32 bytes a wasi:nn tensor carries: written straight
/// into the tensor's bytes, not built as floats and converted after (that
/// conversion took 220 us of a request in the guest).
pub fn preprocess(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let decoded = image::load_from_memory(bytes)
        .map_err(|e| format!("the body is not a PNG or JPEG image this guest can read: {e}"))?;
    // No copy when the image is RGB already (most PNGs and every JPEG).
    let rgb = decoded.into_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    let short = w.min(h);
    let rgb = if short == RESIZE_SHORT {
        rgb
    } else {
        let scale = RESIZE_SHORT as f64 / short as f64;
        let nw = ((w as f64 * scale).round() as u32).max(RESIZE_SHORT);
        let nh = ((h as f64 * scale).round() as u32).max(RESIZE_SHORT);
        image::imageops::resize(&rgb, nw, nh, image::imageops::FilterType::Lanczos3)
    };
    let (w, h) = rgb.dimensions();
    let (left, top) = (((w - SIDE) / 2) as usize, ((h - SIDE) / 2) as usize);
    // Each channel's 256 possible values, normalised once per image rather
    // than once per pixel (the same arithmetic, so the same floats).
    let normalised: [[[u8; 4]; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| ((v as f32 / 255.0 - MEAN_BGR[c]) / STD_BGR[c]).to_le_bytes())
    });
    let side = SIDE as usize;
    let plane = side * side * 4;
    let mut tensor = vec![0u8; 3 * plane];
    let (blue, rest) = tensor.split_at_mut(plane);
    let (green, red) = rest.split_at_mut(plane);
    let stride = w as usize * 3;
    let raw = rgb.as_raw();
    for y in 0..side {
        let row = &raw[(top + y) * stride + left * 3..][..side * 3];
        let span = y * side * 4..(y + 1) * side * 4;
        // BGR: the model was trained on OpenCV's channel order.
        for (((pixel, b), g), r) in row
            .chunks_exact(3)
            .zip(blue[span.clone()].chunks_exact_mut(4))
            .zip(green[span.clone()].chunks_exact_mut(4))
            .zip(red[span].chunks_exact_mut(4))
        {
            b.copy_from_slice(&normalised[0][usize::from(pixel[2])]);
            g.copy_from_slice(&normalised[1][usize::from(pixel[1])]);
            r.copy_from_slice(&normalised[2][usize::from(pixel[0])]);
        }
    }
    Ok(tensor)
}
