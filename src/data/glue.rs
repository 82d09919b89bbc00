//! GLUE TSV readers: one example per row, label parsed against the task's label names.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fsutil::read_text;

use super::task::{Layout, Task};

/// The gold answer of an example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Index into [`Task::labels`].
    Class(usize),
    /// Regression score (STS-B).
    Score(f32),
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// First (or only) sentence.
    pub text_a: String,
    /// Second sentence for pair tasks.
    pub text_b: Option<String>,
    /// Gold label.
    pub target: Target,
}

/// The examples of one TSV file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// File the examples were read from.
    pub path: PathBuf,
    /// Examples in file order.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// The examples at `indices`, in that order, from the same file.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        Dataset {
            path: self.path.clone(),
            examples: indices.iter().map(|&i| self.examples[i].clone()).collect(),
        }
    }
}

/// Locates the files of `split` for `task` under `data`: a file is used as it is; a directory
/// may hold the split files directly or in the task's GLUE sub-directory (e.g. `SST-2/`).
pub fn split_paths(task: Task, data: &Path, split: &str) -> Result<Vec<(&'static str, PathBuf)>> {
    if data.is_file() {
        return Ok(vec![("", data.to_path_buf())]);
    }
    if !data.is_dir() {
        bail!(
            "data path {} does not exist; pass a GLUE task directory or a .tsv file",
            data.display()
        );
    }
    let files = task.split_files(split)?;
    let base = [data.to_path_buf(), data.join(task.glue_dir())]
        .into_iter()
        .find(|dir| files.iter().all(|(_, f)| dir.join(f).is_file()));
    let Some(base) = base else {
        let names: Vec<&str> = files.iter().map(|(_, f)| f.as_str()).collect();
        bail!(
            "{}: no {} for task {task}; expected GLUE TSV files there or in {}/",
            data.display(),
            names.join(" and "),
            task.glue_dir()
        );
    };
    Ok(files.into_iter().map(|(s, f)| (s, base.join(f))).collect())
}

/// Reads a GLUE TSV file for `task` (a UTF-8 byte-order mark is dropped; bytes that are not
/// UTF-8 are an error naming the line).
pub fn read(task: Task, path: &Path) -> Result<Dataset> {
    let examples = parse(task, &read_text(path)?, &path.display().to_string())?;
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
    })
}

/// The examples of the text of a GLUE TSV file for `task`; `shown` names the file in errors.
pub fn parse(task: Task, text: &str, shown: &str) -> Result<Vec<Example>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let columns = match task.layout() {
        Layout::Header {
            text_a,
            text_b,
            label,
        } => {
            let (_, header) = lines
                .next()
                .with_context(|| format!("{shown}: file is empty"))?;
            let names: Vec<&str> = header.split('\t').collect();
            let find = |col: &str| {
                names.iter().position(|n| *n == col).with_context(|| {
                    format!("{shown}: missing column \"{col}\" in the header (task {task} needs it; found: {})", found_columns(&names))
                })
            };
            Columns {
                text_a: find(text_a)?,
                text_b: text_b.map(find).transpose()?,
                label: find(label)?,
                count: names.len(),
            }
        }
        Layout::Positional {
            text_a,
            label,
            columns,
        } => Columns {
            text_a,
            text_b: None,
            label,
            count: columns,
        },
    };
    let mut examples = Vec::new();
    for (line_no, line) in lines {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < columns.count {
            bail!(
                "{shown}:{line_no}: expected {} tab-separated columns, found {}",
                columns.count,
                fields.len()
            );
        }
        let target = parse_target(task, fields[columns.label])
            .with_context(|| format!("{shown}:{line_no}: cannot parse the label"))?;
        examples.push(Example {
            text_a: fields[columns.text_a].to_string(),
            text_b: columns.text_b.map(|c| fields[c].to_string()),
            target,
        });
    }
    if examples.is_empty() {
        bail!("{shown}: no examples; the dataset is empty");
    }
    Ok(examples)
}

struct Columns {
    text_a: usize,
    text_b: Option<usize>,
    label: usize,
    count: usize,
}

