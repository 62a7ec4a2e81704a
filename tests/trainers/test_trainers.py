"""torch_compile_backend="liger" in the HF Trainer and TRL's trainers: the run goes through our backend, fuses,
and its losses equal the same trainer's under torch_compile_backend="eager" (Dynamo without Inductor: the same graphs
and graph breaks, no code generation; CPU, fp32, tiny models)."""
import logging
import re
from collections import Counter

import pytest
import torch

import liger_compile  # noqa: F401  (the one extra line: lets accelerate accept the name)
from models import tiny

datasets = pytest.importorskip("datasets")
WORDS = [f"w{i}" for i in range(120)]


def tokenizer():
    """A word-level tokenizer built in memory (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def sentence(i, n=10):
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


class FusionLog(logging.Handler):
    """Collects our one-line-per-graph INFO records: proof the run went through backend="liger"."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def counts(self):
        total = {}
        for line in self.lines:
            for name, n in re.findall(r"(\w+)=(\d+)", line):
                total[name] = total.get(name, 0) + int(n)
        return total


def run(make_trainer, backend, tmp_path):
    log = logging.getLogger("liger_compile")
    handler, level = FusionLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    torch._dynamo.reset()
    try:
        trainer = make_trainer(backend, str(tmp_path / backend))
        trainer.train()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, handler, trainer


def common_args(backend, out, **extra):
    # adam_epsilon above fp32's rounding noise in the gradients (~1e-9 here): with the default 1e-8 a weight whose
    # true gradient is ~0 moves by +-lr on the sign of that noise, which the next steps' losses show (DPO's third
    # loss drifted by 1.5e-4 between two backends whose gradients agree to 5e-7, on one CPU and not another)
    return dict(output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
                torch_compile=True, torch_compile_backend=backend, adam_epsilon=1e-6, **extra)


def vocab_model(family="llama", **kw):
    return tiny(family, layers=1, vocab=len(WORDS) + 4, hidden=32, **kw)


def assert_same_losses(ours, ref, rtol=1e-4):
    assert len(ours) == len(ref) > 0
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=rtol, atol=1e-5)


# --- HF Trainer ---------------------------------------------------------------------------------------------------
def hf_trainer(grad_accum=1, eval_steps=None, checkpointing=False, bf16=False):
    from transformers import Trainer, TrainingArguments

    def make(backend, out):
        tok = tokenizer()
        ids = [tok(sentence(i))["input_ids"] for i in range(16)]
        data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
        extra = dict(gradient_accumulation_steps=grad_accum, gradient_checkpointing=checkpointing, bf16=bf16)
        if eval_steps:
            extra.update(eval_strategy="steps", eval_steps=eval_steps, per_device_eval_batch_size=2)
        return Trainer(model=vocab_model(), args=TrainingArguments(**common_args(backend, out, **extra)),
                       train_dataset=data, eval_dataset=data.select(range(4)) if eval_steps else None)

    return make


