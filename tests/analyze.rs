//! Significance analysis: exact ablation equals evaluating an explicitly pruned model, Taylor
//! scores equal finite differences, reports are deterministic, bad input is refused.

mod common;

use std::path::{Path, PathBuf};

use axcompress::analyze::elements::{Element, Level};
use axcompress::analyze::report::{ElementSignificance, Method, Report, Settings, Source};
use axcompress::analyze::{analyze, taylor, AnalysedModel};
use axcompress::data::batch::EncodedSet;
use axcompress::data::glue::Target;
use axcompress::data::labels::LabelMap;
use axcompress::data::splits::DataInfo;
use axcompress::data::task::Task;
use axcompress::evaluate::{example_loss, predict, score};
use axcompress::kernels::Ops;
use axcompress::model::encoder::{Gates, RunOptions};
use axcompress::model::Model;
use axcompress::scoring::batch::batches;
use axcompress::text::tokenizer::Sequence;
use candle_core::Tensor;
use common::read_json;
use indicatif::ProgressBar;

/// The unpadded reference batch of a tiny fixture, with arbitrary but fixed labels, as a
/// 3-class (MNLI-shaped) task.
fn tiny_set(dir: &Path) -> EncodedSet {
    let r = read_json(&dir.join("reference.json"));
    let rows = |k: &str| -> Option<Vec<Vec<u32>>> {
        r[k].as_array().map(|a| {
            a.iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        })
    };
    let (ids, mask) = (rows("input_ids").unwrap(), rows("attention_mask").unwrap());
    let types = rows("token_type_ids");
    let mut sequences = Vec::new();
    for (i, (row, m)) in ids.iter().zip(&mask).enumerate() {
        let n = m.iter().filter(|&&x| x == 1).count();
        let type_ids = types.as_ref().map_or(vec![0; n], |t| t[i][..n].to_vec());
        sequences.push(Sequence {
            ids: row[..n].to_vec(),
            type_ids,
        });
    }
    // Duplicate with other labels so the set is not tiny.
    let mut all = sequences.clone();
    all.extend(sequences.iter().rev().cloned());
    let targets = (0..all.len())
        .map(|i| Target::Class((i * 7 + 1) % 3))
        .collect();
    EncodedSet {
        suffix: "",
        path: PathBuf::from("reference.json"),
        sequences: all,
        targets,
    }
}

fn settings(method: Method, group_size: usize, levels: &[Level]) -> Settings {
    Settings {
        method,
        levels: levels.to_vec(),
        group_size,
        exact_groups: None,
        taylor_examples: usize::MAX,
        batch_size: 3,
        max_length: 64,
        forward_pass_budget: None,
    }
}

fn data_info(n: usize) -> DataInfo {
    DataInfo {
        source: "file".into(),
        path: "test".into(),
        examples: n,
        available: n,
        seed: None,
        fraction: None,
    }
}

fn identity_labels(n: usize) -> LabelMap {
    LabelMap {
        model_to_task: (0..n).collect(),
    }
}

/// Every element's ablation result equals evaluating the explicitly sliced model.
fn check_ablation_matches_pruned(
    model: &Model,
    set: &EncodedSet,
    task: Task,
    labels: &LabelMap,
    group_size: usize,
) {
    let all = [Level::Blocks, Level::Heads, Level::Groups];
    let subject = AnalysedModel {
        model,
        source: "test",
        task,
        labels,
    };
    let analysis = analyze(
        &subject,
        set,
        data_info(set.sequences.len()),
        settings(Method::Both, group_size, &all),
        true,
    )
    .unwrap();
    let report = &analysis.report;
    let hidden = ProgressBar::hidden();
    let base_logits = predict(model, &set.sequences, 4, RunOptions::default(), &hidden).unwrap();
    let base = score(task, labels, &base_logits, &set.targets);
    assert!((report.baseline.loss - base.loss).abs() <= 1e-6 * base.loss);
    let metric = task.primary_metric();
    for e in &report.elements {
        assert_eq!(e.source, Source::Ablation);
        let pruned = model.slice(&e.element.removal_plan(model)).unwrap();
        let logits = predict(&pruned, &set.sequences, 4, RunOptions::default(), &hidden).unwrap();
        let s = score(task, labels, &logits, &set.targets);
        let ours = report.baseline.loss + e.loss_delta;
        assert!(
            (ours - s.loss).abs() <= 1e-5 * s.loss.abs(),
            "{:?}: analysis gives loss {ours}, the pruned model {}",
            e.element,
            s.loss
        );
        let metric_delta = s.get(metric).unwrap() - base.get(metric).unwrap();
        assert!(
            (e.metric_delta.unwrap() - metric_delta).abs() < 1e-12,
            "{:?} metric",
            e.element
        );
    }
}

