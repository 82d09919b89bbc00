//! The significance heatmaps, laid out with real fonts: no title, axis or legend text may run
//! past the canvas edge or over another text, a cell or the colour bar.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use axcompress::analyze::elements::{Element, Level};
use axcompress::analyze::plots::write_heatmaps;
use axcompress::analyze::report::{
    Baseline, Cost, ElementSignificance, LevelSummary, Method, ModelIdentity, Report, Settings,
    Source, SCHEMA,
};
use axcompress::data::splits::DataInfo;
use axcompress::model::structure::Structure;
use usvg::fontdb::Database;

/// Common sans-serif families a viewer may substitute for `sans-serif`; DejaVu Sans is among the
/// widest, so it bounds the others.
const SANS_FAMILIES: [&str; 5] = [
    "DejaVu Sans",
    "Liberation Sans",
    "Arial",
    "Helvetica",
    "Noto Sans",
];

/// The shape of the model and data a report describes.
struct Case {
    task: &'static str,
    source: &'static str,
    examples: usize,
    layers: usize,
    heads: usize,
    groups: usize,
    /// Largest |Δ loss|: the legend shows it as `+x.xxe-y hurts`.
    scale: f64,
}

/// A report with every level analysed and deterministic Δ losses spanning `[-scale, scale]`.
fn report(case: &Case) -> Report {
    let Case {
        layers,
        heads,
        groups,
        ..
    } = *case;
    let mut elements = Vec::new();
    for layer in 0..layers {
        elements.push(Element::AttentionBlock { layer });
        elements.push(Element::FfnBlock { layer });
        elements.extend((0..heads).map(|head| Element::Head { layer, head }));
        elements.extend((0..groups).map(|index| Element::Group {
            layer,
            index,
            neurons: (index * 32..index * 32 + 32).collect(),
        }));
    }
    let n = elements.len();
    let elements: Vec<ElementSignificance> = elements
        .into_iter()
        .enumerate()
        .map(|(i, element)| ElementSignificance {
            element,
            loss_delta: case.scale * (1.0 - 2.0 * i as f64 / (n - 1) as f64),
            metric_delta: None,
            source: Source::Ablation,
            taylor_loss_delta: None,
            rank: i + 1,
        })
        .collect();
    let levels = [Level::Blocks, Level::Heads, Level::Groups];
    Report {
        schema: SCHEMA.into(),
        model: ModelIdentity {
            source: "models/minilm-l6-rte".into(),
            fingerprint: "0".repeat(16),
            family: "bert".into(),
            structure: Structure::uniform(layers, heads, 32, groups * 32),
        },
        task: case.task.into(),
        data: DataInfo {
            source: case.source.into(),
            path: format!("data/glue/{}/dev.tsv", case.task),
            examples: case.examples,
            available: case.examples,
            seed: None,
            fraction: None,
        },
        settings: Settings {
            method: Method::Ablation,
            levels: levels.to_vec(),
            group_size: 32,
            exact_groups: None,
            taylor_examples: 0,
            batch_size: 32,
            max_length: 128,
            forward_pass_budget: None,
        },
        baseline: Baseline {
            loss: 0.69,
            metric: "accuracy".into(),
            metrics: BTreeMap::from([("accuracy".into(), 0.5523)]),
        },
        levels: levels
            .iter()
            .map(|&level| LevelSummary {
                level,
                elements: elements
                    .iter()
                    .filter(|e| e.element.level() == level)
                    .count(),
                ablated: 0,
                removal_helps: 0,
                spearman_taylor_vs_ablation: None,
            })
            .collect(),
        elements,
        cost: Cost {
            ablations: n,
            forward_equivalents_bound: 1.0,
        },
    }
}

/// System fonts, or `None` (said loudly) when none of [`SANS_FAMILIES`] is installed; under
/// `CI=true` that is a failure.
fn sans_fonts() -> Option<(Arc<Database>, Vec<&'static str>)> {
    let mut db = Database::new();
    db.load_system_fonts();
    let found: Vec<&str> = SANS_FAMILIES
        .into_iter()
        .filter(|family| {
            db.faces()
                .any(|face| face.families.iter().any(|(name, _)| name == family))
        })
        .collect();
    if !found.is_empty() {
        return Some((Arc::new(db), found));
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !in_ci,
        "no sans-serif font ({SANS_FAMILIES:?}) installed (apt-get install fonts-dejavu-core); under CI=true this is a failure"
    );
    // Straight to stderr: the test harness would swallow `eprintln!` of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: no sans-serif font ({SANS_FAMILIES:?}) installed (apt-get install fonts-dejavu-core) ***\n"
    );
    None
}

