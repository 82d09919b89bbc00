//! Vocabulary pruning, tokenizer side: which token ids a corpus needs, and the tokenizer files
//! rewritten for the kept ids (new id = rank of the old id among the kept ones).
//!
//! WordPiece splits a word greedily, longest piece first. Keeping every piece the corpus
//! produces, plus the pieces a failed word (`[UNK]`) matched before failing, leaves the
//! tokenization of every corpus text unchanged: at each step the longest match in the full
//! vocabulary is kept, and no longer match can appear in a subset of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    Model as _, ModelWrapper, Normalizer as _, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer as _, Tokenizer,
};

/// Token ids kept by vocabulary pruning, ascending; the new id of `kept[i]` is `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptIds(Vec<u32>);

impl KeptIds {
    /// The kept old ids, ascending.
    pub fn old_ids(&self) -> &[u32] {
        &self.0
    }

    /// Number of ids kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The new id of old id `old`, if it is kept.
    pub fn new_id(&self, old: u32) -> Option<u32> {
        self.0.binary_search(&old).ok().map(|i| i as u32)
    }

    fn remap(&self, old: u64, what: &str) -> Result<u64> {
        u32::try_from(old)
            .ok()
            .and_then(|o| self.new_id(o))
            .map(u64::from)
            .with_context(|| format!("{what}: token id {old} is not kept"))
    }
}

/// The ids of every token the `texts` produce with `tokenizer` (a WordPiece tokenizer), the
/// pieces failed words matched, the special tokens, and `extra` ids (e.g. `pad_token_id`).
pub fn corpus_ids(tokenizer: &Tokenizer, texts: &[&str], extra: &[u32]) -> Result<KeptIds> {
    let wordpiece = wordpiece(tokenizer)?;
    let vocab = wordpiece.get_vocab();
    let mut kept: BTreeSet<u32> = extra.iter().copied().collect();
    kept.extend(tokenizer.get_added_tokens_decoder().keys().copied());
    kept.extend(post_processor_ids(tokenizer)?);
    kept.insert(id_of(&vocab, &wordpiece.unk_token)?);
    for text in texts {
        for word in words(tokenizer, text)? {
            kept.extend(greedy_pieces(wordpiece, &vocab, &word));
        }
    }
    Ok(KeptIds(kept.into_iter().collect()))
}

/// The ids of the special tokens the post-processor adds around a pair of texts (`[CLS]` and
/// `[SEP]`): a tokenizer built from `vocab.txt` has them only there, not as added tokens.
fn post_processor_ids(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode(("a", "b"), true)
        .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
    Ok(encoding
        .get_ids()
        .iter()
        .zip(encoding.get_special_tokens_mask())
        .filter(|&(_, &special)| special == 1)
        .map(|(&id, _)| id)
        .collect())
}

/// The words WordPiece sees in `text`: normalised, then pre-tokenised.
fn words(tokenizer: &Tokenizer, text: &str) -> Result<Vec<String>> {
    let mut pre = PreTokenizedString::from(text);
    if let Some(normalizer) = tokenizer.get_normalizer() {
        pre.normalize(|s| normalizer.normalize(s))
            .map_err(|e| anyhow!("cannot normalise {text:?}: {e}"))?;
    }
    if let Some(pre_tokenizer) = tokenizer.get_pre_tokenizer() {
        pre_tokenizer
            .pre_tokenize(&mut pre)
            .map_err(|e| anyhow!("cannot pre-tokenise {text:?}: {e}"))?;
    }
    Ok(pre
        .get_splits(OffsetReferential::Normalized, OffsetType::Byte)
        .into_iter()
        .map(|(word, _, _)| word.to_string())
        .collect())
}

