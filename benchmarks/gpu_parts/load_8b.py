"""gpu_check part (c): a LLaDA-8B-shaped checkpoint (the real config's sizes,
random bfloat16 weights made on the device, written to local disk and
dropped from the page cache) loaded through server/models/loader.py onto the
GPU. Reports load time and rate, the device's peak memory during the load
against the weights' bytes (checked: <= 1.05x, nothing but the weights on
the device), the host's peak RSS growth, that three tensors hold exactly
what was written, and that a forward pass gives finite logits."""
from __future__ import annotations

import re
import time
from pathlib import Path

from _llada8b import default_dir, ensure_checkpoint, specs, tensor
from _part import Record, device_of, run_part

GB = 1e9


def rss(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def body(args, rec: Record) -> None:
    import torch

    from server.models.loader import load_model

    device = device_of(args.small)
    root = Path(args.dir) if args.dir else default_dir(args.small)
    with rec.sub("write"):
        info = ensure_checkpoint(root, args.small, device)
        rec.data["checkpoint"] = info
        rec.line(f"checkpoint {info['bytes'] / GB:.2f} GB at {root}: "
                 + (f"written in {info['write_s']:.1f}s, +sync {info['write_and_sync_s'] - info['write_s']:.1f}s"
                    if info["written"] else "already there (page cache state unknown)"))

    with rec.sub("load"):
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # host peak RSS from here
        except OSError:
            rec.data["host_peak_note"] = "clear_refs refused: host peak includes the write"
        host0 = rss("VmRSS")
        t0 = time.perf_counter()
        model = load_model(root, "bfloat16", str(device))
        if cuda:
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t0
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        host = rss("VmHWM") - host0
        peak = torch.cuda.max_memory_allocated(device) - before if cuda else weights
        reserved = torch.cuda.max_memory_reserved(device) if cuda else weights
        rec.data["load"] = {"seconds": secs, "weights_bytes": weights, "device_peak_bytes": peak,
                            "device_peak_reserved_bytes": reserved, "host_peak_rss_growth_bytes": host,
                            "GB_per_s": weights / secs / GB}
        ok = peak <= 1.05 * weights
        rec.check("load_peak", ok, ratio=peak / weights)
        rec.line(f"load {weights / GB:.2f} GB bf16 in {secs:.1f}s ({weights / secs / GB:.2f} GB/s); device peak "
                 f"{peak / GB:.2f} GB = {peak / weights:.3f}x weights{'' if ok else ' FAILED (> 1.05x)'}; "
                 f"host peak +{host / GB:.2f} GB")

        table = specs(model.config)
        params = model.checkpoint_params()
        picks = [0, len(table) // 2, len(table) - 1]
        same = []
        for i in picks:
            name, shape, _ = table[i]
            param, r0, r1 = params[name]
            same.append(bool(torch.equal(param.data[r0:r1], tensor(i, name, shape, device))))
        rec.check("contents", all(same), tensors=[table[i][0] for i in picks])
        ids = torch.randint(0, model.config.vocab_size, (64,), device=device)
        with torch.inference_mode():
            logits = model(ids, torch.arange(64, device=device), [0, 64])
        finite = bool(torch.isfinite(logits).all())
        rec.check("forward", finite, shape=list(logits.shape))
        rec.line(f"contents of {len(picks)} tensors as written: {'ok' if all(same) else 'FAILED'}; "
                 f"forward (64 tokens) finite: {'ok' if finite else 'FAILED'}")


def add_args(ap) -> None:
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default $LLADA_8B_DIR or /tmp)")


if __name__ == "__main__":
    run_part("load_8b", body, add_args)
