"""The ``llada-serve`` command line. Configuration is read here, once (flags
and ``LLADA_SERVE_<FLAG>`` environment variables), and passed down as
dataclasses.

  llada-serve [serve] [--model M] [--host H] [--port P] ...   the OpenAI server
  llada-serve generate --model M --prompt TEXT [--chat] [--show-steps] ...
  llada-serve eval --tasks T1,T2 [--base-url URL] [--apply-chat-template] ...   lm-eval against a server
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from server.eval.cli import add_eval_args, run_eval

MASK_GLYPH = "░"


def _env_default(name: str, default):
    """LLADA_SERVE_<FLAG> overrides a flag's default; the flag overrides both."""
    return os.environ.get("LLADA_SERVE_" + name.upper().replace("-", "_"), default)


def bundled_model() -> str | None:
    """The demo checkpoint shipped inside the package, if present."""
    from pathlib import Path

    path = Path(__file__).resolve().parent / "assets" / "llada-demo"
    return str(path) if (path / "config.json").is_file() else None


def add_model_args(p: argparse.ArgumentParser) -> None:
    default = _env_default("model", None) or bundled_model()
    p.add_argument("--model", default=default, required=default is None,
                   help="checkpoint directory or Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--dtype", default=_env_default("dtype", "auto"),
                   choices=["auto", "float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default=_env_default("device", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tensor-parallel-size", type=int, default=int(_env_default("tensor-parallel-size", 1)),
                   help="split the model over this many GPUs of this machine (ranks on cuda:N.. from --device; "
                        "gloo processes on CPU); the attention heads must divide evenly")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """DiffusionParams fields; one left out is the model's recommendation
    (its family's decoding, then its generation_config.json), else
    DiffusionParams' default."""
    p.add_argument("--gen-length", type=int, default=None,
                   help="canvas length after the prompt, max tokens (default: the model's max_new_tokens, else 128)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="block length (default: the model's, else 32)")
    p.add_argument("--temperature", type=float, default=None, help="Gumbel-max sampling temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass (default 1: all)")
    p.add_argument("--remasking", default=None, help="commit rule: low_confidence (default), random, margin, entropy, "
                   "threshold, factor")
    p.add_argument("--threshold", type=float, default=None, help="the threshold rule's confidence bar (default 0.9)")
    p.add_argument("--factor", type=float, default=None, help="the factor rule's f (default 1.0)")
    p.add_argument("--decoding", default=None, help="exact (default), prefix_cache or dual_cache")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="the noise seed (default 0)")


# add_decoding_args' flags: DiffusionParams fields of the same names
DECODING_FLAGS = ("gen_length", "steps", "block_length", "temperature", "top_k", "top_p", "remasking", "threshold",
                  "factor", "decoding", "cfg_scale", "seed")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from server.engine.scheduler import SchedulerConfig  # torch-free: the batch defaults' one source

    def flag(name: str, type_, default, help_: str) -> None:
        # An environment value is a string: argparse converts it with type_ as
        # if it were given on the command line, so a bad one is a clear usage error.
        env = "LLADA_SERVE_" + name.upper().replace("-", "_")
        p.add_argument(f"--{name}", type=type_, default=_env_default(name, default), help=f"{help_} [{env}]")

    flag("served-model-name", str, None, "model name in the API (default: --model; llada-demo for the bundled model)")
    flag("host", str, "127.0.0.1", "address to listen on")
    flag("port", int, 8000, "port to listen on")
    flag("api-key", str, None, "require 'Authorization: Bearer KEY' on /v1/* and the tokenizer routes")
    flag("max-num-seqs", int, SchedulerConfig.max_num_seqs, "requests in one forward pass")
    flag("max-num-batched-tokens", int, SchedulerConfig.max_num_batched_tokens,
         "tokens one step puts through the model: whole canvases for exact "
         "steps and cache fills, blocks at cache use steps")
    flag("max-queued-requests", int, 256, "waiting requests before answering 429")
    flag("max-model-len", int, None, "longest prompt + max_tokens (default: the model's max_sequence_length)")
    flag("default-max-tokens", int, None,
         "canvas length when a request gives no max_tokens (default: the model's max_new_tokens, else 128)")
    flag("default-steps", int, None, "denoising steps when a request gives none (default: the model's, else "
         "max_tokens)")
    flag("default-block-length", int, None, "block length when a request gives none (default: the model's, else 32)")
    flag("default-decoding", str, "exact", "exact | prefix_cache | dual_cache, when a request gives none")
    flag("default-remasking", str, None, "commit rule when a request gives none (default: the model's own, "
         "e.g. low_confidence for LLaDA, threshold_quota for LLaDA2, origin for Dream)")
    flag("default-threshold", float, None, "the threshold rule's bar when a request gives none (default: the model's, "
         "else 0.9)")
    flag("kv-cache-tokens", int, None, "KV-cache slots for the cache modes (default: on CUDA sized by "
         "--gpu-memory-utilization, on CPU max-num-batched-tokens; 0: off)")
    flag("gpu-memory-utilization", float, 0.9, "fraction of the GPU's total memory this server may use: the KV "
         "cache gets what weights and a profile step at the largest batch leave (CUDA; --kv-cache-tokens overrides)")
    flag("max-body-bytes", int, 1 << 20, "largest request body accepted")
    flag("drain-timeout", float, 30.0, "seconds in-flight requests get to finish after SIGTERM")
    flag("max-header-bytes", int, 65536, "largest request line + headers; beyond: 431")
    flag("max-headers", int, 100, "most header fields in a request; beyond: 431")
    flag("header-timeout", float, 10.0, "seconds a request's headers may take to arrive; then 408")
    flag("body-timeout", float, 30.0, "seconds a request's body may take to arrive after its headers; then 408")
    flag("keep-alive-timeout", float, 5.0, "seconds an idle kept-alive connection stays open")
    flag("max-connections", int, 1000, "open connections; a request on one beyond gets 503")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                   default=str(_env_default("enforce-eager", "true")).lower() in ("1", "true", "yes", "on"),
                   help="run every step ragged, as scheduled (default). Off: cache use steps of one width padded to "
                   "batch-size buckets (1, 2, 4, ... max-num-seqs) and, on CUDA, replayed as CUDA graphs captured at "
                   "start-up (not yet measured on a GPU; on CPU padding only) [LLADA_SERVE_ENFORCE_EAGER]")
    p.add_argument("--no-playground", action="store_true",
                   default=str(_env_default("no-playground", "")).lower() in ("1", "true", "yes", "on"),
                   help="do not serve the playground web page at /")
    p.add_argument("--log-level", default=_env_default("log-level", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])


SERVE_DESCRIPTION = ("Run the OpenAI-compatible server (the default command: `llada-serve --port 8080` is "
                     "`llada-serve serve --port 8080`). Offline generation: `llada-serve generate --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-serve", description="Serve masked diffusion language models (LLaDA).")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server (the default command)",
                           usage="llada-serve [serve] [flags]", description=SERVE_DESCRIPTION)
    add_model_args(serve)
    add_serve_args(serve)
    gen = sub.add_parser("generate", help="generate offline and print the completion")
    add_model_args(gen)
    add_decoding_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (checkpoints without a tokenizer)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--show-steps", action="store_true", help="print the canvas after every denoising step")
    add_eval_args(sub.add_parser("eval", help="run lm-eval tasks against a running server (the eval extra)"))
    return parser


def _render(llm, req) -> str:
    gen = req.canvas[req.prompt_len:]
    if llm.tokenizer is None:
        return " ".join(MASK_GLYPH if t == req.mask_id else str(t) for t in gen)
    pieces = llm.tokenizer.token_pieces([t for t in gen if t != req.mask_id])
    it = iter(pieces)
    return "".join(MASK_GLYPH if t == req.mask_id else next(it) for t in gen)


def run_generate(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM

    try:
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
        else:
            prompt = args.prompt
        llm = LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size)
        given = {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name) is not None}
        params = llm.default_params(**given)

        def show_step(req_id, req):
            print(f"step {req.num_forward_steps:3d}  block {min(req.block_idx + 1, len(req.blocks))}/{len(req.blocks)}  "
                  f"| {_render(llm, req)}", flush=True)

        on_step = show_step if args.show_steps else None
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # the server is the default command, --help included
        argv.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "serve":
        from server.api.launch import serve

        return serve(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
