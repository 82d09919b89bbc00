//! Accuracy-driven, hierarchical, greedy pruning (AxFormer): blocks first, then heads inside
//! kept attention blocks, then FFN neuron groups inside kept FFN blocks. At each level elements
//! are visited from least to most significant; each is removed tentatively (gates), the model is
//! re-evaluated on the selection data from the element's layer on (the hidden states entering
//! every layer are cached for the accepted model), and the removal is kept only if the
//! acceptance rule holds. After each level the model is sliced physically.

use anyhow::Result;
use candle_core::Tensor;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::analyze::elements::{Element, Level};
use crate::analyze::report::ElementSignificance;
use crate::analyze::{AnalysisBatch, Scorer};
use crate::model::encoder::RunOptions;
use crate::model::slice::LayerKeep;
use crate::model::Model;

/// What a removal must preserve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Keep a removal only if the selection metric does not drop (ties: loss must not rise).
    Accuracy,
    /// Remove as many parameters as `--max-drop` allows, cheapest significance per parameter first.
    Size,
    /// Remove as much estimated latency as `--max-drop` allows, cheapest significance per FLOP first.
    Speed,
}

impl Mode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Accuracy => "accuracy",
            Mode::Size => "size",
            Mode::Speed => "speed",
        }
    }
}

/// The acceptance rule and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rule {
    /// The mode.
    pub mode: Mode,
    /// Lowest acceptable selection metric under size/speed (baseline minus the allowed drop).
    pub floor: f64,
    /// Consecutive rejections that end a level (0: never).
    pub patience: usize,
}

/// Per-batch hidden states entering every layer for the accepted model, so that a tentative
/// removal in layer `l` only recomputes layers `l..`.
pub struct Selector<'a> {
    model: &'a Model,
    batches: &'a [AnalysisBatch],
    scorer: &'a Scorer<'a>,
    metric: &'a str,
    /// `cache[b][l]`: hidden states of batch `b` entering layer `l`.
    cache: Vec<Vec<Tensor>>,
    /// Re-evaluations done so far.
    pub evaluations: usize,
}

/// Loss and primary metric on the selection data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// Mean loss.
    pub loss: f64,
    /// Primary metric.
    pub metric: f64,
}

impl<'a> Selector<'a> {
    /// Caches the model's hidden states with `plan` applied.
    pub fn new(
        model: &'a Model,
        batches: &'a [AnalysisBatch],
        scorer: &'a Scorer<'a>,
        metric: &'a str,
        plan: &[LayerKeep],
    ) -> Result<Self> {
        let mut s = Selector {
            model,
            batches,
            scorer,
            metric,
            cache: Vec::new(),
            evaluations: 0,
        };
        s.cache = batches
            .iter()
            .map(|b| Ok(vec![model.embed(&b.inputs, false)?]))
            .collect::<Result<_>>()?;
        s.accept(0, plan)?;
        Ok(s)
    }

    /// Scores the model with `plan` applied, recomputing from layer `from`.
    pub fn score(&mut self, from: usize, plan: &[LayerKeep]) -> Result<Score> {
        self.evaluations += 1;
        let gates = self.model.gates_for(plan)?;
        let opts = RunOptions {
            gates: Some(&gates),
            differentiable: false,
        };
        let total: usize = self.batches.iter().map(|b| b.examples.len()).sum();
        let mut predictions = vec![0f32; total];
        let mut loss_sum = 0.0;
        for (batch, cache) in self.batches.iter().zip(&self.cache) {
            let logits: Vec<Vec<f32>> = self
                .model
                .logits_from(&cache[from], &batch.inputs.mask_bias, from, opts)?
                .to_vec2()?;
            for (row, &ex) in logits.iter().zip(&batch.examples) {
                loss_sum += self.scorer.example_loss(row, ex);
                predictions[ex] = self.scorer.prediction(row);
            }
        }
        let s = self.scorer.scores(loss_sum, &predictions);
        Ok(Score {
            loss: s.loss,
            metric: s.get(self.metric).unwrap_or(f64::NAN),
        })
    }

    /// Makes `plan` the accepted one: recomputes the cached states of layers after `from`.
    pub fn accept(&mut self, from: usize, plan: &[LayerKeep]) -> Result<()> {
        let gates = self.model.gates_for(plan)?;
        let opts = RunOptions {
            gates: Some(&gates),
            differentiable: false,
        };
        let layers = self.model.num_layers();
        for (batch, cache) in self.batches.iter().zip(self.cache.iter_mut()) {
            cache.truncate(from + 1);
            for l in from..layers.saturating_sub(1) {
                let next = self
                    .model
                    .run_layers(&cache[l], &batch.inputs, l..l + 1, opts)?;
                cache.push(next);
            }
        }
        Ok(())
    }
}

/// One element the pass removed, with the selection score after removing it.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    /// The element (heads by original index, groups by neuron positions at that level).
    #[serde(flatten)]
    pub element: Element,
    /// Selection loss and metric after the removal.
    pub after: Score,
}

