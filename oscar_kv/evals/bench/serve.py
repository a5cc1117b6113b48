"""`python -m oscar_kv.evals.bench.serve`: one method's server up, all tasks, server down.

For a method (bf16 / naive / hadamard / oscar) this builds the SGLang command line and the
OSCAR environment flags, starts `python -m sglang.launch_server` in its own process group
(log in OUT/server.log), waits for `/health`, runs the tasks exactly like
`python -m oscar_kv.evals.bench`, and stops the server (SIGTERM to the group, SIGKILL after
60 s) whatever happens. `--dry-run` prints the environment and command only.

INT2 methods serve `--kv-cache-dtype int2` with the mixed BF16 sink/recent windows and the
rotation files of ROT_DIR: identity (naive), Hadamard (hadamard) or the fitted
`qqt_r_h_pbr` / `sst_r_h_pbr` pair (oscar); clipping only for oscar. `bf16` clears every
OSCAR flag so a stray variable in the shell cannot turn INT2 on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from oscar_kv.errors import OscarError
from oscar_kv.evals.bench.__main__ import add_run_args, run_tasks
from oscar_kv.evals.bench.client import ChatClient, ClientConfig
from oscar_kv.server_process import launched, wait_until
from oscar_kv.sglang_plugin import env as flags

METHODS = ("bf16", "naive", "hadamard", "oscar")
ROTATION_FILES = {
    "naive": ("k_rotation_identity.pt", "v_rotation_identity.pt"),
    "hadamard": ("k_rotation_hadamard.pt", "v_rotation_hadamard.pt"),
    "oscar": ("k_rotation_qqt_r_h_pbr.pt", "v_rotation_sst_r_h_pbr.pt"),
}


def server_env(method: str, rot_dir: str | None, k_clip: float | None, v_clip: float | None,
               sink_tokens: int = 64, recent_tokens: int = 256, scale_dtype: str = "bfloat16",
               absorb_v: bool = True, base: dict | None = None) -> dict[str, str]:
    """The server's environment for `method` (a copy of `base`, default os.environ).

    oscar: k_clip / v_clip None leave the clip flags unset, so the plugin uses the ratios fitted
    into the checkpoint; naive / hadamard never clip."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in flags.FLAGS}
    env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
    if method == "bf16":
        return env
    if method not in ROTATION_FILES:
        raise OscarError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not rot_dir:
        need = " and ".join(ROTATION_FILES[method])
        raise OscarError(f"method {method} needs --rot-dir holding {need}")
    k_file, v_file = (str(Path(rot_dir) / f) for f in ROTATION_FILES[method])
    clip = (k_clip, v_clip) if method == "oscar" else (0.0, 0.0)
    for flag, ratio in ((flags.K_CLIP_RATIO, clip[0]), (flags.V_CLIP_RATIO, clip[1])):
        if ratio is not None:
            env[flag] = str(ratio)
    env.update({flags.ENABLE: "1", flags.PREFIX_TOKENS: str(sink_tokens),
                flags.RECENT_TOKENS: str(recent_tokens), flags.HP_DTYPE: "bfloat16",
                flags.SCALE_DTYPE: scale_dtype, flags.HP_MAX_SPLITS: "8",
                flags.K_ROTATION_PATH: k_file, flags.V_ROTATION_PATH: v_file,
                flags.ABSORB_V_ROTATION: "1" if absorb_v else "0",
                flags.LLOYD_MAX: os.environ.get(flags.LLOYD_MAX, "0")})
    return env


def resolve_clips(method: str, rot_dir: str | None, k_clip: float | None,
                  v_clip: float | None, if_missing: str = "") -> tuple:
    """The clip ratios to serve `oscar` with: explicit ones win; else the checkpoint's own
    (None, None: the plugin reads them); a K file without ratios (published RotationZoo files)
    takes `if_missing` ("K,V", e.g. a model's vars.sh values) and is refused without it, so a
    published rotation is never served unclipped by accident."""
    if method != "oscar" or k_clip is not None or v_clip is not None or not rot_dir:
        return k_clip, v_clip
    from oscar_kv.fit.checkpoint import read_rotation_file

    k_file = Path(rot_dir) / ROTATION_FILES["oscar"][0]
    if not k_file.is_file() or read_rotation_file(k_file).clip_ratios is not None:
        return None, None
    if not if_missing:
        raise OscarError(f"{k_file} has no fitted clip ratios (a published RotationZoo file?); "
                         "pass --k-clip/--v-clip or --clip-if-missing K,V (the original used "
                         "0.96,0.92)")
    try:
        k, v = (float(x) for x in if_missing.split(","))
    except ValueError:
        raise OscarError(f"--clip-if-missing needs 'K,V' (two ratios), got {if_missing!r}"
                         ) from None
    return k, v


