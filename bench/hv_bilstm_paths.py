"""HV-BiLSTM training paths on the CPU, timed alternately in one process, same weights, same draws.

Forward + backward at the paper's shapes (batch 2, 24 x 24 x 768 -> 4 x 192) in training mode with
the default config's dropout (0.2 on the grid, LSTM dropout 0.2), of:

* ``per_direction``: this working tree's layer (each direction one unidirectional LSTM call on its
  own dropped-out input while LSTM dropout is on, one bidirectional call otherwise);
* ``two_calls``: the layer at ``--old`` with ``packed = False``: two full bidirectional ``nn.LSTM``
  calls per orientation while LSTM dropout is on, keeping one direction's half of each;
* ``packed``: the layer at ``--old`` with its hand-written CPU training path (``_BiLSTMs``).

The layer at ``--old`` is loaded from git (``git show``), so the comparison runs after that code
is gone. A round times one step of each path, in an order that rotates from round to round, all
with the same seed (so the same dropout draws; the script checks first that the three give the
same outputs and gradients). This machine's cores are shared with other jobs, so paths alternate
step by step and every ratio is taken within a round. One JSON line per round goes to ``--out``;
``--summarize`` prints per path the median step and per pair the median and the geometric mean
of the per-round ratio with a 95% Student t interval (of the mean log-ratio over rounds).

    .venv/bin/python bench/hv_bilstm_paths.py --out bench/hv_bilstm_paths.jsonl
    .venv/bin/python bench/hv_bilstm_paths.py --summarize bench/hv_bilstm_paths.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("per_direction", "two_calls", "packed")
PAIRS = (("packed", "per_direction"), ("packed", "two_calls"), ("per_direction", "two_calls"))


def load_old_module(commit: str):
    """tkpbench/hv_bilstm.py as of ``commit``, imported under another name."""
    src = subprocess.run(
        ["git", "show", f"{commit}:tkpbench/hv_bilstm.py"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if src.returncode:
        raise SystemExit(f"error: --old {commit}: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "hv_bilstm_old.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("hv_bilstm_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "_BiLSTMs"):
        raise SystemExit(f"error: --old {commit}: its tkpbench/hv_bilstm.py has no packed path (_BiLSTMs); give an older commit")
    return mod


def blob(path: str) -> str:
    """git's hash of the working tree's file (what was timed, dirty tree or not)."""
    return subprocess.run(["git", "hash-object", path], cwd=REPO, capture_output=True, text=True).stdout.strip()


def summarize(jsonl: Path) -> int:
    from scipy import stats

    try:
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            key = (r["old"], r["new_blob"][:10], r["lstm_dropout"], r["threads"], r["input_grad"])
            groups.setdefault(key, []).append(r)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {jsonl} as this script's JSON lines ({exc})", file=sys.stderr)
        return 2
    for (old, new, p, threads, dx), rs in groups.items():
        med = {k: statistics.median(r["s"][k] for r in rs) for k in PATHS}
        print(
            f"old {old}, new hv_bilstm.py {new}, lstm_dropout {p}, {threads} thread(s), input gradient "
            f"{'yes' if dx else 'no'}: {len(rs)} rounds; median step " + ", ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in PATHS)
        )
        for a, b in PAIRS:
            logs = [math.log(r["s"][a] / r["s"][b]) for r in rs]
            mean = statistics.fmean(logs)
            lo, hi = (math.exp(v) for v in stats.t.interval(0.95, len(logs) - 1, mean, stats.sem(logs)))
            print(
                f"    {a} / {b}: median {math.exp(statistics.median(logs)):.3f}, "
                f"geometric mean {math.exp(mean):.3f} [{lo:.3f}, {hi:.3f}]"
            )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="c2c1ead", help="a commit whose tkpbench/hv_bilstm.py has the packed path")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--lstm-dropout", type=float, default=0.2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, default=24)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--out", type=Path, help="append one JSON line per round here")
    p.add_argument("--summarize", type=Path, metavar="JSONL", help="summarise recorded rounds")
    args = p.parse_args()
    if args.summarize:
        return summarize(args.summarize)

    import torch

    sys.path.insert(0, str(REPO))
    from tkpbench.hv_bilstm import HVBiLSTM
    from tkpbench.records import git_commit, machine_info

    old = load_old_module(args.old)
    torch.manual_seed(0)
    new = HVBiLSTM(args.dim, args.hidden, args.dropout, args.lstm_dropout).train()
    layers = {"per_direction": new}
    for name, packed in (("two_calls", False), ("packed", True)):
        layers[name] = old.HVBiLSTM(args.dim, args.hidden, args.dropout, args.lstm_dropout).train()
        layers[name].load_state_dict(new.state_dict())
        layers[name].packed = packed
    x0 = torch.randn(args.batch, args.grid, args.grid, args.dim)

    def step(name: str, input_grad: bool, seed: int) -> tuple[float, torch.Tensor, list]:
        layer = layers[name]
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(input_grad)
        torch.manual_seed(seed)
        t = time.perf_counter()
        out = layer(x)
        out.sum().backward()
        dt = time.perf_counter() - t
        return dt, out.detach(), [x.grad] + [q.grad for q in layer.parameters()]

    _, ref_out, ref_grads = step("per_direction", True, 1)
    agree = {}
    for name in PATHS[1:]:
        _, out, grads = step(name, True, 1)
        agree[name] = {
            "out": (out - ref_out).abs().max().item(),
            "grads_rel": max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)),
        }
        if agree[name]["out"] > 1e-4 or agree[name]["grads_rel"] > 1e-4:
            print(f"error: {name} does not compute per_direction's function: {agree[name]}", file=sys.stderr)
            return 1
    print(json.dumps({"max_diff_vs_per_direction": agree}), flush=True)

    commit, new_blob = git_commit(), blob("tkpbench/hv_bilstm.py")
    for threads in args.threads:
        torch.set_num_threads(threads)
        machine = machine_info()
        for input_grad in (False, True):
            for name in PATHS:  # warm-up at this thread count (oneDNN primitives, allocator)
                step(name, input_grad, 0)
            for rnd in range(args.rounds):
                order = PATHS[rnd % 3 :] + PATHS[: rnd % 3]
                times = {name: step(name, input_grad, 1000 + rnd)[0] for name in order}
                rec = {
                    "what": "HV-BiLSTM forward + backward, training mode",
                    "shape": [args.batch, args.grid, args.grid, args.dim],
                    "hidden": args.hidden,
                    "dropout": args.dropout,
                    "lstm_dropout": args.lstm_dropout,
                    "threads": threads,
                    "input_grad": input_grad,
                    "round": rnd,
                    "order": list(order),
                    "s": times,
                    "old": args.old,
                    "new_blob": new_blob,
                    "commit": commit,
                    "max_diff_vs_per_direction": agree,
                    "machine": machine,
                    "command": " ".join(sys.argv),
                }
                line = json.dumps(rec)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
