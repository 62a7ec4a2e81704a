"""Training through the trainers users run: torch_compile_backend="liger" against use_liger_kernel=True, Inductor
and no compile at all, one process each.

    python bench/bench_trainers.py                       # TRL SFT, Llama-3.2-1B shape, 4 x 2048 tokens a step, bf16
    python bench/bench_trainers.py --trainer dpo         # TRL DPO: 4 pairs of prompt + chosen/rejected, ref model
    python bench/bench_trainers.py --trainer kto         # TRL KTO: 4 rows of prompt + completion, ref model, KL batch
    python bench/bench_trainers.py --trainer grpo        # TRL GRPO: prompts of seq - 64 tokens, 64-token completions
    python bench/bench_trainers.py --trainer gkd         # TRL GKD (trl.experimental.gkd): a teacher of the same shape
    python bench/bench_trainers.py --trainer hf          # transformers' Trainer
    python bench/bench_trainers.py --lora 16             # TRL SFT with a PEFT LoRA adapter on every projection
    python bench/bench_trainers.py --lora 16 --variants unsloth   # the same through Unsloth (CUDA, unsloth installed)
    python bench/bench_trainers.py --tiny ...            # tiny Llama, a few steps: runs on CPU (checks the script)
    python bench/bench_trainers.py ... --one VARIANT     (what the driver runs: one process per variant)

Random init (seed 0), synthetic in-memory data. SFT and the HF Trainer get random full-length token rows (no padding;
--padding F: rows of random lengths, F of each batch padding; --padding-free: TRL's padding_free=True, the batch's
rows flattened into one row of documents with restarting position_ids, as many tokens as a full batch); DPO and KTO get prompts and completions of a
word-level tokenizer built in memory, of random lengths (so their batches are padded, as real preference data is),
`max_length` the sequence length (--pad-to-multiple-of N: their `pad_to_multiple_of`, N = the sequence length gives
every batch one shape, so a compiled run stops recompiling after its first batch). GRPO samples 64-token completions (2 per prompt, two prompt groups a step, with the KV
cache; rewarded by their length) for prompts of 3/4 to all of the rest of the sequence; the generation runs
uncompiled in every variant (TRL generates with the unwrapped model), so its time is in every step. GKD distils from
a teacher of the student's shape (another random init) on chat rows of prompt + answer, lmbda=0 (the answers are
the dataset's, no generation), beta 0.5. bf16=True, adamw_torch_fused, no checkpoints, evaluation or logging to disk,
gradient checkpointing off (TRL's default is on; --checkpointing turns it on; --activation-offloading: TRL SFT's
activation_offloading=True, saved activations to host memory, Unsloth's variant excepted, which offloads through its
own checkpointing). A TrainerCallback times each
optimizer step from on_step_begin to on_step_end with the device synchronised at both ends; tokens/s counts the
sequence positions of a step (the trainer's batch x its accumulation steps x length, for DPO both completions;
every variant runs one micro-batch a step) over the median step after the warm-up
steps (the first includes the compile). Peak memory is the allocator's peak over the whole train(). One more step
runs under torch.profiler (on a GPU): attention kernel time per layer. The liger run's fusions are read from the
backend's one-line-per-graph log records. Writes <trainer>_<model>_<b>x<t>.md/.json/.png into --out.

With bf16=True accelerate runs the forward under autocast and casts every floating output to fp32, the logits
included, inside the compiled graph: the logits escape the loss, so lm_head + cross-entropy is not fused (a near
miss). --pure-bf16 (bf16 weights, bf16=False) shows the run without that cast.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import MODELS  # noqa: E402
from common import COMPILE_PHASES, compile_phases, gpu_idle, is_gpu_work, recompiles  # noqa: E402

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, use_cache=False)
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # the tokenizer's only tokens; data ids start after them
# plain: no compile; liger_kernel: use_liger_kernel=True (Liger-Kernel's patches, no compile); inductor / liger:
# torch_compile=True with that torch_compile_backend; unsloth (with --lora only): Unsloth's FastLanguageModel, no
# compile; liger_offload: liger with LIGER_COMPILE_OFFLOAD_ACTIVATIONS=1 (saved activations in host memory);
# liger_cudagraphs: liger with torch_compile_mode="reduce-overhead" (Inductor's CUDA graphs: no launch per kernel);
# liger_gcfreeze: liger with gc.freeze() after the first step (what compiling left alive out of Python's collections)
VARIANTS = ["plain", "liger_kernel", "inductor", "liger", "unsloth", "liger_offload", "liger_cudagraphs",
            "liger_gcfreeze"]
OURS = ("liger", "liger_offload", "liger_cudagraphs", "liger_gcfreeze")


def tokenizer(words: int = 0):
    """A word-level tokenizer built in memory (nothing downloaded): the special tokens, then `words` words w0, w1, ...
    SFT and the HF Trainer get token ids and need it only for the pad token; TRL's preference trainers tokenize
    text with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate([*SPECIAL, *(f"w{i}" for i in range(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def build(args, device, dtype, seed: int = 0):
    import transformers  # noqa: PLC0415

    if args.tiny:
        cfg = transformers.LlamaConfig(**TINY, attn_implementation="sdpa")
        cls = transformers.LlamaForCausalLM
    else:
        cfg_name, cls_name, _, kwargs = MODELS[args.model]
        cfg = getattr(transformers, cfg_name)(**kwargs, attn_implementation="sdpa")
        cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg).to(dtype)


def token_rows(n: int, seq: int, vocab: int, padding: float = 0.0) -> list[list[int]]:
    """n rows of random token ids; with `padding` > 0, rows shortened at random so that about that fraction of a
    seq-long batch is padding (lengths uniform in [seq * (1 - 2 * padding), seq])."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(len(SPECIAL), vocab, (n, seq), generator=g).tolist()
    if padding <= 0:
        return rows
    shortest = max(1, int(seq * (1 - 2 * padding)))
    lengths = torch.randint(shortest, seq + 1, (n,), generator=g).tolist()
    return [r[:n_tokens] for r, n_tokens in zip(rows, lengths)]


def attention_profile(prof, layers: int) -> dict:
    """From one profiled step: the attention kernels' GPU time per layer (forward + backward) and the step's."""
    from bench_e2e import is_attention_kernel  # noqa: PLC0415

    kernels = [e for e in prof.key_averages() if is_gpu_work(e) and e.self_device_time_total > 0]
    attention_us = sum(e.self_device_time_total for e in kernels if is_attention_kernel(e.key))
    top = sorted((e for e in kernels if is_attention_kernel(e.key)), key=lambda e: -e.self_device_time_total)[:4]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1e3
    # the kernels behind the catch-all kind, which is where an unexpected copy shows up
    other = sorted((e for e in kernels if kernel_kind(e.key).startswith("other")),
                   key=lambda e: -e.self_device_time_total)
    return {"attention_ms_per_layer": attention_us / 1e3 / layers, "head_ms": head_profile(prof),
            **gpu_idle(prof.events()),
            "gpu_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
            "gpu_ms_by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "attention_kernels": [f"{e.key[:80]}: {e.self_device_time_total / 1e3:.1f} ms" for e in top],
            "other_kernels": [f"{e.key[:80]} x{e.count}: {e.self_device_time_total / 1e3:.2f} ms" for e in other[:6]]}


# the per-token log-prob head's events: our op and its backward, or TRL's autograd function (forward, backward node)
HEAD_EVENTS = ("liger::token_logprobs", "liger::token_logprobs_backward", "ChunkedLogProbFunction",
               "ChunkedLogProbFunctionBackward")


def head_profile(prof) -> dict[str, float]:
    """GPU ms of the kernels each head event of one profiled step launched (its device time, children included)."""
    return {e.key: round(e.device_time_total / 1e3, 2) for e in prof.key_averages()
            if e.key in HEAD_EVENTS and e.device_time_total > 0}


def plain_head_matmuls_ms(rows: int, hidden: int, vocab: int, device: str, repeat: int = 5) -> float | None:
    """GPU ms of the three plain matmuls a per-token log-prob head of this shape needs (logits, and the hidden and
    weight gradients from a [rows, vocab] gradient), bf16 cuBLAS, median of `repeat`: the head's yardstick."""
    if device != "cuda":
        return None
    h = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16)
    g = torch.empty(rows, vocab, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(repeat + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(h, w.t(), out=g)
        torch.mm(g, w)
        torch.mm(g.t(), h)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del h, w, g
    torch.cuda.empty_cache()
    return statistics.median(times[1:])


def kernel_kind(name: str) -> str:
    """A profiled kernel's kind, for the step's breakdown: where the GPU time of each variant goes."""
    from bench_e2e import is_attention_kernel  # noqa: PLC0415

    low = name.lower()
    if is_attention_kernel(name):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "matmul"
    if any(k in low for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if low.startswith("triton_"):
        return "inductor triton"
    if low.startswith("_"):  # our kernels and Liger-Kernel's are Triton functions named _...
        return "triton kernels"
    return "other (copies, reductions, norms in eager)"


COMPLETION = 64  # GRPO's completion length (a quarter of the sequence where that is shorter: --tiny)
WORDS = 1000  # the preference data's words, w0 .. w999 (ids after the special tokens; --tiny's vocab fits them)


def texts(n: int, shortest: int, longest: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(0, WORDS, (k,), generator=g).tolist()) for k in lengths]


def in_memory_dataset(data: dict):
    """A datasets.Dataset of `data` with a fingerprint of its own: datasets would otherwise fingerprint the arrow
    table by pickling it with dill, which fails on some Python/pyarrow pairs (3.12 with pyarrow 24-26:
    "Can't pickle <class 'MonthDayNano'>")."""
    import datasets  # noqa: PLC0415
    from datasets.table import InMemoryTable  # noqa: PLC0415

    return datasets.Dataset(InMemoryTable.from_pydict(data), fingerprint=f"bench-{len(next(iter(data.values())))}")


def preference_data(trainer: str, n: int, seq: int):
    """Prompts of a quarter of the length, completions filling the rest to between 3/4 and all of it."""
    prompt, rest = seq // 4, seq - seq // 4 - 2
    data = {"prompt": texts(n, prompt, prompt, 1)}
    if trainer == "dpo":
        data.update(chosen=texts(n, rest * 3 // 4, rest, 2), rejected=texts(n, rest * 3 // 4, rest, 3))
    else:
        data.update(completion=texts(n, rest * 3 // 4, rest, 2), label=[i % 2 == 0 for i in range(n)])
    return in_memory_dataset(data)


def prompt_data(n: int, seq: int):
    """GRPO: prompts of 3/4 to all of the sequence but for the completion (TRL pads them on the left)."""
    prompt = seq - completion_length(seq) - 2
    return in_memory_dataset({"prompt": texts(n, prompt * 3 // 4, prompt, 1)})


def completion_length(seq: int) -> int:
    return min(COMPLETION, seq // 4)


def completion_length_reward(completions, **kwargs) -> list[float]:
    """A reward that needs no model: longer completions score higher (a random model's text means nothing)."""
    return [float(len(c)) for c in completions]


def chat_data(n: int, seq: int):
    """GKD: a user turn of a quarter of the length and an assistant answer filling the rest to 3/4 - all of it."""
    prompt, rest = seq // 4, seq - seq // 4 - 2
    users, answers = texts(n, prompt, prompt, 1), texts(n, rest * 3 // 4, rest, 2)
    return in_memory_dataset({"messages": [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                                           for u, a in zip(users, answers)]})


def causal_lm_collate(rows):
    """Full-length rows: stack them; labels are the inputs (the model shifts them)."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


class FusionLog(logging.Handler):
    """Collects the backend's INFO line per compiled graph ("graph N: rms_norm=33, ..."), as tests/trainers/test_trainers.py
    does: the proof that the run went through backend="liger", and what it fused."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self.variants: dict[str, int] = {}  # "pattern [variant]" -> sites, from the report each DEBUG record carries

    def emit(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.INFO and "liger_compile: graph" in msg:
            self.lines.append(msg)
        for report in record.args if isinstance(record.args, tuple) else ():
            for site in getattr(report, "fused", ()):
                key = f"{site.pattern} [{site.variant}]"
                self.variants[key] = self.variants.get(key, 0) + 1

    def counts(self) -> dict[str, int]:
        total = {}
        for line in self.lines:
            for name, n in re.findall(r"(\w+)=(\d+)", line):
                total[name] = total.get(name, 0) + int(n)
        return total


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(args):
    """--lora R: PEFT LoRA of rank R on every projection (alpha 2R, dropout 0), handed to TRL as users do (its
    peft_config); PEFT's defaults otherwise (float32 adapters on a bf16 model)."""
    if not args.lora:
        return None
    import peft  # noqa: PLC0415

    return peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           task_type="CAUSAL_LM")


def lora_label(args) -> str:
    return f", LoRA r={args.lora}" if args.lora else ""


def unsloth_model(args, model):
    """--lora with variant unsloth: the same random-init model saved to a local directory and loaded back through
    Unsloth's FastLanguageModel (bf16, no 4-bit), with its LoRA of the same rank on every projection and, with
    --checkpointing, its own offloaded checkpointing. Needs CUDA and the unsloth package."""
    if not args.lora or args.trainer not in ("auto", "trl", "sft"):
        sys.exit("bench_trainers: the unsloth variant is TRL SFT with --lora")
    from unsloth import FastLanguageModel  # noqa: PLC0415

    directory = tempfile.mkdtemp(prefix="bench_trainers_unsloth_")
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    loaded, _ = FastLanguageModel.from_pretrained(directory, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                  load_in_4bit=False)
    return FastLanguageModel.get_peft_model(
        loaded, r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth" if args.checkpointing else False, random_state=0)


def label_phases(trainer):
    """Name the step's phases in the profiler's host timeline (phase:<method>), so the profiled step's GPU idle
    time can be told by phase: the forward and loss, the backward, the optimizer, the batch."""
    from torch.profiler import record_function  # noqa: PLC0415

    def labelled(obj, name):
        method = getattr(obj, name)

        def run(*a, **k):
            with record_function(f"phase:{name}"):
                return method(*a, **k)

        setattr(obj, name, run)

    for name in ("training_step", "compute_loss", "get_batch_samples", "_prepare_inputs"):
        if hasattr(trainer, name):
            labelled(trainer, name)
    labelled(trainer.accelerator, "backward")
    original = trainer.create_optimizer

    def create_optimizer(*a, **k):
        optimizer = original(*a, **k)
        labelled(optimizer, "step")
        return optimizer

    trainer.create_optimizer = create_optimizer


def make_trainer(args, variant, model, rows, device, amp, callbacks, steps):
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trainers_"), max_steps=steps, per_device_train_batch_size=args.batch,
        # spelled out: Unsloth rewrites the configs' defaults (two micro-batches a step, weight decay, warmup)
        gradient_accumulation_steps=1, weight_decay=0.0, warmup_steps=0,
        learning_rate=1e-5, lr_scheduler_type="constant", optim="adamw_torch_fused", bf16=amp,
        gradient_checkpointing=args.checkpointing, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        use_cpu=device == "cpu",
    )
    if variant == "liger_kernel":
        common["use_liger_kernel"] = True
    elif variant == "unsloth":  # its model checkpoints itself (get_peft_model's use_gradient_checkpointing)
        common["gradient_checkpointing"] = False
    elif variant == "inductor" or variant in OURS:
        common.update(torch_compile=True, torch_compile_backend="liger" if variant in OURS else variant)
        if variant == "liger_cudagraphs":
            common["torch_compile_mode"] = "reduce-overhead"
    if args.trainer == "grpo":
        import trl  # noqa: PLC0415

        generations = 2  # two prompt groups a step: their prompts differ in length (left padding)
        config = trl.GRPOConfig(**common, max_completion_length=completion_length(args.seq), num_generations=generations,
                                generation_batch_size=args.batch, generation_kwargs={"use_cache": True})
        trainer = trl.GRPOTrainer(model=model, reward_funcs=completion_length_reward, args=config,
                                  processing_class=tokenizer(WORDS),
                                  train_dataset=prompt_data(steps * args.batch // generations + 1, args.seq),
                                  callbacks=callbacks, peft_config=lora_config(args))
        return trainer, f"trl.GRPOTrainer {trl.__version__}" + lora_label(args)
    if args.trainer == "gkd":
        import trl  # noqa: PLC0415
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: PLC0415

        config = GKDConfig(**common, max_length=args.seq, lmbda=0.0, beta=0.5)
        teacher = build(args, device, next(model.parameters()).dtype, seed=1)
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, processing_class=tokenizer(WORDS),
                             train_dataset=chat_data(args.batch * steps * 2, args.seq), callbacks=callbacks)
        return trainer, f"trl.experimental.gkd.GKDTrainer {trl.__version__}"
    if args.trainer in ("dpo", "kto"):
        import trl  # noqa: PLC0415

        config_cls, trainer_cls = (trl.DPOConfig, trl.DPOTrainer) if args.trainer == "dpo" else (trl.KTOConfig,
                                                                                                   trl.KTOTrainer)
        pad = dict(pad_to_multiple_of=args.pad_to_multiple_of) if args.pad_to_multiple_of else {}
        config = config_cls(**common, max_length=args.seq, **pad)
        # with an adapter TRL's reference is the same model with the adapter disabled
        ref = None if args.lora else build(args, device, next(model.parameters()).dtype)
        trainer = trainer_cls(model=model, ref_model=ref, args=config, processing_class=tokenizer(WORDS),
                              train_dataset=preference_data(args.trainer, args.batch * steps * 2, args.seq),
                              callbacks=callbacks, peft_config=lora_config(args))
        return trainer, f"trl.{trainer_cls.__name__} {trl.__version__}" + lora_label(args)
    trl = None
    if args.trainer in ("auto", "trl", "sft"):
        try:
            import trl  # noqa: PLC0415
        except ImportError:
            if args.trainer in ("trl", "sft"):
                raise
    if trl is not None:
        # padded batches: every batch padded to the full length, so every step has one shape (as with
        # max_length padding), and the padding is the given fraction of the tokens
        pad = dict(pad_to_multiple_of=args.seq) if args.padding and not args.padding_free else {}
        # padding_free without packing: the rows are already at most seq long (TRL asks for max_length=None then)
        offload = args.activation_offloading and variant != "unsloth"
        config = trl.SFTConfig(**common, max_length=None if args.padding_free else args.seq, packing=False,
                               padding_free=args.padding_free, activation_offloading=offload, **pad)
        peft_config = None if variant == "unsloth" else lora_config(args)  # Unsloth's model carries its adapter
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=in_memory_dataset({"input_ids": rows}),
                                 processing_class=tokenizer(), callbacks=callbacks, peft_config=peft_config)
        return trainer, f"trl.SFTTrainer {trl.__version__}" + lora_label(args)
    import transformers  # noqa: PLC0415

    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                   train_dataset=[{"input_ids": r} for r in rows], data_collator=causal_lm_collate,
                                   callbacks=callbacks)
    return trainer, f"transformers.Trainer {transformers.__version__}"


def run_one(args) -> dict:
    variant = args.one
    if variant == "unsloth":  # before transformers, TRL and PEFT, which it patches; offline, no usage statistics
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: PLC0415, F401
    try:
        import accelerate  # noqa: PLC0415, F401
    except ImportError:
        sys.exit("bench_trainers: transformers' Trainer needs the accelerate package; install it")
    from transformers import TrainerCallback  # noqa: PLC0415

    if variant in OURS:  # only there: importing liger_compile also compiles TRL's head onto our op
        import liger_compile  # noqa: PLC0415, F401  (accelerate accepts torch_compile_backend="liger" after this)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_bf16 = device == "cuda" or args.cpu_bf16
    model = build(args, device, torch.bfloat16 if use_bf16 else torch.float32)
    if variant == "unsloth":
        model = unsloth_model(args, model)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    profiled_step = args.steps if args.profile else None  # one step more, under torch.profiler, not timed

    class StepTimer(TrainerCallback):
        """Each step's wall time, and the time Python's cyclic garbage collector took inside it."""

        def __init__(self):
            self.times, self.gc_ms, self.prof, self.profile = [], [], None, {}
            self.gc_start, self.gc_now = None, 0.0
            gc.callbacks.append(self.on_gc)

        def on_gc(self, phase, info):
            if phase == "start":
                self.gc_start = time.perf_counter()
            elif self.gc_start is not None:
                self.gc_now += (time.perf_counter() - self.gc_start) * 1e3

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == profiled_step:
                from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
            sync()
            self.gc_now = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            if self.prof is None:
                self.times.append(time.perf_counter() - self.t0)
                self.gc_ms.append(self.gc_now)
                if variant == "liger_gcfreeze" and len(self.times) == 1:
                    gc.freeze()
                print(f"step {len(self.times)}: {self.times[-1]:.3f} s", file=sys.stderr, flush=True)
                return
            self.prof.__exit__(None, None, None)
            self.profile = attention_profile(self.prof, model.config.num_hidden_layers)
            self.prof = None

    timer = StepTimer()
    total_steps = args.steps + (1 if args.profile else 0)
    rows = token_rows(args.batch * total_steps, args.seq, model.config.vocab_size, args.padding)
    amp = use_bf16 and not args.pure_bf16
    trainer, trainer_name = make_trainer(args, variant, model, rows, device, amp, [timer], total_steps)
    label_phases(trainer)

    log = logging.getLogger("liger_compile")
    fusions = FusionLog()
    log.addHandler(fusions)
    log.setLevel(logging.DEBUG)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    log.removeHandler(fusions)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # what the trainer really fed a step (a wrapper may change the configured batch or accumulation)
    rows_per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    timed = timer.times[args.warmup:]
    step = statistics.median(timed)
    result = {
        "variant": variant, "tokens/s": rows_per_step * args.seq * (2 if args.trainer == "dpo" else 1) / step,
        "rows_per_step": rows_per_step, "step_ms": step * 1e3, "peak_GiB": peak,
        "gc_ms_per_step": statistics.mean(timer.gc_ms[args.warmup:]), "gc_ms_max": max(timer.gc_ms[args.warmup:]),
        "first_step_s": timer.times[0], "train_s": wall, "steps": len(timer.times), "timed_steps": len(timed),
        "first_loss": losses[0], "last_loss": losses[-1], "trainer": trainer_name,
        # the preference trainers' first policy log-probs: their loss starts at ln 2 from a difference of nearly
        # equal log-prob sums, where bf16 rounding moves it by a few percent; the sums themselves agree closely
        "first_logps": {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("logps/")},
        "dtype": ("bf16, bf16=True" if amp else "bf16, bf16=False") if use_bf16 else "fp32",
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        **dict(zip(("recompiles", "recompile_reasons"), recompiles())), **compile_phases(),
        "step_times_s": [round(t, 4) for t in timer.times], **timer.profile,
    }
    if args.profile and timer.profile.get("head_ms"):  # after the peak was read: the yardstick allocates [rows, V]
        result["head_plain_matmuls_ms"] = plain_head_matmuls_ms(args.batch * args.seq, model.config.hidden_size,
                                                                model.config.vocab_size, device)
    if variant == "unsloth":
        result["unsloth"] = sys.modules["unsloth"].__version__
    if variant in OURS:
        result["offload_activations"] = os.environ.get("LIGER_COMPILE_OFFLOAD_ACTIVATIONS") == "1"
        result["fused"] = fusions.counts()
        result["fused_variants"] = fusions.variants
        result["enabled"] = os.environ.get("LIGER_COMPILE_ENABLE", "")  # patterns that are off by default, turned on
        result["disabled"] = os.environ.get("LIGER_COMPILE_DISABLE", "")  # and patterns turned off
        # graph calls that ran a version compiled on a run-time assumption (the causal mask), and the others
        result["assumed_calls"] = dict(sys.modules["liger_compile.facts"].stats)
        # lm_head calls that kept gradients from their forward, and backwards that used them or recomputed
        uniform = sys.modules.get("liger_compile.kernels._uniform_grad")
        result["forward_grads"] = dict(uniform.stats) if uniform else {}
        frozen = sys.modules.get("liger_compile.kernels._frozen_head_grad")  # a frozen head's (LoRA)
        result["frozen_head_grads"] = dict(frozen.stats) if frozen else {}
        print("\n".join(fusions.lines), file=sys.stderr)
    return result


def drive(args) -> list[dict]:
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--trainer", args.trainer, "--padding", str(args.padding)]
        cmd += ["--padding-free"] * args.padding_free + (["--lora", str(args.lora)] if args.lora else [])
        cmd += ["--pad-to-multiple-of", str(args.pad_to_multiple_of)] * bool(args.pad_to_multiple_of)
        cmd += ["--tiny"] * args.tiny + ["--checkpointing"] * args.checkpointing + ["--cpu-bf16"] * args.cpu_bf16
        cmd += ["--activation-offloading"] * args.activation_offloading
        cmd += ["--pure-bf16"] * args.pure_bf16 + ["--profile" if args.profile else "--no-profile"]
        env = dict(os.environ)
        if v == "liger_offload":
            env["LIGER_COMPILE_OFFLOAD_ACTIVATIONS"] = "1"
        if v == "unsloth" and os.environ.get("UNSLOTH_PYTHONPATH"):  # its pins (TRL <= 1.15) in front of ours
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env["UNSLOTH_PYTHONPATH"], env.get("PYTHONPATH")]))
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            done = re.findall(r"^step \d+: ([\d.]+) s$", err, flags=re.M)
            rows.append({"variant": v, "error": f"not finished after {args.timeout} s ({len(done)} steps done, "
                                                f"seconds: {', '.join(done)})"})
            print("\n".join(l for l in err.splitlines() if "liger_compile" in l or "Recompiling" in l)[-3000:],
                  file=sys.stderr)
            print(f"{v}: {rows[-1]}", flush=True)
            continue
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
            oom = "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr
            rows.append({"variant": v, "error": "OOM" if oom else err})
            head = p.stderr.find("Traceback")
            print((p.stderr[head:head + 3000] + "\n...\n" if head >= 0 else "") + p.stderr[-3000:], file=sys.stderr)
        else:
            rows.append(json.loads(line[0][len("RESULT "):]))
        print(f"{v}: {rows[-1]} ({time.time() - t0:.0f} s)", flush=True)
        if v in OURS and p.stderr:
            print("\n".join(l for l in p.stderr.splitlines() if "liger_compile" in l)[:4000])
    return rows


def chart(path: str, title: str, rows: list[dict]):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, label in ((axes[0], "tokens/s", "tokens/s (higher is better)"),
                           (axes[1], "peak_GiB", "peak GiB (lower is better)")):
        values = [float("nan") if r[key] is None else r[key] for r in ok]
        bars = ax.bar([r["variant"] for r in ok], [v if v == v else 0 for v in values],
                      color=["tab:green" if r["variant"] in OURS else "tab:blue" for r in ok])
        for b, v in zip(bars, values):
            ax.annotate(f"{v:,.0f}" if key == "tokens/s" else f"{v:.1f}", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--tiny", action="store_true", help="tiny Llama (2 layers, hidden 64), runs on CPU")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (--tiny: 64)")
    ap.add_argument("--steps", type=int, default=None, help="default 12 (--tiny: 6)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trainer", default="auto", choices=["auto", "sft", "trl", "hf", "dpo", "kto", "grpo", "gkd"],
                    help="auto: TRL's SFT if trl imports, else transformers' Trainer; trl: the same as sft")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (TRL's default)")
    ap.add_argument("--activation-offloading", action="store_true",
                    help="TRL SFT: activation_offloading=True (saved activations in host memory; CUDA)")
    ap.add_argument("--lora", type=int, default=0, help="TRL SFT, DPO, KTO or GRPO with a PEFT LoRA adapter of this "
                                                          "rank on every projection (0: full fine-tuning)")
    ap.add_argument("--padding", type=float, default=0.0,
                    help="fraction of each batch that is padding (rows of random lengths, TRL only), e.g. 0.25")
    ap.add_argument("--pad-to-multiple-of", type=int, default=0,
                    help="DPO/KTO: TRL's pad_to_multiple_of (the sequence length: one batch shape, no recompiles)")
    ap.add_argument("--padding-free", action="store_true",
                    help="TRL SFT with padding_free=True: each batch one row of documents, position_ids restarting")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 on CPU too (default there: fp32)")
    ap.add_argument("--pure-bf16", action="store_true",
                    help="bf16 weights with the Trainer's bf16=False: no autocast, and accelerate does not cast the "
                         "model's outputs (the logits) to fp32")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="one more step under torch.profiler: attention ms per layer (default on a GPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--one", default=None)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.activation_offloading and not torch.cuda.is_available():  # TRL's offloading asks for an accelerator
        sys.exit("bench_trainers: --activation-offloading needs a GPU (TRL offloads to host memory from one)")
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps or (6 if args.tiny else 12)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = drive(args)
    from common import write_results  # noqa: PLC0415

    model = "tiny-llama" if args.tiny else args.model
    kind = args.trainer if args.trainer in ("dpo", "kto", "grpo", "gkd", "hf") else "sft"
    name = f"{kind}_{model}_{args.batch}x{args.seq}" + ("_pure-bf16" if args.pure_bf16 else "") + (
        f"_padded{round(args.padding * 100)}" if args.padding and not args.padding_free else "") + (
        "_padding-free" if args.padding_free else "") + (f"_lora{args.lora}" if args.lora else "") + (
        f"_pad-to-{args.pad_to_multiple_of}" if args.pad_to_multiple_of else "") + (
        "_checkpointing" if args.checkpointing else "") + ("_offloading" if args.activation_offloading else "") + (
        "_enable-" + os.environ["LIGER_COMPILE_ENABLE"].replace(",", "-") if os.environ.get("LIGER_COMPILE_ENABLE")
        else "") + (
        "_disable-" + os.environ["LIGER_COMPILE_DISABLE"].replace(",", "-") if os.environ.get("LIGER_COMPILE_DISABLE")
        else "")
    ok = [r for r in rows if "error" not in r]
    compared = "logps/chosen" if all("logps/chosen" in r.get("first_logps", {}) for r in ok) and ok else "loss"
    first = {r["variant"]: r["first_logps"][compared] if compared != "loss" else r["first_loss"] for r in ok}
    agree = len(first) < 2 or max(first.values()) - min(first.values()) <= 2e-3 * max(abs(v) for v in first.values()) + 1e-6
    trainers = {}  # trainer (and version) -> the variants that ran it
    for r in ok:
        trainers.setdefault(r["trainer"], []).append(r["variant"])
    trainer_line = "; ".join(t + (f" ({', '.join(v)})" if len(trainers) > 1 else "") for t, v in trainers.items())
    notes = [f"trainer: {trainer_line}; {ok[0]['dtype'] if ok else ''}; "
             f"{args.steps} steps, median of the last {args.steps - args.warmup}; gradient checkpointing "
             f"{'on' if args.checkpointing else 'off'}"
             + ("; TRL's activation_offloading=True (not for Unsloth)" if args.activation_offloading else ""),
             f"first {'losses' if compared == 'loss' else compared + ' (the first loss is noise around ln 2)'} "
             f"{'agree' if agree else 'DISAGREE'}: {first}"]
    notes += [f"fused (liger, summed over graphs): {r['fused']}" for r in ok if "fused" in r]
    notes += [f"fused sites by variant (liger): {r['fused_variants']}" for r in ok if r.get("fused_variants")]
    notes += [f"{r['variant']} log-prob head GPU ms by event (one profiled step): {r['head_ms']}; three plain bf16 "
              f"matmuls of its shape (all rows): {r.get('head_plain_matmuls_ms') or 0:.1f} ms"
              for r in ok if r.get("head_ms")]
    notes += [f"enabled (patterns off by default): {r['enabled']}" for r in ok if r.get("enabled")]
    cols = ["variant", "tokens/s", "peak_GiB", "step_ms", "gpu_ms", "first_step_s", "first_loss", "last_loss", "graphs",
            "recompiles", "attention_ms_per_layer", "error"]
    notes += [f"{r['variant']} attention kernels: {'; '.join(r['attention_kernels'])}" for r in ok
              if r.get("attention_kernels")]
    notes += [f"{r['variant']} GPU ms by kernel kind (one profiled step): {r['gpu_ms_by_kind']}" for r in ok
              if r.get("gpu_ms_by_kind")]
    notes += [f"{r['variant']} the largest kernels of kind 'other': {'; '.join(r['other_kernels'])}" for r in ok
              if r.get("other_kernels")]
    notes += [f"{r['variant']} GPU idle in the profiled step: {r['idle_ms']} ms in {r['idle_gaps']} gaps of 50 us or "
              f"more; by the step's phase: {r['idle_by_phase']}; host ms by phase: {r.get('host_ms_by_phase')}; "
              f"the longest: {r['longest_idle']}"
              for r in ok if "idle_ms" in r]
    notes += [f"{r['variant']} Python garbage collection per timed step: {r['gc_ms_per_step']:.2f} ms on average, at "
              f"most {r['gc_ms_max']:.2f}" for r in ok if "gc_ms_per_step" in r]
    notes += [f"{r['variant']} graph calls by version: {r['assumed_calls']}" for r in ok if "assumed_calls" in r]
    notes += [f"{r['variant']} lm_head gradients from the forward (kept / used / recomputed): {r['forward_grads']}"
              for r in ok if r.get("forward_grads")]
    notes += [f"{r['variant']} frozen lm_head's d hidden direction from the forward (kept / used / recomputed): "
              f"{r['frozen_head_grads']}" for r in ok if any(r.get("frozen_head_grads", {}).values())]
    notes += [f"{r['variant']} recompiles: {r['recompile_reasons']}" for r in ok if r.get("recompile_reasons")]
    notes += [f"{r['variant']} compile seconds (Dynamo's metrics, nested phases each counted): "
              + ", ".join(f"{c} {r[c]:.1f}" for c, _ in COMPILE_PHASES if r.get(c)) for r in ok
              if r.get("backend_s")]
    title = f"{kind.upper()}, {model} shape, {args.batch} x {args.seq}" + (
        ", padding_free=True" if args.padding_free else f", {args.padding:.0%} padding" if args.padding else "")
    print(write_results(args.out, name, title, rows, cols, notes="\n\n".join(notes)))
    chart(os.path.join(args.out, f"{name}.png"), title, rows)
    if not agree or len(ok) < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
