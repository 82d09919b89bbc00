//! SVG heatmaps of significance, one per level: layers × heads, layers × groups, layers × blocks,
//! on a diverging colour scale (blue: removal helps, white: no effect, red: removal hurts).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::elements::{Element, Level};
use super::report::Report;
use crate::fsutil::write_atomic;

const CELL: f64 = 22.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 50.0;

/// Writes `significance-<level>.svg` for each level of the report into `dir`; returns the paths.
pub fn write_heatmaps(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let layers = report.model.structure.layers.len();
    let mut written = Vec::new();
    for level in &report.levels {
        let mut cells = Vec::new();
        for e in report
            .elements
            .iter()
            .filter(|e| e.element.level() == level.level)
        {
            let column = match &e.element {
                Element::AttentionBlock { .. } => 0,
                Element::FfnBlock { .. } => 1,
                Element::Head { head, .. } => *head,
                Element::Group { index, .. } => *index,
            };
            cells.push((e.element.layer(), column, e.loss_delta));
        }
        let columns = match level.level {
            Level::Blocks => 2,
            _ => cells.iter().map(|c| c.1 + 1).max().unwrap_or(0),
        };
        let (x_label, names): (&str, Vec<String>) = match level.level {
            Level::Blocks => ("block", vec!["attention".into(), "ffn".into()]),
            Level::Heads => (
                "head (original index)",
                (0..columns).map(|c| c.to_string()).collect(),
            ),
            Level::Groups => (
                "neuron group (0 = lowest first-order significance)",
                (0..columns).map(|c| c.to_string()).collect(),
            ),
        };
        let title = format!(
            "{} significance (Δ loss when removed), {} on {} {} examples",
            level.level.name(),
            report.task,
            report.data.examples,
            report.data.source
        );
        let svg = heatmap(&title, x_label, &names, layers, &cells);
        let path = dir.join(format!("significance-{}.svg", level.level.name()));
        write_atomic(&path, svg.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// Diverging colour for `v` in `[-scale, scale]`.
fn colour(v: f64, scale: f64) -> String {
    let t = if scale > 0.0 {
        (v / scale).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let fade = |x: f64| (255.0 * (1.0 - x.abs())).round() as u8;
    let (r, g, b) = if t >= 0.0 {
        (255, fade(t), fade(t))
    } else {
        (fade(t), fade(t), 255)
    };
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn heatmap(
    title: &str,
    x_label: &str,
    names: &[String],
    rows: usize,
    cells: &[(usize, usize, f64)],
) -> String {
    let cols = names.len();
    let cell_w = if cols <= 4 { 80.0 } else { CELL };
    let scale = cells.iter().fold(0f64, |m, c| m.max(c.2.abs()));
    let width = LEFT + cols as f64 * cell_w + 120.0;
    let height = TOP + rows as f64 * CELL + 70.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="13">{}</text>"#,
        escape(title)
    );
    for r in 0..rows {
        let y = TOP + r as f64 * CELL;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">layer {r}</text>"#,
            LEFT - 6.0,
            y + CELL * 0.7
        );
        for c in 0..cols {
            let x = LEFT + c as f64 * cell_w;
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{y}" width="{cell_w}" height="{CELL}" fill="#dddddd" stroke="white"/>"##
            );
        }
    }
    for &(r, c, v) in cells {
        let (x, y) = (LEFT + c as f64 * cell_w, TOP + r as f64 * CELL);
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{y}" width="{cell_w}" height="{CELL}" fill="{}" stroke="white"><title>layer {r}, {} {}: Δloss {v:+.6}</title></rect>"#,
            colour(v, scale),
            escape(x_label),
            escape(&names[c])
        );
    }
    let step = if cols > 24 { 8 } else { 1 };
    let axis_y = TOP + rows as f64 * CELL + 14.0;
    for (c, name) in names.iter().enumerate().step_by(step) {
        let x = LEFT + (c as f64 + 0.5) * cell_w;
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{axis_y}" text-anchor="middle">{}</text>"#,
            escape(name)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + cols as f64 * cell_w / 2.0,
        axis_y + 18.0,
        escape(x_label)
    );
    // Colour bar.
    let bar_x = LEFT + cols as f64 * cell_w + 30.0;
    let bar_h = (rows as f64 * CELL).max(100.0);
    for i in 0..20 {
        let v = scale * (1.0 - 2.0 * i as f64 / 19.0);
        let y = TOP + bar_h * i as f64 / 20.0;
        let _ = writeln!(
            s,
            r#"<rect x="{bar_x}" y="{y}" width="16" height="{}" fill="{}"/>"#,
            bar_h / 20.0 + 0.5,
            colour(v, scale)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">{:+.2e} hurts</text>"#,
        bar_x + 20.0,
        TOP + 9.0,
        scale
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">0</text>"#,
        bar_x + 20.0,
        TOP + bar_h / 2.0 + 4.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">{:+.2e} helps</text>"#,
        bar_x + 20.0,
        TOP + bar_h,
        -scale
    );
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_diverge_around_white() {
        assert_eq!(colour(0.0, 1.0), "#ffffff");
        assert_eq!(colour(1.0, 1.0), "#ff0000");
        assert_eq!(colour(-1.0, 1.0), "#0000ff");
        assert_eq!(colour(5.0, 0.0), "#ffffff");
    }

    #[test]
    fn heatmap_has_a_cell_per_value_and_labels() {
        let svg = heatmap(
            "t",
            "head",
            &["0".into(), "1".into()],
            1,
            &[(0, 0, 0.5), (0, 1, -0.25)],
        );
        assert_eq!(svg.matches("<title>").count(), 2);
        assert!(svg.contains("layer 0") && svg.contains("helps"));
    }
}
