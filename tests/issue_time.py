"""Instruction issue time of the fused step against the memory floor, from the sm_90 SASS compiled on CPU.

Run as a script (``TRITON_INTERPRET`` unset); prints one JSON line per case and, with ``--markdown``,
a table. Method:

* A measurement kernel (below) runs what one program of the fused step runs for BLOCKS live, full
  blocks of WORDS * 32 elements (the loop unrolled): per block the mask words load, the live count
  and ``_step_block`` with FULL=True; then the program's reduction of its statistics. The
  per-tensor values arrive as kernel arguments. Triton compiles it for sm_90 with the backend's
  launch options, ptxas assembles it, and ``cuobjdump -sass`` lists the instructions.
* The measurement kernel has no loop (checked: no backward branch), so its instruction count, with
  each CALLed subroutine counted at every call, is an upper bound on what one thread issues: every
  runtime branch (``sample != 0``, ``kernel_on != 0``, ...) is counted as taken. The per-program
  prologue of the real kernel (address table loads, per-tensor scalars, about 1/BLOCKS of a block's
  cost per block) is not counted.
* Warp instructions per element = instructions per thread x warps per program / elements per program.
  Issue time per element = that / (132 SMs x 4 schedulers x 1.755 GHz) on an H100 SXM; the memory
  floor per element = bytes moved per element / 3.00 TB/s (the measured copy ceiling). The ratio is
  what the targets bound: a kernel whose issue time exceeds about half the floor cannot hide memory
  latency at the occupancy these register counts allow.
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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsetrain.backends.triton_backend import AUTO_WARPS
from sparsetrain.kernels import fused_step, stream_random

TARGET = GPUTarget("cuda", 90, 32)
ISSUE_RATE = 132 * 4 * 1.755e9  # warp instructions per second, H100 SXM
COPY_BANDWIDTH = 3.00e12  # bytes per second, measured copy ceiling
WORDS = 32
BLOCKS = 8  # blocks per program, as the backend launches them


@triton.jit
def full_block_kernel(
    param_ptr, grad_ptr, state1_ptr, state2_ptr, state3_ptr, mask_ptr, group_ptr, partials, numel, shard_offset,
    group_rem, group_first, inner, groups, inv_inner, inv_groups, lr, weight_decay, momentum, one_minus_dampening,
    beta2, one_minus_beta1, one_minus_beta2, eps, decay_factor, step, step_size, inv_bias_correction2_sqrt, l2, l1,
    sd, inv_scale, sample_c, inv_tm, seed, threshold, kernel_on, inv_tm_now,
    PARAM_DTYPE: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_STATS: tl.constexpr, STATS_OUT: tl.constexpr, REGULARIZE: tl.constexpr, L1_PROX: tl.constexpr,
    HAS_GROUPS: tl.constexpr, WIDE_GROUPS: tl.constexpr, PRUNE: tl.constexpr, QUAD_STREAM: tl.constexpr,
    WORDS: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    """The fused step's work for BLOCKS live full blocks of one program (unrolled), nothing else."""
    keys = stream_random.philox_keys(seed)  # once per program, as the fused kernel does
    acc_alive = tl.zeros([WORDS], dtype=tl.int32)
    acc_w = tl.zeros([WORDS, 8], dtype=tl.float64)
    acc_kernel = tl.zeros([WORDS, 8], dtype=tl.float64)
    acc_g = tl.zeros([WORDS, 8], dtype=tl.float64)
    for b in tl.static_range(BLOCKS):
        local = tl.program_id(0).to(tl.int64) * BLOCKS + b
        word_idx = local * WORDS + tl.arange(0, WORDS).to(tl.int64)
        words = tl.load(mask_ptr + word_idx)
        live_count = tl.sum(fused_step._popcount(words))
        full = tl.where(live_count * fused_step.SPARSE_BLOCK <= WORDS * 32, 0, 1)
        if full != 0:
            part_alive, part_w, part_kernel, part_g = fused_step._step_block(
                local, numel, words, param_ptr, grad_ptr, state1_ptr,
                state2_ptr, state3_ptr, mask_ptr, group_ptr, shard_offset, group_rem + b * (WORDS * 32), group_first,
                inner, groups, inv_inner, inv_groups, lr, weight_decay, momentum,
                one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps, decay_factor, step, step_size,
                inv_bias_correction2_sqrt, l2, l1, sd, inv_scale, sample_c, inv_tm, keys, threshold, kernel_on,
                inv_tm_now, 0, PARAM_DTYPE, IS_ADAM, HAS_MOMENTUM, NESTEROV, MAXIMIZE, DECOUPLED, AMSGRAD, HAS_MASK,
                HAS_STATS, STATS_OUT, REGULARIZE, L1_PROX, HAS_GROUPS, WIDE_GROUPS, PRUNE, True, QUAD_STREAM, WORDS,
                True, 1,
            )  # fmt: skip
            acc_alive, acc_w, acc_kernel, acc_g = fused_step._accumulate(
                acc_alive, acc_w, acc_kernel, acc_g, part_alive, part_w, part_kernel, part_g, STATS_OUT
            )
    if STATS_OUT:
        out = partials + tl.program_id(0).to(tl.int64) * fused_step.NUM_PARTIALS + tl.arange(0, fused_step.NUM_PARTIALS)
        tl.store(out, fused_step._partial_row(acc_alive, acc_w, acc_kernel, acc_g, kernel_on, STATS_OUT))


