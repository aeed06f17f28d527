//! PNG images of mandelbrot results: the kernel's little-endian u32 iteration counts,
//! one per pixel in row-major order, coloured with a smooth palette.

use anyhow::Context as _;

/// Encode iteration counts as an RGB PNG. Points that never escaped (`count >=
/// max_iter`) are black; the others run from dark blue through yellow to orange.
pub fn mandelbrot_png(
    counts: &[u8],
    width: u32,
    height: u32,
    max_iter: u32,
) -> anyhow::Result<Vec<u8>> {
    let pixels = width as u64 * height as u64;
    if counts.len() as u64 != pixels * 4 {
        anyhow::bail!(
            "the output is {} bytes, but a {width}x{height} image needs {} (one u32 per pixel)",
            counts.len(),
            pixels * 4
        );
    }
    let max_iter = max_iter.max(1);
    let mut rgb = Vec::with_capacity(pixels as usize * 3);
    for c in counts.chunks_exact(4) {
        let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        rgb.extend_from_slice(&colour(i, max_iter));
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("cannot write the PNG header")?;
        writer
            .write_image_data(&rgb)
            .context("cannot encode the PNG image")?;
        writer.finish().context("cannot finish the PNG image")?;
    }
    Ok(out)
}

/// The colour of one escape count (Bernstein polynomials over the normalised count).
fn colour(i: u32, max_iter: u32) -> [u8; 3] {
    if i >= max_iter {
        return [0, 0, 0];
    }
    let t = i as f64 / max_iter as f64;
    let u = 1.0 - t;
    let to_u8 = |x: f64| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [
        to_u8(9.0 * u * t * t * t),
        to_u8(15.0 * u * u * t * t),
        to_u8(8.5 * u * u * u * t),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_declared_dimensions() {
        let (w, h, max_iter) = (7u32, 3u32, 20u32);
        let counts: Vec<u8> = (0..w * h)
            .flat_map(|i| (i % (max_iter + 1)).to_le_bytes())
            .collect();
        let png_bytes = mandelbrot_png(&counts, w, h, max_iter).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
    }

    #[test]
    fn refuses_a_size_mismatch() {
        let e = mandelbrot_png(&[0u8; 12], 2, 2, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 16"), "{e}");
    }

    #[test]
    fn the_set_is_black_and_the_outside_is_not() {
        assert_eq!(colour(50, 50), [0, 0, 0]);
        assert_ne!(colour(10, 50), [0, 0, 0]);
    }
}
