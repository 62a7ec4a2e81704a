"""The main job: compile a bundled tiny Llama with backend="liger", train a few steps, compare with eager.

    python -m liger_compile.demo [--steps N] [--device cpu|cuda]

Prints the fusion report and, per step, the loss of eager and of backend="liger" from the same initial weights.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

import liger_compile

# A Llama-architecture model small enough for a CPU, random init (nothing is downloaded).
TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, use_cache=False,
)


READING_THE_REPORT = """
How to read it: [in brackets] is the form of the code a site matched, then where it is in the model.
  rms_norm, rotary, swiglu/geglu, linear_cross_entropy: replaced by our fused Triton ops (with their own backward);
    "+ residual": the residual add feeding the norm is fused too; "down_proj": the MLP's down projection is in the
    op, so its input is not saved; "fp32, logits lazy": the loss in fp32, the logits computed only if read.
  causal_mask: no kernel of ours. HF's explicit mask, proved plain causal, is dropped and SDPA runs is_causal=True
    (its fastest kernels); "repeat_kv -> enable_gqa": SDPA reads the shared key/value heads instead of HF's copies.
"""


def build(device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(device=device, dtype=dtype)


def token_stream(steps: int, batch: int, seq: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(steps)]


def train(model, run, batches, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, times = [], []
    for ids in batches:
        t0 = time.perf_counter()
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return losses, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch").setLevel(logging.WARNING)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    eager_model = build(args.device, dtype)
    liger_model = copy.deepcopy(eager_model)
    batches = token_stream(args.steps, args.batch, args.seq, TINY_LLAMA["vocab_size"], args.device)

    print(f"tiny Llama {TINY_LLAMA['num_hidden_layers']} layers, hidden {TINY_LLAMA['hidden_size']}, "
          f"vocab {TINY_LLAMA['vocab_size']}, {args.device} {dtype}, batch {args.batch} x {args.seq}\n")
    print(liger_compile.explain(liger_model, input_ids=batches[0], labels=batches[0]))
    print(READING_THE_REPORT)
    torch._dynamo.reset()

    eager_losses, _ = train(eager_model, eager_model, batches)
    compiled = torch.compile(liger_model, backend="liger")
    liger_losses, times = train(liger_model, compiled, batches)

    print(f"\n{'step':>4}  {'eager loss':>12}  {'liger loss':>12}  {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(eager_losses, liger_losses)):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b):>9.2e}")
    print(f"\nfirst step (compile) {times[0]:.1f} s; later steps {sum(times[1:]) / max(1, len(times) - 1) * 1e3:.1f} ms")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    worst = max(abs(a - b) for a, b in zip(eager_losses, liger_losses))
    print("losses match eager" if worst <= tol * max(1.0, abs(eager_losses[0])) else "LOSSES DIFFER FROM EAGER")
    return 0 if worst <= tol * max(1.0, abs(eager_losses[0])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