/// The header's column names as an error shows them: at most 8, each cut to 40 characters with
/// control characters escaped (a whole 10 MB line or raw NUL bytes never reach the terminal).
fn found_columns(names: &[&str]) -> String {
    let mut shown: Vec<String> = names.iter().take(8).map(|n| excerpt(n)).collect();
    if names.len() > 8 {
        shown.push(format!("… {} more", names.len() - 8));
    }
    shown.join(", ")
}

/// `text` cut to 40 characters, control characters escaped.
pub fn excerpt(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(40)
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect();
    if text.chars().nth(40).is_some() {
        out.push('…');
    }
    out
}

fn parse_target(task: Task, raw: &str) -> Result<Target> {
    let raw = raw.trim();
    let shown = excerpt(raw);
    if task.is_regression() {
        return match raw.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(Target::Score(v)),
            _ => bail!("\"{shown}\" is not a number"),
        };
    }
    let labels = task.labels();
    if let Some(i) = labels.iter().position(|l| *l == raw) {
        return Ok(Target::Class(i));
    }
    match raw.parse::<usize>() {
        Ok(i) if i < labels.len() => Ok(Target::Class(i)),
        _ => bail!(
            "\"{shown}\" is not a label of task {task} (expected one of {} or 0..{})",
            labels.join(", "),
            labels.len() - 1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    #[test]
    fn reads_sst2_and_rte() {
        let f = write("sentence\tlabel\ngood film \t1\nbad \t0\n");
        let d = read(Task::Sst2, f.path()).unwrap();
        assert_eq!(d.examples.len(), 2);
        assert_eq!(d.examples[0].target, Target::Class(1));
        let f = write("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n");
        let d = read(Task::Rte, f.path()).unwrap();
        assert_eq!(d.examples[0].text_b.as_deref(), Some("b"));
        assert_eq!(d.examples[0].target, Target::Class(1));
    }

    #[test]
    fn reads_headerless_cola_and_stsb_scores() {
        let f = write("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n");
        let d = read(Task::Cola, f.path()).unwrap();
        assert_eq!(d.examples[0].target, Target::Class(1));
        let f = write("index\tgenre\tsentence1\tsentence2\tscore\n0\tx\ta\tb\t3.8\n");
        assert_eq!(
            read(Task::Stsb, f.path()).unwrap().examples[0].target,
            Target::Score(3.8)
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let f = write("text\tlabel\nx\t1\n");
        let err = format!("{:#}", read(Task::Sst2, f.path()).unwrap_err());
        assert!(err.contains("missing column \"sentence\""), "{err}");
        let f = write("sentence\tlabel\nx\tmaybe\n");
        let err = format!("{:#}", read(Task::Sst2, f.path()).unwrap_err());
        assert!(
            err.contains(":2: cannot parse the label") && err.contains("\"maybe\""),
            "{err}"
        );
        let f = write("sentence\tlabel\n");
        assert!(format!("{:#}", read(Task::Sst2, f.path()).unwrap_err()).contains("empty"));
    }

    #[test]
    fn a_byte_order_mark_is_dropped_and_bad_bytes_name_their_line() {
        let f = write("\u{feff}sentence\tlabel\r\ngood\t1\r\n");
        assert_eq!(read(Task::Sst2, f.path()).unwrap().examples.len(), 1);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"sentence\tlabel\ngood\t1\nbad \xE9t\xE9\t0\n").unwrap();
        let err = format!("{:#}", read(Task::Sst2, f.path()).unwrap_err());
        assert!(err.contains(":3: byte 5 is not UTF-8"), "{err}");
    }

    #[test]
    fn a_huge_header_or_nul_bytes_are_not_echoed_whole() {
        let header = format!("{}\tx\u{0}y\n", "h".repeat(1_000_000));
        let err = parse(Task::Sst2, &header, "f.tsv").unwrap_err().to_string();
        assert!(err.len() < 300, "{} bytes", err.len());
        assert!(err.contains("hhhh…") && err.contains("x\\u{0}y"), "{err}");
        assert!(!err.contains('\0'));
        let err = parse(Task::Sst2, "sentence\tlabel\na\t\u{0}\u{7}\n", "f.tsv").unwrap_err();
        let chain = format!("{err:#}");
        assert!(
            chain.contains("\\u{0}\\u{7}") && !chain.contains('\0'),
            "{chain}"
        );
    }
}