/// The outcome of one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelOutcome {
    /// The level.
    pub level: Level,
    /// Candidates considered.
    pub candidates: usize,
    /// Re-evaluations spent.
    pub evaluations: usize,
    /// Accepted removals in order.
    pub removed: Vec<Removal>,
    /// Selection score at the end of the level.
    pub score: Score,
}

/// Applies the removal of `e` to `plan`; `false` when `e` is already gone (its block removed).
pub fn remove(plan: &mut [LayerKeep], e: &Element) -> bool {
    let k = &mut plan[e.layer()];
    match e {
        Element::AttentionBlock { .. } => k.heads.take().is_some(),
        Element::FfnBlock { .. } => k.neurons.take().is_some(),
        Element::Head { head, .. } => match &mut k.heads {
            Some(h) if h.contains(head) => {
                h.retain(|x| x != head);
                true
            }
            _ => false,
        },
        Element::Group { neurons, .. } => match &mut k.neurons {
            Some(n) if neurons.iter().all(|x| n.contains(x)) => {
                n.retain(|x| !neurons.contains(x));
                true
            }
            _ => false,
        },
    }
}

/// Estimated cost an element saves: parameters (size) or multiply-adds per token at
/// `mean_len` tokens (speed); 1 under accuracy mode.
pub fn saving(model: &Model, e: &Element, mode: Mode, mean_len: f64) -> f64 {
    let h = model.config.hidden_size as f64;
    let d = model.config.structure.head_size as f64;
    let layer = &model.layers[e.layer()];
    let heads = layer
        .attention
        .as_ref()
        .map_or(0.0, |a| a.heads.len() as f64);
    let width = layer.ffn.as_ref().map_or(0.0, |f| f.width() as f64);
    let (params, flops) = match e {
        Element::Head { .. } => (4.0 * h * d + 3.0 * d, 4.0 * h * d + 2.0 * mean_len * d),
        Element::AttentionBlock { .. } => (
            heads * (4.0 * h * d + 3.0 * d) + 3.0 * h,
            heads * (4.0 * h * d + 2.0 * mean_len * d),
        ),
        Element::Group { neurons, .. } => {
            let g = neurons.len() as f64;
            (2.0 * h * g + g, 2.0 * h * g)
        }
        Element::FfnBlock { .. } => (2.0 * h * width + width + 3.0 * h, 2.0 * h * width),
    };
    match mode {
        Mode::Accuracy => 1.0,
        Mode::Size => params.max(1.0),
        Mode::Speed => flops.max(1.0),
    }
}

/// Greedy removal over one level's `candidates` (already in visiting order).
pub fn prune_level(
    selector: &mut Selector,
    plan: &mut Vec<LayerKeep>,
    level: Level,
    candidates: &[Element],
    rule: Rule,
    budget: &mut usize,
    progress: &ProgressBar,
) -> Result<LevelOutcome> {
    let start_evals = selector.evaluations;
    let mut current = selector.score(0, plan)?;
    let mut removed = Vec::new();
    let mut rejected_in_a_row = 0;
    for e in candidates {
        progress.inc(1);
        if *budget == 0 || (rule.patience > 0 && rejected_in_a_row >= rule.patience) {
            break;
        }
        let mut tentative = plan.clone();
        if !remove(&mut tentative, e) {
            continue;
        }
        *budget -= 1;
        let s = selector.score(e.layer(), &tentative)?;
        let keep = match rule.mode {
            Mode::Accuracy => {
                s.metric > current.metric || (s.metric == current.metric && s.loss <= current.loss)
            }
            Mode::Size | Mode::Speed => s.metric >= rule.floor,
        };
        rejected_in_a_row = if keep { 0 } else { rejected_in_a_row + 1 };
        if keep {
            *plan = tentative;
            selector.accept(e.layer(), plan)?;
            current = s;
            removed.push(Removal {
                element: e.clone(),
                after: s,
            });
        }
    }
    Ok(LevelOutcome {
        level,
        candidates: candidates.len(),
        evaluations: selector.evaluations - start_evals,
        removed,
        score: current,
    })
}

/// Orders a level's significance results into visiting order: ascending rank under accuracy;
/// ascending significance per unit saved under size and speed.
pub fn visiting_order(
    model: &Model,
    results: &[ElementSignificance],
    level: Level,
    mode: Mode,
    mean_len: f64,
) -> Vec<Element> {
    let mut items: Vec<&ElementSignificance> = results
        .iter()
        .filter(|r| r.element.level() == level)
        .collect();
    match mode {
        Mode::Accuracy => items.sort_by_key(|r| r.rank),
        Mode::Size | Mode::Speed => items.sort_by(|a, b| {
            let key =
                |r: &ElementSignificance| r.loss_delta / saving(model, &r.element, mode, mean_len);
            key(a).total_cmp(&key(b)).then(a.rank.cmp(&b.rank))
        }),
    }
    items.into_iter().map(|r| r.element.clone()).collect()
}
