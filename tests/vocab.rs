//! Vocabulary pruning: every corpus text tokenizes as before (renumbered) with the exported
//! tokenizer, logits are unchanged, and a run judges the pruned model on data encoded by its own
//! tokenizer (what `eval` sees).

mod common;

use std::path::Path;

use axcompress::data::glue;
use axcompress::data::task::Task;
use axcompress::evaluate::predict;
use axcompress::export::write_model_dir;
use axcompress::model::encoder::RunOptions;
use axcompress::model::Model;
use axcompress::passes::vocab::{dataset_texts, prune_vocabulary};
use axcompress::text::tokenizer::Sequence;
use axcompress::text::tokenizer::TextEncoder;
use indicatif::ProgressBar;
use serde_json::json;

fn encode(dir: &Path, texts: &[String], max_length: usize) -> Vec<Sequence> {
    let pairs: Vec<(String, Option<String>)> = texts.iter().map(|t| (t.clone(), None)).collect();
    TextEncoder::load(dir, max_length)
        .unwrap()
        .encode(&pairs)
        .unwrap()
}

fn logits(model: &Model, seqs: &[Sequence]) -> Vec<f32> {
    predict(
        model,
        seqs,
        32,
        RunOptions::default(),
        &ProgressBar::hidden(),
    )
    .unwrap()
    .concat()
}

