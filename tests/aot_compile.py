"""Compile the Triton kernels for an H100 (sm_90) without a GPU and report registers and spills.

Run as a script (``TRITON_INTERPRET`` unset): the interpreter checks the math on CPU, this checks
that the same source lowers through Triton's GPU compiler and ptxas to a cubin. Prints one JSON
line per variant: ``{"variant": ..., "registers": N, "spill_bytes": N, "vector_loads": N,
"vector_stores": N}`` (spills: local memory + stack; vector: 8- or 16-byte global loads / stores in
the PTX); the fused step's variants also give ``"instructions"`` and ``"fp64_adds"``, counted in the
SASS (static counts: what changes when a switch adds or removes work).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from issue_time import sass
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsetrain.backends.triton_backend import AUTO_WARPS
from sparsetrain.kernels import fused_step, masked_weight

TARGET = GPUTarget("cuda", 90, 32)
MAIN_SIGNATURE = {
    "table": "*i64", "num_tensors": "i32", "seeds": "*i64", "block_tensor": "*i32", "block_local": "*i32",
    "tensor_first_row": "*i32", "partials": "*fp64", "found_inf_ptr": "*i32", "lr_ptr": "*fp32", "lr": "fp32",
    "weight_decay": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32", "beta2": "fp32",
    "one_minus_beta1": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "decay_factor": "fp32",
    "log_betas_ptr": "*fp64",
}  # fmt: skip
FINISH_SIGNATURE = {
    "table": "*i64", "num_tensors": "i32", "tensor_first_partial": "*i32", "tensor_num_partials": "*i32",
    "partials": "*fp64", "found_inf_ptr": "*i32",
}  # fmt: skip
VARIANTS = [
    ("sgd fp32 stochastic", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=1)),
    ("sgd fp32 stochastic unaligned", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=1, ALIGNED=False)),
    ("sgd bf16 group", dict(PARAM_DTYPE=tl.bfloat16, IS_ADAM=False, PRUNE=4)),
    ("adamw fp32 stochastic", dict(PARAM_DTYPE=tl.float32, IS_ADAM=True, PRUNE=1)),
    ("adamw fp16 low", dict(PARAM_DTYPE=tl.float16, IS_ADAM=True, PRUNE=2)),
    ("sgd fp32 stochastic off quads", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=1, QUAD_STREAM=False)),
    ("sgd fp32 group wide", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=4, WIDE_GROUPS=True)),
    ("sgd bf16 stochastic bf16 states", dict(PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.bfloat16, IS_ADAM=False, PRUNE=1)),
    ("adamw fp16 stochastic fp16 states", dict(PARAM_DTYPE=tl.float16, STATE_DTYPE=tl.float16, IS_ADAM=True, PRUNE=1)),
    ("sgd fp32 2:4", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=5, NM_M=4)),
    # the statistics of a stochastic event (alive, |w|, kernel) and of selective decay (alive, |g|)
    ("sgd bf16 stochastic event statistics", dict(PARAM_DTYPE=tl.bfloat16, IS_ADAM=False, PRUNE=1, STATS_OUT=7)),
    ("adamw fp32 low selective decay statistics", dict(PARAM_DTYPE=tl.float32, IS_ADAM=True, PRUNE=2, STATS_OUT=9)),
]
EVERYTHING_ON = dict(
    HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, DECOUPLED=True, AMSGRAD=True, HAS_MASK=True, HAS_STATS=True,
    STATS_OUT=int(fused_step.STATS_ALL), REGULARIZE=True, L1_PROX=False, HAS_GROUPS=True, WIDE_GROUPS=False,
    HAS_FOUND_INF=True, LR_ON_DEVICE=True, ALIGNED=True, QUAD_STREAM=True, WORDS=32, BLOCKS=8, STATE_DTYPE=tl.float32,
    NM_M=1,
)  # fmt: skip
# STATS_OUT, a bit set, is flipped to 0 (no statistics computed)
SWITCHES = [
    k
    for k, v in EVERYTHING_ON.items()
    if (isinstance(v, bool) or k == "STATS_OUT") and k not in ("ALIGNED", "QUAD_STREAM", "WIDE_GROUPS")
]


def switch_variants():
    """Every structural switch flipped on its own, for SGD and Adam, plus the plainest step and
    the prune modes not above: each must lower (the interpreter does not compile anything)."""
    for algo in (False, True):
        for switch in SWITCHES:
            yield (
                f"switch: {'adam' if algo else 'sgd'} {switch}={not EVERYTHING_ON[switch]}",
                dict(PARAM_DTYPE=tl.float32, IS_ADAM=algo, PRUNE=1, **{switch: not EVERYTHING_ON[switch]}),
            )
        plain = {k: False for k in SWITCHES}
        yield f"switch: {'adam' if algo else 'sgd'} plain", dict(PARAM_DTYPE=tl.float32, IS_ADAM=algo, PRUNE=0, **plain)
    for prune in (0, 3):
        yield f"switch: sgd prune={prune}", dict(PARAM_DTYPE=tl.float32, IS_ADAM=False, PRUNE=prune)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) of a compiled kernel, read by the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    result = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True)
    registers = int(re.search(r"REG:(\d+)", result.stdout).group(1))
    local = int(re.search(r"LOCAL:(\d+)", result.stdout).group(1)) + int(
        re.search(r"STACK:(\d+)", result.stdout).group(1)
    )
    return registers, local


def vector_accesses(ptx: str) -> tuple[int, int]:
    """(vector global loads, vector global stores) in the PTX: .v2 or .v4 of 32-bit words, i.e. 8 or
    16 bytes per thread and access (16-bit parameters at 4 elements per thread give 8 bytes)."""
    loads = re.findall(r"\bld\.global(?:\.\w+)*\.v[24]\.b32\b", ptx)
    return len(loads), len(re.findall(r"\bst\.global(?:\.\w+)*\.v[24]\.b32\b", ptx))


def main() -> int:
    for name, switches in [*VARIANTS, *switch_variants()]:
        constexprs = {**EVERYTHING_ON, **switches}
        signature = {**MAIN_SIGNATURE, **{k: "constexpr" for k in constexprs}}
        # the backend's launch options: warps by optimizer, FMA contraction on
        options = {"num_warps": AUTO_WARPS[constexprs["IS_ADAM"]], "enable_fp_fusion": True}
        source = ASTSource(fused_step.fused_step_kernel, signature, constexprs)
        kernel = triton.compile(source, target=TARGET, options=options)
        registers, spills = resource_usage(kernel.asm["cubin"])
        loads, stores = vector_accesses(kernel.asm["ptx"])
        report = {"variant": name, "registers": registers, "spill_bytes": spills, "vector_loads": loads}
        instructions = [text for address, text in sass(kernel.asm["cubin"]) if address >= 0]
        fp64_adds = sum(re.match(r"(@!?U?P\w+\s+)?DADD\b", text) is not None for text in instructions)
        report.update(vector_stores=stores, instructions=len(instructions), fp64_adds=fp64_adds)
        print(json.dumps(report), flush=True)
    for stats, found in ((int(fused_step.STATS_ALL), True), (0, False), (7, False)):
        constexprs = {"STATS_OUT": stats, "HAS_FOUND_INF": found, "CHUNK": 256}
        signature = {**FINISH_SIGNATURE, **{k: "constexpr" for k in constexprs}}
        kernel = triton.compile(ASTSource(fused_step.finish_step_kernel, signature, constexprs), target=TARGET)
        registers, spills = resource_usage(kernel.asm["cubin"])
        name = {0: "switch: finish plain", 7: "finish alive |w| kernel"}.get(stats, "finish")
        print(json.dumps({"variant": name, "registers": registers, "spill_bytes": spills}), flush=True)
    signature = {"src": "*fp64", "dst": "*fp64", "segment_first": "*i32", "segment_rows": "*i32", "CHUNK": "constexpr"}
    kernel = triton.compile(ASTSource(fused_step.reduce_partials_kernel, signature, {"CHUNK": 256}), target=TARGET)
    registers, spills = resource_usage(kernel.asm["cubin"])
    print(json.dumps({"variant": "reduce partials", "registers": registers, "spill_bytes": spills}), flush=True)
    for name, kernel_fn, signature in (
        ("masked weight forward bf16", masked_weight.masked_weight_forward_kernel,
         {"weight_ptr": "*bf16", "mask_ptr": "*i32", "out_ptr": "*bf16", "numel": "i64"}),
        ("masked weight backward fp32", masked_weight.masked_weight_backward_kernel,
         {"grad_ptr": "*fp32", "weight_ptr": "*fp32", "mask_ptr": "*i32", "coef_ptr": "*fp32", "out_ptr": "*fp32",
          "numel": "i64"}),
    ):  # fmt: skip
        # pointers 16-byte aligned, as Triton's argument specialization reports for fresh allocations
        attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
        source = ASTSource(kernel_fn, {**signature, "WORDS": "constexpr"}, {"WORDS": 32}, attrs=attrs)
        kernel = triton.compile(source, target=TARGET)
        registers, spills = resource_usage(kernel.asm["cubin"])
        loads, stores = vector_accesses(kernel.asm["ptx"])
        report = {"variant": name, "registers": registers, "spill_bytes": spills, "vector_loads": loads}
        print(json.dumps({**report, "vector_stores": stores}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
