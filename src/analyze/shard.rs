//! Sharded analysis: `analyze --shard I/N` measures one deterministic share of the ablations,
//! and `analyze merge` joins the N shard files into the report one run would have written, byte
//! for byte.
//!
//! Every shard runs the same baseline and Taylor pass, so every shard knows the whole element
//! list. The exact ablations are dealt round-robin in element order (element order runs layer by
//! layer within each level, so every shard gets a similar mix of cheap late-layer and costly
//! early-layer ablations); the Taylor-only elements cost nothing and go to shard 0.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::rank_and_summarise;
use super::report::{ElementSignificance, Report, Versioned};
use crate::fsutil::read_text;

/// Schema identifier of a shard file.
pub const SHARD_SCHEMA: &str = "axcompress.significance-shard.v1";

/// One share of an analysis: shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// How many shards the analysis is split into.
    pub count: usize,
}

impl Shard {
    /// The whole analysis in one process.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Which of the elements this shard measures, given which are ablated exactly: the exact ones
    /// dealt round-robin, the Taylor-only ones to shard 0.
    pub fn owned(&self, exact: &[bool]) -> Vec<bool> {
        let mut ordinal = 0;
        exact
            .iter()
            .map(|&is_exact| {
                if !is_exact {
                    return self.index == 0;
                }
                ordinal += 1;
                (ordinal - 1) % self.count == self.index
            })
            .collect()
    }
}

impl FromStr for Shard {
    type Err = String;

    /// Parses `I/N` with `0 ≤ I < N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("expected I/N with 0 <= I < N (e.g. 0/4), got `{s}`");
        let (i, n) = s.split_once('/').ok_or_else(usage)?;
        let index: usize = i.trim().parse().map_err(|_| usage())?;
        let count: usize = n.trim().parse().map_err(|_| usage())?;
        if count == 0 || index >= count {
            return Err(usage());
        }
        Ok(Shard { index, count })
    }
}

/// What one shard writes: its elements' significances (unranked) and where they sit in the
/// whole analysis's element order, inside the report every shard shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    /// Always [`SHARD_SCHEMA`].
    pub schema: String,
    /// Which share this is.
    pub shard: Shard,
    /// Elements in the whole analysis.
    pub total_elements: usize,
    /// Position of each of `report.elements` in the whole analysis's element order.
    pub positions: Vec<usize>,
    /// The analysis with only this shard's elements (rank 0) and no level summaries.
    pub report: Report,
}

impl ShardReport {
    /// Reads a shard file and checks its schema.
    pub fn load(path: &Path) -> Result<ShardReport> {
        let expected = Versioned {
            schema: SHARD_SCHEMA,
            fix: "pass the files `analyze --shard I/N --out FILE` wrote",
            what: "shard file",
        };
        expected.parse(&read_text(path)?, path)
    }

    /// Everything but this shard's own elements, to compare shards with.
    fn shared_part(&self) -> Result<serde_json::Value> {
        let mut common = self.report.clone();
        common.elements.clear();
        Ok(serde_json::to_value((
            &common,
            self.shard.count,
            self.total_elements,
        ))?)
    }
}

/// Joins the shard files at `paths` (any order) into the report of the whole analysis, checking
/// that they are the `N` shards of one analysis, each once.
pub fn merge(paths: &[PathBuf]) -> Result<Report> {
    let shards = paths
        .iter()
        .filter(|p| !is_timing_file(p))
        .map(|p| Ok((p.as_path(), ShardReport::load(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let Some((first_path, first)) = shards.first() else {
        bail!("analyze merge needs the shard files to join; pass every FILE that `analyze --shard I/N --out FILE` wrote");
    };
    let shared = first.shared_part()?;
    let count = first.shard.count;
    let mut seen: Vec<Option<&Path>> = vec![None; count];
    for (path, shard) in &shards {
        if shard.shared_part()? != shared {
            bail!(
                "{}: not a shard of the same analysis as {} (model, data, settings, baseline or shard count differ); rerun the shards with the same command",
                path.display(),
                first_path.display()
            );
        }
        if let Some(other) = seen[shard.shard.index].replace(path) {
            bail!(
                "{}: shard {}/{count} is also in {}; pass each shard once",
                path.display(),
                shard.shard.index,
                other.display()
            );
        }
    }
    if let Some(missing) = seen.iter().position(Option::is_none) {
        bail!("shard {missing}/{count} is missing; run `analyze --shard {missing}/{count}` and pass its file too");
    }
    let mut slots: Vec<Option<ElementSignificance>> = vec![None; first.total_elements];
    for (path, shard) in &shards {
        place(&mut slots, shard, path)?;
    }
    let mut elements = slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("the shards do not cover every element; rerun the shards with the same command")?;
    let levels = rank_and_summarise(&mut elements, &first.report.settings.levels);
    Ok(Report {
        elements,
        levels,
        ..first.report.clone()
    })
}

/// True for the wall-clock file `analyze` writes beside each shard (`<stem>.timing.json`), which
/// a glob such as `shards/*.json` also matches: the merge skips it.
fn is_timing_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(".timing.json"))
}

/// Puts `shard`'s elements into their slots, refusing positions out of range or taken.
fn place(
    slots: &mut [Option<ElementSignificance>],
    shard: &ShardReport,
    path: &Path,
) -> Result<()> {
    if shard.positions.len() != shard.report.elements.len() {
        bail!(
            "{}: {} positions for {} elements (the file was edited or is corrupt); rerun this shard",
            path.display(),
            shard.positions.len(),
            shard.report.elements.len()
        );
    }
    for (&position, element) in shard.positions.iter().zip(&shard.report.elements) {
        let slot = slots.get_mut(position).filter(|s| s.is_none()).with_context(|| {
            format!(
                "{}: element position {position} is out of range or in another shard too (the file was edited or is corrupt); rerun this shard",
                path.display()
            )
        })?;
        *slot = Some(element.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_bad_counts() {
        assert_eq!("2/5".parse(), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "0/0", "1", "a/3", "1/b", "-1/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_element_has_exactly_one_shard() {
        let exact: Vec<bool> = (0..23).map(|i| i % 4 != 3).collect();
        for count in 1..6 {
            let owners: Vec<Vec<bool>> = (0..count)
                .map(|index| Shard { index, count }.owned(&exact))
                .collect();
            for i in 0..exact.len() {
                let n = owners.iter().filter(|o| o[i]).count();
                assert_eq!(n, 1, "element {i} of {count} shards");
            }
            // The exact ablations are spread evenly.
            let per_shard: Vec<usize> = owners
                .iter()
                .map(|o| o.iter().zip(&exact).filter(|(&a, &b)| a && b).count())
                .collect();
            let (lo, hi) = (per_shard.iter().min(), per_shard.iter().max());
            assert!(hi.unwrap() - lo.unwrap() <= 1, "{per_shard:?}");
        }
        assert_eq!(Shard::WHOLE.owned(&exact), vec![true; exact.len()]);
    }
}
