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
/// Blank border left around everything drawn.
const MARGIN: f64 = 8.0;
const TITLE_SIZE: f64 = 13.0;
const FONT_SIZE: f64 = 11.0;
/// Upper bounds on a sans-serif font's ascent above and descent below the baseline, in em.
const ASCENT_EM: f64 = 1.1;
const DESCENT_EM: f64 = 0.3;

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
        let path = heatmap_path(dir, level.level);
        write_atomic(&path, svg.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// Where the heatmap of `level` goes in `dir`.
pub fn heatmap_path(dir: &Path, level: Level) -> PathBuf {
    dir.join(format!("significance-{}.svg", level.name()))
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

/// Geometry of the cell grid: `rows` layers × `cols` columns of `cell_w` × [`CELL`] cells, its
/// top-left corner at ([`LEFT`], [`TOP`]).
struct Grid {
    rows: usize,
    cols: usize,
    cell_w: f64,
}

impl Grid {
    /// Left edge of column `c` (fractional: `c + 0.5` is its centre).
    fn x(&self, c: f64) -> f64 {
        LEFT + c * self.cell_w
    }

    /// Top edge of row `r`.
    fn y(&self, r: usize) -> f64 {
        TOP + r as f64 * CELL
    }

    /// Height of all rows.
    fn height(&self) -> f64 {
        self.rows as f64 * CELL
    }
}

/// One heatmap's SVG: `rows` layers × the columns `names`, `cells` holding (layer, column, Δ
/// loss), on a canvas sized to everything drawn.
fn heatmap(
    title: &str,
    x_label: &str,
    names: &[String],
    rows: usize,
    cells: &[(usize, usize, f64)],
) -> String {
    let cols = names.len();
    let cell_w = if cols <= 4 { 80.0 } else { CELL };
    let grid = Grid { rows, cols, cell_w };
    let scale = cells.iter().fold(0f64, |m, c| m.max(c.2.abs()));
    let mut canvas = Canvas::new();
    draw_cells(&mut canvas, &grid, x_label, names, cells, scale);
    draw_axes(&mut canvas, &grid, x_label, names);
    draw_colour_bar(&mut canvas, &grid, scale);
    canvas.text(LEFT, 20.0, Anchor::Start, TITLE_SIZE, title);
    canvas.finish()
}

/// The grid: grey where no value was measured, else the value's colour with a tooltip.
fn draw_cells(
    canvas: &mut Canvas,
    grid: &Grid,
    x_label: &str,
    names: &[String],
    cells: &[(usize, usize, f64)],
    scale: f64,
) {
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            let at = (grid.x(c as f64), grid.y(r), grid.cell_w, CELL);
            canvas.rect(at, r##"fill="#dddddd" stroke="white""##, None);
        }
    }
    for &(r, c, v) in cells {
        let at = (grid.x(c as f64), grid.y(r), grid.cell_w, CELL);
        let fill = format!(r#"fill="{}" stroke="white""#, colour(v, scale));
        let tip = format!("layer {r}, {x_label} {}: Δloss {v:+.6}", names[c]);
        canvas.rect(at, &fill, Some(&tip));
    }
}

/// Layer names left of the rows; column names (every 8th when there are many) and `x_label`
/// below the grid.
fn draw_axes(canvas: &mut Canvas, grid: &Grid, x_label: &str, names: &[String]) {
    for r in 0..grid.rows {
        let y = grid.y(r) + CELL * 0.7;
        canvas.text(LEFT - 6.0, y, Anchor::End, FONT_SIZE, &format!("layer {r}"));
    }
    let step = if grid.cols > 24 { 8 } else { 1 };
    let axis_y = TOP + grid.height() + 14.0;
    for (c, name) in names.iter().enumerate().step_by(step) {
        canvas.text(
            grid.x(c as f64 + 0.5),
            axis_y,
            Anchor::Middle,
            FONT_SIZE,
            name,
        );
    }
    let centre = grid.x(grid.cols as f64 / 2.0);
    canvas.text(centre, axis_y + 18.0, Anchor::Middle, FONT_SIZE, x_label);
}

/// The colour scale, right of everything drawn so far, labelled with its ends and its middle.
fn draw_colour_bar(canvas: &mut Canvas, grid: &Grid, scale: f64) {
    let bar_x = canvas.right() + 30.0;
    let bar_h = grid.height().max(100.0);
    for i in 0..20 {
        let v = scale * (1.0 - 2.0 * i as f64 / 19.0);
        let at = (
            bar_x,
            TOP + bar_h * i as f64 / 20.0,
            16.0,
            bar_h / 20.0 + 0.5,
        );
        canvas.rect(at, &format!(r#"fill="{}""#, colour(v, scale)), None);
    }
    let x = bar_x + 20.0;
    let labels = [
        (TOP + 9.0, format!("{scale:+.2e} hurts")),
        (TOP + bar_h / 2.0 + 4.0, "0".to_string()),
        (TOP + bar_h, format!("{:+.2e} helps", -scale)),
    ];
    for (y, label) in labels {
        canvas.text(x, y, Anchor::Start, FONT_SIZE, &label);
    }
}

/// Bins of a [`histogram`], per decade of the value.
const BINS_PER_DECADE: f64 = 4.0;

/// An SVG histogram of positive values on a log scale, one outlined series per entry (e.g. group
/// norms before and after training), counts on a square-root scale so that both the crowd and
/// the few show.
pub fn histogram(title: &str, x_label: &str, series: &[(&str, &[f64])]) -> String {
    let positive = |v: &[f64]| v.iter().copied().filter(|x| *x > 0.0).collect::<Vec<_>>();
    let all: Vec<f64> = series.iter().flat_map(|(_, v)| positive(v)).collect();
    let lo = all
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = all
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .log10()
        .ceil();
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let bins = ((hi - lo) * BINS_PER_DECADE) as usize;
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|(_, v)| {
            let mut c = vec![0; bins];
            for x in positive(v) {
                let b = ((x.log10() - lo) * BINS_PER_DECADE) as usize;
                c[b.min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let peak = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let (w, h, bar) = (bins as f64 * CELL / 2.0, 160.0, CELL / 2.0);
    let mut canvas = Canvas::new();
    canvas.text(LEFT, TOP - 24.0, Anchor::Start, TITLE_SIZE, title);
    canvas.rect((LEFT, TOP, w, h), r##"fill="none" stroke="#999""##, None);
    let colours = ["#1f77b4", "#d62728", "#2ca02c"];
    for (i, (c, (name, _))) in counts.iter().zip(series).enumerate() {
        let colour = colours[i % colours.len()];
        for (b, &n) in c.iter().enumerate().filter(|(_, n)| **n > 0) {
            let bh = h * (n as f64 / peak).sqrt();
            let style = format!(r#"fill="{colour}" fill-opacity="0.35" stroke="{colour}""#);
            let tip = format!(
                "{name}: {n} in [1e{:.2}, 1e{:.2})",
                lo + b as f64 / BINS_PER_DECADE,
                lo + (b + 1) as f64 / BINS_PER_DECADE
            );
            canvas.rect(
                (LEFT + b as f64 * bar, TOP + h - bh, bar, bh),
                &style,
                Some(&tip),
            );
        }
        let y = TOP + 14.0 * (i as f64 + 1.0);
        canvas.rect(
            (LEFT + w + 12.0, y - 9.0, 10.0, 10.0),
            &format!(r#"fill="{colour}""#),
            None,
        );
        canvas.text(LEFT + w + 26.0, y, Anchor::Start, FONT_SIZE, name);
    }
    for d in 0..=(hi - lo) as usize {
        let x = LEFT + d as f64 * BINS_PER_DECADE * bar;
        canvas.text(
            x,
            TOP + h + 14.0,
            Anchor::Middle,
            FONT_SIZE,
            &format!("1e{}", lo as i64 + d as i64),
        );
    }
    canvas.text(
        LEFT + w / 2.0,
        TOP + h + 30.0,
        Anchor::Middle,
        FONT_SIZE,
        x_label,
    );
    canvas.text(
        LEFT - 6.0,
        TOP + 9.0,
        Anchor::End,
        FONT_SIZE,
        &format!("{peak}"),
    );
    canvas.text(LEFT - 6.0, TOP + h, Anchor::End, FONT_SIZE, "0");
    canvas.finish()
}

/// Where a text sits relative to its anchor point (SVG `text-anchor`).
#[derive(Debug, Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn name(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }

    /// Share of the text's width left of the anchor point.
    fn before(self) -> f64 {
        match self {
            Anchor::Start => 0.0,
            Anchor::Middle => 0.5,
            Anchor::End => 1.0,
        }
    }
}

/// Upper bound on the advance width of `c`, in em, in common sans-serif fonts. DejaVu Sans, the
/// widest of them, sets the bounds: narrow punctuation and `fijlrtIJ` under 0.42, digits and the
/// other lower-case letters under 0.64, capitals but `M` and `W` under 0.8, anything else 1.
fn advance_em(c: char) -> f64 {
    match c {
        ' ' | '.' | ',' | ':' | ';' | '!' | '\'' | '|' | '/' | '(' | ')' | '[' | ']' | '-' => 0.42,
        'f' | 'i' | 'j' | 'l' | 'r' | 't' | 'I' | 'J' => 0.42,
        'm' | 'w' | 'M' | 'W' => 1.0,
        'a'..='z' | '0'..='9' => 0.64,
        'A'..='Z' => 0.8,
        _ => 1.0,
    }
}

/// An SVG body being drawn, with a bounding box of everything in it, so that the canvas can be
/// sized to its content rather than guessed.
struct Canvas {
    body: String,
    min: (f64, f64),
    max: (f64, f64),
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            body: String::new(),
            min: (f64::INFINITY, f64::INFINITY),
            max: (f64::NEG_INFINITY, f64::NEG_INFINITY),
        }
    }

    /// Extends the bounding box over the rectangle from `(x0, y0)` to `(x1, y1)`.
    fn cover(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64)) {
        self.min = (self.min.0.min(x0), self.min.1.min(y0));
        self.max = (self.max.0.max(x1), self.max.1.max(y1));
    }

    /// Right edge of everything drawn so far.
    fn right(&self) -> f64 {
        self.max.0
    }

    /// Draws the rectangle `(x, y, width, height)` with `style` attributes and a tooltip.
    fn rect(&mut self, (x, y, w, h): (f64, f64, f64, f64), style: &str, tip: Option<&str>) {
        self.cover((x, y), (x + w, y + h));
        let _ = write!(
            self.body,
            r#"<rect x="{x}" y="{y}" width="{w}" height="{h}" {style}"#
        );
        let _ = match tip {
            Some(tip) => writeln!(self.body, "><title>{}</title></rect>", escape(tip)),
            None => writeln!(self.body, "/>"),
        };
    }

    /// Draws `text` with its baseline at `y`, covering a bound of the space its glyphs take.
    fn text(&mut self, x: f64, y: f64, anchor: Anchor, size: f64, text: &str) {
        let width = size * text.chars().map(advance_em).sum::<f64>();
        let left = x - anchor.before() * width;
        let top = y - ASCENT_EM * size;
        self.cover((left, top), (left + width, y + DESCENT_EM * size));
        let _ = writeln!(
            self.body,
            r#"<text x="{x}" y="{y}" font-size="{size}" text-anchor="{}">{}</text>"#,
            anchor.name(),
            escape(text)
        );
    }

    /// The SVG document: the body shifted and the canvas sized so that everything drawn lies
    /// [`MARGIN`] or more inside the edges.
    fn finish(self) -> String {
        let dx = (MARGIN - self.min.0).ceil();
        let dy = (MARGIN - self.min.1).ceil();
        let width = (self.max.0 + dx + MARGIN).ceil();
        let height = (self.max.1 + dy + MARGIN).ceil();
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(svg, r#"<g transform="translate({dx} {dy})">"#);
        svg.push_str(&self.body);
        svg.push_str("</g>\n</svg>\n");
        svg
    }
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