def server_command(model_path: str, method: str, tp: int, port: int, group_size: int = 128,
                   reasoning_parser: str = "", extra: str = "",
                   python: str = sys.executable) -> list[str]:
    """`python -m sglang.launch_server ...` for `method` (spec §7.2 arguments)."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", model_path,
           "--tensor-parallel-size", str(tp), "--host", "127.0.0.1", "--port", str(port),
           "--trust-remote-code", "--mem-fraction-static", "0.8",
           "--max-running-requests", "64", "--cuda-graph-max-bs", "32",
           "--enable-cache-report"]
    if method == "bf16":
        cmd += ["--kv-cache-dtype", "auto", "--prefill-attention-backend", "fa3",
                "--decode-attention-backend", "triton"]
    else:  # the plugin picks its own int2_triton attention backend
        cmd += ["--kv-cache-dtype", "int2", "--kv-cache-quant-group-size", str(group_size)]
    if reasoning_parser:
        cmd += ["--reasoning-parser", reasoning_parser]
    return cmd + shlex.split(extra)


def wait_healthy(client: ChatClient, proc: subprocess.Popen, timeout_s: float,
                 poll_s: float = 5.0, log_path: str = "") -> None:
    """Poll /health until 200; raise if the server exits or `timeout_s` passes."""
    wait_until(client.health, proc, timeout_s, poll_s,
               "it was healthy (raise --health-timeout if it is only slow)", log_path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m oscar_kv.evals.bench.serve",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True, help="HF id or local dir the server loads")
    ap.add_argument("--method", choices=METHODS, required=True, help="what the server runs")
    ap.add_argument("--rot-dir", default=None, help="rotation folder (INT2 methods)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, default=31057)
    ap.add_argument("--k-clip", type=float, default=None,
                    help="override the checkpoint's K clip ratio (oscar only)")
    ap.add_argument("--v-clip", type=float, default=None,
                    help="override the checkpoint's V clip ratio (oscar only)")
    ap.add_argument("--clip-if-missing", default="",
                    help="'K,V' clip ratios for rotation files that carry none (RotationZoo)")
    ap.add_argument("--sink-tokens", type=int, default=64)
    ap.add_argument("--recent-tokens", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", default="bfloat16")
    ap.add_argument("--absorb-v", type=int, choices=(0, 1), default=1)
    ap.add_argument("--reasoning-parser", default="")
    ap.add_argument("--server-args", default="", help="extra server arguments (one string)")
    ap.add_argument("--server-cmd", default="",
                    help="replace the launch command (run as given plus --port PORT)")
    ap.add_argument("--health-timeout", type=float, default=1200.0)
    ap.add_argument("--health-poll", type=float, default=5.0)
    ap.add_argument("--dry-run", action="store_true")
    add_run_args(ap, method_tag=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        k_clip, v_clip = resolve_clips(args.method, args.rot_dir, args.k_clip, args.v_clip,
                                       args.clip_if_missing)
        env = server_env(args.method, args.rot_dir, k_clip, v_clip,
                         args.sink_tokens, args.recent_tokens, args.scale_dtype,
                         bool(args.absorb_v))
        if args.server_cmd:
            cmd = shlex.split(args.server_cmd) + ["--port", str(args.port)]
        else:
            cmd = server_command(args.model_path, args.method, args.tp, args.port,
                                 args.group_size, args.reasoning_parser, args.server_args)
        shown = {k: env[k] for k in sorted(env) if k in flags.FLAGS}
        print("server env: " + " ".join(f"{k}={v}" for k, v in shown.items()))
        print("server cmd: " + shlex.join(cmd))
        if args.dry_run:
            return 0
        for key in (flags.K_ROTATION_PATH, flags.V_ROTATION_PATH):
            if key in env and not Path(env[key]).is_file():
                raise OscarError(f"{env[key]} does not exist; run compute_rotation.sh or "
                                 "scripts/fetch_rotations.py first")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        base_url = f"http://127.0.0.1:{args.port}/v1"
        client = ChatClient(ClientConfig(base_url=base_url, model=args.model_path))
        with launched(cmd, env, out / "server.log") as proc:
            wait_healthy(client, proc, args.health_timeout, args.health_poll,
                         str(out / "server.log"))
            run_tasks(args, base_url, args.model_path)
    except OscarError as e:
        print(f"oscar-kv serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
