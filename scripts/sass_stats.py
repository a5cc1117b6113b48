"""Compile the decode stage-1 kernel for sm_90 on a machine without a GPU and print the SASS
instruction mix of its hottest loop (a CPU-side proxy for kernel work between device runs).

    python scripts/sass_stats.py [--block-n 128] [--num-warps 4] [--dump DIR]

It needs only the triton wheel (ptxas / cuobjdump ship in triton/backends/nvidia/bin).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from oscar_kv.kernels.triton.decode import _decode_stage1_kernel

PTR = {"q_ptr": "*bf16", "kp_ptr": "*u8", "ks_ptr": "*bf16", "kz_ptr": "*bf16",
       "vp_ptr": "*u8", "vs_ptr": "*bf16", "vz_ptr": "*bf16", "slots_ptr": "*i32",
       "len_ptr": "*i32", "k_ptr": "*bf16", "v_ptr": "*bf16", "hslots_ptr": "*i32",
       "hlen_ptr": "*i32", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32"}


def compile_stage1(block_n: int, num_warps: int, num_stages: int, d: int = 128, gqa: int = 4,
                   maxnreg: int | None = None, kv_group: int = 1, **over):
    fn = _decode_stage1_kernel
    const = dict(GQA=gqa, KVG=kv_group, BLOCK_H=16, BLOCK_N=block_n, HP_BLOCK_N=64, D=d, GROUP=d,
                 DOT=None, I2DOT=None, EMU=False, MAGIC=2, IDX64=False, PRECISION=None,
                 HAS_INT2=True, HAS_HP=True, PREFETCH=False, CENTER=False)
    import triton.language as tl
    const["DOT"] = tl.bfloat16
    const["I2DOT"] = tl.bfloat16
    const.update(over)
    # the launch's int arguments for Qwen3-8B geometry (B 8, 32K, 9 + 3 splits): Triton
    # specialises ints equal to 1 and marks multiples of 16 (vectorised loads depend on it)
    ints = dict(int2_splits=9, hp_splits=3, stride_qb=4096, stride_qh=128, stride_kpn=256,
                stride_kph=32, stride_ksn=8, stride_ksh=1, stride_vpn=256, stride_vph=32,
                stride_vsn=8, stride_vsh=1, stride_tb=32448, stride_kn=1024, stride_kh=128,
                stride_vn=1024, stride_vh=128, stride_hb=320, stride_ob=49152, stride_oh=1536,
                stride_os=128, stride_lb=384, stride_lh=12)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif ints.get(name) == 1:
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"registers {m.group(1)} stack {m.group(2)}" if m else out.strip()[-200:]


def loop_mix(text: str) -> tuple[int, collections.Counter]:
    """Histogram of the longest backward-branch body (the main loop)."""
    lines = []
    for ln in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m:
            lines.append((int(m.group(1), 16), m.group(2).strip()))
    best = (0, 0, 0)
    for i, (addr, ins) in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        tgt = re.search(r"0x([0-9a-f]+)", ins) if "BRA" in ins else None
        if tgt:
            t = int(tgt.group(1), 16)
            if t < addr:
                j = next(k for k, (a, _) in enumerate(lines) if a >= t)
                if i - j > best[0]:
                    best = (i - j, j, i)
    _, j, i = best
    mix = collections.Counter()
    for _, ins in lines[j:i + 1]:
        op = ins.split()[0]
        if op.startswith("@"):
            op = ins.split()[1]
        mix[op.split(".")[0]] += 1
    return i - j + 1, mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--kv-group", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="extra constexpr NAME=VALUE (ints, True/False, fp16/bf16/fp32) of "
                         "_int2_part (only passed through the stage-1 kernel when it has that "
                         "parameter)")
    ap.add_argument("--dump", type=Path, default=None)
    a = ap.parse_args()
    import triton.language as tl

    named = {"True": True, "False": False, "fp16": tl.float16, "bf16": tl.bfloat16,
             "fp32": tl.float32}
    extra = {}
    for kv in a.set:
        name, val = kv.split("=", 1)
        extra[name] = named.get(val, int(val) if val.isdigit() else val)
    k = compile_stage1(a.block_n, a.num_warps, a.num_stages, maxnreg=a.maxnreg,
                       kv_group=a.kv_group, **extra)
    text = sass(k.asm["cubin"])
    if a.dump:
        a.dump.mkdir(parents=True, exist_ok=True)
        (a.dump / "stage1.sass").write_text(text)
        (a.dump / "stage1.ttgir").write_text(k.asm["ttgir"])
        (a.dump / "stage1.ptx").write_text(k.asm["ptx"])
    n, mix = loop_mix(text)
    print(f"{resources(k.asm['cubin'])}  shared {k.metadata.shared} B")
    print(f"main loop: {n} instructions per warp-iteration; "
          f"{n / (a.kv_group * a.block_n * 256 / a.num_warps / 32):.2f} per code per lane")
    print("  " + "  ".join(f"{op} {c}" for op, c in mix.most_common(16)))


if __name__ == "__main__":
    main()
