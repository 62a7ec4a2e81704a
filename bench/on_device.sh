#!/usr/bin/env bash
# Everything the H200 runs, in stages; one invocation may run several (each stage stays under 10 minutes):
#   bash bench/on_device.sh tests kernels       GPU tests, then the kernel table
# Stages:
#   tests      GPU tests (every kernel test, tests/models/test_gpu*.py, the graph-break, run-time mask, rotary-form
#              and TRL-head tests on CUDA; 4 pytest-xdist workers)
#   sweep      RMSNorm tile sweep at 4096 and 2048 columns (bench/investigations/sweep_rms_norm.py)
#   lce        lm_head+CE: row-kernel and chunk settings, two-stream variant, profile (bench/investigations/bench_lce.py)
#   lceexp     lm_head+CE with the softmax in our matmul's epilogue: tile settings vs cuBLAS, op by path, profile
#   paths      lm_head+CE: op time of each path at hidden 2048 and 4096, memory left after calls (check_lce_paths.py)
#   trltests   the per-token log-prob op and TRL fused-head tests on the GPU
#   lcetests   the lm_head+CE tests only (test_gpu.py's and the kernel tests on CUDA)
#   trig       rotary with cos/sin computed in the kernel vs read (bench/investigations/bench_rotary_trig.py)
#   kernels    kernel table (eager, Inductor, Liger-Kernel, ours): event, GPU-busy and CUDA-graph times, memory
#   e2e4k      Llama-3.2-1B 4x4096, all variants side by side, one process each
#   ours4k     the same, backend="liger" only (a quick check after a change)
#   e2e32k     Llama-3.2-1B 1x32768: Liger-Kernel and ours (eager/Inductor: the reference runs in bench/summary.py)
#   e2e64k     Llama-3.2-1B 1x65536: Liger-Kernel and ours (eager and Inductor run out of memory)
#   ours32k    Llama-3.2-1B 1x32768, backend="liger" only
#   retest     the add_rms_norm kernel tests and the bf16 training-shape tests that are not padding/packing
#   fsdp2      FSDP2 over 2 GPUs (needs both): eager, Inductor, Liger-Kernel, ours (bench/bench_fsdp.py)
#   convergence  the bf16 explain and convergence tests only
#   qwen4k     Qwen2-1.5B 4x4096, all variants but Liger-Kernel + Inductor
#   ablation   Llama-3.2-1B 4x4096: ours, and ours with each pattern disabled (the step with and without each)
#   profiles4k / profiles32k   one profiled step of eager, Inductor and ours: attention ms per layer, kernel tables
#   sft        TRL SFT (or the HF Trainer) on the Llama-3.2-1B shape, 4x2048: no compile, use_liger_kernel=True,
#              Inductor and backend "liger" (SFT_VARIANTS narrows the list); sftpad the same with 25% padding;
#              sftfree the same with padding_free=True (each batch one row of four documents)
#   lora       TRL SFT with a PEFT LoRA adapter (rank LORA_RANK, default 16) on every projection, 4x2048, the same
#              four variants (SFT_VARIANTS; SFT_VARIANTS=unsloth for Unsloth's FastLanguageModel, whose wheels and
#              TRL <= 1.15 must be in .whl); loracheckpoint the same with gradient checkpointing on;
#              LIGER_COMPILE_DISABLE=lora_projection leaves the adapters unfused (results named _disable-...),
#              LIGER_COMPILE_ENABLE=lora_shared_input groups q/k/v and gate/up adapters (results named _enable-...)
#              OFFLOAD=1 adds TRL's activation_offloading=True (results named _offloading); variants liger_offload
#              (offload_activations) and liger_cudagraphs (torch_compile_mode="reduce-overhead") in any trainer stage
#   dpo, kto   TRL DPO (PAIRS pairs, default 2) / KTO (PAIRS rows) with a reference model, the same four variants
#              (TRAINER_VARIANTS, TRAINER_TIMEOUT seconds per variant, TRAINER_STEPS; PAD_TO=2048 pads every batch
#              to one shape, TRL's pad_to_multiple_of, so the compiled variants stop recompiling)
#              LORA_RANK=16 gives the policy a LoRA adapter (the reference: the adapter disabled)
#   grpo, gkd  TRL GRPO (PAIRS rows: prompt groups of 2 completions of 64 tokens) / GKD (PAIRS rows, a teacher of the
#              same shape), the same four variants and settings
#   attention  one layer's attention fwd+bwd for unpadded, padded and packed batches (bench/bench_attention.py)
#   varlentests  the variable-length attention, run-time mask and training-shape tests on the GPU
#   masktests  the run-time mask tests, the op-output tests, the norm/down_proj kernel tests and the training shapes
#   context    longest trainable context (batch 1) for ours and Liger-Kernel (CONTEXT_VARIANTS, e.g. ours_offload;
#              CONTEXT_CHECKPOINTING=1 with gradient checkpointing in every variant)
#   host       host-bound step time (a few tokens): eager, Inductor, ours, LoRA r LORA_RANK (0: none), and a cProfile
#              of one step of ours (bench/investigations/host_overhead.py)
#   saved      bytes per token per decoder layer kept for backward at 1 x 4096: eager, Inductor, ours, Liger-Kernel,
#              with the saved tensors' shapes (bench/investigations/saved_activations.py)
#   hgemm      q/k/v and gate/up projections as one matmul or three, fwd+bwd (bench/investigations/bench_horizontal_gemm.py)
#   sdpa       causal attention through cuDNN, FlashAttention-2, memory-efficient SDPA and FlexAttention, head dim 64
#              and 128, 4x4096 and 1x32768 (bench/investigations/bench_sdpa_backends.py)
#   compile    compile time at 4x4096, Inductor and ours, each a cold start then a warm restart over fresh caches
#              (bench/bench_compile.py; COMPILE_MODE sets torch.compile's mode, COMPILE_PROFILE=1 adds a cold start
#              per variant under cProfile (compile_profile_<variant>_cold.txt), COMPILE_VARIANTS the list, e.g.
#              inductor,ours,ours-no-memo for ours without the memo of torch's analysis of our kernels' calls)
# Stage lists can be narrowed by environment: QWEN_VARIANTS, ABLATION_VARIANTS, ABLATION_REPEAT (runs of the list,
# round robin, medians reported; later runs find the kernels compiled), P32_VARIANTS, CONTEXT_VARIANTS,
# CONTEXT_START, CONTEXT_MAX, CONTEXT_BUDGET (seconds).
# Put wheels in .whl for what the GPU machine lacks (bench/carry_wheels.sh builds it): Liger-Kernel, and for the sft stage trl, datasets, dill,
# multiprocess and pyarrow (the image has no TRL); a package may come unpacked as .whl/NAME.site.txz (a tar.xz of
# its site-packages folders) where its wheel is too large, and .whl/unsloth.txz (the same for Unsloth, unsloth_zoo
# and the versions they pin) gives the unsloth variant its own packages in front of the others. Results and logs go to $OUT/results.tgz
# (the device returns only a few files) and each stage's last lines to the call's output.
# One invocation per TAG: each invocation removes its results folder when it ends (after packing it), so a second
# invocation under the same TAG replaces the first one's .tgz; chain stages in one invocation instead.
# On a machine of several GPUs two lists of stages can run at once, one per GPU, each under its own TAG:
#   bash bench/on_device.sh install; CUDA_VISIBLE_DEVICES=1 TAG=a bash bench/on_device.sh tests > $OUT/a.log &
#   CUDA_VISIBLE_DEVICES=0 TAG=b bash bench/on_device.sh kernels; wait     (results_a.tgz, results_b.tgz)
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/liger_compile ]; then  # installed once per machine (parallel lists must not install twice)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  for t in .whl/*.site.txz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done  # packages carried unpacked (smaller)
  if [ -f .whl/unsloth.txz ]; then mkdir -p /tmp/site_unsloth && tar xJf .whl/unsloth.txz -C /tmp/site_unsloth; fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site
