//! Throughput across the update as a PNG: one line per variant, each run's time axis shifted so
//! its `update-start` mark is at 0. Text uses DejaVu Sans embedded in the binary (plotters'
//! `ab_glyph` feature), so no fontconfig or freetype is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::Error;
use crate::report::{Variant, aligned_series};

/// The mark each variant's time axis is aligned on.
pub const ALIGN_MARK: &str = "update-start";

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 720;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // DejaVu Sans parses; a failure would only leave the text out.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Draws throughput (answers/s per bucket) over time (s, 0 = each variant's `update-start`) for
/// every variant into the PNG at `path`.
pub fn plot(path: &Path, title: &str, variants: &[Variant]) -> Result<(), Error> {
    register_font();
    let err = |message: String| Error::Plot {
        path: path.to_owned(),
        message,
    };
    let series: Vec<(String, Vec<(f64, f64)>)> = variants
        .iter()
        .map(|v| (v.name.clone(), aligned_series(v, ALIGN_MARK)))
        .collect();
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() || x1 <= x0 {
        (x0, x1) = (0.0, 1.0);
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(format!("time since {ALIGN_MARK} (s)"))
        .y_desc("throughput (answers/s)")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    // The update's start.
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (0.0, y1)],
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Kind;
    use crate::timeline::tests::synthetic;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        let a = synthetic(
            8_000,
            5,
            &[(4_000, 5_500)],
            |_| 1.0,
            &[("update-start", 3_900)],
        );
        let b = synthetic(
            9_000,
            5,
            &[(6_000, 6_800)],
            |_| 0.8,
            &[("update-start", 5_800)],
        );
        plot(
            &path,
            "memcached, 10 MiB",
            &[
                Variant::new("kup", Kind::Kup, 1, a),
                Variant::new("switch", Kind::Switch, 1, b),
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        // Text was drawn: with an embedded font, the image is far from blank.
        assert!(bytes.len() > 10_000, "{}", bytes.len());
        // No variants at all still makes a (blank) chart.
        plot(&dir.path().join("empty.png"), "nothing", &[]).unwrap();
    }
}