/// What a laid-out SVG draws, each with its bounding box on the canvas: texts, and shapes other
/// than the background.
#[derive(Default)]
struct Drawn {
    texts: Vec<(String, usvg::Rect)>,
    shapes: Vec<usvg::Rect>,
}

fn collect(group: &usvg::Group, size: usvg::Size, drawn: &mut Drawn) {
    for node in group.children() {
        match node {
            usvg::Node::Group(g) => collect(g, size, drawn),
            usvg::Node::Text(t) => {
                let text = t.chunks().iter().map(|c| c.text()).collect();
                drawn.texts.push((text, t.abs_bounding_box()));
            }
            usvg::Node::Path(p) => {
                let b = p.abs_bounding_box();
                if (b.width(), b.height()) != (size.width(), size.height()) {
                    drawn.shapes.push(b);
                }
            }
            _ => {}
        }
    }
}

/// True when `a` and `b` share more than an edge.
fn overlap(a: &usvg::Rect, b: &usvg::Rect) -> bool {
    a.left() < b.right() && b.left() < a.right() && a.top() < b.bottom() && b.top() < a.bottom()
}

/// Lays `svg` out with `family` as `sans-serif` and asserts that each of its texts was rendered,
/// lies within the canvas and overlaps no other text or shape.
fn assert_text_fits(svg: &Path, fonts: &Arc<Database>, family: &str) {
    let data = std::fs::read(svg).unwrap();
    let mut db = (**fonts).clone();
    db.set_sans_serif_family(family);
    let options = usvg::Options {
        fontdb: Arc::new(db),
        ..usvg::Options::default()
    };
    let tree = usvg::Tree::from_data(&data, &options).unwrap();
    let (width, height) = (tree.size().width(), tree.size().height());
    let mut drawn = Drawn::default();
    collect(tree.root(), tree.size(), &mut drawn);
    let written = String::from_utf8_lossy(&data).matches("<text").count();
    let name = format!("{} in {family}", svg.display());
    assert_eq!(drawn.texts.len(), written, "{name}: texts not laid out");
    for (i, (text, b)) in drawn.texts.iter().enumerate() {
        let inside =
            b.left() >= 0.0 && b.top() >= 0.0 && b.right() <= width && b.bottom() <= height;
        assert!(
            inside,
            "{name}: \"{text}\" {b:?} runs off the {width}×{height} canvas"
        );
        let others = drawn.texts.iter().skip(i + 1).map(|(_, o)| o);
        let hit = others.chain(&drawn.shapes).find(|o| overlap(b, o));
        assert!(hit.is_none(), "{name}: \"{text}\" {b:?} overlaps {hit:?}");
    }
}

/// Writes the heatmaps of `case` and checks each one in every installed sans-serif family.
fn check(case: &Case) {
    let Some((fonts, families)) = sans_fonts() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let written = write_heatmaps(&report(case), dir.path()).unwrap();
    assert_eq!(written.len(), 3);
    for svg in &written {
        for family in &families {
            assert_text_fits(svg, &fonts, family);
        }
    }
}

#[test]
fn rte_heatmaps_fit_title_and_legend_in_the_canvas() {
    check(&Case {
        task: "rte",
        source: "dev-split",
        examples: 277,
        layers: 6,
        heads: 12,
        groups: 48,
        scale: 7.58e-3,
    });
}

#[test]
fn two_column_heatmaps_fit_a_title_and_axis_label_wider_than_the_grid() {
    check(&Case {
        task: "sst2",
        source: "train-holdout",
        examples: 6735,
        layers: 2,
        heads: 2,
        groups: 2,
        scale: 1.25e-12,
    });
}

#[test]
fn deep_model_heatmaps_fit_every_label_in_the_canvas() {
    check(&Case {
        task: "mnli",
        source: "dev",
        examples: 9815,
        layers: 24,
        heads: 16,
        groups: 128,
        scale: 3.5,
    });
}