# Unsloth and what it pins (TRL <= 1.15, datasets < 5), seen by its variant only (bench/bench_trainers.py)
[ -d /tmp/site_unsloth ] && export UNSLOTH_PYTHONPATH=/tmp/site_unsloth
TAG=${TAG:-}
R=$OUT/results${TAG:+_$TAG}
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/gpu.txt" 2>&1
E2E="python3 bench/bench_e2e.py --out $R"
for stage in "${@:-tests}"; do
  echo "=== $stage $(date +%T)"
  case "$stage" in
    tests) timeout 540 python3 -m pytest -v -n 4 -p no:logging --tb=short -rfs --timeout 240 tests/kernels \
             tests/models/test_gpu.py tests/models/test_gpu_families.py tests/models/test_gpu_training_shapes.py tests/models/test_gpu_lora.py \
             tests/patterns/test_graph_breaks.py tests/patterns/test_runtime_masks.py tests/patterns/test_rotary_forms.py \
             tests/patterns/test_offload_activations.py tests/patterns/test_opaque_ops.py tests/patterns/test_lora_shared_input.py tests/trainers/test_trl_head.py \
             > "$R/gpu_tests.log" 2>&1
           grep -E "FAILED|ERROR|passed|failed" "$R/gpu_tests.log" | tail -25 ;;
    trltests) timeout 200 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 110 \
                tests/kernels/test_kernel_token_logprobs.py tests/kernels/test_token_logprobs_uniform_grad.py \
                tests/kernels/test_token_logprobs_frozen_head.py \
                tests/trainers/test_trl_head.py > "$R/gpu_trl_tests.log" 2>&1
              grep -E "FAILED|ERROR|passed|failed" "$R/gpu_trl_tests.log" | tail -12; grep -c PASSED "$R/gpu_trl_tests.log" ;;
    retest) timeout 200 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 190 \
              tests/kernels/test_kernel_add_rms_norm.py tests/models/test_gpu_training_shapes.py -k "not padding and not packed" \
              > "$R/gpu_retest.log" 2>&1
            grep -E "FAILED|ERROR|passed|failed" "$R/gpu_retest.log" | tail -12 ;;
    fsdp2) timeout 420 python3 bench/bench_fsdp.py --gpus 2 --out "$R" --timeout 180 > "$R/bench_fsdp.log" 2>&1
           grep -E "^\| |^[a-z_]+: |graph|near miss" "$R/bench_fsdp.log" | cut -c1-400 | tail -30 ;;
    convergence) timeout 170 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 165 \
                   tests/models/test_gpu_families.py -k "convergence or explain_counts_bf16" > "$R/gpu_convergence.log" 2>&1
                 grep -E "FAILED|ERROR|passed|failed|assert|Error" "$R/gpu_convergence.log" | tail -25 ;;
    host) timeout 420 python3 bench/investigations/host_overhead.py --lora "${LORA_RANK:-16}" > "$R/host_overhead.log" 2>&1
          grep -E "^\| |ms per step|Error" "$R/host_overhead.log" | tail -8 ;;
    saved) timeout 300 python3 bench/investigations/saved_activations.py --seq 4096 \
             --variants eager,inductor,ours,liger_kernel > "$R/saved_activations.log" 2>&1
           grep -E "^\| " "$R/saved_activations.log" ;;
    sweep) timeout 330 python3 bench/investigations/sweep_rms_norm.py > "$R/sweep_rms_norm.log" 2>&1
           for d in 4096 2048; do for k in "fwd" "bwd" "bwd+ds"; do
             grep "^| $k | $d |" "$R/sweep_rms_norm.log" | sort -t"|" -k8 -n | head -3; done; done ;;
    lce) timeout 400 python3 bench/investigations/bench_lce.py --out "$R" > "$R/bench_lce.log" 2>&1
         grep -vE "^\| row " "$R/bench_lce.log" | tail -45; grep -E "^\| row " "$R/bench_lce.log" | sort -t"|" -k7 -n | head -5 ;;
    lceexp) timeout 500 python3 bench/investigations/bench_lce_exp_matmul.py --out "$R" --configs "${LCE_CONFIGS:-all}" \
              > "$R/bench_lce_exp_matmul.log" 2>&1
            grep -E "^\| |plain|vs row|Error|error" "$R/bench_lce_exp_matmul.log" | cut -c1-300 | tail -30
            grep -E "Self CUDA time total|exp_matmul_kernel|row_combine|row_scaled|gemm|nvjet|elementwise|index|bmm" \
              "$R/bench_lce_exp_matmul.log" | cut -c1-48,120-200 | head -16 ;;
    lcetests) timeout 300 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 240 tests/models/test_gpu.py \
                tests/kernels/test_kernel_linear_cross_entropy.py tests/kernels/test_kernel_lce_exp_matmul.py \
                tests/kernels/test_kernel_launch_args.py > "$R/gpu_lce_tests.log" 2>&1
              grep -E "FAILED|ERROR|passed|failed|Error" "$R/gpu_lce_tests.log" | tail -25 ;;
    paths) timeout 200 python3 bench/investigations/check_lce_paths.py > "$R/check_lce_paths.log" 2>&1
           tail -8 "$R/check_lce_paths.log" ;;
    trig) timeout 200 python3 bench/investigations/bench_rotary_trig.py --out "$R" > "$R/bench_rotary_trig.log" 2>&1
          tail -8 "$R/bench_rotary_trig.log" ;;
    kernels) timeout 300 python3 bench/bench_kernels.py ${KERNELS_ONLY:+--only $KERNELS_ONLY} --out "$R" > "$R/bench_kernels.log" 2>&1
             grep -E "^\| |FAILED|report:" "$R/bench_kernels.log" ;;
    e2e4k) timeout 400 $E2E --timeout 110 2>&1 | tail -9 ;;
    ours4k) timeout 150 $E2E --variants ours --timeout 140 2>&1 | tail -4 ;;
    e2e32k) timeout 260 $E2E --batch 1 --seq 32768 --variants liger_kernel,ours --timeout 125 2>&1 | tail -5 ;;
    e2e64k) timeout 260 $E2E --batch 1 --seq 65536 --variants liger_kernel,ours --timeout 135 --steps 3 \
              --warmup 2 2>&1 | tail -5 ;;
    ours32k) timeout 140 $E2E --batch 1 --seq 32768 --variants ours --timeout 135 --steps 3 --warmup 2 2>&1 | tail -4 ;;
    qwen4k) timeout 420 $E2E --model qwen2-1.5b --variants "${QWEN_VARIANTS:-eager,inductor,liger_kernel,ours}" \
              --timeout 120 2>&1 | tail -7 ;;
    ablation) timeout 560 $E2E --variants "${ABLATION_VARIANTS:-ours,ours-no-rms_norm,ours-no-rotary,ours-no-swiglu,ours-no-linear_cross_entropy,ours-no-causal_mask}" \
                --name ablation_llama-1b_4x4096 --no-phases --timeout 120 --repeat "${ABLATION_REPEAT:-1}" 2>&1 | tail -9 ;;
    profiles4k) timeout 400 $E2E --variants eager,inductor,ours --profile "$R/profiles" --name profile_llama-1b_4x4096 \
                  --no-phases --steps 2 --warmup 2 --timeout 130 2>&1 | tail -6 ;;
    profiles32k) timeout 560 $E2E --batch 1 --seq 32768 --variants "${P32_VARIANTS:-eager,inductor,ours}" --profile "$R/profiles" \
                   --name profile_llama-1b_1x32768 --no-phases --steps 2 --warmup 2 --timeout 180 2>&1 | tail -6 ;;
    sft) timeout 560 python3 bench/bench_trainers.py --variants "${SFT_VARIANTS:-plain,liger_kernel,inductor,liger}" \
           --timeout 200 --out "$R" > "$R/bench_sft.log" 2>&1
         grep -E "^\| |agree|by version|by kernel kind|from the forward|GPU idle|garbage collection|kind 'other'" "$R/bench_sft.log" | cut -c1-300 | tail -14 ;;
    sftpad) timeout 560 python3 bench/bench_trainers.py --variants "${SFT_VARIANTS:-plain,liger_kernel,inductor,liger}" \
              --padding 0.25 --timeout 200 --out "$R" > "$R/bench_sft_padded.log" 2>&1
            grep -E "^\| |agree|by version|by kernel kind|from the forward|GPU idle|garbage collection|kind 'other'" "$R/bench_sft_padded.log" | cut -c1-300 | tail -14 ;;
    lora|loracheckpoint) timeout 560 python3 bench/bench_trainers.py --variants "${SFT_VARIANTS:-plain,liger_kernel,inductor,liger}" \
               --lora "${LORA_RANK:-16}" $([ "$stage" = loracheckpoint ] && echo --checkpointing) --timeout 200 \
               ${OFFLOAD:+--activation-offloading} \
               --out "$R" > "$R/bench_$stage.log" 2>&1
             grep -E "^\| |agree|by version|by kernel kind|from the forward|GPU idle|garbage collection|kind 'other'" "$R/bench_$stage.log" | cut -c1-300 | tail -14 ;;
    sftfree) timeout 560 python3 bench/bench_trainers.py --variants "${SFT_VARIANTS:-plain,liger_kernel,inductor,liger}" \
               --padding-free --timeout 200 --out "$R" > "$R/bench_sft_padding_free.log" 2>&1
             grep -E "^\| |agree|by version|by kernel kind|from the forward|GPU idle|garbage collection|kind 'other'" "$R/bench_sft_padding_free.log" | cut -c1-300 | tail -14 ;;
    dpo|kto|grpo|gkd) timeout 580 python3 bench/bench_trainers.py --trainer "$stage" --batch "${PAIRS:-2}" \
               --variants "${TRAINER_VARIANTS:-plain,liger_kernel,inductor,liger}" --timeout "${TRAINER_TIMEOUT:-200}" \
               --steps "${TRAINER_STEPS:-12}" ${PAD_TO:+--pad-to-multiple-of $PAD_TO} ${LORA_RANK:+--lora $LORA_RANK} --out "$R" \
               > "$R/bench_$stage.log" 2>&1
             grep -E "^\| |agree|by version|by kernel kind|from the forward|GPU idle|garbage collection|kind 'other'" "$R/bench_$stage.log" | cut -c1-300 | tail -14 ;;
    attention) timeout 200 python3 bench/bench_attention.py --out "$R" > "$R/bench_attention.log" 2>&1
               grep -E "^\| |Error|error" "$R/bench_attention.log" | tail -8 ;;
    varlentests) timeout 300 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 240 \
                   tests/kernels/test_varlen_attention.py tests/patterns/test_runtime_masks.py tests/models/test_gpu_training_shapes.py \
                   tests/patterns/test_graph_breaks.py > "$R/gpu_varlen_tests.log" 2>&1
                 grep -E "FAILED|ERROR|passed|failed" "$R/gpu_varlen_tests.log" | tail -20 ;;
    masktests) timeout 300 python3 -m pytest -v -n 4 -p no:logging --tb=short -rf --timeout 240 \
                 tests/patterns/test_runtime_masks.py tests/kernels/test_op_outputs.py tests/kernels/test_kernel_rms_norm.py \
                 tests/kernels/test_kernel_add_rms_norm.py tests/kernels/test_kernel_gated_down_proj.py tests/models/test_gpu_training_shapes.py \
                 tests/patterns/test_graph_breaks.py > "$R/gpu_mask_tests.log" 2>&1
               grep -E "FAILED|ERROR|passed|failed" "$R/gpu_mask_tests.log" | tail -20 ;;
    context) b=${CONTEXT_BUDGET:-540}
             timeout $((b + 20)) python3 bench/bench_context.py --variants "${CONTEXT_VARIANTS:-ours,liger_kernel}" \
               --start "${CONTEXT_START:-65536}" --max "${CONTEXT_MAX:-524288}" --budget-s "$b" \
               ${CONTEXT_CHECKPOINTING:+--checkpointing} --out "$R" > "$R/bench_context.log" 2>&1; tail -12 "$R/bench_context.log" ;;
    hgemm) timeout 200 python3 bench/investigations/bench_horizontal_gemm.py --out "$R" > "$R/bench_horizontal_gemm.log" 2>&1
           grep -E "^\| |Error|error" "$R/bench_horizontal_gemm.log" | tail -16 ;;
    sdpa) timeout 300 python3 bench/investigations/bench_sdpa_backends.py --out "$R" > "$R/bench_sdpa_backends.log" 2>&1
          grep -E "^\| |Error|error" "$R/bench_sdpa_backends.log" | cut -c1-300 | tail -20 ;;
    compile) timeout 560 python3 bench/bench_compile.py --variants "${COMPILE_VARIANTS:-inductor,ours}" \
               ${COMPILE_MODE:+--mode $COMPILE_MODE} ${COMPILE_PROFILE:+--profile $R} --timeout 200 --cache-root /tmp --out "$R" > "$R/bench_compile.log" 2>&1
             grep -E "^\| |Error|error" "$R/bench_compile.log" | cut -c1-400 | tail -8 ;;
    install) ;;  # nothing more than the install above
    *) echo "unknown stage $stage" ;;
  esac
  tar -czf "$OUT/results${TAG:+_$TAG}.tgz" -C "$OUT" "$(basename "$R")"  # after every stage: a call cut short keeps what it measured
done
rm -rf "$R"
