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

/// The model's input, `[1, 3, 224, 224]` row-major, channels B, G, R.
pub fn preprocess(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let decoded = image::load_from_memory(bytes)
        .map_err(|e| format!("the body is not a PNG or JPEG image this guest can read: {e}"))?;
    let rgb = decoded.to_rgb8();
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
    let (left, top) = ((w - SIDE) / 2, (h - SIDE) / 2);
    let plane = (SIDE * SIDE) as usize;
    let mut input = vec![0f32; 3 * plane];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let pixel = rgb.get_pixel(left + x, top + y).0;
            // BGR: the model was trained on OpenCV's channel order.
            let bgr = [pixel[2], pixel[1], pixel[0]];
            for c in 0..3 {
                let value = (bgr[c] as f32 / 255.0 - MEAN_BGR[c]) / STD_BGR[c];
                input[c * plane + (y * SIDE + x) as usize] = value;
            }
        }
    }
    Ok(input)
}
