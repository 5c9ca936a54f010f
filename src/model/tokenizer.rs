//! BERT's WordPiece tokenizer built from a `vocab.txt`, with the `tokenizers` crate.
//!
//! Built the way Hugging Face's `BertTokenizer` works (BioBERT ships only a `vocab.txt`): BERT
//! normalisation (control characters removed, CJK split, optional lower-casing with accent
//! stripping), whitespace-and-punctuation pre-tokenisation, greedy longest-match WordPiece with `##`
//! continuations, then `[CLS] … [SEP]`, truncated to the token limit.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// The lower-case vocabulary of the built-in random BERT (configs/tiny.yaml): common report words
/// plus every letter, digit and punctuation mark, so any English text tokenizes without `[UNK]`.
pub const BUILTIN_VOCAB: &str = include_str!("builtin_vocab.txt");

/// Token ids and attention mask of a batch, padded to its longest member.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// [B, T] u32
    pub ids: Tensor,
    /// [B, T] u32: 1 for real tokens, 0 for padding
    pub mask: Tensor,
}

pub struct TextTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
    vocab_size: usize,
}

impl TextTokenizer {
    /// `vocab`: the contents of a `vocab.txt` (one token per line, id = line number).
    pub fn from_vocab(vocab: &str, lowercase: bool, max_tokens: usize) -> Result<Self> {
        let vocab = WordPiece::read_bytes(vocab.as_bytes())
            .map_err(|e| anyhow!("cannot parse the vocabulary: {e}"))?;
        let vocab_size = vocab.len();
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| anyhow!("the vocabulary has no {token} token"))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        id("[UNK]")?;
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".to_string())
            .continuing_subword_prefix("##".to_string())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| anyhow!("cannot build WordPiece: {e}"))?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .map_err(|e| anyhow!("{e}"))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".to_string(), sep),
            ("[CLS]".to_string(), cls),
        )));
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{e}"))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id: pad,
            pad_token: "[PAD]".to_string(),
            ..Default::default()
        }));
        Ok(Self {
            inner,
            max_tokens,
            vocab_size,
        })
    }

    pub fn from_vocab_file(path: &Path, lowercase: bool, max_tokens: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read vocabulary {}", path.display()))?;
        Self::from_vocab(&text, lowercase, max_tokens)
            .with_context(|| format!("vocabulary {}", path.display()))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Ids of one text with `[CLS]`/`[SEP]`, truncated to the limit; also whether it was truncated.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// A batch of texts as padded ids and mask on `device`.
    pub fn encode_batch(&self, texts: &[&str], device: &Device) -> Result<TokenBatch> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("cannot tokenize a batch: {e}"))?;
        let b = encs.len();
        let t = encs.first().map_or(0, |e| e.len());
        let ids: Vec<u32> = encs.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = encs
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        Ok(TokenBatch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocabulary_tokenizes_without_unknowns() -> Result<()> {
        let tok = TextTokenizer::from_vocab(BUILTIN_VOCAB, true, 64)?;
        let (ids, truncated) =
            tok.encode("No acute cardiopulmonary abnormality. Heart size 15.2 cm, XXXX.")?;
        assert!(!truncated);
        assert_eq!(ids[0], 2, "[CLS] first");
        assert_eq!(*ids.last().unwrap(), 3, "[SEP] last");
        assert!(!ids.contains(&1), "no [UNK]: {ids:?}");
        Ok(())
    }

    #[test]
    fn truncation_and_padding() -> Result<()> {
        let tok = TextTokenizer::from_vocab(BUILTIN_VOCAB, true, 8)?;
        let long = "the heart is normal in size and the lungs are clear without effusion";
        let (ids, truncated) = tok.encode(long)?;
        assert_eq!(ids.len(), 8);
        assert!(truncated);
        assert_eq!(ids[7], 3, "[SEP] kept after truncation");
        let batch = tok.encode_batch(&["normal", long], &Device::Cpu)?;
        assert_eq!(batch.ids.dims(), &[2, 8]);
        let mask = batch.mask.to_vec2::<u32>()?;
        assert_eq!(mask[0], [1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(batch.ids.to_vec2::<u32>()?[0][3], 0, "[PAD] id");
        Ok(())
    }
}