#[test]
fn ablation_equals_explicitly_pruned_models_on_tiny_fixtures() {
    for name in ["tiny-bert", "tiny-roberta", "tiny-distilbert"] {
        let dir = common::tiny(name);
        let model = Model::from_dir(&dir).unwrap();
        let set = tiny_set(&dir);
        check_ablation_matches_pruned(&model, &set, Task::Mnli, &identity_labels(3), 16);
    }
}

#[test]
fn ablation_equals_explicitly_pruned_models_on_a_reshaped_demo_model() {
    let dir = common::demo_model();
    let full = Model::from_dir(&dir).unwrap();
    // A model whose layers differ: drop some heads and neurons first.
    let mut keep = full.keep_all();
    keep[0].heads = Some(vec![0, 2, 3, 5, 7]);
    keep[1].neurons = Some((0..768).filter(|n| n % 3 != 0).take(512).collect());
    keep[2].heads = None;
    let model = full.slice(&keep).unwrap();
    let encoder = axcompress::text::tokenizer::TextEncoder::load(&dir, 64).unwrap();
    let glue =
        axcompress::data::glue::read(Task::Sst2, &common::demo_sst2().join("dev.tsv")).unwrap();
    let mut set = axcompress::data::batch::encode(&glue, "", &encoder).unwrap();
    set = set.subset(&(0..12).collect::<Vec<_>>());
    let labels = LabelMap::new(&model.config, Task::Sst2).unwrap();
    check_ablation_matches_pruned(&model, &set, Task::Sst2, &labels, 256);
}

