//! GLUE from the Hugging Face hub dataset `nyu-mll/glue`: its parquet files, found in the local
//! hub cache first and downloaded only when not offline, read into the same [`Dataset`] as the
//! GLUE TSV reader gives.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::SchemaDescriptor;

use super::glue::{Dataset, Example, Target};
use super::task::Task;
use crate::model::source::{describe_hub_error, env_flag, hub_api};

/// Where the hub cache is (for error messages): the same place models are looked for
/// (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub use crate::model::source::hub_cache_dir;

/// The hub dataset holding GLUE.
pub const DATASET: &str = "nyu-mll/glue";

/// The parquet files of a split: groups of shards, each with its metric suffix ("" normally;
/// "matched" / "mismatched" for MNLI's dev split).
pub type SplitFiles = Vec<(&'static str, Vec<PathBuf>)>;

/// Parquet files of `split` ("train" or "dev") of `task` in the hub dataset, each with the
/// metric suffix used for that file ("" normally; MNLI "dev" gives ("matched",
/// validation_matched files…) and ("mismatched", validation_mismatched…)).
/// Looks in the local hub cache first; when not there and `offline` (or `HF_HUB_OFFLINE=1`) is
/// false, downloads them (hf-hub sync API, listing the repo's files to find
/// `<config>/<split>-*.parquet`). Returns Ok(None) when the files are neither cached nor
/// downloadable because we are offline (so that the caller can try the next source and name
/// every place it tried).
pub fn split_files(task: Task, split: &str, offline: bool) -> Result<Option<SplitFiles>> {
    let offline = offline || env_flag("HF_HUB_OFFLINE");
    split_files_in(&hub_cache_dir(), task, split, offline)
}

/// [`split_files`] with the hub cache directory given.
fn split_files_in(
    cache: &Path,
    task: Task,
    split: &str,
    offline: bool,
) -> Result<Option<SplitFiles>> {
    let splits = hub_splits(task, split)?;
    if let Some(found) = cached(cache, task, &splits) {
        return Ok(Some(found));
    }
    if offline {
        return Ok(None);
    }
    download(cache, task, &splits).map(Some).with_context(|| {
        format!("{task} data (pass --data DIR or set GLUE_DIR to use local GLUE files)")
    })
}

/// The hub split names of GLUE `split`, each with its metric suffix. The task registry decides
/// which splits exist: its `dev*.tsv` files are the hub's `validation*` splits.
fn hub_splits(task: Task, split: &str) -> Result<Vec<(&'static str, String)>> {
    let splits = task.split_files(split)?.into_iter().map(|(suffix, file)| {
        let stem = file.trim_end_matches(".tsv");
        let hub = match stem.strip_prefix("dev") {
            Some(rest) => format!("validation{rest}"),
            None => stem.to_string(),
        };
        (suffix, hub)
    });
    Ok(splits.collect())
}

/// The cached files of every one of `splits` (all shards present) in the snapshot that the
/// cache's `refs/main` of [`DATASET`] names; None when any is missing.
fn cached(cache: &Path, task: Task, splits: &[(&'static str, String)]) -> Option<SplitFiles> {
    let repo = cache.join(hf_hub::Repo::dataset(DATASET.to_string()).folder_name());
    let revision = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    // The hub's config names are the task names (sst2, cola, …, mnli).
    let dir = repo
        .join("snapshots")
        .join(revision.trim())
        .join(task.name());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let files = splits.iter().map(|(suffix, split)| {
        let shards = complete_shards(names.iter().map(String::as_str), split)?;
        Some((*suffix, shards.iter().map(|s| dir.join(s)).collect()))
    });
    files.collect()
}

/// Lists [`DATASET`]'s files on the hub and downloads the shards of `splits` into `cache`.
fn download(cache: &Path, task: Task, splits: &[(&'static str, String)]) -> Result<SplitFiles> {
    let api = hub_api(cache.to_path_buf())?;
    let repo = api.dataset(DATASET.to_string());
    let info = repo
        .info()
        .map_err(|e| describe_hub_error(e, DATASET, "file list"))?;
    let folder = format!("{}/", task.name());
    let names: Vec<&str> = info
        .siblings
        .iter()
        .filter_map(|s| s.rfilename.strip_prefix(&folder))
        .collect();
    let fetch = |name: String| {
        repo.get(&name)
            .map_err(|e| describe_hub_error(e, DATASET, &name))
    };
    let files = splits.iter().map(|(suffix, split)| {
        let Some(shards) = complete_shards(names.iter().copied(), split) else {
            bail!(
                "the hub dataset {DATASET} has no complete set of {folder}{split}-*.parquet files"
            );
        };
        let paths = shards.into_iter().map(|s| fetch(format!("{folder}{s}")));
        Ok((*suffix, paths.collect::<Result<_>>()?))
    });
    files.collect()
}

/// The shard file names of `split` (`<split>-00000-of-00002.parquet`, …) among `names`, sorted;
/// None unless every shard the names announce is there.
fn complete_shards<'a>(names: impl Iterator<Item = &'a str>, split: &str) -> Option<Vec<&'a str>> {
    let mut shards: Vec<(&str, usize)> = names
        .filter_map(|name| Some((name, shard_count(name, split)?)))
        .collect();
    shards.sort_unstable();
    let complete = !shards.is_empty() && shards.iter().all(|&(_, n)| n == shards.len());
    complete.then(|| shards.into_iter().map(|(name, _)| name).collect())
}

/// The number of shards of `split` when `name` is one of them (`<split>-<k>-of-<n>.parquet`).
fn shard_count(name: &str, split: &str) -> Option<usize> {
    let rest = name.strip_prefix(split)?.strip_prefix('-')?;
    let (k, n) = rest.strip_suffix(".parquet")?.split_once("-of-")?;
    k.parse::<usize>().ok()?;
    n.parse().ok()
}

/// Reads the parquet files of one split of `task` into a Dataset (rows in file order, files in
/// name order). Its `path` is the file, or the shards' folder when there are several.
pub fn read(task: Task, files: &[PathBuf]) -> Result<Dataset> {
    let mut files = files.to_vec();
    files.sort();
    let path = match files.as_slice() {
        [] => bail!("no parquet files given for task {task}"),
        [one] => one.clone(),
        [first, ..] => first.parent().unwrap_or(first).to_path_buf(),
    };
    let mut examples = Vec::new();
    for file in &files {
        examples.extend(read_file(task, file)?);
    }
    if examples.is_empty() {
        bail!("{}: no examples; the dataset is empty", path.display());
    }
    Ok(Dataset { path, examples })
}

/// How a file's `label` column becomes a [`Target`].
#[derive(Debug, PartialEq)]
enum Labels {
    /// A regression score (STS-B).
    Score,
    /// Hub class index → index into [`Task::labels`].
    Classes(Vec<usize>),
}

/// Positions of a task's columns in a hub parquet file.
struct Columns {
    text_a: usize,
    text_b: Option<usize>,
    label: usize,
}

/// The examples of one parquet file, in row order.
fn read_file(task: Task, path: &Path) -> Result<Vec<Example>> {
    let shown = path.display();
    let file = File::open(path).with_context(|| format!("cannot read {shown}"))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{shown}: unreadable parquet"))?;
    let meta = reader.metadata();
    let codecs = meta.row_groups().iter().flat_map(|g| g.columns());
    check_compression(codecs.map(|c| c.compression())).with_context(|| format!("{shown}"))?;
    let file_meta = meta.file_metadata();
    let columns =
        find_columns(task, file_meta.schema_descr()).with_context(|| format!("{shown}"))?;
    let labels = label_names(file_meta.key_value_metadata())
        .and_then(|names| label_map(task, names))
        .with_context(|| format!("{shown}"))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{shown}: unreadable parquet"))?;
    let examples = rows.enumerate().map(|(i, row)| {
        let row = row.with_context(|| format!("{shown}: unreadable parquet row {}", i + 1))?;
        example(row.into_columns(), &columns, &labels)
            .with_context(|| format!("{shown}: row {}", i + 1))
    });
    examples.collect()
}

/// Refuses column chunks compressed with a codec this build cannot decode.
fn check_compression(mut codecs: impl Iterator<Item = Compression>) -> Result<()> {
    match codecs.find(|c| !matches!(c, Compression::UNCOMPRESSED | Compression::SNAPPY)) {
        Some(codec) => bail!(
            "unsupported compression {codec} (axcompress reads snappy-compressed or uncompressed parquet)"
        ),
        None => Ok(()),
    }
}

/// The hub's text columns for `task`'s config.
fn text_columns(task: Task) -> (&'static str, Option<&'static str>) {
    match task {
        Task::Sst2 | Task::Cola => ("sentence", None),
        Task::Mrpc | Task::Rte | Task::Stsb => ("sentence1", Some("sentence2")),
        Task::Qnli => ("question", Some("sentence")),
        Task::Qqp => ("question1", Some("question2")),
        Task::Mnli => ("premise", Some("hypothesis")),
    }
}

/// Finds `task`'s text columns and `label` among the file's top-level columns.
fn find_columns(task: Task, schema: &SchemaDescriptor) -> Result<Columns> {
    let fields = schema.root_schema().get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    let find = |col: &str| {
        names.iter().position(|n| *n == col).with_context(|| {
            format!(
                "missing column \"{col}\" (task {task} needs it; found: {})",
                names.join(", ")
            )
        })
    };
    let (text_a, text_b) = text_columns(task);
    Ok(Columns {
        text_a: find(text_a)?,
        text_b: text_b.map(find).transpose()?,
        label: find("label")?,
    })
}

/// The ClassLabel names of the `label` column in a file's `huggingface` metadata
/// (`info.features.label.names`), when the file has them.
fn label_names(metadata: Option<&Vec<KeyValue>>) -> Result<Option<Vec<String>>> {
    let json = metadata
        .into_iter()
        .flatten()
        .find(|kv| kv.key == "huggingface")
        .and_then(|kv| kv.value.as_deref());
    let Some(json) = json else {
        return Ok(None);
    };
    let meta: serde_json::Value =
        serde_json::from_str(json).context("the \"huggingface\" metadata is not JSON")?;
    let Some(names) = meta.pointer("/info/features/label/names") else {
        return Ok(None);
    };
    let names = serde_json::from_value(names.clone())
        .context("the \"huggingface\" metadata's label names are not a list of strings")?;
    Ok(Some(names))
}

/// How hub labels map to `task`'s: through the ClassLabel `names` when given (equal to a task
/// label after lower-casing), else the hub's integer is the index into [`Task::labels`].
fn label_map(task: Task, names: Option<Vec<String>>) -> Result<Labels> {
    let labels = task.labels();
    if task.is_regression() {
        return Ok(Labels::Score);
    }
    let Some(names) = names else {
        return Ok(Labels::Classes((0..labels.len()).collect()));
    };
    let index = |name: &String| {
        let lower = name.to_lowercase();
        labels.iter().position(|l| *l == lower).with_context(|| {
            format!(
                "label name \"{name}\" is not a label of task {task} (expected one of {})",
                labels.join(", ")
            )
        })
    };
    Ok(Labels::Classes(
        names.iter().map(index).collect::<Result<_>>()?,
    ))
}

/// One example from a row's fields (top-level columns in schema order).
fn example(
    mut fields: Vec<(String, Field)>,
    columns: &Columns,
    labels: &Labels,
) -> Result<Example> {
    let mut text = |c: usize| match std::mem::replace(&mut fields[c].1, Field::Null) {
        Field::Str(s) => Ok(s),
        other => bail!("column \"{}\" holds {other}, not a string", fields[c].0),
    };
    Ok(Example {
        text_a: text(columns.text_a)?,
        text_b: columns.text_b.map(&mut text).transpose()?,
        target: target(&fields[columns.label].1, labels)?,
    })
}

/// The target for a `label` value.
fn target(label: &Field, labels: &Labels) -> Result<Target> {
    let value = match *label {
        Field::Long(v) => v as f64,
        Field::Int(v) => v.into(),
        Field::Float(v) => v.into(),
        Field::Double(v) => v,
        ref other => bail!("label {other} is not a number"),
    };
    if value == -1.0 {
        bail!("has no gold labels (label -1); use the train or validation split");
    }
    match labels {
        Labels::Score if value.is_finite() => Ok(Target::Score(value as f32)),
        Labels::Classes(map) if value >= 0.0 && value.fract() == 0.0 => map
            .get(value as usize)
            .map(|&i| Target::Class(i))
            .with_context(|| format!("label {value} is not a class (0..{})", map.len() - 1)),
        _ => bail!("label {value} is not a valid label"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// A cache holding `files` (paths inside the snapshot) of [`DATASET`] at revision `abc`.
    fn cache_with(files: &[&str]) -> tempfile::TempDir {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("datasets--nyu-mll--glue");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        for file in files {
            let path = repo.join("snapshots/abc").join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        cache
    }

    #[test]
    fn offline_without_cached_files_gives_none() {
        let empty = tempfile::tempdir().unwrap();
        assert!(split_files_in(empty.path(), Task::Sst2, "dev", true)
            .unwrap()
            .is_none());
        let cache = cache_with(&["sst2/train-00000-of-00001.parquet"]);
        assert!(split_files_in(cache.path(), Task::Rte, "train", true)
            .unwrap()
            .is_none());
        assert!(split_files_in(cache.path(), Task::Sst2, "dev", true)
            .unwrap()
            .is_none());
        let cache = cache_with(&["sst2/train-00001-of-00002.parquet"]);
        assert!(split_files_in(cache.path(), Task::Sst2, "train", true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn cached_shards_are_all_taken_in_name_order_and_mnli_dev_has_two_groups() {
        let cache = cache_with(&[
            "sst2/train-00001-of-00002.parquet",
            "sst2/train-00000-of-00002.parquet",
            "sst2/test-00000-of-00001.parquet",
            "mnli/validation_matched-00000-of-00001.parquet",
            "mnli/validation_mismatched-00000-of-00001.parquet",
        ]);
        let snapshot = cache.path().join("datasets--nyu-mll--glue/snapshots/abc");
        let found = split_files_in(cache.path(), Task::Sst2, "train", true).unwrap();
        let expected = [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet",
        ]
        .map(|f| snapshot.join("sst2").join(f));
        assert_eq!(found, Some(vec![("", expected.to_vec())]));
        let found = split_files_in(cache.path(), Task::Mnli, "dev", true)
            .unwrap()
            .unwrap();
        let suffixes: Vec<&str> = found.iter().map(|(s, _)| *s).collect();
        assert_eq!(suffixes, ["matched", "mismatched"]);
        assert!(found[1].1[0].ends_with("mnli/validation_mismatched-00000-of-00001.parquet"));
        let found = split_files_in(cache.path(), Task::Mnli, "dev_matched", true).unwrap();
        assert_eq!(found.unwrap()[0].0, "");
        assert!(split_files_in(cache.path(), Task::Sst2, "test", true).is_err());
    }

    /// Writes a parquet file with columns `sentence` and `label` (one row per label) and, when
    /// given, the `huggingface` metadata.
    fn write_parquet(dir: &Path, labels: &[i64], huggingface: Option<&str>) -> PathBuf {
        let message =
            "message schema { REQUIRED BYTE_ARRAY sentence (UTF8); REQUIRED INT64 label; }";
        let schema = Arc::new(parse_message_type(message).unwrap());
        let metadata =
            huggingface.map(|m| vec![KeyValue::new("huggingface".into(), m.to_string())]);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(metadata)
            .build();
        let path = dir.join("train-00000-of-00001.parquet");
        let file = File::create(&path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, Arc::new(props)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let sentences: Vec<ByteArray> = (0..labels.len())
            .map(|i| format!("s{i}").as_str().into())
            .collect();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&sentences, None, None)
            .unwrap();
        column.close().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<Int64Type>()
            .write_batch(labels, None, None)
            .unwrap();
        column.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();
        path
    }

    fn targets(dataset: &Dataset) -> Vec<Target> {
        dataset.examples.iter().map(|e| e.target).collect()
    }

    #[test]
    fn labels_map_through_metadata_names_else_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let reversed = r#"{"info": {"features": {"label": {"names": ["Positive", "negative"], "_type": "ClassLabel"}}}}"#;
        let file = write_parquet(dir.path(), &[0, 1], Some(reversed));
        let d = read(Task::Sst2, &[file]).unwrap();
        assert_eq!(targets(&d), [Target::Class(1), Target::Class(0)]);
        assert_eq!(d.examples[1].text_a, "s1");
        let file = write_parquet(dir.path(), &[0, 1], None);
        assert_eq!(
            targets(&read(Task::Sst2, &[file]).unwrap()),
            [Target::Class(0), Target::Class(1)]
        );
        let names = |n: &[&str]| Some(n.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            label_map(Task::Rte, names(&["NOT_ENTAILMENT", "entailment"])).unwrap(),
            Labels::Classes(vec![1, 0])
        );
        let err = format!(
            "{:#}",
            label_map(Task::Rte, names(&["yes", "no"])).unwrap_err()
        );
        assert!(
            err.contains("label name \"yes\" is not a label of task rte"),
            "{err}"
        );
        assert_eq!(label_map(Task::Stsb, None).unwrap(), Labels::Score);
    }

    fn read_error(task: Task, file: &Path) -> String {
        format!("{:#}", read(task, &[file.to_path_buf()]).unwrap_err())
    }

    #[test]
    fn gold_less_labels_missing_columns_and_other_codecs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = write_parquet(dir.path(), &[0, -1], None);
        let err = read_error(Task::Sst2, &file);
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(
            err.contains("has no gold labels (label -1); use the train or validation split"),
            "{err}"
        );
        let file = write_parquet(dir.path(), &[0, 5], None);
        let err = read_error(Task::Sst2, &file);
        assert!(err.contains("row 2: label 5 is not a class"), "{err}");
        let err = read_error(Task::Rte, &file);
        assert!(
            err.contains(
                "missing column \"sentence1\" (task rte needs it; found: sentence, label)"
            ),
            "{err}"
        );
        std::fs::write(&file, "not parquet").unwrap();
        let err = read_error(Task::Sst2, &file);
        assert!(err.contains("unreadable parquet"), "{err}");
        let err =
            check_compression([Compression::SNAPPY, Compression::LZ4].into_iter()).unwrap_err();
        assert!(
            err.to_string().contains("unsupported compression LZ4"),
            "{err}"
        );
        assert!(check_compression([Compression::UNCOMPRESSED].into_iter()).is_ok());
    }
}
