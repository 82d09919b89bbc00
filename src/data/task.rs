//! The GLUE task registry: file layout, label names and metrics of each task.

use anyhow::{bail, Result};

/// A GLUE task.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Stanford Sentiment Treebank (binary sentiment), metric accuracy.
    Sst2,
    /// Corpus of Linguistic Acceptability, metric Matthews correlation.
    Cola,
    /// Microsoft Research Paraphrase Corpus, metrics F1 and accuracy.
    Mrpc,
    /// Question NLI, metric accuracy.
    Qnli,
    /// Recognizing Textual Entailment, metric accuracy.
    Rte,
    /// Semantic Textual Similarity Benchmark (regression), metrics Pearson and Spearman.
    Stsb,
    /// Quora Question Pairs, metrics F1 and accuracy.
    Qqp,
    /// Multi-Genre NLI, metrics matched and mismatched accuracy.
    Mnli,
}

/// Where a task's columns are in its TSV files.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// Files have a header row; columns are found by name.
    Header {
        /// First sentence column.
        text_a: &'static str,
        /// Second sentence column for pair tasks.
        text_b: Option<&'static str>,
        /// Label (or score) column.
        label: &'static str,
    },
    /// Files have no header (CoLA train/dev); columns by position.
    Positional {
        /// Sentence column.
        text_a: usize,
        /// Label column.
        label: usize,
        /// Number of columns each row must have.
        columns: usize,
    },
}

impl Task {
    /// All tasks, in GLUE order.
    pub const ALL: [Task; 8] = [
        Task::Sst2,
        Task::Cola,
        Task::Mrpc,
        Task::Qnli,
        Task::Rte,
        Task::Stsb,
        Task::Qqp,
        Task::Mnli,
    ];

    /// Lower-case task name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Sst2 => "sst2",
            Task::Cola => "cola",
            Task::Mrpc => "mrpc",
            Task::Qnli => "qnli",
            Task::Rte => "rte",
            Task::Stsb => "stsb",
            Task::Qqp => "qqp",
            Task::Mnli => "mnli",
        }
    }

    /// The directory name GLUE distributes the task under.
    pub fn glue_dir(self) -> &'static str {
        match self {
            Task::Sst2 => "SST-2",
            Task::Cola => "CoLA",
            Task::Mrpc => "MRPC",
            Task::Qnli => "QNLI",
            Task::Rte => "RTE",
            Task::Stsb => "STS-B",
            Task::Qqp => "QQP",
            Task::Mnli => "MNLI",
        }
    }

    /// Label names in the task's canonical order (the GLUE file's integer labels index this);
    /// empty for regression.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::Sst2 => &["negative", "positive"],
            Task::Cola => &["unacceptable", "acceptable"],
            Task::Mrpc => &["not_equivalent", "equivalent"],
            Task::Qnli | Task::Rte => &["entailment", "not_entailment"],
            Task::Stsb => &[],
            Task::Qqp => &["not_duplicate", "duplicate"],
            Task::Mnli => &["entailment", "neutral", "contradiction"],
        }
    }

    /// True for STS-B.
    pub fn is_regression(self) -> bool {
        self == Task::Stsb
    }

    /// Column layout of the task's TSV files.
    pub fn layout(self) -> Layout {
        let header = |a, b, label| Layout::Header {
            text_a: a,
            text_b: b,
            label,
        };
        match self {
            Task::Sst2 => header("sentence", None, "label"),
            Task::Cola => Layout::Positional {
                text_a: 3,
                label: 1,
                columns: 4,
            },
            Task::Mrpc => header("#1 String", Some("#2 String"), "Quality"),
            Task::Qnli => header("question", Some("sentence"), "label"),
            Task::Rte => header("sentence1", Some("sentence2"), "label"),
            Task::Stsb => header("sentence1", Some("sentence2"), "score"),
            Task::Qqp => header("question1", Some("question2"), "is_duplicate"),
            Task::Mnli => header("sentence1", Some("sentence2"), "gold_label"),
        }
    }

    /// The files of a split, each with a name suffix for its metrics (MNLI's dev split has a
    /// matched and a mismatched file).
    pub fn split_files(self, split: &str) -> Result<Vec<(&'static str, String)>> {
        match (self, split) {
            (Task::Mnli, "dev") => Ok(vec![
                ("matched", "dev_matched.tsv".into()),
                ("mismatched", "dev_mismatched.tsv".into()),
            ]),
            (Task::Mnli, "dev_matched" | "dev_mismatched") => {
                Ok(vec![("", format!("{split}.tsv"))])
            }
            (_, "train" | "dev") => Ok(vec![("", format!("{split}.tsv"))]),
            (_, other) => bail!("unknown split \"{other}\"; use train or dev"),
        }
    }

    /// Name of the metric that decisions (pruning acceptance, significance) use.
    pub fn primary_metric(self) -> &'static str {
        match self {
            Task::Cola => "mcc",
            Task::Mrpc | Task::Qqp => "f1",
            Task::Stsb => "pearson",
            _ => "accuracy",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnli_dev_has_two_files() {
        let files = Task::Mnli.split_files("dev").unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            Task::Sst2.split_files("dev").unwrap(),
            vec![("", "dev.tsv".to_string())]
        );
        assert!(Task::Sst2.split_files("test").is_err());
    }

    #[test]
    fn every_classification_task_has_labels() {
        for t in Task::ALL {
            assert_eq!(t.labels().is_empty(), t.is_regression(), "{t}");
        }
    }
}
