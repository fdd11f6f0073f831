//! The SVG plot of `usermm bench`: accesses/s against W/B, one panel per pattern,
//! one colour per system; dashed lines for cells with writes, markers by threads.

use super::util::fmt_num;
use plotters::prelude::*;
use std::path::Path;

/// One line of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Panel (pattern).
    pub panel: String,
    /// System name.
    pub system: &'static str,
    /// "wr W tN".
    pub variant: String,
    /// (W/B, accesses/s), sorted by W/B.
    pub points: Vec<(f64, f64)>,
}

fn color(system: &str) -> RGBColor {
    match system {
        "usermm" => RGBColor(0xd6, 0x27, 0x28),
        "transparent" => RGBColor(0x94, 0x67, 0xbd),
        "kernel" => RGBColor(0x1f, 0x77, 0xb4),
        "plain" => RGBColor(0x2c, 0xa0, 0x2c),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

/// Draws `series` to `path` (SVG).
pub fn draw(path: &Path, series: &[Series], budget: u64) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut panels: Vec<String> = Vec::new();
    for s in series {
        if !panels.contains(&s.panel) {
            panels.push(s.panel.clone());
        }
    }
    if panels.is_empty() {
        return Err("nothing to plot (no cell was measured)".into());
    }
    let width = 560 * panels.len() as u32;
    let root = SVGBackend::new(path, (width, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root
        .titled(
            &format!(
                "usermm bench: accesses/s against W/B (budget {} MiB). Solid: read-only, dashed: with \
                 writes; circle: 1 thread, triangle: 2+ threads",
                budget >> 20
            ),
            ("sans-serif", 18),
        )
        .map_err(|x| e(&x))?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(&panels) {
        let mine: Vec<&Series> = series.iter().filter(|s| &s.panel == panel).collect();
        let pts = mine.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            if y > 0.0 {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if y0 > y1 {
            (y0, y1) = (1.0, 10.0);
        }
        let pad = ((x1 - x0) * 0.08).max(0.1);
        let mut chart = ChartBuilder::on(area)
            .caption(panel, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            // Headroom above the highest line for the legend.
            .build_cartesian_2d(
                (x0 - pad)..(x1 + pad),
                ((y0 / 3.0)..(y1 * 40.0)).log_scale(),
            )
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("W/B (working set / budget)")
            .y_desc("accesses/s")
            .y_label_formatter(&|v| fmt_num(*v))
            .x_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(|x| e(&x))?;
        let mut labelled: Vec<&str> = Vec::new();
        for s in mine {
            let c = color(s.system);
            let dashed = !s.variant.starts_with("wr 0 ");
            let style = c.stroke_width(2);
            let pts = s.points.clone();
            let anno = if dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                    .map_err(|x| e(&x))?
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(|x| e(&x))?
            };
            // One legend entry per system (colour); the title explains the rest.
            if !labelled.contains(&s.system) {
                labelled.push(s.system);
                anno.label(s.system).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
            }
            if s.variant.ends_with(" t1") {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .map_err(|x| e(&x))?;
            } else {
                chart
                    .draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 6, c.filled())))
                    .map_err(|x| e(&x))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
