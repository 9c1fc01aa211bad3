"""tkpbench's HV-BiLSTM against ViT-PCM's Keras layer, same weights, at the paper's shapes.

ViT-PCM's layer (its ``model.py``): dropout, then ``TimeDistributed(Bidirectional(LSTM(192,
return_sequences=True)))`` along the rows and the same on the transposed grid for the columns,
concatenated. This script times forward + backward of tkpbench's layer on one CPU thread (dropout
off; ``--input-grad`` adds the gradient to the input, as in training with the encoder unfrozen),
saves its weights, input, output and weight gradients, then runs the Keras layer with those
weights in a second process (TensorFlow and torch in one process crash at these shapes: both bring
their own oneDNN/OpenMP), checks that the outputs and the gradients agree and times it the same
way. Prints one JSON line.

TensorFlow is not a tkpbench dependency: give an interpreter that has tensorflow-cpu and numpy,
e.g. a separate virtual environment. ViT-PCM's code is written for the Keras 2 API: from
TensorFlow 2.16 on that is the tf-keras package, selected by ``TF_USE_LEGACY_KERAS=1`` (without it
``tf.keras`` is Keras 3); the record names both versions:

    python -m venv /tmp/tf221 && /tmp/tf221/bin/pip install "tensorflow-cpu==2.21.*" "tf-keras==2.21.*"
    TF_USE_LEGACY_KERAS=1 .venv/bin/python bench/hv_bilstm_vs_keras.py --tf-python /tmp/tf221/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up (graph tracing, oneDNN primitive creation)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def keras_side(npz: Path, reps: int, threads: int, input_grad: bool) -> dict:
    """Runs in the TensorFlow interpreter: no torch here."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from tensorflow.keras.layers import LSTM, Bidirectional, TimeDistributed

    keras_pkg = LSTM.__module__.split(".")[0]
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    d = np.load(npz)
    hidden = int(d["hidden"])
    rows = TimeDistributed(Bidirectional(LSTM(hidden, return_sequences=True)))
    cols = TimeDistributed(Bidirectional(LSTM(hidden, return_sequences=True)))

    def call(x):
        h = rows(x)
        v = tf.transpose(cols(tf.transpose(x, (0, 2, 1, 3))), (0, 2, 1, 3))
        return tf.concat([h, v], axis=-1)

    x = tf.Variable(d["x"]) if input_grad else tf.constant(d["x"])
    call(x)  # builds the layers
    # nn.LSTM -> Keras LSTM: kernel = W_ih^T, recurrent = W_hh^T, bias = b_ih + b_hh (gate order i, f, g/c, o)
    for layer, name in ((rows, "horizontal"), (cols, "vertical")):
        for keras_lstm, sfx in ((layer.layer.forward_layer, ""), (layer.layer.backward_layer, "_reverse")):
            w_ih, w_hh = d[f"{name}.weight_ih_l0{sfx}"], d[f"{name}.weight_hh_l0{sfx}"]
            b = d[f"{name}.bias_ih_l0{sfx}"] + d[f"{name}.bias_hh_l0{sfx}"]
            keras_lstm.set_weights([w_ih.T, w_hh.T, b])
    diff = float(np.abs(call(x).numpy() - d["out"]).max())
    # the same gradients: Keras kernel = W_ih^T, recurrent kernel = W_hh^T, bias = b_ih (= b_hh) gradient
    pairs = [
        (var, f"grad.{name}.{kind}_l0{sfx}")
        for layer, name in ((rows, "horizontal"), (cols, "vertical"))
        for keras_lstm, sfx in ((layer.layer.forward_layer, ""), (layer.layer.backward_layer, "_reverse"))
        for var, kind in (
            (keras_lstm.cell.kernel, "weight_ih"),
            (keras_lstm.cell.recurrent_kernel, "weight_hh"),
            (keras_lstm.cell.bias, "bias_ih"),
        )
    ]
    variables = [v for v, _ in pairs] + ([x] if input_grad else [])  # all 12 trainable variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(call(x))
        return tape.gradient(loss, variables)

    grads = step()  # the timed function's own gradients are the ones compared
    grad_diff = max(float(np.abs(g.numpy() - d[k].T).max() / np.abs(d[k]).max()) for g, (_, k) in zip(grads, pairs))
    return {
        "max_abs_diff_forward": diff,
        "max_rel_diff_grads": grad_diff,
        "keras_s": timed(step, reps),
        "tensorflow": tf.__version__,
        "keras": f"{keras_pkg} {sys.modules[keras_pkg].__version__}",  # tf_keras (Keras 2) or keras (Keras 3)
    }


