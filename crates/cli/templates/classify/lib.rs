//! `{{name}}`: an image classifier on wasi:nn.
//!
//! `POST /{{name}}` with a PNG or JPEG body answers JSON with the model's
//! top classes and every score. The image is prepared here, in the
//! function, the way the model was trained; the node runs the model itself
//! (loaded once per node, shared by every instance) through `wasi:nn`.
//!
//! The preparation suits the PP-LCNet document-orientation classifier
//! (`mayfly model put orientation …`, see README.md): shorter side resized
//! to 256, centre crop 224×224, channels B, G, R, ImageNet normalisation,
//! laid out `[1, 3, 224, 224]`. For another model, change [`prepare`], the
//! input name in [`INPUT`] and the `LABELS` in `mayfly.toml`.
//!
//! The logic is plain Rust, so `cargo test` checks it on your machine with a
//! stand-in for the model; `wasi_http.rs` connects it to wasi:http and
//! `nn.rs` to wasi:nn.

mod wasi_http;

#[cfg(target_arch = "wasm32")]
mod nn;

pub use wasi_http::{Request, Response};

/// Side of the square the model sees.
const SIDE: u32 = 224;
/// The shorter side is resized to this before the centre crop.
const RESIZE_SHORT: u32 = 256;
/// ImageNet's per-channel mean and deviation, in B, G, R order.
const MEAN_BGR: [f32; 3] = [0.485, 0.456, 0.406];
const STD_BGR: [f32; 3] = [0.229, 0.224, 0.225];
/// The model's input tensor name.
pub const INPUT: &str = "x";
/// How many classes the answer lists first.
const TOP: usize = 3;

/// Runs a model: the input tensor (`[1, 3, SIDE, SIDE]`) in, its scores out.
pub type Infer<'a> = &'a dyn Fn(&[u32], &[f32]) -> Result<Vec<f32>, String>;

/// Answers one request.
pub fn handle(request: &Request) -> Response {
    #[cfg(target_arch = "wasm32")]
    let infer: Infer = &|dims, input| nn::infer(&model(), INPUT, dims, input);
    #[cfg(not(target_arch = "wasm32"))]
    let infer: Infer = &|_, _| Err("wasi:nn runs only inside the WebAssembly component".into());
    classify(request, infer)
}

/// The request's answer, given the model as `infer`.
pub fn classify(request: &Request, infer: Infer) -> Response {
    if request.method != "POST" {
        return Response::text(405, "POST a PNG or JPEG image\n");
    }
    let input = match prepare(&request.body) {
        Ok(input) => input,
        Err(message) => return json_error(400, &message),
    };
    let scores = match infer(&[1, 3, SIDE, SIDE], &input) {
        Ok(scores) => scores,
        Err(message) => return json_error(500, &message),
    };
    let labels = labels();
    println!(
        "classified {} bytes: top class {}",
        request.body.len(),
        top(&scores, 1)
            .first()
            .map_or("none", |i| label(&labels, *i))
    );
    let top: Vec<String> = top(&scores, TOP)
        .into_iter()
        .map(|i| {
            format!(
                "{{\"class\":{i},\"label\":{},\"score\":{}}}",
                quote(label(&labels, i)),
                scores[i]
            )
        })
        .collect();
    let all: Vec<String> = scores.iter().map(f32::to_string).collect();
    Response {
        status: 200,
        content_type: Some("application/json".into()),
        body: format!(
            "{{\"model\":{},\"top\":[{}],\"scores\":[{}]}}\n",
            quote(&model()),
            top.join(","),
            all.join(",")
        )
        .into_bytes(),
    }
}

/// The model to run: `MODEL` in `mayfly.toml`'s env, granted under
/// `grants.models`.
fn model() -> String {
    std::env::var("MODEL").unwrap_or_else(|_| "orientation".into())
}

/// The class names, in the model's output order (`LABELS`, comma-separated).
fn labels() -> Vec<String> {
    std::env::var("LABELS")
        .unwrap_or_else(|_| "0,90,180,270".into())
        .split(',')
        .map(|label| label.trim().to_string())
        .collect()
}

fn label(labels: &[String], class: usize) -> &str {
    labels.get(class).map_or("?", String::as_str)
}

