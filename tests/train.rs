//! Training in candle: the gradients of the penalised loss equal finite differences, recovery
//! training lowers the task loss, and a run interrupted by Ctrl-C resumes to the same bytes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axcompress::model::inputs::Inputs;
use axcompress::model::Model;
use axcompress::scoring::batch::ScoringBatch;
use axcompress::text::tokenizer::Sequence;
use axcompress::train::lasso::{GroupPenalty, Grouping};
use axcompress::train::loss::Objective;
use axcompress::train::params::Trainable;
use candle_core::{Device, Tensor};

/// Three short sequences with labels for tiny-bert.
fn tiny_batch(model: &Model) -> ScoringBatch {
    let seqs = [
        vec![2u32, 7, 9, 11, 3],
        vec![2, 5, 3],
        vec![2, 13, 8, 6, 1, 3],
    ];
    let seqs: Vec<Sequence> = seqs
        .into_iter()
        .map(|ids| Sequence {
            type_ids: vec![0; ids.len()],
            ids,
        })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    ScoringBatch {
        inputs: Inputs::from_sequences(&model.config, &refs).unwrap(),
        examples: vec![0, 1, 2],
        loss_targets: Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap(),
        regression: false,
    }
}

#[test]
fn penalised_loss_gradients_match_finite_differences() {
    let model = Model::from_dir(&common::tiny("tiny-bert")).unwrap();
    let trainable = Trainable::new(&model).unwrap();
    let batch = tiny_batch(&model);
    let objective = Objective {
        task_weight: 1.0,
        distill_weight: 0.5,
        temperature: 2.0,
        hidden_weight: 0.3,
    };
    // The teacher is the original model; the student moves away from it a little first, so that
    // distillation has a gradient.
    for p in &trainable.params {
        let moved = ((p.var.as_tensor().detach() * 0.9).unwrap() + 0.01).unwrap();
        p.var.set(&moved).unwrap();
    }
    let w = |name: &str| {
        let p = trainable.params.iter().find(|p| p.name == name).unwrap();
        p.var.clone()
    };
    let ffn = w("layer.0.ffn.intermediate.weight");
    let lasso = GroupPenalty::new(ffn.as_tensor(), Grouping::Stripes(4), 0.01).unwrap();
    let loss = || -> Tensor {
        let task = objective.loss(&trainable.model, &model, &batch).unwrap();
        (task + lasso.value(ffn.as_tensor()).unwrap()).unwrap()
    };
    let grads = loss().backward().unwrap();
    let probes = [
        ("layer.0.ffn.intermediate.weight", 37),
        ("layer.0.ffn.intermediate.weight", 1000),
        ("layer.0.attention.qkv.weight", 5),
        ("layer.1.attention.output.weight", 300),
        ("layer.1.ffn.norm.weight", 3),
        ("head.out.bias", 1),
    ];
    for (name, index) in probes {
        let var = w(name);
        let analytic: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original = var.as_tensor().detach().copy().unwrap();
        let at = |delta: f32| -> f64 {
            let mut v: Vec<f32> = original.flatten_all().unwrap().to_vec1().unwrap();
            v[index] += delta;
            let moved = Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap();
            var.set(&moved).unwrap();
            loss().to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2;
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        var.set(&original).unwrap();
        let a = analytic[index] as f64;
        assert!(
            (a - numeric).abs() <= 2e-3 + 0.02 * numeric.abs(),
            "{name}[{index}]: backward {a}, finite difference {numeric}"
        );
    }
}

/// A compress config training the demo model on `data` with `recover` settings.
fn recover_config(dir: &Path, data: &Path, recover: &str) -> std::path::PathBuf {
    let text = format!(
        "model = \"{}\"\ntask = \"sst2\"\ndata = \"{}\"\n\n[selection]\nselect_fraction = 0.5\n\n[[stages]]\npass = \"recover\"\n{recover}\n",
        common::demo_model().display(),
        data.display()
    );
    let path = dir.join("recover.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn recovery_training_on_the_task_loss_lowers_it() {
    let data = common::small_sst2(48);
    let tmp = tempfile::tempdir().unwrap();
    let settings = "task_weight = 1.0\ndistill_weight = 0.0\nepochs = 6\nlearning_rate = 2e-4\nwarmup = 0.0\nevaluations = 2";
    let config = recover_config(tmp.path(), data.path(), settings);
    let report = common::compress_json(&config, &tmp.path().join("out"), &[]);
    let d = &report["stages"][0]["details"];
    assert_eq!(d["train_examples"], 48);
    assert_eq!(d["steps"], 12);
    let (first, last) = (
        d["loss_first_tenth"].as_f64().unwrap(),
        d["loss_last_tenth"].as_f64().unwrap(),
    );
    assert!(last < 0.5 * first, "loss {first} → {last}");
    assert_eq!(d["evaluations"].as_array().unwrap().len(), 3, "{d}");
}

#[test]
fn recovery_stops_early_after_evaluations_that_do_not_beat_the_best() {
    let data = common::small_sst2(48);
    let tmp = tempfile::tempdir().unwrap();
    // A learning rate that wrecks the model: no evaluation beats the untrained one, which the
    // selection (labelled by the input model) scores at full agreement.
    let wreck =
        "epochs = 8\nlearning_rate = 0.05\nwarmup = 0.0\nevaluations = 4\ntrain_limit = 1000";
    let perturbed = ["--on", "train-perturbed", "--holdout", "16"];
    let stopped = format!("{wreck}\nearly_stop = 1");
    let config = recover_config(tmp.path(), data.path(), &stopped);
    let report = common::compress_json(&config, &tmp.path().join("stopped"), &perturbed);
    let d = &report["stages"][0]["details"];
    assert_eq!(d["kept"]["step"], 0, "{d}");
    assert_eq!(
        d["steps"], 2,
        "one evaluation after the untrained model, then stop: {d}"
    );
    assert_eq!(d["evaluations"].as_array().unwrap().len(), 2);
    // Without it, the run trains to the end (32 examples: one step per epoch).
    let config = recover_config(tmp.path(), data.path(), wreck);
    let report = common::compress_json(&config, &tmp.path().join("full"), &perturbed);
    let d = &report["stages"][0]["details"];
    assert_eq!(d["steps"], 8, "{d}");
    assert_eq!(d["evaluations"].as_array().unwrap().len(), 5);
}

#[test]
fn recovery_never_trains_on_a_train_holdout_or_perturbed_selection() {
    let data = common::small_sst2(48);
    let tmp = tempfile::tempdir().unwrap();
    let config = recover_config(tmp.path(), data.path(), "train_limit = 1000");
    let holdout = ["--on", "train-holdout", "--holdout", "16"];
    let report = common::compress_json(&config, &tmp.path().join("out"), &holdout);
    assert_eq!(report["stages"][0]["details"]["train_examples"], 48 - 16);
    // Perturbed and labelled by the input model: the input agrees with itself, and the
    // sentences the selection was made from are not trained on either.
    let perturbed = ["--on", "train-perturbed", "--holdout", "16"];
    let report = common::compress_json(&config, &tmp.path().join("perturbed"), &perturbed);
    assert_eq!(report["data"]["selection"]["source"], "train-perturbed");
    assert_eq!(report["stages"][0]["details"]["train_examples"], 48 - 16);
    let selection = &report["evaluation"][0];
    assert_eq!(selection["split"], "selection");
    assert_eq!(selection["before"]["metrics"]["accuracy"], 1.0);
    let out = tmp.path().join("all");
    let config = config.to_str().unwrap();
    let args = [
        "compress",
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
        "-q",
    ];
    let all_held_out =
        common::run(&[&args[..], &["--on", "train-holdout", "--holdout", "48"]].concat());
    common::assert_clean_error(
        &all_held_out,
        &["no train examples outside the selection", "--holdout"],
    );
}

#[test]
fn recovery_interrupted_by_ctrl_c_resumes_to_the_same_model() {
    let data = common::small_sst2(96);
    let tmp = tempfile::tempdir().unwrap();
    let settings =
        "train_limit = 96\nepochs = 2\nlearning_rate = 1e-4\nevaluations = 6\ntask_weight = 0.5";
    let config = recover_config(tmp.path(), data.path(), settings);
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    let args = |out: &Path| {
        [
            "compress",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ]
        .map(String::from)
        .to_vec()
    };
    let o = common::run(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let checkpoint = tmp
        .path()
        .join("resumed.progress.stage0-recover.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_axcompress"))
        .args(args(&resumed))
        .env_remove("GLUE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before a checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!resumed.exists() && checkpoint.exists());

    let mut again = args(&resumed);
    again.push("--resume".into());
    let o = common::run(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !checkpoint.exists(),
        "the finished run removes its checkpoint"
    );
    for file in ["model.safetensors", "report.json"] {
        let (a, b) = (
            std::fs::read(whole.join(file)).unwrap(),
            std::fs::read(resumed.join(file)).unwrap(),
        );
        assert!(a == b, "{file} differs after resuming");
    }
}

#[test]
fn prune_with_recover_runs_a_recovery_stage_after_pruning() {
    let data = common::small_sst2(64);
    let tmp = tempfile::tempdir().unwrap();
    let model = common::demo_model();
    let extra = [
        "--levels",
        "blocks",
        "--budget",
        "2",
        "--max-drop",
        "50",
        "--confidence",
        "0.5",
        "--mode",
        "size",
        "--on",
        "dev",
        "--recover",
        "32",
        "--augment",
        "0.2",
    ];
    let o = common::run_stage("prune", &model, data.path(), &tmp.path().join("p"), &extra);
    let report = common::json_stdout(&o);
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[1]["pass"], "recover");
    assert_eq!(stages[1]["details"]["train_examples"], 32);
    assert_eq!(stages[1]["settings"]["train_limit"], 32);
    assert_eq!(stages[1]["settings"]["augment"], 0.2);
    assert_eq!(stages[0]["settings"]["recover_slack"], 1.0);
    assert!(
        stages[0]["alternatives"].is_null(),
        "with a recovery after it, the size prune does not re-fit (no unfitted alternative)"
    );
    let before = stages[1]["selection_before"]["metric"].as_f64().unwrap();
    let after = stages[1]["selection_after"]["metric"].as_f64().unwrap();
    assert!(
        after >= before,
        "the best kept includes the model before training"
    );
}
