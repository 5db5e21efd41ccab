"""Writing the demo model as a complete Hugging Face LLaDA checkpoint
directory: the weights and config through ``server.models.writer`` (LLaDA-8B's
tensor names and config fields), plus generation config, tokenizer and card.
``write_checkpoint`` reloads what it wrote with the server's loader and
checks the logits are identical before it replaces the output directory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from server.models.llada import LLaDAModel
from server.models.loader import load_model
from server.models.writer import save_checkpoint

# What the model was trained for: answers of at most ~20 tokens in canvases up
# to 64; evaluated (card, eval_tasks.py) at gen_length 32, block_length 8.
RECOMMENDED = {"gen_length": 32, "block_length": 8}


def write_checkpoint(model: LLaDAModel, bos_id: int, tokenizer_dir: Path, card: str, out: Path) -> None:
    """Writes the whole checkpoint directory to ``out`` (replacing it), after
    checking that the server's loader gives back identical logits."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config
    save_checkpoint(model, tmp, dtype=torch.float32)
    generation = {"bos_token_id": bos_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                  # the decoding the server and CLI use when a request gives none (the card's recommendation)
                  "max_new_tokens": RECOMMENDED["gen_length"], "block_length": RECOMMENDED["block_length"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / f, tmp / f)
    (tmp / "README.md").write_text(card)
    verify(model, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@torch.no_grad()
def verify(model: LLaDAModel, path: Path) -> None:
    loaded = load_model(path, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=g)
    want = model.float().eval().forward_dense(ids)
    got = loaded.forward_dense(ids)
    if not torch.equal(want, got):
        raise RuntimeError(f"{path}: reloaded logits differ (max abs {float((want - got).abs().max()):.3g})")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    msgs = [{"role": "user", "content": "reverse: apple banana cherry"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.decode(ids) != text or ids[0] != tok.bos_token_id:
        raise RuntimeError(f"{path}: tokenizer does not round-trip the chat template")
    if tok.convert_tokens_to_ids("<|mdm_mask|>") != model.config.mask_token_id:
        raise RuntimeError(f"{path}: <|mdm_mask|> is not config.mask_token_id")
