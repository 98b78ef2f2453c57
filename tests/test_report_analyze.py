"""The report on result directories written by a real 'nerve analyze' run of tiny GPT-2 checkpoints."""

from __future__ import annotations

import json
import re

import pytest

from nerve_cli.cli import main

from .conftest import save_tiny_gpt2_run, save_token_probe


@pytest.mark.slow
def test_report_of_analyzed_runs(runner, tmp_path):
    probe = save_token_probe(tmp_path / "probe.npy")
    for activation in ("gelu", "relu"):
        run_dir = save_tiny_gpt2_run(
            tmp_path / activation, steps=(0, 10, 20, 30), activation=activation
        )
        args = ["-q", "analyze", str(run_dir), "--out", str(tmp_path / "results" / activation)]
        analyzed = runner.invoke(main, [*args, "--probe", str(probe), "--device", "cpu"])
        assert analyzed.exit_code == 0, analyzed.output
    out = tmp_path / "report.html"

    result = runner.invoke(
        main,
        [
            "report",
            str(tmp_path / "results" / "gelu"),
            str(tmp_path / "results" / "relu"),
            "--html",
            str(out),
        ],
    )

    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    sha256 = json.loads((tmp_path / "results" / "gelu" / "run.json").read_text())["probe"]["sha256"]
    assert f'<td class="hash">{sha256}</td>' in page
    assert len(re.findall(r'<div id="plot-\d+" class="plot">', page)) == 1 + 2 * 10
    assert "tracks the eval loss most closely" in page
    assert "SE post exceeds SE pre in" in page