POINTERS = ["param_ptr", "grad_ptr", "state1_ptr", "state2_ptr", "state3_ptr", "mask_ptr", "group_ptr", "partials"]
SCALARS = {"numel": "i64", "shard_offset": "i64", "group_rem": "i32", "group_first": "i32", "inner": "i32"}
SCALARS |= {"groups": "i32", "seed": "i64", "kernel_on": "i32"}
FLOATS = [
    "lr", "weight_decay", "momentum", "one_minus_dampening", "beta2", "one_minus_beta1", "one_minus_beta2", "eps",
    "decay_factor", "step", "step_size", "inv_bias_correction2_sqrt", "l2", "l1", "sd", "inv_scale", "sample_c",
    "inv_tm", "threshold", "inv_tm_now", "inv_inner", "inv_groups",
]  # fmt: skip

# The cases the targets name: SGD (momentum 0.9) + L2 + mask, AdamW + mask; event steps sample
# (stochastic) and write the statistics the next event reads (an event on every step: the alive
# count, the |w| sum for its scale and the kernel sum; never |g|); the "no statistics written" cases
# are the events of a longer interval, which read the previous step's statistics and write none; the
# "all statistics written" cases add the |g| sum (a step without a Pruner); the "selective decay"
# non-event steps write what the next step's decay term reads (alive count, |g| sum). Bytes per
# element: reads and writes of w and the states, the gradient read, the mask bit read (and written
# on event steps).
BASE = dict(
    IS_ADAM=False, HAS_MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, DECOUPLED=False, AMSGRAD=False, HAS_MASK=True,
    HAS_STATS=False, STATS_OUT=0, REGULARIZE=True, L1_PROX=True, HAS_GROUPS=False, WIDE_GROUPS=False, PRUNE=0,
    QUAD_STREAM=True,
)  # fmt: skip
EVENT_STATS = int(fused_step.STATS_ALIVE) | int(fused_step.STATS_SUM_ABS_W) | int(fused_step.STATS_SUM_KERNEL)
DECAY_STATS = int(fused_step.STATS_ALIVE) | int(fused_step.STATS_SUM_ABS_G)
EVENT = dict(HAS_STATS=True, STATS_OUT=EVENT_STATS, PRUNE=1)
EVENT_ALL = dict(HAS_STATS=True, STATS_OUT=int(fused_step.STATS_ALL), PRUNE=1)
EVENT_READ = dict(HAS_STATS=True, STATS_OUT=0, PRUNE=1)  # reads the previous step's statistics only
KEPT = dict(HAS_STATS=True, STATS_OUT=DECAY_STATS)
ADAMW = dict(IS_ADAM=True, HAS_MOMENTUM=False, DECOUPLED=True)
CASES = [
    # name, switches, parameter dtype, bytes per element, target (issue time / memory floor)
    ("sgd fp32 event", EVENT, tl.float32, 20.25, 0.50),
    ("sgd fp32 non-event", {}, tl.float32, 20.125, 0.30),
    ("adamw fp32 event", {**ADAMW, **EVENT}, tl.float32, 28.25, 0.50),
    ("adamw fp32 non-event", ADAMW, tl.float32, 28.125, 0.30),
    ("sgd bf16 event", EVENT, tl.bfloat16, 14.25, 0.60),
    ("adamw bf16 event", {**ADAMW, **EVENT}, tl.bfloat16, 22.25, 0.60),
    ("sgd fp32 group penalty (greg)", dict(HAS_GROUPS=True), tl.float32, 20.125, 0.60),
    ("sgd fp32 group penalty, group prune event", dict(HAS_GROUPS=True, PRUNE=4), tl.float32, 20.25, 0.60),
    # non-event steps whose statistics the next step reads (selective decay: alive count and |g| sum)
    ("sgd fp32 non-event, statistics kept", KEPT, tl.float32, 20.125, 0.30),
    ("adamw fp32 non-event, statistics kept", {**ADAMW, **KEPT}, tl.float32, 28.125, 0.30),
    # 16-bit parameters with optimizer states in their dtype (the optimizers' default, as torch.optim):
    # fewer bytes, so the same instructions weigh more
    ("sgd bf16 event, bf16 states", {**EVENT, "STATE_DTYPE": tl.bfloat16}, tl.bfloat16, 10.25, 0.60),
    ("adamw bf16 event, bf16 states", {**ADAMW, **EVENT, "STATE_DTYPE": tl.bfloat16}, tl.bfloat16, 14.25, 0.60),
    ("sgd fp32 event, no statistics written", EVENT_READ, tl.float32, 20.25, 0.50),
    ("adamw fp32 event, no statistics written", {**ADAMW, **EVENT_READ}, tl.float32, 28.25, 0.50),
    ("sgd bf16 event, bf16 states, no statistics written", {**EVENT_READ, "STATE_DTYPE": tl.bfloat16}, tl.bfloat16,
     10.25, 0.60),
    ("adamw bf16 event, bf16 states, no statistics written", {**ADAMW, **EVENT_READ, "STATE_DTYPE": tl.bfloat16},
     tl.bfloat16, 14.25, 0.60),
    # for comparison: the same events computing every statistic, |g| included
    ("sgd bf16 event, bf16 states, all statistics written", {**EVENT_ALL, "STATE_DTYPE": tl.bfloat16}, tl.bfloat16,
     10.25, 0.60),
    ("adamw bf16 event, bf16 states, all statistics written", {**ADAMW, **EVENT_ALL, "STATE_DTYPE": tl.bfloat16},
     tl.bfloat16, 14.25, 0.60),
]  # fmt: skip


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """The SASS of a cubin as cuobjdump lists it: (address, instruction) pairs, and (-1, ``.L_x_N:``) labels."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    listing = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)
    pattern = r"^\s*(\.L_x_\d+):|/\*([0-9a-f]{4,})\*/\s+([^;]*);"
    return [
        (-1, m.group(1) + ":") if m.group(1) else (int(m.group(2), 16), m.group(3).strip())
        for m in re.finditer(pattern, listing, re.M)
    ]


def executed(listing: list[tuple[int, str]]) -> list[str]:
    """An upper bound on the instructions one thread issues: the body up to the last EXIT (dropping the
    assembler's padding), plus for each CALL the whole subroutine it calls (to its RET); NOPs excluded.
    Raises if a branch of the body goes backwards (a loop: the count would not bound)."""
    last_exit = max(i for i, (_, text) in enumerate(listing) if re.search(r"\bEXIT\b", text))
    body = listing[: last_exit + 1]
    labels = {text[:-1]: i for i, (_, text) in enumerate(body) if text.endswith(":")}
    counted = []
    for i, (_, text) in enumerate(body):
        target = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), len(body)) <= i:
            raise RuntimeError(f"backward branch at {text!r}: the measured block body has a loop")
        call = re.search(r"\bCALL\.REL\S*\s+(0x[0-9a-f]+)", text)
        if call:
            first = next(j for j, (address, _) in enumerate(listing) if address == int(call.group(1), 16))
            end = next(j for j in range(first, len(listing)) if re.search(r"\bRET\b", listing[j][1]))
            counted += [t for _, t in listing[first : end + 1] if not t.endswith(":")]
        if not text.endswith(":"):
            counted.append(text)
    return [text for text in counted if not text.startswith("NOP")]


def loads_after_first_use(listing: list[str]) -> list[str]:
    """The block data loads that issue after an instruction has used a value loaded by an earlier load
    of the same block (empty: every load of each block is in flight before the first use).

    ``listing``: the straight-line instructions (see :func:`executed`). Block data loads are the
    vector loads (``LDG.E.64`` / ``LDG.E.128``: the weights, gradients and states of a full block); a
    block ends at its first global store. A use is any later instruction reading one of the loaded
    registers (a 64-bit or 128-bit load writes 2 or 4 consecutive registers)."""
    late, loaded, used = [], set(), False
    for text in listing:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        operands = text[text.index(opcode) + len(opcode) :]
        registers = [int(r) for r in re.findall(r"(?<![\w.])R(\d+)", operands)]
        if opcode.startswith("STG"):
            loaded, used = set(), False
            continue
        wide = re.match(r"LDG\.E\.(64|128)\b", opcode)
        if wide:
            if used:
                late.append(text)
            loaded |= set(range(registers[0], registers[0] + int(wide.group(1)) // 32))
            continue
        # the first register is written, unless the instruction writes a predicate or stores
        writes_register = re.match(r"\s*R\d+", operands) is not None and not opcode.startswith("ST")
        if loaded and set(registers[1:] if writes_register else registers) & loaded:
            used = True
    return late


def compile_case(switches: dict, dtype) -> tuple[triton.compiler.CompiledKernel, int]:
    switches = dict(switches)
    state = _short(switches.pop("STATE_DTYPE", tl.float32))  # a pointer type here, not a switch
    constexprs = {**BASE, **switches, "PARAM_DTYPE": dtype, "WORDS": WORDS, "BLOCKS": BLOCKS}
    signature = {name: "*fp32" for name in POINTERS}
    signature |= {"mask_ptr": "*i32", "partials": "*fp64", "param_ptr": f"*{_short(dtype)}"}
    signature |= {"grad_ptr": f"*{_short(dtype)}", **SCALARS, **{name: "fp32" for name in FLOATS}}
    signature |= {name: f"*{state}" for name in ("state1_ptr", "state2_ptr", "state3_ptr")}
    signature |= {k: "constexpr" for k in constexprs}
    ordered = {name: signature[name] for name in full_block_kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(ordered.values()) if kind.startswith("*")}
    warps = AUTO_WARPS[constexprs["IS_ADAM"]]
    options = {"num_warps": warps, "enable_fp_fusion": True}
    source = ASTSource(full_block_kernel, ordered, constexprs, attrs=attrs)
    kernel = triton.compile(source, target=TARGET, options=options)
    return kernel, warps


def _short(dtype) -> str:
    return {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}[dtype]


def measure(name: str, switches: dict, dtype, bytes_per_element: float, target: float) -> dict:
    kernel, warps = compile_case(switches, dtype)
    instructions = executed(sass(kernel.asm["cubin"]))
    elements = WORDS * 32 * BLOCKS
    per_element = len(instructions) * warps / elements  # warp instructions per element
    issue_s, floor_s = per_element / ISSUE_RATE, bytes_per_element / COPY_BANDWIDTH
    return {
        "case": name,
        "instructions_per_thread": len(instructions),
        "warps": warps,
        "warp_instructions_per_element": round(per_element, 3),
        "bytes_per_element": bytes_per_element,
        "issue_ps_per_element": round(issue_s * 1e12, 3),
        "floor_ps_per_element": round(floor_s * 1e12, 3),
        "issue_over_floor": round(issue_s / floor_s, 3),
        "target": target,
        "branches": sum(1 for text in instructions if re.search(r"\bBRA\b", text)),
        "loads_after_first_use": loads_after_first_use(instructions),
        "opcodes": _histogram(instructions),
    }


def _histogram(instructions: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in instructions:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        counts[opcode] = counts.get(opcode, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> int:
    markdown = "--markdown" in sys.argv
    rows = [measure(*case) for case in CASES]
    for row in rows:
        print(json.dumps(row), flush=True)
    if markdown:
        print("\n| case | instr/thread/program | warps | warp instr/elem | B/elem | issue / floor | target |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['case']} | {r['instructions_per_thread']} | {r['warps']} | {r['warp_instructions_per_element']}"
                f" | {r['bytes_per_element']} | {r['issue_over_floor']:.0%} | {r['target']:.0%} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
