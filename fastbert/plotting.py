"""The training curves as a picture: losses on the left, accuracies on the right."""
import os


def plot_training(records, path, title="fastbert pretrain"):
    """Write a PNG of the metrics.jsonl records (train and held-out) to `path`, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("loss", "train loss (MLM + NSP)", "-"), ("mlm_loss", "train MLM loss", "-"),
                              ("nsp_loss", "train NSP loss", "-"), ("eval_mlm_loss", "held-out MLM loss", "o--")):
        x, y = series(key)
        if x:
            left.plot(x, y, style, label=label, markersize=4)
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats)")
    left.set_title("loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for key, label, style in (("mlm_accuracy", "train MLM accuracy", "-"), ("nsp_accuracy", "train NSP accuracy", "-"),
                              ("eval_mlm_accuracy", "held-out MLM accuracy", "o--"),
                              ("eval_nsp_accuracy", "held-out NSP accuracy", "o--")):
        x, y = series(key)
        if x:
            right.plot(x, y, style, label=label, markersize=4)
    right.axhline(0.5, color="gray", lw=0.8, ls=":", label="NSP chance")
    right.set_ylim(0, 1)
    right.set_xlabel("step")
    right.set_title("accuracy")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
