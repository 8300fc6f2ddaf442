"""`dvc plots show`: charts that name their variant, loss and accuracy on axes of their own, and a
page that renders with no network (the libraries inline, from plots_page.py's template).

The page is DVC's own, from a real `dvc plots show` in a temporary git + DVC repository holding
dvc.yaml, the chart templates in .dvc/plots/ and small plot files; the browser is Debian's headless
chromium in a network namespace of its own (`unshare --net`), where it exists."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.plots_page import main as write_plots_page
from tests.conftest import REPO, tiny_params
from tests.helpers import DVC, sh

SHOWN = ["logistic_regression", "mlp512_relu"]  # two variants are enough for the page


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's dvc.yaml and chart templates, two variants, and small plot files of theirs
    where the stages write them (DVC draws what the workspace holds; nothing needs to run)."""
    repo = tmp_path_factory.mktemp("plots")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = tiny_params()
    params["variants"] = {k: v for k, v in params["variants"].items() if k in SHOWN}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for variant in SHOWN:
        header = ["epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy"]
        rows = [[e, 1 / e, 1 - 0.5 / e, 1.1 / e, 1 - 0.6 / e] for e in (1, 2, 3)]
        write_csv(repo / "plots" / "train" / f"{variant}.csv", header, rows)
        pairs = [[k % 10, (k * 7) % 10] for k in range(40)]
        write_csv(repo / "plots" / "predictions" / f"{variant}.csv", ["actual", "predicted"], pairs)
    sh(["git", "init", "-q"], repo)
    sh([DVC, "init", "-q"], repo)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    return repo


@pytest.fixture(scope="module")
def pages(repo: Path) -> dict[str, str]:
    """DVC's own page ("dvc"), then the page after what `make setup` does ("offline"): write the
    template into .dvc/tmp/ and name it, relative to .dvc/, in .dvc/config.local."""
    found = {}
    for name in ("dvc", "offline"):
        if name == "offline":
            assert write_plots_page([str(repo / ".dvc" / "tmp" / "offline-plots.html")]) == 0
            sh([DVC, "config", "--local", "plots.html_template", "tmp/offline-plots.html"], repo)
        shown = sh([DVC, "plots", "show", "-o", name], repo)
        assert "failed to load" not in shown
        found[name] = str(repo / name / "index.html")
    return found


def test_each_chart_names_its_variant_and_gives_each_metric_its_axis(repo: Path):
    shown = json.loads(sh([DVC, "plots", "show", "--json"], repo, stderr=False))["data"]
    charts = {path: entries[0]["content"] for path, entries in shown.items()}
    assert sorted(charts) == sorted(
        f"plots/{kind}/{v}.csv" for v in SHOWN for kind in ("train", "predictions")
    )
    for variant in SHOWN:
        curves = charts[f"plots/train/{variant}.csv"]
        assert curves["title"]["text"] == f"{variant}: loss and accuracy per epoch"
        assert curves["facet"]["column"]["field"] == "metric"  # loss | accuracy, side by side
        assert curves["resolve"]["scale"]["y"] == "independent"  # each on its own y axis
        confusion = charts[f"plots/predictions/{variant}.csv"]
        assert confusion["title"]["text"] == f"{variant}: confusion matrix (test set)"


def test_the_page_references_no_remote_script(pages):
    html = Path(pages["offline"]).read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html)  # every script is inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "cdn.jsdelivr" in Path(pages["dvc"]).read_text()  # what the template replaces
    for variant in SHOWN:
        assert f"{variant}: loss and accuracy per epoch" in html


def rendered_charts(page: str) -> str:
    """The page's DOM once its scripts ran, in a browser with no network at all."""
    browser = shutil.which("chromium")
    if browser is None or shutil.which("unshare") is None:
        reason = "needs Debian's chromium and unshare (`make test-tools` installs it)"
        if os.environ.get("CI"):  # CI never silently skips: `make test` installs it
            pytest.fail(reason)
        pytest.skip(reason)
    profile = Path(page).parent / "profile"
    cmd = [
        *("unshare", "--net", browser, "--headless", "--no-sandbox", "--disable-gpu"),
        *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
        *("--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000"),
        *("--dump-dom", Path(page).as_uri()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"no network namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_page_draws_every_chart_offline(pages):
    dom = rendered_charts(pages["offline"])
    drawn = re.findall(r'<svg[^>]*class="marks"', dom)  # vega-embed's drawing, one per chart
    assert len(drawn) == 2 * len(SHOWN)
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", dom)  # every word drawn
    for variant in SHOWN:
        for what in ("loss and accuracy per epoch", "confusion matrix (test set)"):
            assert f"{variant}: {what}" in texts
    assert texts.count("loss") == texts.count("accuracy") == len(SHOWN)  # the panels' headers


def test_dvcs_own_page_is_blank_offline(pages):
    """The check above can fail: DVC's page, which loads the libraries from a CDN, draws none."""
    dom = rendered_charts(pages["dvc"])
    assert "vegaEmbed(" in dom
    assert re.findall(r'<svg[^>]*class="marks"', dom) == []
