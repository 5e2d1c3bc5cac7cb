"""Small Hugging Face checkpoints of each supported family, made here with save_pretrained.

Nothing may be downloaded at run time, so the tests (random weights: plumbing) and
benchmarks/huggingface_finetune.py (trained weights: accuracy) make their checkpoints from a
WordPiece vocabulary learned on the corpus, with each family's own special tokens, config class and
sequence-classification head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from miaotui.data.corpus import LABELS


@dataclass(frozen=True)
class Specials:
    pad: str
    unk: str
    cls: str
    sep: str
    mask: str
    roberta_pairs: bool  # "<s> A </s></s> B </s>" rather than "[CLS] A [SEP] B [SEP]"

    def ordered(self) -> list[str]:
        # RoBERTa's ids are <s>=0, <pad>=1, </s>=2, <unk>=3; BERT's [PAD]=0, [UNK], [CLS], [SEP], [MASK].
        if self.roberta_pairs:
            return [self.cls, self.pad, self.sep, self.unk, self.mask]
        return [self.pad, self.unk, self.cls, self.sep, self.mask]


BERT_SPECIALS = Specials("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", roberta_pairs=False)
ROBERTA_SPECIALS = Specials("<pad>", "<unk>", "<s>", "</s>", "<mask>", roberta_pairs=True)
FAMILY_SPECIALS = {"bert": BERT_SPECIALS, "distilbert": BERT_SPECIALS, "electra": BERT_SPECIALS,
                   "deberta-v2": BERT_SPECIALS, "roberta": ROBERTA_SPECIALS, "xlm-roberta": ROBERTA_SPECIALS,
                   "camembert": ROBERTA_SPECIALS}


def wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, specials: Specials, max_length: int):
    """A WordPiece tokenizer learned on `texts` (CJK characters split one by one, as BERT's do)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token=specials.unk))
    tokenizer.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials.ordered(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = specials.cls, specials.sep
    ids = {token: tokenizer.token_to_id(token) for token in (cls, sep)}
    pair = f"{cls} $A {sep} {sep} $B:1 {sep}:1" if specials.roberta_pairs else f"{cls} $A {sep} $B:1 {sep}:1"
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=pair,
                                                              special_tokens=list(ids.items()))
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def family_config(model_type: str, vocab_size: int, specials_ids: dict[str, int], hidden: int = 32, layers: int = 2,
                  heads: int = 2, max_positions: int = 130, labels: tuple[str, ...] = LABELS):
    """A transformers config of `model_type` at this size, with the corpus's labels and special ids."""
    from transformers import AutoConfig

    size = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=hidden * 2, max_position_embeddings=max_positions)
    if model_type == "distilbert":
        size = dict(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=hidden * 2,
                    max_position_embeddings=max_positions)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        size["type_vocab_size"] = 1  # as the published RoBERTa checkpoints: no token types
        size["max_position_embeddings"] = max_positions + specials_ids["pad"] + 1
    if model_type == "electra":
        size["embedding_size"] = hidden // 2
    return AutoConfig.for_model(model_type, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                label2id={label: i for i, label in enumerate(labels)},
                                pad_token_id=specials_ids["pad"], **size)


def save_checkpoint(folder: Path, model_type: str, texts: Iterable[str], vocab_size: int = 400, seed: int = 0,
                    max_length: int = 128, **size):
    """A random-weight *ForSequenceClassification checkpoint and its tokenizer in `folder`; returns the model."""
    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    specials = FAMILY_SPECIALS[model_type]
    tokenizer = wordpiece_tokenizer(texts, vocab_size, specials, max_length)
    ids = {"pad": tokenizer.token_to_id(specials.pad)}
    config = family_config(model_type, tokenizer.get_vocab_size(), ids, max_positions=max_length + 2, **size)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=specials.pad, unk_token=specials.unk,
                                   cls_token=specials.cls, sep_token=specials.sep, mask_token=specials.mask,
                                   model_max_length=max_length)
    fast.save_pretrained(folder)
    return model