/// The pieces WordPiece's greedy longest-match visits on `word`: its tokens when it succeeds,
/// the pieces matched before failing otherwise (the word itself becomes `[UNK]`).
fn greedy_pieces(wordpiece: &WordPiece, vocab: &HashMap<String, u32>, word: &str) -> Vec<u32> {
    if word.chars().count() > wordpiece.max_input_chars_per_word {
        return Vec::new();
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < word.len() {
        let matched = word[start..]
            .char_indices()
            .map(|(i, c)| start + i + c.len_utf8())
            .rev()
            .find_map(|end| {
                let piece = &word[start..end];
                let key = if start > 0 {
                    format!("{}{piece}", wordpiece.continuing_subword_prefix)
                } else {
                    piece.to_string()
                };
                vocab.get(&key).map(|&id| (id, end))
            });
        match matched {
            Some((id, end)) => {
                pieces.push(id);
                start = end;
            }
            None => break,
        }
    }
    pieces
}

fn wordpiece(tokenizer: &Tokenizer) -> Result<&WordPiece> {
    match tokenizer.get_model() {
        ModelWrapper::WordPiece(w) => Ok(w),
        other => bail!(
            "vocabulary pruning needs a WordPiece tokenizer (BERT, DistilBERT); this one is {}",
            match other {
                ModelWrapper::BPE(_) => "BPE",
                ModelWrapper::Unigram(_) => "Unigram",
                _ => "WordLevel",
            }
        ),
    }
}

fn id_of(vocab: &HashMap<String, u32>, token: &str) -> Result<u32> {
    vocab
        .get(token)
        .copied()
        .with_context(|| format!("the unknown token {token} is not in the vocabulary"))
}

/// Tokenizer files written for a pruned vocabulary, by file name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizerFiles(pub BTreeMap<&'static str, Vec<u8>>);

impl TokenizerFiles {
    /// The bytes of `name`, if this set replaces it.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }
}

/// `tokenizer.json` keeping only `kept`: the vocabulary, added tokens, post-processor and padding
/// ids renumbered.
pub fn prune_tokenizer_json(json: &Value, kept: &KeptIds) -> Result<Value> {
    let mut out = json.clone();
    let vocab = out
        .pointer_mut("/model/vocab")
        .and_then(Value::as_object_mut)
        .context("tokenizer.json: model.vocab is not an object")?;
    let mut pruned = serde_json::Map::new();
    for (token, id) in vocab.iter() {
        let old = id
            .as_u64()
            .context("tokenizer.json: a vocabulary id is not a number")?;
        if let Some(new) = u32::try_from(old).ok().and_then(|o| kept.new_id(o)) {
            pruned.insert(token.clone(), Value::from(new));
        }
    }
    *vocab = pruned;
    if let Some(added) = out.get_mut("added_tokens").and_then(Value::as_array_mut) {
        for token in added {
            remap_field(token, "id", kept, "tokenizer.json added_tokens")?;
        }
    }
    if let Some(post) = out.get_mut("post_processor") {
        remap_post_processor(post, kept)?;
    }
    if let Some(padding) = out.get_mut("padding").filter(|p| p.is_object()) {
        remap_field(padding, "pad_id", kept, "tokenizer.json padding")?;
    }
    Ok(out)
}

fn remap_field(obj: &mut Value, key: &str, kept: &KeptIds, what: &str) -> Result<()> {
    if let Some(v) = obj.get_mut(key) {
        let old = v
            .as_u64()
            .with_context(|| format!("{what}.{key} is not an id"))?;
        *v = Value::from(kept.remap(old, what)?);
    }
    Ok(())
}

/// Renumbers the ids a post-processor names: TemplateProcessing's `special_tokens.*.ids`,
/// BertProcessing's `sep` / `cls` pairs, and those of a `Sequence` of processors.
fn remap_post_processor(value: &mut Value, kept: &KeptIds) -> Result<()> {
    const WHAT: &str = "tokenizer.json post_processor";
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match (key.as_str(), v) {
                    ("ids", Value::Array(ids)) => {
                        for id in ids {
                            let old = id.as_u64().context("post_processor id is not a number")?;
                            *id = Value::from(kept.remap(old, WHAT)?);
                        }
                    }
                    ("sep" | "cls", Value::Array(pair)) if pair.len() == 2 => {
                        let old = pair[1]
                            .as_u64()
                            .context("post_processor id is not a number")?;
                        pair[1] = Value::from(kept.remap(old, WHAT)?);
                    }
                    (_, v) => remap_post_processor(v, kept)?,
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                remap_post_processor(item, kept)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `vocab.txt` for the kept ids of `tokenizer`: one token per line, in new-id order.
pub fn vocab_txt(tokenizer: &Tokenizer, kept: &KeptIds) -> Result<Vec<u8>> {
    let mut text = String::new();
    for &old in kept.old_ids() {
        let token = tokenizer
            .id_to_token(old)
            .with_context(|| format!("token id {old} has no token"))?;
        text.push_str(&token);
        text.push('\n');
    }
    Ok(text.into_bytes())
}

/// `tokenizer_config.json` with its `added_tokens_decoder` keys renumbered.
pub fn prune_tokenizer_config(config: &Value, kept: &KeptIds) -> Result<Value> {
    let mut out = config.clone();
    if let Some(decoder) = out
        .get_mut("added_tokens_decoder")
        .and_then(Value::as_object_mut)
    {
        let mut renumbered = serde_json::Map::new();
        for (id, token) in decoder.iter() {
            let old: u64 = id
                .parse()
                .with_context(|| format!("tokenizer_config.json: {id} is not a token id"))?;
            let new = kept.remap(old, "tokenizer_config.json added_tokens_decoder")?;
            renumbered.insert(new.to_string(), token.clone());
        }
        *decoder = renumbered;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        let json = r###"{"version":"1.0","truncation":null,"padding":null,
          "added_tokens":[{"id":0,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                          {"id":1,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                          {"id":2,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                          {"id":3,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
          "normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},
          "pre_tokenizer":{"type":"BertPreTokenizer"},
          "post_processor":{"type":"TemplateProcessing",
             "single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}}],
             "pair":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}},{"Sequence":{"id":"B","type_id":1}},{"SpecialToken":{"id":"[SEP]","type_id":1}}],
             "special_tokens":{"[CLS]":{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]},"[SEP]":{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}},
          "decoder":null,
          "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
             "vocab":{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"good":4,"film":5,"go":6,"##od":7,"##s":8,"bad":9,"xy":10,"xyz":11,"##zq":12,"!":13}}}"###;
        Tokenizer::from_bytes(json).unwrap()
    }

    fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
        t.encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn keeps_produced_pieces_specials_and_failed_paths() {
        let t = tiny_tokenizer();
        // "xyzq": the full vocabulary matches "xyz" then fails on "##q" → [UNK]; "xyz" is kept
        // so the pruned tokenizer fails the same way instead of finding "xy" + "##zq".
        let kept = corpus_ids(&t, &["Good films!", "xyzq"], &[]).unwrap();
        assert_eq!(kept.old_ids(), &[0, 1, 2, 3, 4, 5, 8, 11, 13]);
    }

    #[test]
    fn pruned_tokenizer_tokenizes_the_corpus_as_before() {
        let t = tiny_tokenizer();
        let corpus = ["Good films!", "xyzq", "goods BAD"];
        let kept = corpus_ids(&t, &corpus, &[]).unwrap();
        let json: Value = serde_json::from_str(&t.to_string(false).unwrap()).unwrap();
        let pruned = prune_tokenizer_json(&json, &kept).unwrap();
        let p = Tokenizer::from_bytes(serde_json::to_vec(&pruned).unwrap()).unwrap();
        assert_eq!(p.get_vocab_size(true), kept.len());
        for text in corpus {
            let want: Vec<u32> = ids(&t, text)
                .iter()
                .map(|&i| kept.new_id(i).unwrap())
                .collect();
            assert_eq!(ids(&p, text), want, "{text}");
        }
        // A word outside the corpus whose pieces were dropped becomes [UNK].
        assert_eq!(ids(&p, "film xy"), vec![2, 5, 1, 3]);
    }

    #[test]
    fn tokenizer_config_and_vocab_txt_follow_the_new_ids() {
        let t = tiny_tokenizer();
        let kept = KeptIds(vec![0, 1, 2, 3, 9]);
        let config = serde_json::json!({"added_tokens_decoder": {"3": {"content": "[SEP]"}}});
        let pruned = prune_tokenizer_config(&config, &kept).unwrap();
        assert_eq!(pruned["added_tokens_decoder"]["3"]["content"], "[SEP]");
        let text = vocab_txt(&t, &kept).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\nbad\n"
        );
        let bad = serde_json::json!({"added_tokens_decoder": {"7": {}}});
        assert!(prune_tokenizer_config(&bad, &kept).is_err());
    }

    #[test]
    fn a_bpe_tokenizer_is_refused() {
        let t = Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let err = corpus_ids(&t, &["hello"], &[]).unwrap_err().to_string();
        assert!(err.contains("WordPiece") && err.contains("BPE"), "{err}");
    }
}
