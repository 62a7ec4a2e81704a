"""Compiles the exp-path kernels of lm_head + cross-entropy for Hopper (sm_90) without a GPU: Triton's whole pipeline,
to a cubin, at the settings the op launches them with. Run by tests/kernels/test_kernels_build_for_hopper.py in a process of
its own (the tests' process runs Triton's interpreter, whose kernels cannot be compiled). A compiler failure here
(an MLIR pass assertion, too much shared memory) is one the H200 would hit: the op would fall back to the slower
path there. Prints one line per kernel build and exits non-zero if any failed."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from liger_compile.kernels.linear_cross_entropy import exp_matmul as lce_exp_matmul
from liger_compile.kernels.linear_cross_entropy import label_logit as lce_label_logit
from liger_compile.kernels.linear_cross_entropy import row_combine as lce_row_combine
from liger_compile.kernels.linear_cross_entropy import row_scaled_matmul as lce_row_scaled_matmul
from liger_compile.kernels import layer_norm, linear_jsd, rms_norm, rotary, token_logprobs

HOPPER = GPUTarget("cuda", 90, 32)


def build(kernel, types: dict, constants: dict, **options) -> None:
    """types: each runtime parameter's Triton type; constants: the constexpr parameters' values."""
    signature = {name: ("constexpr" if name in constants else types[name]) for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constants), target=HOPPER, options=options)


def exp_matmul(softcap: bool, rerun: bool) -> None:
    cfg = lce_exp_matmul.config("cuda")
    bm, bn, bk, sub = cfg["BM"], cfg["BN"], cfg["BK"], cfg["SUBTILE"]
    types = dict(h_desc=f"tensordesc<bf16[{bm}, {bk}]>", w_desc=f"tensordesc<bf16[{bn}, {bk}]>",
                 p_desc=f"tensordesc<bf16[{bm}, {bn // sub}]>", REF="*fp32", LABELS="*i64", PART_SUM="*fp32",
                 ROW_MAX="*fp32", RERUN="*i32", n_rows="i32", n_cols="i32", k_dim="i32", n_col_tiles="i32",
                 softcap="fp32")
    build(lce_exp_matmul.exp_matmul_kernel, types,
          dict(HAS_SOFTCAP=softcap, IS_RERUN=rerun, UPCAST_DOT=False, BM=bm, BN=bn, BK=bk, SUBTILE=sub, PLAIN=False,
               WARP_SPECIALIZE=cfg["WARP_SPECIALIZE"]),
          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def label_logit(softcap: bool) -> None:
    types = dict(H="*bf16", W="*bf16", LABELS="*i64", Z_LABEL="*fp32", REF="*fp32", ROW_MAX="*fp32",
                 h_row_stride="i32", n_cols="i32", k_dim="i32", ignore_index="i32", softcap="fp32")
    build(lce_label_logit.label_logit_kernel, types, dict(HAS_SOFTCAP=softcap, BLOCK_K=1024), num_warps=4)


def row_combine(softcap: bool, rerun: bool) -> None:
    types = dict(P="*bf16", p_row_stride="i32", REF="*fp32", LABELS="*i64", PART_SUM="*fp32", ROW_MAX="*fp32",
                 Z_LABEL="*fp32", LOSSES="*fp32", ROW_SCALE="*fp32", INV_DENOM="*fp32", RERUN="*i32", H="*bf16",
                 H_SCALED="*bf16", h_row_stride="i32", n_rows="i32", n_cols="i32", n_col_tiles="i32", k_dim="i32",
                 ignore_index="i32", softcap="fp32", safe_exp="fp32")
    build(lce_row_combine.row_combine_kernel, types,
          dict(HAS_SOFTCAP=softcap, IS_RERUN=rerun, ROUND_BY_HAND=False, BLOCK_R=8, BLOCK_T=128, BLOCK_K=512),
          num_warps=4)


def row_scaled_matmul(m: int, n: int) -> None:
    cfg = dict(lce_row_scaled_matmul.config("cuda", m, n, 132))
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    types = dict(a_desc=f"tensordesc<bf16[{bm}, {bk}]>", b_desc=f"tensordesc<bf16[{bk}, {bn}]>",
                 c_desc=f"tensordesc<bf16[{bm}, {bn}]>", ROW_SCALE="*fp32", n_rows="i32", k_dim="i32")
    build(lce_row_scaled_matmul.row_scaled_matmul_kernel, types, dict(UPCAST_DOT=False, BM=bm, BN=bn, BK=bk),
          **cfg)


def token_logprobs_rows(backward: bool, softcap: bool) -> None:
    kernel = token_logprobs._backward_kernel if backward else token_logprobs._forward_kernel
    out = ("LOGP", "ENTROPY", "LOG_Z", "GRAD_LOGP", "GRAD_ENTROPY") if backward else \
        ("LOGP", "ENTROPY", "LOG_SUM_SQ", "MEAN", "LOG_Z")
    types = dict(LOGITS="*bf16", LABELS="*i64", TOP1="*i8", row_stride="i32", n_cols="i32", ignore_index="i32",
                 logit_scale="fp32", softcap="fp32", inv_temperature="fp32", **{name: "*fp32" for name in out})
    build(kernel, types, dict(HAS_SOFTCAP=softcap, BLOCK_V=4096), num_warps=8)


def linear_jsd_rows(mode: int) -> None:
    types = dict(STUDENT="*bf16", TEACHER="*bf16", LABELS="*i64", LOSSES="*fp32", row_stride_s="i32",
                 row_stride_t="i32", n_cols="i32", ignore_index="i32", beta="fp32", inv_temperature="fp32")
    build(linear_jsd._row_kernel, types, dict(MODE=mode, BLOCK_V=4096), num_warps=8)


def rotary_mode(in_il: bool, out_il: bool, block_pass: int, has_k: bool, backward: bool) -> None:
    ints = ("n_t n_pairs n_q_heads n_k_heads rot_start pass_start n_pass c_step c_off q_sb q_st q_sh q_sd k_sb k_st "
            "k_sh k_sd qo_sb qo_st qo_sh ko_sb ko_st ko_sh cos_sb cos_st cos_sd sin_sb sin_st sin_sd").split()
    types = dict(Q="*bf16", K="*bf16", COS="*bf16", SIN="*bf16", QO="*bf16", KO="*bf16", **{n: "i32" for n in ints})
    build(rotary._rotary_kernel, types, dict(BACKWARD=backward, HAS_K=has_k, Q_UNIT_D=True, K_UNIT_D=True,
                                             IN_INTERLEAVED=in_il, OUT_INTERLEAVED=out_il, BLOCK_H=8, BLOCK_HALF=32,
                                             BLOCK_PASS=block_pass), num_warps=1)


def rms_norm_mode(backward: bool, has_weight: bool, has_residual: bool, n_cols: int, round_rstd: bool = False,
                  gate: int = 0) -> None:
    ptrs = dict(X="*bf16", W="*bf16", RSTD="*fp32")
    if backward:
        kernel, cfg = rms_norm._rms_norm_bwd_kernel, rms_norm.bwd_config(n_cols, has_residual)
        types = dict(ptrs, DY="*bf16", DX="*bf16", DW_PARTIAL="*fp32", DS="*bf16", DG="*bf16",
                     **{n: "i32" for n in ("dy_row_stride x_row_stride dx_row_stride ds_row_stride dg_row_stride "
                                           "n_rows n_cols").split()})
        consts = dict(HAS_DS=has_residual, ROWS_PER_PROGRAM=rms_norm.rows_per_program(1 << 16, rms_norm._wide(n_cols)))
    else:
        kernel, cfg = rms_norm._rms_norm_fwd_kernel, rms_norm.fwd_config(n_cols)
        types = dict(ptrs, Y="*bf16", RES="*bf16", S="*bf16", eps="fp32",
                     **{n: "i32" for n in "x_row_stride y_row_stride res_row_stride s_row_stride n_rows n_cols".split()})
        consts = dict(HAS_RESIDUAL=has_residual)
    num_warps = cfg.pop("num_warps")
    # a gate before the norm comes with the Llama form (cast before the weight)
    build(kernel, types, dict(consts, **cfg, OFFSET=0.0, CAST_BEFORE_WEIGHT=gate == rms_norm.GATE_BEFORE_SILU,
                              HAS_WEIGHT=has_weight, ROUND_RSTD=round_rstd, GATE=gate, BLOCK_N=triton.next_power_of_2(n_cols)),
          num_warps=num_warps)


def layer_norm_mode(backward: bool, residual: bool, cols: int) -> None:
    cfg = layer_norm.bwd_config(cols, 16384) if backward else layer_norm.fwd_config(cols)
    block = dict(BLOCK_N=triton.next_power_of_2(cols), **{k: v for k, v in cfg.items() if k != "num_warps"})
    if backward:
        types = dict(DY="*bf16", X="*bf16", W="*bf16", MEAN="*fp32", RSTD="*fp32", DS="*bf16", DX="*bf16",
                     DW_PARTIAL="*fp32", DB_PARTIAL="*fp32", dy_row_stride="i32", x_row_stride="i32",
                     ds_row_stride="i32", dx_row_stride="i32", n_rows="i32", n_cols="i32")
        build(layer_norm._layer_norm_bwd_kernel, types, dict(HAS_WEIGHT=True, HAS_DS=residual, WEIGHT_GRAD=True,
                                                             BIAS_GRAD=True, **block), num_warps=cfg["num_warps"])
    else:
        types = dict(X="*bf16", R="*bf16", S="*bf16", W="*bf16", B="*bf16", Y="*bf16", MEAN="*fp32", RSTD="*fp32",
                     x_row_stride="i32", r_row_stride="i32", y_row_stride="i32", n_rows="i32", n_cols="i32",
                     eps="fp32")
        build(layer_norm._layer_norm_fwd_kernel, types, dict(HAS_RESIDUAL=residual, HAS_WEIGHT=True, HAS_BIAS=True,
                                                             **block), num_warps=cfg["num_warps"])


BUILDS = {
    "exp_matmul": lambda: exp_matmul(False, False),
    "exp_matmul rerun": lambda: exp_matmul(False, True),
    "exp_matmul softcap": lambda: exp_matmul(True, False),
    "label_logit": lambda: label_logit(False),
    "label_logit softcap": lambda: label_logit(True),
    "row_combine": lambda: row_combine(False, False),
    "row_combine rerun softcap": lambda: row_combine(True, True),
    "row_scaled_matmul hidden 4096": lambda: row_scaled_matmul(1024, 4096),
    "row_scaled_matmul hidden 2048": lambda: row_scaled_matmul(1024, 2048),
    "token_logprobs forward": lambda: token_logprobs_rows(False, False),
    "token_logprobs forward softcap": lambda: token_logprobs_rows(False, True),
    "token_logprobs backward softcap": lambda: token_logprobs_rows(True, True),
    **{f"linear_jsd mode {mode}": (lambda mode=mode: linear_jsd_rows(mode)) for mode in (0, 1, 2)},
    "rotary halves": lambda: rotary_mode(False, False, 0, True, False),
    "rotary interleaved, backward": lambda: rotary_mode(True, True, 0, True, True),
    "rotary interleaved to halves, one tensor": lambda: rotary_mode(True, False, 0, False, False),
    "rotary partial, copied channels": lambda: rotary_mode(False, False, 32, True, False),
    "rms_norm forward": lambda: rms_norm_mode(False, True, False, 4096),
    "rms_norm forward, no weight, + residual": lambda: rms_norm_mode(False, False, True, 2048),
    "rms_norm backward, no weight, prefetch": lambda: rms_norm_mode(True, False, False, 4096),
    "rms_norm backward, no weight, + residual, prefetch": lambda: rms_norm_mode(True, False, True, 2048),
    "rms_norm forward, rounded rstd, head dim": lambda: rms_norm_mode(False, False, False, 128, round_rstd=True),
    "rms_norm backward, rounded rstd, prefetch": lambda: rms_norm_mode(True, False, False, 4096, round_rstd=True),
    "gated rms_norm forward": lambda: rms_norm_mode(False, True, False, 4096, gate=rms_norm.GATE_BEFORE_SILU),
    "gated rms_norm backward, prefetch": lambda: rms_norm_mode(True, True, False, 2048, gate=rms_norm.GATE_BEFORE_SILU),
    "rms_norm gated after, sigmoid, forward": lambda: rms_norm_mode(False, True, False, 128,
                                                                    gate=rms_norm.GATE_AFTER_SIGMOID),
    "rms_norm gated after, silu, backward, prefetch": lambda: rms_norm_mode(True, True, False, 4096,
                                                                            gate=rms_norm.GATE_AFTER_SILU),
    "layer_norm forward, + residual": lambda: layer_norm_mode(False, True, 4096),
    "layer_norm backward, + sum gradient": lambda: layer_norm_mode(True, True, 4096),
    "layer_norm forward, narrow rows": lambda: layer_norm_mode(False, False, 64),
}

if __name__ == "__main__":
    failed = 0
    for name, run in BUILDS.items():
        try:
            run()
            print(f"built {name}", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"builds: {len(BUILDS)}", flush=True)
    sys.exit(1 if failed else 0)