/// The indices of the `n` highest scores, highest first.
fn top(scores: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    order.truncate(n);
    order
}

/// Decodes `image` and lays it out as the model's input: `[1, 3, 224, 224]`
/// row-major, channels B, G, R, normalised.
pub fn prepare(image: &[u8]) -> Result<Vec<f32>, String> {
    let decoded = image::load_from_memory(image)
        .map_err(|e| format!("the body is not a PNG or JPEG image: {e}"))?;
    let rgb = decoded.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w < 1 || h < 1 {
        return Err("the image is empty".into());
    }
    let short = w.min(h);
    let rgb = if short == RESIZE_SHORT {
        rgb
    } else {
        let scale = f64::from(RESIZE_SHORT) / f64::from(short);
        let nw = ((f64::from(w) * scale).round() as u32).max(RESIZE_SHORT);
        let nh = ((f64::from(h) * scale).round() as u32).max(RESIZE_SHORT);
        image::imageops::resize(&rgb, nw, nh, image::imageops::FilterType::Lanczos3)
    };
    let (w, h) = rgb.dimensions();
    let (left, top) = ((w - SIDE) / 2, (h - SIDE) / 2);
    let plane = (SIDE * SIDE) as usize;
    let mut input = vec![0f32; 3 * plane];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let [r, g, b] = rgb.get_pixel(left + x, top + y).0;
            for (c, value) in [b, g, r].into_iter().enumerate() {
                input[c * plane + (y * SIDE + x) as usize] =
                    (f32::from(value) / 255.0 - MEAN_BGR[c]) / STD_BGR[c];
            }
        }
    }
    Ok(input)
}

fn json_error(status: u16, message: &str) -> Response {
    Response {
        status,
        content_type: Some("application/json".into()),
        body: format!("{{\"error\":{}}}\n", quote(message)).into_bytes(),
    }
}

/// `text` as a JSON string.
fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `w`×`h` pixels, white with a black left half.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) }
        });
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    fn post(body: Vec<u8>) -> Request {
        Request {
            method: "POST".into(),
            path: "/{{name}}".into(),
            headers: vec![("content-type".into(), b"image/png".to_vec())],
            body,
        }
    }

    #[test]
    fn prepare_lays_out_normalised_bgr_planes() {
        let input = prepare(&png(512, 300)).unwrap();
        let plane = (SIDE * SIDE) as usize;
        assert_eq!(input.len(), 3 * plane);
        // The left edge is black, the right edge white, in every channel.
        for c in 0..3 {
            let black = input[c * plane];
            let white = input[c * plane + SIDE as usize - 1];
            assert!((black - (0.0 - MEAN_BGR[c]) / STD_BGR[c]).abs() < 1e-3);
            assert!((white - (1.0 - MEAN_BGR[c]) / STD_BGR[c]).abs() < 1e-3);
        }
    }

    #[test]
    fn the_answer_lists_the_top_classes_by_score() {
        let response = classify(&post(png(256, 256)), &|dims, input| {
            assert_eq!(dims, [1, 3, SIDE, SIDE]);
            assert_eq!(input.len(), 3 * (SIDE * SIDE) as usize);
            Ok(vec![0.1, 0.6, 0.05, 0.25])
        });
        assert_eq!(response.status, 200);
        let body = String::from_utf8(response.body).unwrap();
        assert!(
            body.contains(r#""top":[{"class":1,"label":"90","score":0.6},{"class":3,"label":"270""#),
            "{body}"
        );
    }

    #[test]
    fn bad_requests_and_model_errors_are_explained() {
        let never: Infer = &|_, _| panic!("no model call for a bad request");
        let response = classify(&post(b"not an image".to_vec()), never);
        assert_eq!(response.status, 400);
        assert!(String::from_utf8_lossy(&response.body).contains("not a PNG or JPEG"));
        let get = Request { method: "GET".into(), ..post(Vec::new()) };
        assert_eq!(classify(&get, never).status, 405);
        let failed = classify(&post(png(256, 256)), &|_, _| Err("no grant".into()));
        assert_eq!(failed.status, 500);
        assert!(String::from_utf8_lossy(&failed.body).contains("no grant"));
    }
}
