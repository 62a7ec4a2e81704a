"""Host time of a training step, with the GPU given almost nothing to do: a Llama of the given shape (default the
Llama-3.2-1B shape, 16 layers) with a PEFT LoRA adapter on every projection (or none), bf16, on a batch of a few
tokens, so that a step's wall time is the time the host takes to launch it. Eager, Inductor and backend "liger"
side by side, then a cProfile of one step of ours: where the host time of our ops goes. ours_static: ours with
Inductor's static launcher for our Triton kernels too (Inductor config static_launch_user_defined_triton_kernels,
off by default).

    python bench/investigations/host_overhead.py [--tokens 64] [--lora 16] [--layers 16] [--top 30]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import pstats
import sys
import time

import torch
import torch._inductor.config
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from bench_e2e import MODELS  # noqa: E402
from bench_trainers import LORA_TARGETS  # noqa: E402


def build(args):
    config_cls, model_cls, _, shape = MODELS["llama-1b"]
    config = getattr(transformers, config_cls)(**{**shape, "num_hidden_layers": args.layers},
                                               attn_implementation="sdpa")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to("cuda", torch.bfloat16)
    if args.lora:
        import peft  # noqa: PLC0415

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules=LORA_TARGETS),
            autocast_adapter_dtype=False)
    return model.train()


def step(run, batch):
    loss = run(**batch).loss
    loss.backward()
    return loss


def measure(variant, args):
    torch._dynamo.reset()
    model = build(args)
    if variant == "eager":
        run = model
    elif variant == "inductor":
        run = torch.compile(model, backend="inductor")
    else:  # ours_static: our Triton kernels launched by Inductor's static launcher, as its own are
        run = torch.compile(model, backend="liger", options={"static_launch_user_defined_triton_kernels": True}
                            if variant == "ours_static" else None)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    for _ in range(3):
        step(run, batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(run, batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    profile = None
    if variant.startswith("ours"):
        prof = cProfile.Profile()
        prof.enable()
        step(run, batch)
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        profile = out.getvalue()
    del model, run
    torch.cuda.empty_cache()
    return times[len(times) // 2] * 1e3, profile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--lora", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--variants", default="eager,inductor,ours,ours_static")
    args = ap.parse_args()
    import liger_compile  # noqa: F401, PLC0415

    variants = args.variants.split(",")
    if "ours_static" in variants and not hasattr(torch._inductor.config, "static_launch_user_defined_triton_kernels"):
        print("ours_static left out: this torch's Inductor has no static_launch_user_defined_triton_kernels")
        variants.remove("ours_static")
    rows, profiles = [], {}
    for v in variants:
        ms, p = measure(v, args)
        rows.append((v, ms))
        if p:
            profiles[v] = p
        print(f"{v}: {ms:.1f} ms per step", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"date {datetime.date.today()}; "
          f"{args.layers} layers, LoRA r={args.lora or 'none'}, 1 x {args.tokens} tokens, median of {args.steps}")
    print("| variant | host-bound step ms |\n|---|---|")
    for v, ms in rows:
        print(f"| {v} | {ms:.1f} |")
    for v, p in profiles.items():
        print(f"\ncProfile of one step, {v} (tottime):\n" + p)


if __name__ == "__main__":
    main()