#[test]
fn taylor_gradients_equal_finite_differences() {
    let dir = common::tiny("tiny-bert");
    let model = Model::from_dir(&dir).unwrap();
    let set = tiny_set(&dir);
    let labels = identity_labels(3);
    let b = batches(&model, &set, &labels, 3).unwrap();
    let grads = taylor::gate_gradients(&model, &b, &ProgressBar::hidden()).unwrap();
    let n = set.sequences.len() as f64;
    // Losses in f64 from the logits, so the difference quotient is not lost to f32 rounding.
    let loss_with = |gates: &Gates| -> f64 {
        b.iter()
            .map(|batch| {
                let logits: Vec<Vec<f32>> = model
                    .forward(
                        &batch.inputs,
                        RunOptions {
                            gates: Some(gates),
                            ops: Ops::Inference,
                        },
                    )
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                logits
                    .iter()
                    .zip(&batch.examples)
                    .map(|(row, &ex)| example_loss(&labels, row, &set.targets[ex]))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n
    };
    let base = model.gates_for(&model.keep_all()).unwrap();
    let eps = 1e-2;
    type Pick = fn(&mut axcompress::model::encoder::LayerGates) -> &mut Option<Tensor>;
    let kinds: [(&str, Pick); 4] = [
        ("attention", |g| &mut g.attention),
        ("heads", |g| &mut g.heads),
        ("ffn", |g| &mut g.ffn),
        ("neurons", |g| &mut g.neurons),
    ];
    let mut checked = 0;
    for layer in 0..model.num_layers() {
        for (kind, pick) in kinds {
            let len = pick(&mut base.layers[layer].clone())
                .as_ref()
                .unwrap()
                .elem_count();
            for i in [0, len - 1] {
                let shifted = |delta: f32| {
                    let mut g = base.clone();
                    let t = pick(&mut g.layers[layer]).as_mut().unwrap();
                    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v[i] += delta;
                    *t = Tensor::new(v, &candle_core::Device::Cpu)
                        .unwrap()
                        .reshape(t.shape())
                        .unwrap();
                    g
                };
                let fd = (loss_with(&shifted(eps as f32)) - loss_with(&shifted(-eps as f32)))
                    / (2.0 * eps);
                let analytic = match kind {
                    "attention" => grads.attention[layer].unwrap(),
                    "heads" => grads.heads[layer][i],
                    "ffn" => grads.ffn[layer].unwrap(),
                    _ => grads.neurons[layer][i],
                };
                let tol = 2e-3 * analytic.abs().max(fd.abs()) + 2e-6;
                assert!(
                    (fd - analytic).abs() <= tol,
                    "layer {layer} {kind}[{i}]: analytic {analytic}, finite difference {fd}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 2);
}

#[test]
fn report_for_another_model_is_refused() {
    let dir = common::tiny("tiny-bert");
    let model = Model::from_dir(&dir).unwrap();
    let set = tiny_set(&dir);
    let labels = identity_labels(3);
    let subject = AnalysedModel {
        model: &model,
        source: "tiny-bert",
        task: Task::Mnli,
        labels: &labels,
    };
    let analysis = analyze(
        &subject,
        &set,
        data_info(8),
        settings(Method::Ablation, 16, &[Level::Blocks]),
        true,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("report.json");
    std::fs::write(&path, serde_json::to_string(&analysis.report).unwrap()).unwrap();
    let loaded = Report::load(&path).unwrap();
    assert_eq!(loaded, analysis.report);
    loaded.check_model(&model, &path).unwrap();
    let mut keep = model.keep_all();
    keep[0].heads = Some(vec![1, 2, 3]);
    let pruned = model.slice(&keep).unwrap();
    let err = loaded.check_model(&pruned, &path).unwrap_err().to_string();
    assert!(
        err.contains("report.json")
            && err.contains("computed for model tiny-bert")
            && err.contains("rerun axcompress analyze"),
        "{err}"
    );
    let other = Model::from_dir(&common::tiny("tiny-roberta")).unwrap();
    assert!(loaded.check_model(&other, &path).is_err());
    std::fs::write(&path, r#"{"schema": "something-else"}"#).unwrap();
    assert!(Report::load(&path)
        .unwrap_err()
        .to_string()
        .contains("schema"));
}

fn analyze_cli(extra: &[&str]) -> std::process::Output {
    let (model, data) = (common::demo_model(), common::demo_sst2());
    let mut args = vec![
        "analyze",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        data.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    common::run(&args)
}

#[test]
fn the_report_is_complete_finite_and_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        tmp.path().join("a/report.json"),
        tmp.path().join("b/report.json"),
    );
    for out in [&a, &b] {
        let o = analyze_cli(&[
            "--on",
            "train-holdout",
            "--holdout",
            "40",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "reports differ between runs"
    );
    let report = Report::load(&a).unwrap();
    let count = |level: Level| {
        report
            .elements
            .iter()
            .filter(|e| e.element.level() == level)
            .count()
    };
    assert_eq!(
        (
            count(Level::Blocks),
            count(Level::Heads),
            count(Level::Groups)
        ),
        // The demo model: 3 layers of 2 blocks, 8 heads and 768 / 32 neuron groups.
        (6, 24, 3 * 768 / 32)
    );
    assert!(report
        .elements
        .iter()
        .all(|e| e.loss_delta.is_finite() && e.metric_delta.is_none_or(f64::is_finite)));
    assert_eq!(report.data.source, "train-holdout");
    assert_eq!((report.data.examples, report.data.seed), (40, Some(3)));
    let timing = read_json(&tmp.path().join("a/report.timing.json"));
    assert!(timing["forward_pass_equivalents"].as_f64().unwrap() > 1.0);
    for level in ["blocks", "heads", "groups"] {
        let svg = std::fs::read_to_string(tmp.path().join(format!("a/significance-{level}.svg")))
            .unwrap();
        let expected = count(match level {
            "blocks" => Level::Blocks,
            "heads" => Level::Heads,
            _ => Level::Groups,
        });
        assert_eq!(svg.matches("<title>").count(), expected, "{level}.svg");
    }
    // A different seed draws different data.
    let o = analyze_cli(&[
        "--on",
        "train-holdout",
        "--holdout",
        "40",
        "--seed",
        "4",
        "--levels",
        "blocks",
        "--json",
    ]);
    let other: serde_json::Value = common::json_stdout(&o);
    assert_ne!(
        other["baseline"]["loss"].as_f64(),
        Some(report.baseline.loss)
    );
}

#[test]
fn both_methods_report_rank_correlation() {
    let o = analyze_cli(&[
        "--on",
        "dev",
        "--limit",
        "24",
        "--method",
        "both",
        "--levels",
        "blocks,heads",
        "--json",
    ]);
    let report: Report = serde_json::from_value(common::json_stdout(&o)).unwrap();
    assert_eq!(report.data.source, "dev-split");
    assert_eq!(report.data.fraction, Some(0.5));
    for level in &report.levels {
        let rho = level
            .spearman_taylor_vs_ablation
            .expect("both gives a correlation");
        assert!((-1.0..=1.0).contains(&rho));
        assert_eq!(level.ablated, level.elements);
    }
    assert!(report
        .elements
        .iter()
        .all(|e| e.taylor_loss_delta.is_some()));
}

#[test]
fn group_size_must_divide_ffn_width() {
    let o = analyze_cli(&["--limit", "8", "--group-size", "100"]);
    common::assert_clean_error(
        &o,
        &["--group-size 100 does not divide the FFN width 768 of layer 0"],
    );
}

#[test]
fn empty_analysis_data_is_refused() {
    let empty = tempfile::Builder::new().suffix(".tsv").tempfile().unwrap();
    std::fs::write(empty.path(), "sentence\tlabel\n").unwrap();
    let o = analyze_cli(&["--on", empty.path().to_str().unwrap()]);
    common::assert_clean_error(&o, &["dataset is empty"]);
    let o = analyze_cli(&["--limit", "0"]);
    common::assert_clean_error(&o, &["selection data is empty"]);
}

#[test]
fn shards_run_apart_merge_into_the_report_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name);
    let common = ["--limit", "30", "--group-size", "64"];
    let out = path("one/report.json");
    let o = analyze_cli(&[&common[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shard_files: Vec<PathBuf> = (0..3).map(|i| path(&format!("s{i}.json"))).collect();
    for (i, file) in shard_files.iter().enumerate() {
        let shard = format!("{i}/3");
        let o = analyze_cli(
            &[
                &common[..],
                &["--shard", &shard, "--out", file.to_str().unwrap()],
            ]
            .concat(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let merge = |files: &[&PathBuf], out: &Path| {
        let mut args = vec!["analyze", "merge", "-q"];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        args.extend(["--out", out.to_str().unwrap()]);
        common::run(&args)
    };
    // Any order: the merged report is the one run's, byte for byte.
    let [a, b, c] = [&shard_files[0], &shard_files[1], &shard_files[2]];
    let merged = path("merged/report.json");
    let o = merge(&[c, a, b], &merged);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&merged).unwrap()
    );
    // Every shard measured a share of the ablations, not all of them.
    let ablated = |f: &PathBuf| {
        let v = read_json(f);
        let n = v["report"]["elements"].as_array().unwrap().iter();
        n.filter(|e| e["source"] == "ablation").count()
    };
    let whole = Report::load(&out).unwrap().cost.ablations;
    let shares: Vec<usize> = shard_files.iter().map(ablated).collect();
    assert_eq!(shares.iter().sum::<usize>(), whole, "{shares:?}");
    assert!(shares.iter().all(|&s| s > 0 && s < whole), "{shares:?}");
    // A missing shard, a shard twice, a shard of another analysis, a plain report: refused.
    let o = merge(&[a, c], &path("m.json"));
    common::assert_clean_error(&o, &["shard 1/3 is missing"]);
    let o = merge(&[a, b, b, c], &path("m.json"));
    common::assert_clean_error(&o, &["shard 1/3 is also in"]);
    let other = path("other.json");
    let o = analyze_cli(
        &[
            "--limit",
            "20",
            "--group-size",
            "64",
            "--shard",
            "1/3",
            "--out",
        ]
        .into_iter()
        .chain([other.to_str().unwrap()])
        .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = merge(&[a, &other, c], &path("m.json"));
    common::assert_clean_error(&o, &["not a shard of the same analysis"]);
    let o = merge(&[a, b, &out], &path("m.json"));
    common::assert_clean_error(&o, &["is not axcompress.significance-shard.v1"]);
    assert!(!path("m.json").exists());
}

#[test]
fn a_forward_pass_budget_ablates_the_taylor_least_significant_first() {
    let run = |extra: &[&str]| -> Report {
        let args = [
            &["--limit", "24", "--group-size", "64", "--json"][..],
            extra,
        ]
        .concat();
        serde_json::from_value(common::json_stdout(&analyze_cli(&args))).unwrap()
    };
    let full = run(&[]);
    let capped = run(&["--budget-passes", "20"]);
    // The report's bound counts the Taylor pass as 3 passes, the budget at its measured 12.
    let bound = capped.cost.forward_equivalents_bound;
    assert!(bound + 9.0 <= 20.0 + 1e-9, "{:?}", capped.cost);
    assert!(capped.cost.ablations > 0 && capped.cost.ablations < full.cost.ablations);
    assert_eq!(capped.settings.forward_pass_budget, Some(20.0));
    // Within each level, no candidate left to its Taylor estimate ranks (by Taylor) below an
    // ablated one of the same layer: the budget goes to the least significant first (a layer's
    // elements all cost the same).
    let candidate =
        |e: &&ElementSignificance| !matches!(e.element, Element::Group { index, .. } if index >= 8);
    let left_out = capped.elements.iter().filter(candidate);
    for e in left_out.filter(|e| e.source == Source::Taylor) {
        let estimate = e.taylor_loss_delta.unwrap();
        let above = capped.elements.iter().filter(|x| {
            x.source == Source::Ablation
                && x.element.level() == e.element.level()
                && x.element.layer() == e.element.layer()
                && x.taylor_loss_delta.unwrap() > estimate
        });
        assert_eq!(above.count(), 0, "{:?}", e.element);
    }
    assert!(capped
        .elements
        .iter()
        .any(|e| e.source == Source::Taylor && e.element.level() == Level::Heads));
    // A budget that covers everything changes nothing but the recorded setting.
    let roomy = run(&["--budget-passes", "100000"]);
    assert_eq!(roomy.elements, full.elements);
    assert_eq!(roomy.cost, full.cost);
}
