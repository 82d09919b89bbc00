//! The readable terminal summary of a significance report.

use std::fmt::Write;

use super::elements::Element;
use super::report::{ElementSignificance, Report};

/// Short name of an element: `L3.attn`, `L3.ffn`, `L3.H5`, `L3.G12`.
pub fn short_name(e: &Element) -> String {
    match e {
        Element::AttentionBlock { layer } => format!("L{layer}.attn"),
        Element::FfnBlock { layer } => format!("L{layer}.ffn"),
        Element::Head { layer, head } => format!("L{layer}.H{head}"),
        Element::Group { layer, index, .. } => format!("L{layer}.G{index}"),
    }
}

fn describe(e: &ElementSignificance, metric: &str) -> String {
    let mut s = format!("{} Δloss {:+.5}", short_name(&e.element), e.loss_delta);
    if let Some(m) = e.metric_delta {
        let _ = write!(s, " Δ{metric} {:+.4}", m);
    }
    if e.source == super::report::Source::Taylor {
        s.push_str(" (taylor)");
    }
    s
}

/// Per level: the least and most significant elements, and those whose removal helps.
pub fn render(report: &Report, shown: usize) -> String {
    let mut out = String::new();
    let metric = &report.baseline.metric;
    let _ = writeln!(
        out,
        "baseline on {} {} examples ({}): loss {:.5}, {metric} {:.4}",
        report.data.examples,
        report.data.source,
        report.data.path,
        report.baseline.loss,
        report
            .baseline
            .metrics
            .get(metric)
            .copied()
            .unwrap_or(f64::NAN)
    );
    for level in &report.levels {
        let mut items: Vec<&ElementSignificance> = report
            .elements
            .iter()
            .filter(|e| e.element.level() == level.level)
            .collect();
        items.sort_by_key(|e| e.rank);
        let _ = write!(
            out,
            "{}: {} elements, {} ablated exactly",
            level.level.name(),
            level.elements,
            level.ablated
        );
        if let Some(rho) = level.spearman_taylor_vs_ablation {
            let _ = write!(out, ", Spearman(taylor, ablation) {rho:.3}");
        }
        out.push('\n');
        let list = |it: &mut dyn Iterator<Item = &&ElementSignificance>| -> String {
            it.map(|e| describe(e, metric))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            out,
            "  least significant: {}",
            list(&mut items.iter().take(shown))
        );
        let _ = writeln!(
            out,
            "  most significant:  {}",
            list(&mut items.iter().rev().take(shown))
        );
        let helps: Vec<&&ElementSignificance> = items
            .iter()
            .filter(|e| e.source == super::report::Source::Ablation && e.loss_delta < 0.0)
            .collect();
        let _ = writeln!(
            out,
            "  removal helps ({}): {}",
            helps.len(),
            if helps.is_empty() {
                "none".to_string()
            } else {
                list(&mut helps.into_iter().take(shown))
            }
        );
    }
    out
}
