//! Mapping a model's output labels (`id2label`) onto a task's labels.

use anyhow::{bail, Result};

use super::task::Task;
use crate::model::config::ModelConfig;

/// For each model output, the task label index it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// `model_to_task[i]` is the task label of model output `i`.
    pub model_to_task: Vec<usize>,
}

impl LabelMap {
    /// Matches by name where the model names its labels, by index for generic `LABEL_k` names.
    pub fn new(config: &ModelConfig, task: Task) -> Result<Self> {
        let task_labels = task.labels();
        if task.is_regression() {
            if !config.regression {
                bail!("config.json: task {task} is a regression task but the model has {} labels (id2label); it needs num_labels = 1", config.num_labels());
            }
            return Ok(LabelMap {
                model_to_task: vec![0],
            });
        }
        if config.num_labels() != task_labels.len() {
            bail!(
                "config.json: the model has {} labels (id2label: {}) but task {task} has {} ({}); use a model fine-tuned for {task}",
                config.num_labels(),
                config.labels.join(", "),
                task_labels.len(),
                task_labels.join(", ")
            );
        }
        if config
            .labels
            .iter()
            .enumerate()
            .all(|(i, l)| is_generic(l, i))
        {
            return Ok(LabelMap {
                model_to_task: (0..task_labels.len()).collect(),
            });
        }
        let mut map = Vec::with_capacity(task_labels.len());
        for (i, name) in config.labels.iter().enumerate() {
            let norm = normalise(name);
            let Some(t) = task_labels.iter().position(|l| *l == norm) else {
                bail!(
                    "config.json: id2label[{i}] = \"{name}\" is not a label of task {task} ({}); fix id2label or use LABEL_0..LABEL_{}",
                    task_labels.join(", "),
                    task_labels.len() - 1
                );
            };
            if map.contains(&t) {
                bail!(
                    "config.json: id2label names task label \"{}\" twice",
                    task_labels[t]
                );
            }
            map.push(t);
        }
        Ok(LabelMap { model_to_task: map })
    }

    /// The model output that stands for task label `t`.
    pub fn model_index(&self, t: usize) -> usize {
        self.model_to_task
            .iter()
            .position(|&m| m == t)
            .expect("LabelMap is a permutation")
    }
}

fn is_generic(name: &str, i: usize) -> bool {
    name == format!("LABEL_{i}") || name == i.to_string()
}

fn normalise(name: &str) -> String {
    name.trim().to_lowercase().replace([' ', '-'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(labels: serde_json::Value) -> ModelConfig {
        ModelConfig::from_json(
            json!({"model_type": "bert", "hidden_size": 4, "num_hidden_layers": 1,
                   "num_attention_heads": 1, "intermediate_size": 4, "hidden_act": "gelu",
                   "vocab_size": 4, "max_position_embeddings": 4, "type_vocab_size": 1,
                   "id2label": labels}),
            "config.json",
        )
        .unwrap()
    }

    #[test]
    fn maps_by_name_and_by_index() {
        let c = config(json!({"0": "Not Entailment", "1": "entailment"}));
        assert_eq!(
            LabelMap::new(&c, Task::Rte).unwrap().model_to_task,
            vec![1, 0]
        );
        let c = config(json!({"0": "LABEL_0", "1": "LABEL_1"}));
        assert_eq!(
            LabelMap::new(&c, Task::Sst2).unwrap().model_to_task,
            vec![0, 1]
        );
    }

    #[test]
    fn refuses_foreign_labels_and_counts() {
        let c = config(json!({"0": "a", "1": "b", "2": "c"}));
        let err = LabelMap::new(&c, Task::Sst2).unwrap_err().to_string();
        assert!(
            err.contains("has 3 labels") && err.contains("task sst2 has 2"),
            "{err}"
        );
        let c = config(json!({"0": "negative", "1": "happy"}));
        let err = LabelMap::new(&c, Task::Sst2).unwrap_err().to_string();
        assert!(err.contains("id2label[1] = \"happy\""), "{err}");
    }
}
