//! The elements significance analysis scores, coarse to fine: attention and FFN blocks, attention
//! heads, and groups of FFN neurons.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::model::slice::LayerKeep;
use crate::model::structure::Structure;
use crate::model::Model;

/// Granularity of an element.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Whole attention and FFN blocks of each layer.
    Blocks,
    /// Attention heads.
    Heads,
    /// Groups of FFN neurons.
    Groups,
}

impl Level {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Blocks => "blocks",
            Level::Heads => "heads",
            Level::Groups => "groups",
        }
    }
}

/// One removable part of the current model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Element {
    /// The attention block of a layer.
    AttentionBlock {
        /// Encoder layer.
        layer: usize,
    },
    /// The FFN block of a layer.
    FfnBlock {
        /// Encoder layer.
        layer: usize,
    },
    /// One attention head.
    Head {
        /// Encoder layer.
        layer: usize,
        /// Original head index.
        head: usize,
    },
    /// A group of FFN neurons: rows of the intermediate dense and the matching columns of the
    /// output dense.
    Group {
        /// Encoder layer.
        layer: usize,
        /// Group number within the layer (0 = lowest first-order significance).
        index: usize,
        /// Neuron positions in the layer's current FFN, ascending.
        neurons: Vec<usize>,
    },
}

impl Element {
    /// The level the element belongs to.
    pub fn level(&self) -> Level {
        match self {
            Element::AttentionBlock { .. } | Element::FfnBlock { .. } => Level::Blocks,
            Element::Head { .. } => Level::Heads,
            Element::Group { .. } => Level::Groups,
        }
    }

    /// The encoder layer of the element.
    pub fn layer(&self) -> usize {
        match self {
            Element::AttentionBlock { layer }
            | Element::FfnBlock { layer }
            | Element::Head { layer, .. }
            | Element::Group { layer, .. } => *layer,
        }
    }

    /// True when `structure` has this element: its layer, block, head, or neurons (positions in
    /// the layer's FFN, ascending and distinct).
    pub fn exists_in(&self, structure: &Structure) -> bool {
        let Some(shape) = structure.layers.get(self.layer()) else {
            return false;
        };
        match self {
            Element::AttentionBlock { .. } => shape.heads.is_some(),
            Element::FfnBlock { .. } => shape.ffn_width.is_some(),
            Element::Head { head, .. } => shape.heads.as_ref().is_some_and(|h| h.contains(head)),
            Element::Group { neurons, .. } => {
                let width = shape.ffn_width.unwrap_or(0);
                !neurons.is_empty()
                    && neurons.windows(2).all(|w| w[0] < w[1])
                    && neurons.last().is_some_and(|&n| n < width)
            }
        }
    }

    /// The pruning plan that removes just this element from `model`.
    pub fn removal_plan(&self, model: &Model) -> Vec<LayerKeep> {
        let mut keep = model.keep_all();
        let k = &mut keep[self.layer()];
        match self {
            Element::AttentionBlock { .. } => k.heads = None,
            Element::FfnBlock { .. } => k.neurons = None,
            Element::Head { head, .. } => {
                if let Some(h) = &mut k.heads {
                    h.retain(|x| x != head);
                }
            }
            Element::Group { neurons, .. } => {
                if let Some(n) = &mut k.neurons {
                    n.retain(|x| !neurons.contains(x));
                }
            }
        }
        keep
    }
}

/// Blocks and heads of the model's present attention / FFN blocks, in layer order.
pub fn blocks_and_heads(model: &Model, levels: &[Level]) -> Vec<Element> {
    let mut out = Vec::new();
    if levels.contains(&Level::Blocks) {
        for (layer, l) in model.layers.iter().enumerate() {
            if l.attention.is_some() {
                out.push(Element::AttentionBlock { layer });
            }
            if l.ffn.is_some() {
                out.push(Element::FfnBlock { layer });
            }
        }
    }
    if levels.contains(&Level::Heads) {
        for (layer, l) in model.layers.iter().enumerate() {
            for &head in l.attention.iter().flat_map(|a| &a.heads) {
                out.push(Element::Head { layer, head });
            }
        }
    }
    out
}

/// Checks that `group_size` divides every present FFN width.
pub fn check_group_size(model: &Model, group_size: usize) -> Result<()> {
    if group_size == 0 {
        bail!("--group-size must be at least 1");
    }
    for (l, layer) in model.layers.iter().enumerate() {
        if let Some(f) = &layer.ffn {
            if f.width() % group_size != 0 {
                bail!(
                    "--group-size {group_size} does not divide the FFN width {} of layer {l}; pick a divisor such as 32",
                    f.width()
                );
            }
        }
    }
    Ok(())
}

/// Groups each layer's FFN neurons by a per-neuron score: neurons sorted by ascending score (ties
/// by position) and cut into consecutive groups of `group_size`, so that group 0 collects the
/// neurons whose removal is estimated to matter least. `scores[l]` has one value per neuron.
pub fn groups_by_score(scores: &[Vec<f64>], group_size: usize) -> Vec<Element> {
    let mut out = Vec::new();
    for (layer, s) in scores.iter().enumerate() {
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
        for (index, chunk) in order.chunks(group_size).enumerate() {
            let mut neurons = chunk.to_vec();
            neurons.sort_unstable();
            out.push(Element::Group {
                layer,
                index,
                neurons,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_outside_the_structure_do_not_exist_in_it() {
        let mut s = Structure::uniform(2, 3, 4, 8);
        s.layers[1].heads = Some(vec![0, 2]);
        s.layers[1].ffn_width = None;
        let group = |neurons: Vec<usize>| Element::Group {
            layer: 0,
            index: 0,
            neurons,
        };
        assert!(Element::Head { layer: 1, head: 2 }.exists_in(&s));
        assert!(!Element::Head { layer: 1, head: 1 }.exists_in(&s));
        assert!(!Element::AttentionBlock { layer: 2 }.exists_in(&s));
        assert!(!Element::FfnBlock { layer: 1 }.exists_in(&s));
        assert!(group(vec![0, 7]).exists_in(&s));
        for bad in [vec![], vec![8], vec![3, 3], vec![4, 1]] {
            assert!(!group(bad.clone()).exists_in(&s), "{bad:?}");
        }
    }

    #[test]
    fn groups_collect_lowest_scores_first() {
        let scores = vec![vec![0.5, -1.0, 0.2, 3.0], vec![]];
        let g = groups_by_score(&scores, 2);
        assert_eq!(
            g,
            vec![
                Element::Group {
                    layer: 0,
                    index: 0,
                    neurons: vec![1, 2]
                },
                Element::Group {
                    layer: 0,
                    index: 1,
                    neurons: vec![0, 3]
                },
            ]
        );
    }

    #[test]
    fn element_json_is_tagged() {
        let e = Element::Head { layer: 2, head: 5 };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"kind":"head","layer":2,"head":5}"#
        );
        assert_eq!(e.level(), Level::Heads);
    }
}