def summarize(jsonl: Path, commit: str) -> int:
    """Rounds of this script at the given commits (``commit``: prefixes, comma-separated), grouped by
    TensorFlow and Keras version, threads and input gradient: per round the ratio of the fastest
    repetitions (tkpbench / Keras), then the median over rounds and a 95% Student t interval of the
    mean log-ratio (rounds are paired in time: ours, then Keras's)."""
    import math

    from scipy import stats

    try:
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {jsonl} as JSON lines of this script's records ({exc})", file=sys.stderr)
        return 2
    commits = tuple(commit.split(","))
    rows = [r for r in rows if r.get("commit", "").startswith(commits) and "keras_s_min" in r]
    if not rows:
        print(
            f"error: {jsonl} has no rounds of commit {commit!r} with Keras timings (run with --tf-python first)", file=sys.stderr
        )
        return 2
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tensorflow"], r.get("keras", ""), r["threads"], "input" in r["what"]), []).append(r)
    for (tf_version, keras, threads, dx), rs in sorted(groups.items()):
        logs = [math.log(r["tkpbench_s_min"] / r["keras_s_min"]) for r in rs]
        mean = statistics.fmean(logs)
        lo, hi = (
            (math.exp(v) for v in stats.t.interval(0.95, len(logs) - 1, mean, stats.sem(logs)))
            if len(logs) > 1
            else (math.nan,) * 2
        )
        print(
            f"TensorFlow {tf_version} {keras}, threads {threads}, input gradient {'yes' if dx else 'no '}: {len(rs)} rounds; "
            f"tkpbench {statistics.median(r['tkpbench_s_min'] for r in rs):.3f} s, "
            f"Keras {statistics.median(r['keras_s_min'] for r in rs):.3f} s (fastest repetition, median over rounds); "
            f"tkpbench / Keras {math.exp(mean):.3f} [{lo:.3f}, {hi:.3f}]"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, default=24)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--input-grad", action="store_true", help="also the gradient to the input (training with the encoder unfrozen)"
    )
    p.add_argument("--tf-python", default="", help="an interpreter with tensorflow-cpu (runs the Keras side)")
    p.add_argument("--keras-side", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--summarize",
        nargs=2,
        metavar=("JSONL", "COMMITS"),
        help="summarise recorded rounds of these commits (prefixes, comma-separated)",
    )
    args = p.parse_args()
    if args.summarize:
        return summarize(Path(args.summarize[0]), args.summarize[1])
    if args.tf_python and not os.access(args.tf_python, os.X_OK):
        print(
            f"error: --tf-python {args.tf_python} is not an executable interpreter (see this script's docstring)", file=sys.stderr
        )
        return 2
    if args.keras_side:
        print(json.dumps(keras_side(args.keras_side, args.reps, args.threads, args.input_grad)))
        return 0

    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from tkpbench.hv_bilstm import HVBiLSTM
    from tkpbench.records import git_commit, machine_info

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = HVBiLSTM(args.dim, args.hidden, dropout=0.0).train()
    x = torch.randn(args.batch, args.grid, args.grid, args.dim, requires_grad=args.input_grad)

    def torch_step():
        ours.zero_grad(set_to_none=True)
        x.grad = None
        ours(x).sum().backward()

    t_ours = timed(torch_step, args.reps)
    rec = {
        "what": "HV-BiLSTM forward + backward, dropout off" + (", with the input's gradient" if args.input_grad else ""),
        "shape": [args.batch, args.grid, args.grid, args.dim],
        "hidden": args.hidden,
        "threads": args.threads,
        "tkpbench_s_median": statistics.median(t_ours),
        "tkpbench_s_min": min(t_ours),
        "machine": machine_info(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    if args.tf_python:
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "hv.npz"
            torch_step()  # the weights' gradients of the training step
            out = ours(x).detach().numpy()
            sd = {k: v.numpy() for k, v in ours.state_dict().items()}
            sd.update({f"grad.{k}": v.grad.numpy() for k, v in ours.named_parameters()})
            np.savez(npz, x=x.detach().numpy(), out=out, hidden=args.hidden, **sd)
            cmd = [args.tf_python, __file__, "--keras-side", str(npz), "--reps", str(args.reps), "--threads", str(args.threads)]
            cmd += ["--input-grad"] if args.input_grad else []
            res = subprocess.run(
                cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            )
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return res.returncode
            keras = json.loads(res.stdout.strip().splitlines()[-1])
        rec.update(
            max_abs_diff_forward=keras["max_abs_diff_forward"],
            max_rel_diff_grads=keras["max_rel_diff_grads"],
            keras_s_median=statistics.median(keras["keras_s"]),
            keras_s_min=min(keras["keras_s"]),
            tkpbench_over_keras=statistics.median(t_ours) / statistics.median(keras["keras_s"]),
            tensorflow=keras["tensorflow"],
            keras=keras["keras"],
        )
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
