//! `inspect --plot`: the picture that explains SmoothQuant, drawn to a PNG with plotters.
//!
//! Top: the per-channel `max|x|` of one Linear input before and after smoothing (a few channels
//! towering over the rest, then flattened). Bottom: the max/median channel ratio of every
//! distinct Linear input of every layer, before (pale) and after (solid) smoothing, on a log
//! scale. Text is drawn with an embedded DejaVu Sans subset (`assets/fonts`), so no system font
//! or C library is needed.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const WIDTH: u32 = 1600;
const HEIGHT: u32 = 1150;

/// Colors of the input kinds of a layer (tab10-like, readable on white).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One distinct Linear input of a layer (Linears reading the same tensor share one).
#[derive(Clone, Debug)]
pub struct InputRatio {
    pub layer: usize,
    /// Which input of the layer: the Linears reading it, without the layer prefix
    /// (`q_proj, k_proj, v_proj`).
    pub kind: String,
    pub before: f32,
    pub after: f32,
}

/// Everything the figure shows.
pub struct PlotData<'a> {
    pub model: &'a str,
    pub alpha: &'a str,
    pub calibration: &'a str,
    pub linear: &'a str,
    pub before: &'a [f32],
    pub after: &'a [f32],
    pub inputs: &'a [InputRatio],
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded plot font cannot be read (a bug)"));
    });
    result
}

fn median(v: &[f32]) -> f32 {
    let mut s: Vec<f32> = v.to_vec();
    s.sort_by(f32::total_cmp);
    if s.is_empty() {
        0.0
    } else {
        s[s.len() / 2]
    }
}

fn ratio(v: &[f32]) -> f32 {
    let m = median(v);
    let max = v.iter().copied().fold(0.0f32, f32::max);
    if m > 0.0 {
        max / m
    } else {
        f32::INFINITY
    }
}

