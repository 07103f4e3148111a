//! A minimal line chart as PNG: series of (x, y) points with y in percent, axes, grid lines
//! at every 25 %, and a dashed threshold line. No text (labels go in the accompanying
//! table): a plotting crate with text rendering needs system fonts these machines lack.

const W: usize = 720;
const H: usize = 360;
const MARGIN: usize = 30;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3], dash: usize) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            if dash > 0 && (s as usize / dash) % 2 == 1 {
                continue;
            }
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            self.set(x, y, rgb);
            self.set(x, y + 1, rgb);
        }
    }
}

/// One series: points (x, y %) and its colour.
pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub rgb: [u8; 3],
}

/// Renders `series` (y from 0 to 100 %) over x in [0, x_max] with a dashed line at
/// `threshold` percent.
pub fn percent_chart(
    series: &[Series<'_>],
    x_max: f64,
    threshold: f64,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut c = Canvas::new();
    let (left, right, top, bottom) = (
        MARGIN as i64,
        (W - MARGIN) as i64,
        MARGIN as i64,
        (H - MARGIN) as i64,
    );
    let to_px = |x: f64, y: f64| {
        let fx = if x_max > 0.0 {
            (x / x_max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let fy = (y / 100.0).clamp(0.0, 1.0);
        (
            left + ((right - left) as f64 * fx) as i64,
            bottom - ((bottom - top) as f64 * fy) as i64,
        )
    };
    for g in [25.0, 50.0, 75.0, 100.0] {
        c.line(to_px(0.0, g), to_px(x_max, g), [220, 220, 220], 0);
    }
    c.line(
        to_px(0.0, threshold),
        to_px(x_max, threshold),
        [200, 40, 40],
        6,
    );
    c.line((left, top), (left, bottom), [0, 0, 0], 0);
    c.line((left, bottom), (right, bottom), [0, 0, 0], 0);
    for s in series {
        for w in s.points.windows(2) {
            c.line(to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1), s.rgb, 0);
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&c.px)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_a_png() {
        let pts = [(0.0, 0.0), (50.0, 60.0), (100.0, 100.0)];
        let png = super::percent_chart(
            &[super::Series {
                points: &pts,
                rgb: [0, 0, 255],
            }],
            100.0,
            95.0,
        )
        .unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
