"""The model's tokenizer and the token ids that end an answer.

Loaded offline from the checkpoint directory with transformers'
AutoTokenizer (no remote code). A checkpoint without tokenizer files still
serves token-id prompts; text then is None. The chat template is the
checkpoint's own (``chat_template`` in tokenizer_config.json, or
chat_template.jinja). EOS/EoT ids come from the model's own files (config,
generation config, tokenizer, chat template), never from a list of names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Stands for an assistant turn's text when the chat template is rendered to
# find the token it closes a turn with; no template or tokenizer knows it.
_TURN_PROBE = "\u2063llada-serve-turn-probe\u2063"


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet read backwards: the character that stands
    for each byte (GPT-2's table: printable bytes stand for themselves, the
    rest for 256, 257, ... in byte order) -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        # A fast tokenizer's Rust backend encodes the same ids as calling the
        # transformers wrapper, without its per-call Python (a tenth of the
        # server's event-loop time went there). Our own copy, with the
        # truncation and padding a tokenizer.json may carry switched off, as
        # the wrapper switches them off for a plain call.
        self._backend = None
        if getattr(hf_tokenizer, "is_fast", False):
            from tokenizers import Tokenizer as RustTokenizer

            self._backend = RustTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        decoder = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    @classmethod
    def load(cls, path: Path) -> "Tokenizer | None":
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        # transformers does not know model_type "llada" and warns while
        # probing config.json; the tokenizer files themselves are all it needs.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return cls(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))
        finally:
            hf_logging.set_verbosity(verbosity)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A plain completion prompt, by default with the special tokens the
        model's tokenizer adds (e.g. a BOS)."""
        return self._encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template with the assistant turn opened, then
        tokenized with add_special_tokens=False (the template holds them)."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use a plain completion prompt")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_pieces(self, ids: list[int]) -> list[str]:
        return [self.hf.decode([i]) for i in ids]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes: with a byte-level BPE, a token may hold
        part of a UTF-8 character, which its text piece cannot show."""
        if not self._byte_level:
            return [piece.encode("utf-8") for piece in self.token_pieces(ids)]
        table = _BYTE_OF_CHAR
        out = []
        for token in self.hf.convert_ids_to_tokens(ids):
            out.append(b"".join(bytes([table[ch]]) if ch in table else ch.encode("utf-8") for ch in token))
        return out

    def end_ids(self) -> set[int]:
        """The tokenizer's EOS and the chat template's end-of-turn token."""
        ids = set() if self.hf.eos_token_id is None else {self.hf.eos_token_id}
        turn_end = self.end_of_turn_id()
        return ids if turn_end is None else ids | {turn_end}

    def end_of_turn_id(self) -> int | None:
        """The special token the chat template writes right after an
        assistant turn's text (``<|eot_id|>`` for LLaDA, ``<|im_end|>`` for
        Dream, ``<|role_end|>`` for LLaDA-MoE and LLaDA2), found by rendering
        a conversation whose answer is a probe string; None when the
        template has none (or no template)."""
        if not getattr(self.hf, "chat_template", None):
            return None
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}]
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses this conversation says nothing about its turn end
            return None
        _, found, tail = text.partition(_TURN_PROBE)
        ids = self._encode(tail, add_special_tokens=False) if found else []
        special = {i for i, t in self.hf.added_tokens_decoder.items() if t.special} | set(self.hf.all_special_ids)
        return ids[0] if ids and ids[0] in special else None


_BYTE_OF_CHAR = _byte_of_char()


def stop_token_ids(path: Path, raw_config: dict[str, Any], tokenizer: Tokenizer | None) -> frozenset[int]:
    """Every id that ends an answer: EOS from config.json and
    generation_config.json (an int or a list), the tokenizer's EOS and the
    end-of-turn token its chat template closes an answer with."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(raw_config.get("eos_token_id"))
    gen_config = path / "generation_config.json"
    if gen_config.is_file():
        add(json.loads(gen_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        ids |= tokenizer.end_ids()
    return frozenset(ids)
