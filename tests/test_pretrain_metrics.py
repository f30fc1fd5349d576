"""What metrics.jsonl, the end-of-run summary and training.png say about NSP: accuracy beside the
majority-class rate of the same pairs, NSP loss on its own axis, one colour per quantity."""
import json

import pytest
import torch

from fastbert.commands.pretrain import format_summary
from fastbert.plotting import COLOURS, figure
from fastbert.trainer import Trainer, TrainArgs

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "model_type": "bert"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "config.json").write_text(json.dumps(TINY))
    args = TrainArgs(out=str(root / "out"), config=str(root / "config.json"), cache_dir=str(root / "cache"), steps=8,
                     batch_size=8, seq_len=64, vocab_size=2000, dupe_factor=1, log_every=4, eval_every=4,
                     save_every=8, eval_batches=3, warmup=2, lr=2e-3, progress=False)
    trainer = Trainer(args)
    summary = trainer.train()
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, rows


def test_nsp_majority_rate_beside_accuracy(run):
    trainer, summary, rows = run
    labels = torch.cat([b["next_sentence_label"] for batches in trainer.eval_sets for b in batches]).double()
    p = float(labels.mean())
    majority = max(p, 1 - p)
    assert labels.numel() > 8 and majority > 0.5 - 1e-9
    for row in rows:
        assert row["eval_nsp_majority"] == pytest.approx(majority, abs=1e-12)
        assert 0.5 <= row["nsp_majority"] <= 1  # the train window's own labels
    # held-out NSP loss: the model's own NSP cross-entropy over the held-out pairs
    model = trainer.model.eval()
    with torch.no_grad():
        total = sum(float(model(**b).nsp_loss) * len(b["next_sentence_label"])
                    for batches in trainer.eval_sets for b in batches)
    assert rows[-1]["eval_nsp_loss"] == pytest.approx(total / labels.numel(), abs=1e-6)
    text = format_summary(summary)
    assert f"NSP accuracy {summary['eval_nsp_accuracy']:.1%} (majority-class rate {majority:.1%})" in text


def test_plot_one_colour_per_quantity_and_majority_line(run):
    _, _, rows = run
    fig = figure(rows)
    mlm, nsp, acc = fig.axes
    by_label = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    # NSP loss on its own axes, away from MLM's scale
    assert {l.get_label() for l in nsp.lines if "NSP loss" in l.get_label()} == {"train NSP loss", "held-out NSP loss"}
    assert not any("NSP" in l.get_label() for l in mlm.lines if "MLM + NSP" not in l.get_label())
    # one colour per quantity, whichever panel
    import matplotlib.colors as mc
    for label, line in by_label.items():
        quantity = "mlm" if "MLM" in label and "+" not in label else "total" if "+" in label else "nsp"
        assert mc.to_hex(line.get_color()) == mc.to_hex(COLOURS[quantity]), label
    # the NSP reference is the held-out pairs' majority-class rate, labelled as such
    majority = rows[-1]["eval_nsp_majority"]
    line = next(l for l in acc.lines if "majority-class rate" in l.get_label())
    assert line.get_ydata()[0] == pytest.approx(majority)
    assert f"{majority:.1%}" in line.get_label()
    assert not any(l.get_label() == "NSP chance" for l in acc.lines)
    import matplotlib.pyplot as plt
    plt.close(fig)