/// Check `--plot` before any work: a `.png` name in an existing directory.
pub fn check_path(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if ext.as_deref() != Some("png") {
        anyhow::bail!(
            "--plot {}: the plot is written as PNG; give a file name ending in .png",
            path.display()
        );
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            anyhow::bail!(
                "--plot {}: the directory {} does not exist; create it or choose another path",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Draw the figure to `path` (PNG).
pub fn draw(path: &Path, data: &PlotData<'_>) -> Result<()> {
    register_font()?;
    let result = draw_inner(path, data).map_err(|e| anyhow!("{e}"));
    result.with_context(|| format!("cannot draw the plot to {}", path.display()))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw_inner(path: &Path, d: &PlotData<'_>) -> DrawResult {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.margin(10, 10, 16, 16);
    let (title, body) = root.split_vertically(64);
    title.draw(&Text::new(
        format!("SmoothQuant on {}", d.model),
        (0, 0),
        ("sans-serif", 30).into_font().color(&BLACK),
    ))?;
    title.draw(&Text::new(
        format!(
            "top: per-channel max|x| of the input of {} (calibration: {}); smoothed with \u{3b1} = {}",
            d.linear, d.calibration, d.alpha
        ),
        (0, 36),
        ("sans-serif", 20).into_font().color(&RGBColor(80, 80, 80)),
    ))?;
    let (top, bottom) = body.split_vertically(480);
    let (left, right) = top.split_horizontally((WIDTH - 32) / 2);
    channel_panel(&left, "before smoothing", d.before, PALETTE[3])?;
    channel_panel(&right, "after smoothing (X / s)", d.after, PALETTE[0])?;
    ratio_panel(&bottom.margin(16, 0, 0, 0), d.inputs)?;
    root.present()?;
    Ok(())
}

fn channel_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    what: &str,
    values: &[f32],
    color: RGBColor,
) -> DrawResult {
    let n = values.len().max(1);
    let max = values.iter().copied().fold(0.0f32, f32::max).max(1e-6) as f64;
    let med = median(values) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{what}: max/median = {:.1}", ratio(values)),
            ("sans-serif", 22),
        )
        .margin(8)
        .x_label_area_size(48)
        .y_label_area_size(76)
        .build_cartesian_2d(0f64..n as f64, 0f64..max * 1.08)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("input channel")
        .y_desc("max |x| over calibration tokens")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format_value(*y))
        .draw()?;
    chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
        Rectangle::new(
            [(i as f64, 0.0), (i as f64 + 1.0, v as f64)],
            color.filled(),
        )
    }))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, med), (n as f64, med)],
            ShapeStyle::from(&BLACK).stroke_width(2),
        ))?
        .label(format!("median channel = {}", format_value(med)))
        .legend(|(x, y)| {
            PathElement::new(
                [(x, y), (x + 20, y)],
                ShapeStyle::from(&BLACK).stroke_width(2),
            )
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

/// A tick or legend value with at most 3 significant decimals and no trailing zeros.
fn format_value(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn ratio_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    inputs: &[InputRatio],
) -> DrawResult {
    let mut kinds: Vec<&str> = Vec::new();
    for i in inputs {
        if !kinds.contains(&i.kind.as_str()) {
            kinds.push(&i.kind);
        }
    }
    let layers = inputs.iter().map(|i| i.layer + 1).max().unwrap_or(1);
    let finite = |v: f32| if v.is_finite() { v as f64 } else { 1.0 };
    let top = inputs
        .iter()
        .map(|i| finite(i.before).max(finite(i.after)))
        .fold(2.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "outlier ratio (max/median channel range) of every Linear input: pale = before smoothing, solid = after",
            ("sans-serif", 22),
        )
        .margin(8)
        .x_label_area_size(48)
        .y_label_area_size(76)
        .build_cartesian_2d(-0.5f64..layers as f64 - 0.5, (1f64..top * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("decoder layer")
        .y_desc("max / median channel range (log scale)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .x_labels(layers.min(40))
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let k = kinds.len().max(1) as f64;
    let slot = 0.84 / k;
    for (ki, kind) in kinds.iter().enumerate() {
        let color = PALETTE[ki % PALETTE.len()];
        let x0 = |layer: usize| layer as f64 - 0.42 + ki as f64 * slot;
        let rows: Vec<&InputRatio> = inputs.iter().filter(|i| i.kind == *kind).collect();
        chart.draw_series(rows.iter().map(|i| {
            Rectangle::new(
                [
                    (x0(i.layer), 1.0),
                    (x0(i.layer) + slot * 0.92, finite(i.before)),
                ],
                color.mix(0.3).filled(),
            )
        }))?;
        chart
            .draw_series(rows.iter().map(|i| {
                let pad = slot * 0.18;
                Rectangle::new(
                    [
                        (x0(i.layer) + pad, 1.0),
                        (x0(i.layer) + slot * 0.92 - pad, finite(i.after)),
                    ],
                    color.filled(),
                )
            }))?
            .label(kind.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let before: Vec<f32> = (0..64).map(|i| if i == 7 { 50.0 } else { 1.0 }).collect();
        let after: Vec<f32> = before.iter().map(|v| v.sqrt()).collect();
        let inputs: Vec<InputRatio> = (0..3)
            .flat_map(|l| {
                [
                    InputRatio {
                        layer: l,
                        kind: "q_proj, k_proj, v_proj".into(),
                        before: 50.0,
                        after: 7.0,
                    },
                    InputRatio {
                        layer: l,
                        kind: "o_proj".into(),
                        before: 3.0,
                        after: 3.0,
                    },
                ]
            })
            .collect();
        let data = PlotData {
            model: "test",
            alpha: "0.5",
            calibration: "nothing",
            linear: "model.layers.0.self_attn.q_proj",
            before: &before,
            after: &after,
            inputs: &inputs,
        };
        draw(&path, &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(check_path(&dir.path().join("x.svg")).is_err());
        assert!(check_path(&dir.path().join("missing/x.png")).is_err());
        assert!(check_path(&path).is_ok());
    }
}
