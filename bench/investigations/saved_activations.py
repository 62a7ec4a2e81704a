"""What a training step keeps for backward, per decoder layer: eager, Inductor and backend "liger" side by side.

    python bench/investigations/saved_activations.py [--seq 1024] [--hidden 2048] [--intermediate 8192]

Meant for CUDA (on CPU our ops trace as their plain-torch references, whose recomputation in backward AOTAutograd
merges with the forward's, so the CPU figures overstate what ours keeps). bf16, a Llama of the given width with one
and with two decoder layers; the difference of the two is one layer's share. Counts every tensor autograd saves
in the step (a saved_tensors_hooks pack hook sees each one, the compiled graphs' saved values included, after a
first step compiled without the hook), each storage once, parameters and buffers left out. Prints bytes per token
per layer by variant and the saved tensors' shapes and dtypes: where activation memory for long context goes, and
what a rewrite could recompute instead of keeping. Variant liger_kernel patches transformers' Llama classes for the
rest of the process (Liger-Kernel's apply_liger_kernel_to_llama): put it last.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
import transformers


def build(layers: int, args) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
        max_position_embeddings=args.seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(args.device, torch.bfloat16).train()


def saved(model, batch) -> tuple[int, Counter]:
    """(bytes of the distinct non-parameter storages saved for backward in one step, Counter of shape/dtype)."""
    kept = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    storages, kinds = {}, Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in kept and ptr not in storages:
            storages[ptr] = t.untyped_storage().nbytes()
            kinds[f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values()), kinds


def measure(variant: str, layers: int, args):
    import torch._dynamo  # noqa: PLC0415

    torch._dynamo.reset()
    if variant == "liger_kernel":
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: PLC0415

        apply_liger_kernel_to_llama()
    model = build(layers, args)
    if variant in ("inductor", "ours"):
        if variant == "ours":
            import liger_compile  # noqa: F401, PLC0415
        model = torch.compile(model, backend="liger" if variant == "ours" else "inductor")
    ids = torch.randint(0, args.vocab, (1, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids}
    model(**batch).loss.backward()  # compiles, outside the hook
    return saved(model, batch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--variants", default="eager,inductor,ours")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print("| variant | saved bytes per token per layer | in units of hidden x 2 bytes |\n|---|---|---|")
    details = {}
    for variant in args.variants.split(","):
        (one, kinds_one), (two, kinds_two) = measure(variant, 1, args), measure(variant, 2, args)
        per_layer = (two - one) / args.seq
        print(f"| {variant} | {per_layer:,.0f} | {per_layer / (2 * args.hidden):.2f} |", flush=True)
        details[variant] = kinds_two - kinds_one
    for variant, kinds in details.items():
        print(f"\n{variant}, one layer's saved tensors (shape dtype: count):")
        for kind, count in sorted(kinds.items()):
            print(f"  {kind}: {count}")


if __name__ == "__main__":
    main()
