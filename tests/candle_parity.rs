//! Our runtime against candle-transformers' own BERT, DistilBERT and (XLM-)RoBERTa encoders: a
//! second reference, written independently of ours and of Python, that runs anywhere. The
//! classification heads (BERT's pooler and classifier, DistilBERT's pre-classifier, RoBERTa's
//! dense + out_proj) are applied here to candle's first-token states, from the same weights.
//! Both runtimes compute in f32; the last hidden states agree to 1e-4 and the logits to 1e-4
//! relative. The demo and tiny models in the repository run anywhere; MiniLM needs the shared
//! fixtures.

mod common;

use std::path::Path;

use axcompress::model::encoder::RunOptions;
use axcompress::model::inputs::Inputs;
use axcompress::model::Model;
use axcompress::text::tokenizer::TextEncoder;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{linear, VarBuilder};
use candle_transformers::models::{bert, distilbert, xlm_roberta};
use common::{max_abs_diff, read_json};
use serde_json::Value;

/// A padded batch: token ids, attention mask (1 real, 0 padding) and segment ids.
struct Batch {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    types: Vec<Vec<u32>>,
}

impl Batch {
    /// The reference batch of a tiny fixture.
    fn of_reference(reference: &Value) -> Batch {
        let rows = |key: &str| -> Option<Vec<Vec<u32>>> {
            let rows = reference[key].as_array()?;
            let row = |r: &Value| -> Vec<u32> {
                let values = r.as_array().unwrap().iter();
                values.map(|v| v.as_u64().unwrap() as u32).collect()
            };
            Some(rows.iter().map(row).collect())
        };
        let (ids, mask) = (rows("input_ids").unwrap(), rows("attention_mask").unwrap());
        let types = rows("token_type_ids")
            .unwrap_or_else(|| ids.iter().map(|r| vec![0; r.len()]).collect());
        Batch { ids, mask, types }
    }

    /// `sentences` tokenized by the model's own tokenizer, padded with `pad`.
    fn of_sentences(dir: &Path, sentences: &[&str], pad: u32) -> Batch {
        let texts: Vec<(String, Option<String>)> =
            sentences.iter().map(|s| (s.to_string(), None)).collect();
        let seqs = TextEncoder::load(dir, 64).unwrap().encode(&texts).unwrap();
        let len = seqs.iter().map(|s| s.ids.len()).max().unwrap();
        let padded = |v: &[u32], fill: u32| {
            let mut v = v.to_vec();
            v.resize(len, fill);
            v
        };
        Batch {
            ids: seqs.iter().map(|s| padded(&s.ids, pad)).collect(),
            mask: seqs
                .iter()
                .map(|s| padded(&vec![1; s.ids.len()], 0))
                .collect(),
            types: seqs.iter().map(|s| padded(&s.type_ids, 0)).collect(),
        }
    }

    fn shape(&self) -> (usize, usize) {
        (self.ids.len(), self.ids[0].len())
    }

    fn tensor(rows: &[Vec<u32>]) -> Tensor {
        let (b, t) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
    }

    /// Our inputs for `model`.
    fn ours(&self, model: &Model) -> Inputs {
        let (b, t) = self.shape();
        let (ids, mask, types) = (self.ids.concat(), self.mask.concat(), self.types.concat());
        Inputs::from_padded(&model.config, b, t, ids, mask, types).unwrap()
    }
}

/// Last hidden states and logits, flattened.
type Outputs = (Vec<f32>, Vec<f32>);

/// Our last hidden states and logits, flattened.
fn our_outputs(model: &Model, batch: &Batch) -> Outputs {
    let hidden = model
        .encode(&batch.ours(model), RunOptions::default())
        .unwrap();
    let logits = model.classify(&hidden).unwrap();
    (flat(&hidden), flat(&logits))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn weights(dir: &Path) -> VarBuilder<'static> {
    let file = dir.join("model.safetensors");
    // SAFETY: the fixture file is not modified while the test maps it.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu).unwrap() }
}

fn config(dir: &Path) -> Value {
    read_json(&dir.join("config.json"))
}

/// Candle's BERT encoder, then the pooler (tanh) and the classifier on the first token.
fn candle_bert(dir: &Path, batch: &Batch) -> Outputs {
    let cfg: bert::Config = serde_json::from_value(config(dir)).unwrap();
    let vb = weights(dir);
    let model = bert::BertModel::load(vb.clone(), &cfg).unwrap();
    let (ids, types, mask) = (
        Batch::tensor(&batch.ids),
        Batch::tensor(&batch.types),
        Batch::tensor(&batch.mask),
    );
    let hidden = model.forward(&ids, &types, Some(&mask)).unwrap();
    let h = cfg.hidden_size;
    let pooler = linear(h, h, vb.pp("bert.pooler.dense")).unwrap();
    let labels = config(dir)["id2label"].as_object().unwrap().len();
    let classifier = linear(h, labels, vb.pp("classifier")).unwrap();
    let first = hidden.i((.., 0)).unwrap();
    let pooled = pooler.forward(&first).unwrap().tanh().unwrap();
    let logits = classifier.forward(&pooled).unwrap();
    (flat(&hidden), flat(&logits))
}

