"""bf16 on CUDA: the real-training-shapes tests (tests/models/test_training_shapes.py: changing lengths, padding, packed
sequences, activation checkpointing, evaluation between training steps) in the dtype people train in.

The test bodies are test_training_shapes' own, given a bf16 precision instead of its fp32 one: the routing
assertions (fusion counts, near misses, graphs compiled for the changing lengths, Inductor's as well) are
exactly the CPU ones. Accuracy is test_gpu_families' rule: every result of every step (loss, each gradient,
logits where a test keeps them), compared with the same bf16 weights run in float64, may be off by at most
K x max(eager's error, Inductor's error, |Inductor - eager|) + floor (test_gpu_families.accuracy).

Tiny models (hidden 64, head_dim 16, intermediate 128, vocabulary 128; one or two layers): each test compiles
its scenario once under Inductor and once under backend="liger".

Marked `gpu` (skipped without CUDA). To check the logic without a GPU: LIGER_TEST_DEVICE=cpu runs the same tests
on CPU (unmarked; LIGER_TEST_DTYPE=float32 for fp32), slowly.
"""
from __future__ import annotations

import copy

import pytest
import torch

import liger_compile
import test_training_shapes as shapes
from test_gpu_families import DEVICE, DTYPE, accuracy
from test_training_shapes import Compiled, Precision, Steps, compile_and_run

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []


class LowPrecision(Precision):
    """DTYPE on DEVICE: backend="liger" as accurate as eager and Inductor are, against a float64 reference."""
    device, dtype, hidden = DEVICE, DTYPE, 64

    def check(self, model, steps: Steps, count_inductor: bool = True) -> Compiled:
        ref_model = copy.deepcopy(model).double()  # the same weights, float64 math
        ref, eager = steps(ref_model, ref_model), steps(model, model)
        inductor, inductor_graphs = compile_and_run(model, steps, "inductor")
        report = liger_compile.Report()
        liger, graphs = compile_and_run(model, steps, "liger", options={"report": report})
        assert liger.keys() == ref.keys()
        bad = []
        for label in ref:
            assert liger[label][1].keys() == ref[label][1].keys(), label
            lines, summary = accuracy(liger[label], eager[label], inductor[label], ref[label])
            print(f"{label}: {summary}")
            bad += [f"{label}: {line}" for line in lines]
        assert not bad, "\n".join(bad)
        return Compiled(report, graphs, inductor_graphs)


BF16 = LowPrecision()


def test_changing_lengths_bf16():
    shapes.test_changing_lengths_stay_fused_without_extra_recompiles(BF16)


def test_right_padding_bf16():
    shapes.test_right_padding_with_masked_labels_matches_eager(BF16)


def test_packed_sequences_bf16():
    shapes.test_packed_sequences_match_eager_with_attention_per_document(BF16)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_bf16(use_reentrant):
    shapes.test_gradient_checkpointing_matches_eager(use_reentrant, BF16)


def test_checkpointed_body_with_a_padding_mask_bf16():
    shapes.test_checkpointed_body_with_a_padding_mask(BF16)


def test_eval_between_training_steps_bf16():
    shapes.test_eval_with_grad_disabled_gives_real_logits_between_training_steps(BF16)
