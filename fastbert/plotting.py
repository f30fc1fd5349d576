"""The training curves as a picture: MLM loss, NSP loss and accuracies in three panels.

One colour per quantity in every panel (MLM blue, NSP orange, their sum grey); train is a solid
line, held-out is dashed with markers. NSP loss has its own panel: it lives near log 2 = 0.69,
which the MLM scale (several nats) would flatten. The NSP reference lines come from the held-out
pairs' labels: their majority-class rate (the accuracy of always answering the commoner label), not
a fixed 0.5, and their entropy (the loss of predicting just the class rates).
"""
import os

COLOURS = {"mlm": "tab:blue", "nsp": "tab:orange", "total": "tab:gray"}
TRAIN = {"ls": "-", "lw": 1.4}
HELD_OUT = {"ls": "--", "marker": "o", "markersize": 4, "lw": 1.2}


def plot_training(records, path, title="fastbert pretrain"):
    """Write a PNG of the metrics.jsonl records (train and held-out) to `path`, atomically."""
    import matplotlib.pyplot as plt
    fig = figure(records, title)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def figure(records, title="fastbert pretrain"):
    """The matplotlib Figure of the metrics.jsonl records: axes MLM loss, NSP loss, accuracy."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    def draw(ax, key, colour, style, label):
        x, y = series(key)
        if x:
            ax.plot(x, y, color=COLOURS[colour], label=label, **style)

    fig, (mlm, nsp, acc) = plt.subplots(1, 3, figsize=(14, 4.2))
    draw(mlm, "loss", "total", TRAIN, "train loss (MLM + NSP)")
    draw(mlm, "mlm_loss", "mlm", TRAIN, "train MLM loss")
    draw(mlm, "eval_mlm_loss", "mlm", HELD_OUT, "held-out MLM loss")
    mlm.set_title("masked LM loss (and the total)")
    mlm.set_ylabel("cross-entropy (nats)")

    draw(nsp, "nsp_loss", "nsp", TRAIN, "train NSP loss")
    draw(nsp, "eval_nsp_loss", "nsp", HELD_OUT, "held-out NSP loss")
    _, majority = series("eval_nsp_majority")
    if majority and 0 < majority[-1] < 1:  # what knowing only the label frequencies scores
        p = majority[-1]
        entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        nsp.axhline(entropy, color=COLOURS["nsp"], lw=1, ls=":",
                    label=f"predicting the held-out class rates ({entropy:.3f})")
    nsp.set_title("next sentence prediction loss")
    nsp.set_ylabel("cross-entropy (nats)")

    draw(acc, "mlm_accuracy", "mlm", TRAIN, "train MLM accuracy")
    draw(acc, "eval_mlm_accuracy", "mlm", HELD_OUT, "held-out MLM accuracy")
    draw(acc, "nsp_accuracy", "nsp", TRAIN, "train NSP accuracy")
    draw(acc, "eval_nsp_accuracy", "nsp", HELD_OUT, "held-out NSP accuracy")
    if majority:  # the same held-out pairs at every evaluation; the latest value
        acc.axhline(majority[-1], color=COLOURS["nsp"], lw=1, ls=":",
                    label=f"NSP majority-class rate of held-out pairs ({majority[-1]:.1%})")
    acc.set_ylim(0, 1)
    acc.set_title("accuracy")

    for ax in (mlm, nsp, acc):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