/// Candle's DistilBERT, then pre-classifier (ReLU) and classifier on the first token.
fn candle_distilbert(dir: &Path, batch: &Batch) -> Outputs {
    let cfg: distilbert::Config = serde_json::from_value(config(dir)).unwrap();
    let vb = weights(dir);
    let model = distilbert::DistilBertModel::load(vb.pp("distilbert"), &cfg).unwrap();
    let (b, t) = batch.shape();
    // Candle masks the positions where its mask is set.
    let padding = Batch::tensor(&batch.mask)
        .eq(0u32)
        .unwrap()
        .reshape((b, 1, 1, t))
        .unwrap();
    let hidden = model.forward(&Batch::tensor(&batch.ids), &padding).unwrap();
    let h = cfg.dim;
    let labels = config(dir)["id2label"].as_object().unwrap().len();
    let pre = linear(h, h, vb.pp("pre_classifier")).unwrap();
    let classifier = linear(h, labels, vb.pp("classifier")).unwrap();
    let first = hidden.i((.., 0)).unwrap();
    let logits = classifier
        .forward(&pre.forward(&first).unwrap().relu().unwrap())
        .unwrap();
    (flat(&hidden), flat(&logits))
}

/// Candle's XLM-RoBERTa encoder (RoBERTa's layout), then dense (tanh) and out_proj.
fn candle_roberta(dir: &Path, batch: &Batch) -> Outputs {
    let mut raw = config(dir);
    raw["position_embedding_type"] = "absolute".into();
    let cfg: xlm_roberta::Config = serde_json::from_value(raw).unwrap();
    let vb = weights(dir);
    let model = xlm_roberta::XLMRobertaModel::new(&cfg, vb.pp("roberta")).unwrap();
    let (ids, mask, types) = (
        Batch::tensor(&batch.ids),
        Batch::tensor(&batch.mask),
        Batch::tensor(&batch.types),
    );
    let hidden = model
        .forward(&ids, &mask, &types, None, None, None)
        .unwrap();
    let h = cfg.hidden_size;
    let labels = config(dir)["id2label"].as_object().unwrap().len();
    let dense = linear(h, h, vb.pp("classifier.dense")).unwrap();
    let out = linear(h, labels, vb.pp("classifier.out_proj")).unwrap();
    let first = hidden.i((.., 0)).unwrap();
    let logits = out
        .forward(&dense.forward(&first).unwrap().tanh().unwrap())
        .unwrap();
    (flat(&hidden), flat(&logits))
}

/// Asserts that ours and candle's hidden states and logits agree.
fn assert_agree(name: &str, ours: Outputs, candle: Outputs) {
    let hidden = max_abs_diff(&ours.0, &candle.0);
    assert!(hidden <= 1e-4, "{name}: hidden states differ by {hidden}");
    let scale = candle.1.iter().fold(0f32, |m, v| m.max(v.abs()));
    let logits = max_abs_diff(&ours.1, &candle.1) / scale;
    assert!(logits <= 1e-4, "{name}: logits differ by {logits} relative");
}

fn tiny(name: &str, candle: fn(&Path, &Batch) -> Outputs) {
    let dir = common::tiny(name);
    let batch = Batch::of_reference(&read_json(&dir.join("reference.json")));
    let model = Model::from_dir(&dir).unwrap();
    assert_agree(name, our_outputs(&model, &batch), candle(&dir, &batch));
}

#[test]
fn tiny_bert_matches_candle_transformers() {
    tiny("tiny-bert", candle_bert);
}

#[test]
fn tiny_distilbert_matches_candle_transformers() {
    tiny("tiny-distilbert", candle_distilbert);
}

#[test]
fn tiny_roberta_matches_candle_transformers() {
    tiny("tiny-roberta", candle_roberta);
}

/// The BERT classifier at `dir` on four SST-2 dev sentences, ours against candle's.
fn bert_on_real_sentences(name: &str, dir: &Path) {
    let sentences = [
        "it 's a charming and often affecting journey . ",
        "unflinchingly bleak and desperate ",
        "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales . ",
        "a sometimes tedious film . ",
    ];
    let batch = Batch::of_sentences(dir, &sentences, 0);
    let model = Model::from_dir(dir).unwrap();
    assert_agree(name, our_outputs(&model, &batch), candle_bert(dir, &batch));
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): the MiniLM SST-2 fixture"
)]
fn minilm_on_real_sentences_matches_candle_transformers() {
    let shared = fixtures_or_skip!();
    bert_on_real_sentences("minilm-l6-sst2", &shared.join("models/minilm-l6-sst2"));
}

#[test]
fn the_demo_model_on_real_sentences_matches_candle_transformers() {
    bert_on_real_sentences("demo", &common::demo_model());
}
