"""tkpbench's HV-BiLSTM against ViT-PCM's Keras layer, same weights, at the paper's shapes.

ViT-PCM's layer (its ``model.py``): dropout, then ``TimeDistributed(Bidirectional(LSTM(192,
return_sequences=True)))`` along the rows and the same on the transposed grid for the columns,
concatenated. This script builds it in Keras with tkpbench's weights copied over, checks that the
outputs agree, then times forward + backward of both on one CPU thread (dropout off in both, so
the numbers can be compared) and prints a JSON line per layout with the machine.

TensorFlow is not a tkpbench dependency: run this with an interpreter that has both torch and
tensorflow-cpu, e.g. a separate virtual environment:

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu torch
    /tmp/tfvenv/bin/python bench/hv_bilstm_vs_keras.py --batch 2 --grid 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def keras_layer(tf, hidden: int):
    from tensorflow.keras.layers import LSTM, Bidirectional, TimeDistributed

    rows = TimeDistributed(Bidirectional(LSTM(hidden, return_sequences=True)))
    cols = TimeDistributed(Bidirectional(LSTM(hidden, return_sequences=True)))

    def call(x):
        h = rows(x)
        v = tf.transpose(cols(tf.transpose(x, (0, 2, 1, 3))), (0, 2, 1, 3))
        return tf.concat([h, v], axis=-1)

    return rows, cols, call


def copy_weights(torch_lstm, keras_td) -> None:
    """nn.LSTM (bidirectional) -> Keras Bidirectional(LSTM): kernel = W_ih^T, recurrent = W_hh^T,
    bias = b_ih + b_hh; both use the gate order i, f, g (c), o."""
    bi = keras_td.layer
    for keras_lstm, sfx in ((bi.forward_layer, ""), (bi.backward_layer, "_reverse")):
        w_ih = getattr(torch_lstm, f"weight_ih_l0{sfx}").detach().numpy()
        w_hh = getattr(torch_lstm, f"weight_hh_l0{sfx}").detach().numpy()
        b = (getattr(torch_lstm, f"bias_ih_l0{sfx}") + getattr(torch_lstm, f"bias_hh_l0{sfx}")).detach().numpy()
        keras_lstm.set_weights([w_ih.T, w_hh.T, b])


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up (graph tracing, oneDNN primitive creation)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, default=24)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import tensorflow as tf
    import torch

    from tkpbench.hv_bilstm import HVBiLSTM
    from tkpbench.records import machine_info

    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.manual_seed(0)
    ours = HVBiLSTM(args.dim, args.hidden, dropout=0.0).train()
    x = torch.randn(args.batch, args.grid, args.grid, args.dim)

    rows, cols, call = keras_layer(tf, args.hidden)
    xt = tf.constant(x.numpy())
    call(xt)  # builds the layers
    copy_weights(ours.horizontal, rows)
    copy_weights(ours.vertical, cols)
    diff = float(abs(call(xt).numpy() - ours(x).detach().numpy()).max())

    keras_vars = rows.trainable_variables + cols.trainable_variables

    @tf.function
    def keras_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(call(xt))
        return tape.gradient(loss, keras_vars)

    def torch_step():
        ours.zero_grad(set_to_none=True)
        ours(x).sum().backward()

    t_keras = timed(keras_step, args.reps)
    t_ours = timed(torch_step, args.reps)
    rec = {
        "what": "HV-BiLSTM forward + backward, dropout off",
        "shape": [args.batch, args.grid, args.grid, args.dim],
        "hidden": args.hidden,
        "threads": args.threads,
        "max_abs_diff_forward": diff,
        "keras_s_median": statistics.median(t_keras),
        "tkpbench_s_median": statistics.median(t_ours),
        "tkpbench_over_keras": statistics.median(t_ours) / statistics.median(t_keras),
        "torch": torch.__version__,
        "tensorflow": tf.__version__,
        "machine": machine_info(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
