"""Build a tiny, random-weight Llama GGUF (~1 MB) that llama.cpp can serve offline.

It generates nonsense fast, which is all tests need: a real engine speaking the real protocol.
SentencePiece BPE tokenizer (byte fallback) trained on local text, ChatML chat template.
Deterministic: the same seed gives the same file.

    python -m devkit.tiny_model OUT.gguf
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>"]
DIM, FF, LAYERS, HEADS, KV_HEADS, VOCAB, CTX = 64, 128, 2, 4, 2, 1000, 2048


def _corpus() -> str:
    texts = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*"))[:12]:
        try:
            texts.append(Path(path).read_text(encoding="utf-8", errors="ignore"))
        except OSError:
            continue
    text = "\n".join(texts)
    if len(text) < 20000:  # any machine: add Python's own license text
        for path in glob.glob(os.path.join(sys.base_prefix, "lib", "python*", "LICENSE.txt")):
            text += Path(path).read_text(encoding="utf-8", errors="ignore")
        text += "\nThe quick brown fox jumps over the lazy dog. " * 500
    return text


def build(out: Path, seed: int = 1234) -> Path:
    import gguf
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        corpus.write_text(_corpus(), encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(input=str(corpus), model_writer=model, vocab_size=VOCAB, model_type="bpe",
                                       byte_fallback=True, user_defined_symbols=SPECIAL, character_coverage=1.0,
                                       num_threads=2, minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece.encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i) or piece in SPECIAL:
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    vocab = len(tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp_out), "llama")
    writer.add_name("vilms-tiny")
    writer.add_context_length(CTX)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(sp.piece_to_id("<|im_end|>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = DIM // HEADS
    writer.add_tensor("token_embd.weight", weight(vocab, DIM))
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(DIM, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", weight(DIM, DIM))
        writer.add_tensor(p + "attn_k.weight", weight(KV_HEADS * head_dim, DIM))
        writer.add_tensor(p + "attn_v.weight", weight(KV_HEADS * head_dim, DIM))
        writer.add_tensor(p + "attn_output.weight", weight(DIM, DIM))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weight(FF, DIM))
        writer.add_tensor(p + "ffn_up.weight", weight(FF, DIM))
        writer.add_tensor(p + "ffn_down.weight", weight(DIM, FF))
    writer.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, DIM))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp_out.replace(out)
    return out


def ensure(out: Path) -> Path:
    """Build once; later calls reuse the cached file."""
    return out if out.is_file() and out.stat().st_size > 0 else build(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    path = build(args.out) if args.force else ensure(args.out)
    print(path)


if __name__ == "__main__":
    main()
