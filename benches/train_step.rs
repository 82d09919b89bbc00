//! One training step of MiniLM-L6 (SST-2) on the differentiable path: the loss (forward),
//! `backward`, and the AdamW update, timed apart, for the task loss alone and with distillation
//! (a teacher forward on the fast path added), at batch 32 on the first 32 SST-2 dev sentences
//! (padded to the longest), on `RAYON_NUM_THREADS` threads (candle's element-wise pool on one,
//! as in the binary). `scripts/compare_pytorch_train.py`
//! times the same step in PyTorch. `cargo bench --bench train_step` (needs ../shared).

use std::path::PathBuf;
use std::time::Instant;

use axcompress::data::batch::encode;
use axcompress::data::glue;
use axcompress::data::labels::LabelMap;
use axcompress::data::task::Task;
use axcompress::model::Model;
use axcompress::scoring::batch::batch;
use axcompress::train::loss::Objective;
use axcompress::train::optimizer::{AdamSettings, AdamW};
use axcompress::train::params::Trainable;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // As the binary does: candle's element-wise pool on one thread (see `threads`).
    axcompress::threads::configure(None);
    let shared = std::env::var_os("AXCOMPRESS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let model = Model::from_dir(&shared.join("models/minilm-l6-sst2")).expect("MiniLM fixture");
    let encoder = model.text_encoder(128).unwrap();
    let dev = glue::read(Task::Sst2, &shared.join("data/glue/SST-2/dev.tsv")).unwrap();
    let set = encode(&dev, "", &encoder).unwrap();
    let labels = LabelMap::new(&model.config, Task::Sst2).unwrap();
    let b = batch(&model, &set, &labels, (0..32).collect()).unwrap();
    println!(
        "batch 32 x {} tokens, {} threads",
        b.inputs.input_ids.dim(1).unwrap(),
        rayon::current_num_threads()
    );
    println!("objective     forward ms  backward ms  optimizer ms  step ms");
    for (name, distill) in [("task", 0.0), ("distill", 1.0)] {
        let objective = Objective {
            task_weight: 1.0 - distill,
            distill_weight: distill,
            temperature: 2.0,
            hidden_weight: 0.0,
        };
        let trainable = Trainable::new(&model).unwrap();
        let mut opt = AdamW::new(&trainable.params, AdamSettings::default()).unwrap();
        let (mut fwd, mut bwd, mut upd) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..13 {
            let t0 = Instant::now();
            let loss = objective.loss(&trainable.model, &model, &b).unwrap();
            let t1 = Instant::now();
            let grads = loss.backward().unwrap();
            let t2 = Instant::now();
            opt.step(&trainable.params, &grads, 1e-5).unwrap();
            let t3 = Instant::now();
            if i >= 3 {
                fwd.push((t1 - t0).as_secs_f64() * 1e3);
                bwd.push((t2 - t1).as_secs_f64() * 1e3);
                upd.push((t3 - t2).as_secs_f64() * 1e3);
            }
        }
        let (f, b, u) = (median(fwd), median(bwd), median(upd));
        println!(
            "{name:<12} {f:>10.1}  {b:>11.1}  {u:>12.1}  {:>7.1}",
            f + b + u
        );
    }
}