@pytest.mark.parametrize("case", ["plain", "grad_accum", "eval", "checkpointing", "bf16"])
def test_hf_trainer(case, tmp_path):
    """bf16: a float32 model with bf16=True (mixed precision), whose autocast accelerate enters inside the compiled
    forward: the lm_head's matmul runs in bf16 there, and the fused op is fed what autocast casts."""
    make = {"plain": hf_trainer(), "grad_accum": hf_trainer(grad_accum=2), "eval": hf_trainer(eval_steps=2),
            "checkpointing": hf_trainer(checkpointing=True), "bf16": hf_trainer(bf16=True)}[case]
    ours, log, trainer = run(make, "liger", tmp_path)
    ref, _, ref_trainer = run(make, "eager", tmp_path)
    assert_same_losses(ours, ref, rtol=1e-2 if case == "bf16" else 1e-4)
    # compiled through our backend, one graph: the layer's two norms and the final one, rotary, the MLP, the causal
    # mask and the loss
    assert log.counts() == dict(rms_norm=3, rotary=1, swiglu=1, causal_mask=1, linear_cross_entropy=1), log.lines
    if case == "eval":
        evals, ref_evals = ([h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
                            for t in (trainer, ref_trainer))
        assert_same_losses(evals, ref_evals)


def test_hf_trainer_honours_compile_mode(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    seen = {}
    import liger_compile.backend as backend_module

    real = backend_module.liger_backend

    def spy(gm, example_inputs, mode=None, options=None):
        seen["mode"] = mode
        return real(gm, example_inputs, mode=mode, options=options)

    from torch._dynamo.backends import registry

    monkeypatch.setitem(registry._COMPILER_FNS, "liger", spy)
    tok = tokenizer()
    ids = [tok(sentence(i))["input_ids"] for i in range(4)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(**{**common_args("liger", str(tmp_path)), "max_steps": 1},
                             torch_compile_mode="reduce-overhead")
    Trainer(model=vocab_model(), args=args, train_dataset=data).train()
    assert seen["mode"] == "reduce-overhead"


@pytest.mark.parametrize("bf16", [False, True])
def test_peft_lora(tmp_path, bf16):
    """bf16: TRL's LoRA setting, a bf16 model with PEFT's float32 adapters and bf16=True, whose autocast accelerate
    enters inside the compiled forward."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    def make(backend, out):
        tok = tokenizer()
        ids = [tok(sentence(i))["input_ids"] for i in range(8)]
        data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                               lora_dropout=0.0)
        model = peft.get_peft_model(vocab_model().to(torch.bfloat16 if bf16 else torch.float32), lora)
        args = TrainingArguments(**common_args(backend, out, bf16=bf16))
        return Trainer(model=model, args=args, train_dataset=data)

    ours, log, _ = run(make, "liger", tmp_path)
    ref, _, _ = run(make, "eager", tmp_path)
    assert_same_losses(ours, ref, rtol=1e-2 if bf16 else 1e-4)
    # the LoRA-wrapped projections still make a gated MLP, and each adapted projection is fused with its adapter
    assert log.counts() == dict(rms_norm=3, rotary=1, swiglu=1, causal_mask=1, linear_cross_entropy=1,
                                lora_projection=4), log.lines


# --- TRL ------------------------------------------------------------------------------------------------------------
trl = pytest.importorskip("trl")
from liger_compile.kernels import _frozen_head_grad, _uniform_grad  # noqa: E402


def sft(backend, out):
    tok = tokenizer()
    data = datasets.Dataset.from_dict({"text": [sentence(i) for i in range(16)]})
    args = trl.SFTConfig(**common_args(backend, out), max_length=16)
    return trl.SFTTrainer(model=vocab_model(), args=args, train_dataset=data, processing_class=tok)


def preference_pairs():
    return datasets.Dataset.from_dict({
        "prompt": [sentence(i, 4) for i in range(8)],
        "chosen": [sentence(i + 1, 5) for i in range(8)],
        "rejected": [sentence(i + 2, 5) for i in range(8)],
    })


def dpo(backend, out):
    args = trl.DPOConfig(**common_args(backend, out), max_length=16)
    return trl.DPOTrainer(model=vocab_model(), ref_model=vocab_model(), args=args, train_dataset=preference_pairs(),
                          processing_class=tokenizer())


def kto(backend, out):
    tok = tokenizer()
    data = datasets.Dataset.from_dict({
        "prompt": [sentence(i, 4) for i in range(8)],
        "completion": [sentence(i + 1, 5) for i in range(8)],
        "label": [i % 2 == 0 for i in range(8)],
    })
    args = trl.KTOConfig(**common_args(backend, out), max_length=16)
    return trl.KTOTrainer(model=vocab_model(), ref_model=vocab_model(), args=args, train_dataset=data,
                          processing_class=tok)


def grpo(backend, out):
    tok = tokenizer()
    data = datasets.Dataset.from_dict({"prompt": [sentence(i, 4) for i in range(8)]})

    def reward(completions, **_):  # prefers short completions: any deterministic function will do
        return [-float(len(c)) for c in completions]

    args = trl.GRPOConfig(**common_args(backend, out), num_generations=2, max_completion_length=6,
                          generation_batch_size=2, temperature=1.0)
    return trl.GRPOTrainer(model=vocab_model(), reward_funcs=reward, args=args, train_dataset=data,
                           processing_class=tok)


def gkd(backend, out):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = tokenizer()
    data = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": sentence(i, 4)}, {"role": "assistant", "content": sentence(i + 1, 5)}]
        for i in range(8)]})
    args = GKDConfig(**common_args(backend, out), max_length=16, lmbda=0.0)  # lmbda=0: no on-policy generation
    return GKDTrainer(model=vocab_model(), teacher_model=vocab_model(seed=1), args=args, train_dataset=data,
                      processing_class=tok)


TRL_TRAINERS = {"sft": sft, "dpo": dpo, "kto": kto, "grpo": grpo}  # GKD: test_gkd_loss_runs_on_linear_jsd_without_logits


@pytest.mark.parametrize("name", list(TRL_TRAINERS))
def test_trl_trainer(name, tmp_path):
    _uniform_grad.reset()
    ours, log, _ = run(TRL_TRAINERS[name], "liger", tmp_path)
    # SFT's loss weights every token alike: from the second of its 3 steps the head's gradients come from its
    # forward (kernels/_uniform_grad.py); DPO's, KTO's and GRPO's weights differ per sequence, so never
    assert _uniform_grad.stats["used"] == (2 if name == "sft" else 0), _uniform_grad.stats
    ref, _, _ = run(TRL_TRAINERS[name], "eager", tmp_path)
    assert_same_losses(ours, ref)
    # every graph (one per shape the trainer's batches take) has the layer's sites fused, and TRL's head
    graphs = log.counts().get("rotary", 0)
    assert graphs >= 1 and log.counts() == dict(rms_norm=3 * graphs, rotary=graphs, swiglu=graphs,
                                                causal_mask=graphs, trl_labelled_rows=graphs), log.lines


def dpo_lora(backend, out):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)  # B random: the adapters move from the first step
    args = trl.DPOConfig(**common_args(backend, out), max_length=16)  # the reference: the adapters disabled
    return trl.DPOTrainer(model=vocab_model(), args=args, train_dataset=preference_pairs(),
                          processing_class=tokenizer(), peft_config=lora)


def test_dpo_with_lora_takes_the_frozen_heads_gradient_from_its_forward(tmp_path):
    """A LoRA policy's lm_head is frozen: every step's head backward scales the direction its forward kept
    (kernels/_frozen_head_grad.py) by DPO's per-sequence weights, and the losses stay eager's."""
    _frozen_head_grad.reset()
    ours, _, _ = run(dpo_lora, "liger", tmp_path)
    assert _frozen_head_grad.stats["used"] == 3 and _frozen_head_grad.stats["recomputed"] == 0, \
        _frozen_head_grad.stats
    ref, _, _ = run(dpo_lora, "eager", tmp_path)
    assert_same_losses(ours, ref)
    assert ours[0] != ours[-1]  # the adapters trained


def sft_padding_free(backend, out):
    tok = tokenizer()
    # equal lengths keep every flattened batch the same shape (two documents a row): one graph, no recompiles
    data = datasets.Dataset.from_dict({"text": [sentence(i, 8) for i in range(16)]})
    args = trl.SFTConfig(**common_args(backend, out), max_length=None, padding_free=True)
    return trl.SFTTrainer(model=vocab_model(), args=args, train_dataset=data, processing_class=tok)


def test_sft_padding_free_runs_attention_per_document(tmp_path, monkeypatch):
    """padding_free=True: TRL flattens each batch into one row of documents with restarting position_ids and no
    attention_mask; HF builds a block-diagonal mask from them. The causal rewrite's test fails for it, so the graph's
    second version runs, with the variable-length attention (causal within each document). Losses equal Inductor's."""
    import liger_compile.backend as backend_module

    reports = []
    rewrite_graph = backend_module.rewrite_graph

    def recording(gm, opts, **kwargs):
        new_gm, report = rewrite_graph(gm, opts, **kwargs)
        reports.append(report)
        return new_gm, report

    monkeypatch.setattr(backend_module, "rewrite_graph", recording)
    ours, log, _ = run(sft_padding_free, "liger", tmp_path)
    monkeypatch.setattr(backend_module, "rewrite_graph", rewrite_graph)
    ref, _, _ = run(sft_padding_free, "eager", tmp_path)
    assert_same_losses(ours, ref)
    # the graph compiled twice: assuming the causal mask, then without the assumption (its attention the
    # variable-length op), each with the layer's sites and TRL's head fused
    fused = Counter(s.pattern for r in reports for s in r.fused)
    assert len(reports) == 2 and fused == dict(rms_norm=6, rotary=2, swiglu=2, trl_labelled_rows=2, causal_mask=1,
                                               varlen_attention=2), [str(r) for r in reports]



def test_gkd_loss_runs_on_linear_jsd_without_logits(tmp_path, monkeypatch):
    """Under torch_compile_backend="liger", GKD's loss is liger::linear_jsd on the two last hidden states (no
    [B, T, V] logits from either model), and each step's loss equals TRL's own (generalized_jsd_loss on the logits,
    which the run with another backend takes)."""
    import liger_compile.ops as ops
    from trl.experimental.gkd import GKDTrainer

    ours_calls, trl_calls = [], []
    real_ours, real_trl = ops.linear_jsd, GKDTrainer.generalized_jsd_loss
    monkeypatch.setattr(ops, "linear_jsd", lambda *a, **k: ours_calls.append(1) or real_ours(*a, **k))
    monkeypatch.setattr(GKDTrainer, "generalized_jsd_loss",
                        staticmethod(lambda *a, **k: trl_calls.append(1) or real_trl(*a, **k)))
    ours, log, _ = run(gkd, "liger", tmp_path)
    assert (len(ours_calls), len(trl_calls)) == (3, 0)
    # two graphs with the layer's sites fused; no lm_head + cross-entropy: the loss is linear_jsd on hidden states
    assert log.counts() == dict(rms_norm=6, rotary=2, swiglu=2, causal_mask=2), log.lines
    ours_calls.clear()
    ref, _, _ = run(gkd, "eager", tmp_path)
    assert (len(ours_calls), len(trl_calls)) == (0, 3)
    assert_same_losses(ours, ref)


def test_gkd_loss_takes_bf16_models_whose_outputs_come_back_upcast():
    """accelerate returns a bf16 model's outputs upcast to fp32: the hidden states are read inside the model, in the
    lm_head's dtype, as its logits were computed in eager, and the loss equals TRL's on those logits."""
    from types import SimpleNamespace

    from trl.experimental.gkd import GKDTrainer

    class Upcast(torch.nn.Module):  # what accelerate's prepared model returns for a bf16 model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits.float()
            return out

    student, teacher = vocab_model().to(torch.bfloat16), vocab_model(seed=1).to(torch.bfloat16)
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    unwrap = SimpleNamespace(unwrap_model=lambda m: m.inner if isinstance(m, Upcast) else m)
    trainer = SimpleNamespace(accelerator=unwrap, teacher_model=Upcast(teacher), beta=0.5,
                              args=SimpleNamespace(torch_compile_backend="liger"))
    loss = GKDTrainer.compute_loss(trainer, Upcast(student), inputs)
    with torch.no_grad():
        ref = GKDTrainer.generalized_jsd_loss(student(input_ids=ids).logits[:, :-1].float(),
                                              teacher(input_ids=ids).logits[:, :-1].float(), labels[:, 1:], beta=0.5)
    torch.testing.assert_close(loss.float(), ref, atol=2e-3, rtol=2e-2)


def test_gkd_falls_back_to_trls_loss_if_ours_fails(monkeypatch, caplog):
    """A failure of the fused path (a bug of ours) costs the run nothing but a warning: TRL's own loss is used."""
    from types import SimpleNamespace

    import liger_compile.ops as ops
    from trl.experimental.gkd import GKDTrainer

    def broken(*_a, **_k):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(ops, "linear_jsd", broken)
    student, teacher = vocab_model(), vocab_model(seed=1)
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), teacher_model=teacher, beta=0.5,
                              args=SimpleNamespace(torch_compile_backend="liger"),
                              generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    with caplog.at_level(logging.WARNING, logger="liger_compile"):
        loss = GKDTrainer.compute_loss(trainer, student, inputs)
    assert "using TRL's own compute_loss" in caplog.text
    want = GKDTrainer.compute_loss.__wrapped__(trainer, student, inputs)
    torch.testing.assert_close(loss, want)