#[test]
fn every_sst2_corpus_text_tokenizes_as_before_and_logits_are_unchanged() {
    let src = common::demo_model();
    let model = Model::from_dir(&src).unwrap();
    let read = |split: &str| {
        let path = common::demo_sst2().join(format!("{split}.tsv"));
        glue::read(Task::Sst2, &path).unwrap()
    };
    let (train, dev) = (read("train"), read("dev"));
    let texts = dataset_texts(&[train, dev.clone()]);
    let (pruned, kept) = prune_vocabulary(&model, &texts).unwrap();
    // The demo model's vocabulary is already SST-2's (train and dev); the demo's train sample
    // is a subset of SST-2 train, so its corpus still drops tokens.
    assert!(
        kept.len() < model.config.vocab_size,
        "kept {} of {}",
        kept.len(),
        model.config.vocab_size
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    write_model_dir(&pruned, &out, &[], &json!({}), false).unwrap();
    let reloaded = Model::from_dir(&out).unwrap();
    assert_eq!(reloaded.config.vocab_size, kept.len());
    let vocab_txt = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert_eq!(vocab_txt.lines().count(), kept.len());

    // Every corpus text, whole (no truncation): the exported tokenizer gives the renumbered ids.
    let (before, after) = (encode(&src, &texts, 512), encode(&out, &texts, 512));
    for ((text, b), a) in texts.iter().zip(&before).zip(&after) {
        let renumbered: Vec<u32> = b.ids.iter().map(|&i| kept.new_id(i).unwrap()).collect();
        assert_eq!(renumbered, a.ids, "{text}");
        assert_eq!(b.type_ids, a.type_ids, "{text}");
    }
    // Logits: identical ids pick identical rows, so every text's logits are unchanged; run every
    // dev sentence and the first 1000 train sentences through both models.
    let dev_texts = dataset_texts(&[dev]);
    let sample: Vec<String> = texts[..1000].iter().chain(&dev_texts).cloned().collect();
    let want = logits(&model, &encode(&src, &sample, 128));
    let got = logits(&reloaded, &encode(&out, &sample, 128));
    assert_eq!(want.len(), got.len());
    let diff = common::max_abs_diff(&want, &got);
    assert!(diff <= 1e-5, "max |Δlogit| {diff}");
}

#[test]
#[cfg_attr(
    fixtures_missing,
    ignore = "needs ../shared (AXCOMPRESS_FIXTURES): the MiniLM RTE fixture and GLUE RTE"
)]
fn a_file_corpus_prunes_rte_pairs_and_the_judge_sees_what_eval_sees() {
    let shared = fixtures_or_skip!();
    let data = common::small_glue(&shared.join("data/glue"), "RTE", 40);
    // The corpus: only the train pairs, so dev words outside it become [UNK].
    let train = glue::read(Task::Rte, &data.path().join("RTE/train.tsv")).unwrap();
    let corpus: Vec<String> = train
        .examples
        .iter()
        .map(|e| format!("{}\t{}", e.text_a, e.text_b.clone().unwrap_or_default()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let corpus_file = tmp.path().join("corpus.txt");
    std::fs::write(&corpus_file, corpus.join("\n")).unwrap();
    let out = tmp.path().join("rte");
    let model = shared.join("models/minilm-l6-rte");
    let corpus_flag = [
        "--bits",
        "8",
        "--vocab-corpus",
        corpus_file.to_str().unwrap(),
    ];
    let report = common::json_stdout(&common::run_task_stage(
        "quantize",
        "rte",
        &model,
        data.path(),
        &out,
        &corpus_flag,
    ));
    let v = &vocab_stage(&report)["details"];
    assert_eq!(v["corpus_texts"], 80);
    let kept = v["kept"].as_u64().unwrap();
    assert!(kept < v["of"].as_u64().unwrap());
    assert_eq!(v["dev_unknown_rate_before"], 0.0);
    assert!(v["dev_unknown_rate_after"].as_f64().unwrap() > 0.0, "{v}");

    let config = common::read_json(&out.join("config.json"));
    assert_eq!(config["vocab_size"], kept);
    let history = config["axcompress"]["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["pass"], "vocab", "{history:?}");
    assert!(
        !out.join("vocab.txt").exists(),
        "the input had no vocab.txt"
    );
    let tokenizer = common::read_json(&out.join("tokenizer.json"));
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len() as u64, kept);

    // The run's dev figure for the pruned model is what `eval` measures on the output.
    let evaluated = common::eval_json(&out, "rte", data.path());
    assert_eq!(evaluated["metrics"], common::dev_after(&report));
}

/// The vocab stage of a run's report (its last stage).
fn vocab_stage(report: &serde_json::Value) -> &serde_json::Value {
    let last = report["stages"].as_array().unwrap().last().unwrap();
    assert_eq!(last["pass"], "vocab", "{last}");
    last
}

/// A config for the demo model and data with `stages` (TOML `[[stages]]` tables).
fn demo_config(dir: &Path, stages: &str) -> std::path::PathBuf {
    let text = format!(
        "model = \"{}\"\ndata = \"{}\"\ntask = \"sst2\"\n[selection]\nlimit = 200\n{stages}",
        common::demo_model().display(),
        common::demo_glue().join("SST-2").display()
    );
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_vocab_stage_after_quantize_writes_what_the_vocab_flag_writes_and_changes_no_selection_prediction(
) {
    let tmp = tempfile::tempdir().unwrap();
    let stages = "[[stages]]\npass = \"quantize\"\nbits = \"8\"\n[[stages]]\npass = \"vocab\"\n";
    let config = demo_config(tmp.path(), stages);
    let staged = tmp.path().join("staged");
    let report = common::compress_json(&config, &staged, &[]);
    let flagged = tmp.path().join("flagged");
    let quantize = common::run_stage(
        "quantize",
        &common::demo_model(),
        &common::demo_glue().join("SST-2"),
        &flagged,
        &["--bits", "8", "--vocab", "corpus", "--limit", "200"],
    );
    common::json_report(&quantize);
    for file in ["model.safetensors", "tokenizer.json", "vocab.txt"] {
        let (a, b) = (staged.join(file), flagged.join(file));
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{file}"
        );
    }
    // The corpus (train + dev) holds every selection sentence, so the re-encoded selection gives
    // every prediction it gave before the stage.
    let vocab = vocab_stage(&report);
    assert_eq!(
        vocab["settings"],
        json!({"corpus": null, "positions": false})
    );
    assert_eq!(vocab["selection_after"], vocab["selection_before"]);
    assert_eq!(vocab["selection_after"]["discordant"], 0, "{vocab}");
    let details = &vocab["details"];
    assert!(details["kept"].as_u64().unwrap() < details["of"].as_u64().unwrap());
    let config = common::read_json(&staged.join("config.json"));
    assert_eq!(config["vocab_size"], details["kept"]);
}

#[test]
fn a_stage_after_vocab_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let stages = "[[stages]]\npass = \"vocab\"\n[[stages]]\npass = \"quantize\"\nbits = \"8\"\n";
    let config = demo_config(tmp.path(), stages);
    let out = tmp.path().join("out");
    let o = common::run(&[
        "compress",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    common::assert_clean_error(
        &o,
        &["stage 1 is vocab but stage 2 follows it", "last stage"],
    );
    assert!(!out.exists());
}

#[test]
fn a_model_with_vocab_txt_only_prunes_its_vocabulary() {
    // Before: "token id 101 is not kept": a tokenizer built from vocab.txt has [CLS] and [SEP]
    // only in its post-processor, and the corpus ids left them out.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir(&src).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.txt",
    ] {
        std::fs::copy(common::demo_model().join(file), src.join(file)).unwrap();
    }
    let model = Model::from_dir(&src).unwrap();
    let dev = glue::read(Task::Sst2, &common::demo_sst2().join("dev.tsv")).unwrap();
    let texts = dataset_texts(&[dev]);
    let (pruned, kept) = prune_vocabulary(&model, &texts).unwrap();
    assert!(kept.len() < model.config.vocab_size);
    let out = tmp.path().join("pruned");
    write_model_dir(&pruned, &out, &[], &json!({}), false).unwrap();
    let reloaded = Model::from_dir(&out).unwrap();
    let (before, after) = (encode(&src, &texts, 128), encode(&out, &texts, 128));
    for (b, a) in before.iter().zip(&after) {
        let renumbered: Vec<u32> = b.ids.iter().map(|&i| kept.new_id(i).unwrap()).collect();
        assert_eq!(renumbered, a.ids);
    }
    let diff = common::max_abs_diff(&logits(&model, &before), &logits(&reloaded, &after));
    assert!(diff <= 1e-5, "max |Δlogit| {diff}");
}

/// `positions = true` keeps the position rows of the run's max length: the output's table is the
/// first rows of the plain vocab output's, its dev predictions are the same, and a longer
/// `--max-length` is refused in one line.
#[test]
fn a_vocab_stage_with_positions_keeps_the_rows_of_the_max_length_and_the_same_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, stages: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let out = dir.join("out");
        let config = demo_config(&dir, stages);
        let report = common::compress_json(&config, &out, &["--max-length", "48"]);
        (out, report)
    };
    let (plain, _) = run("plain", "[[stages]]\npass = \"vocab\"\n");
    let (cut, report) = run("cut", "[[stages]]\npass = \"vocab\"\npositions = true\n");
    let details = &vocab_stage(&report)["details"];
    let before = common::read_json(&plain.join("config.json"))["max_position_embeddings"].clone();
    assert_eq!(details["positions"], json!([48, before]));
    assert_eq!(
        common::read_json(&cut.join("config.json"))["max_position_embeddings"],
        48
    );
    let table = |dir: &Path| {
        let model = Model::from_dir(dir).unwrap();
        model.embeddings.position.to_vec2::<f32>().unwrap()
    };
    let (full, kept) = (table(&plain), table(&cut));
    assert_eq!(kept, full[..48].to_vec());
    let predictions = |dir: &Path, name: &str| {
        let file = tmp.path().join(name);
        let args = [
            "--max-length",
            "48",
            "--predictions",
            file.to_str().unwrap(),
        ];
        let run = common::eval(dir, &common::demo_glue().join("SST-2"), &args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        common::read_json(&file)["predicted"].clone()
    };
    assert_eq!(
        predictions(&cut, "cut.json"),
        predictions(&plain, "plain.json")
    );
    let longer = common::eval(
        &cut,
        &common::demo_glue().join("SST-2"),
        &["--max-length", "49"],
    );
    common::assert_clean_error(&longer, &["--max-length 49 is out of range", "2..=48"]);
}
