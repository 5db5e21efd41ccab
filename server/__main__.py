"""The ``llada-serve`` command line. Configuration is read here, once (flags
and ``LLADA_SERVE_<FLAG>`` environment variables), and passed down as
dataclasses.

  llada-serve generate --model DIR --prompt TEXT [--chat] [--show-steps] ...
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

MASK_GLYPH = "░"


def _env_default(name: str, default):
    """LLADA_SERVE_<FLAG> overrides a flag's default; the flag overrides both."""
    return os.environ.get("LLADA_SERVE_" + name.upper().replace("-", "_"), default)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_env_default("model", None), required=_env_default("model", None) is None,
                   help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--dtype", default=_env_default("dtype", "auto"),
                   choices=["auto", "float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default=_env_default("device", "auto"), help="auto, cpu, cuda or cuda:N")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=64, help="canvas length after the prompt (max tokens)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", default="low_confidence")
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-serve", description="Serve masked diffusion language models (LLaDA).")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate offline and print the completion")
    add_model_args(gen)
    add_decoding_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (checkpoints without a tokenizer)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--show-steps", action="store_true", help="print the canvas after every denoising step")
    return parser


def _render(llm, req) -> str:
    gen = req.canvas[req.prompt_len:]
    if llm.tokenizer is None:
        return " ".join(MASK_GLYPH if t == req.mask_id else str(t) for t in gen)
    pieces = llm.tokenizer.token_pieces([t for t in gen if t != req.mask_id])
    it = iter(pieces)
    return "".join(MASK_GLYPH if t == req.mask_id else next(it) for t in gen)


def run_generate(args: argparse.Namespace) -> int:
    from sampler.params import DiffusionParams
    from server.engine.llm import LLM

    try:
        params = DiffusionParams(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                                 temperature=args.temperature, remasking=args.remasking,
                                 cfg_scale=args.cfg_scale, seed=args.seed)
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
        else:
            prompt = args.prompt
        llm = LLM(args.model, dtype=args.dtype, device=args.device)
        on_step = None
        if args.show_steps:
            def on_step(req_id, req):
                b0, b1 = req.block_range if not req.is_done else (0, 0)
                print(f"step {req.num_forward_steps:3d}  block {min(req.block_idx + 1, len(req.blocks))}/{len(req.blocks)}  "
                      f"| {_render(llm, req)}", flush=True)
        if args.chat:
            if not isinstance(prompt, str):
                raise ValueError("--chat needs --prompt text")
            out = llm.chat([{"role": "user", "content": prompt}], params, on_step=on_step)[0]
        else:
            out = llm.generate([prompt], params, on_step=on_step)[0]
    except (ValueError, OSError) as e:
        print(f"llada-serve: error: {e}", file=sys.stderr)
        return 2
    print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
