"""The demo's whole story (pipelines/demo.py) on a tiny budget: every stage runs, the report holds every table and plot,
and a second run continues from the finished stages instead of redoing them."""
import os

from robustsparse.config import load_config
from robustsparse.pipelines.demo import run_story

TINY = ["train.epochs=1", "model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2",
        "train.batch_size=128", "prune.search_iters=3", "prune.search_batch=8", "eval.n=24"]


def test_story_writes_one_report_with_every_table_and_plot_and_continues(tmp_path):
    out = str(tmp_path / "demo")
    cfg = load_config("digits_pgdat", TINY)
    report = run_story(cfg, out, density=0.2, methods=("magnitude", "awt"), final_suite="clean,pgd-3",
                       lams="0,1", progress=False)
    text = open(report).read()
    for needle in ("Headline models", "dense PGD-AT", "AWT ticket d=0.2", "magnitude ticket d=0.2 (best other at-init)", "SMART lam=0", "SMART lam=1",
                   "PGD-3 L∞ eps=0.1", "| awt | 0.2 |", "| magnitude | 0.2 |", "grid/density_robustness.png",
                   "sweep/tradeoff.png", "Cost per inference path"):
        assert needle in text, needle
    for png in ("grid/density_robustness.png", "sweep/tradeoff.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    stamp = os.path.getmtime(os.path.join(out, "smart", "checkpoints", "last.json"))
    assert run_story(cfg, out, density=0.2, methods=("magnitude", "awt"), final_suite="clean,pgd-3",
                     lams="0,1", progress=False) == report
    assert os.path.getmtime(os.path.join(out, "smart", "checkpoints", "last.json")) == stamp  # not retrained
