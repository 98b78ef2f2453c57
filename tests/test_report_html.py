"""The report's HTML file: self-contained, escaped, and containing the figure data of the tables."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from plotly.offline import get_plotlyjs

from nerve_cli.cli import main
from nerve_cli.compare import ComparisonError
from nerve_cli.report import ReportError, build_report_html, render_report
from nerve_cli.report.frames import pivot_layer_by_step
from nerve_cli.store import load_results
from tests.synthetic_results import write_synthetic_run

SHA256 = "ab" * 32


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_synthetic_run(root / "a", run="run-a", steps=(0, 10, 100, 1000), probe_sha256=SHA256)
    write_synthetic_run(
        root / "b", run="run-b", steps=(0, 10, 100, 1000), probe_sha256=SHA256, seed=1
    )
    return root


@pytest.fixture(scope="module")
def page(two_runs):
    return build_report_html([load_results(two_runs / "a"), load_results(two_runs / "b")])


def figure_blocks(page: str) -> dict[str, dict]:
    pattern = (
        r'<script type="application/json" class="nerve-figure" data-target="([^"]+)">(.*?)</script>'
    )
    return {target: json.loads(text) for target, text in re.findall(pattern, page, flags=re.S)}


def decode_array(value) -> np.ndarray:
    """Decode a plotly JSON array, which plotly 7.1 stores as a base64 typed array.

    A 2-D typed array carries its shape as a string such as "6, 5".
    """
    if not isinstance(value, dict):
        return np.asarray(value, dtype=float)

    data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    if "shape" in value:
        data = data.reshape([int(size) for size in str(value["shape"]).split(",")])
    return data


def test_plotly_js_inlined_once(page):
    assert page.count(get_plotlyjs()) == 1
    assert page.count('id="nerve-plotly-template"') == 1


def test_no_external_resources(page):
    # plotly.js 4.1 contains URL strings, such as attribution links, that it does not load itself.
    rest = page.replace(get_plotlyjs(), "")

    assert "<script src" not in rest
    assert "<link" not in rest
    assert "file://" not in rest
    assert "MathJax" not in rest
    assert not re.search(r"https?://", rest)


def test_every_container_has_figure_data(page):
    containers = re.findall(r'<div id="(plot-\d+)" class="plot">', page)
    blocks = figure_blocks(page)

    assert containers == list(blocks)
    # Comparison overlay, then per run: 4 trajectories, 4 heatmaps, last step, scree.
    assert len(containers) == 1 + 2 * 10


def test_heatmap_json_equals_metrics(page, two_runs):
    metrics = load_results(two_runs / "b").metrics
    expected = pivot_layer_by_step(metrics, "pr_gain").to_numpy()

    heatmaps = [
        figure["data"][0]
        for figure in figure_blocks(page).values()
        if figure["data"][0]["type"] == "heatmap" and figure["data"][0]["meta"] == ["run-b"]
    ]
    pr_gain = next(trace for trace in heatmaps if trace["name"] == "PR gain")

    np.testing.assert_allclose(decode_array(pr_gain["z"]), expected)
    assert pr_gain["x"] == ["0", "10", "100", "1000"]


def test_metadata_table_shows_probe(page):
    assert f'<td class="hash">{SHA256}</td>' in page
    assert '<td class="text">probe tokens</td>' in page


def test_findings_and_comparison_present(page):
    assert '<section id="findings">' in page
    assert "SE post exceeds SE pre in" in page
    assert '<section id="comparison">' in page
    assert "Change over training" in page


def test_single_run_has_no_comparison(two_runs):
    page = build_report_html([load_results(two_runs / "a")])

    assert '<section id="comparison">' not in page
    assert len(figure_blocks(page)) == 10


def test_run_names_are_escaped(tmp_path):
    name = '<script>alert("x")</script>&'
    write_synthetic_run(tmp_path / "evil", run=name)

    page = build_report_html([load_results(tmp_path / "evil")])

    assert name not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert page.count("</script>") == page.count("<script")


def test_probe_mismatch_raises(tmp_path):
    write_synthetic_run(tmp_path / "a", run="a", probe_sha256="1" * 64)
    write_synthetic_run(tmp_path / "b", run="b", probe_sha256="2" * 64)
    runs = [load_results(tmp_path / "a"), load_results(tmp_path / "b")]

    with pytest.raises(ComparisonError, match="different probes"):
        build_report_html(runs)
    assert "different probes" in build_report_html(runs, allow_probe_mismatch=True)


def test_render_report_writes_file(tmp_path, two_runs):
    out = render_report([load_results(two_runs / "a")], tmp_path / "report.html")

    assert out == tmp_path / "report.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob(".tmp-*"))


def test_render_report_missing_directory(tmp_path, two_runs):
    with pytest.raises(ReportError, match="directory not found"):
        render_report([load_results(two_runs / "a")], tmp_path / "missing" / "report.html")


def test_cli_report_prints_path_and_size(tmp_path, two_runs):
    out = tmp_path / "report.html"

    result = CliRunner().invoke(
        main, ["report", str(two_runs / "a"), str(two_runs / "b"), "--html", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{out} (")
    assert result.output.rstrip().endswith("MiB)")
    assert out.stat().st_size > 1_000_000


def test_cli_report_not_a_result_directory(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--html", str(tmp_path / "r.html")])

    assert result.exit_code == 2
    assert "not a nerve result directory" in result.output
    assert "Traceback" not in result.output


def test_cli_report_probe_mismatch_exit_2(tmp_path):
    write_synthetic_run(tmp_path / "a", run="a", probe_sha256="1" * 64)
    write_synthetic_run(tmp_path / "b", run="b", probe_sha256="2" * 64)
    args = ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(tmp_path / "r.html")]

    rejected = CliRunner().invoke(main, args)
    allowed = CliRunner().invoke(main, [*args, "--allow-probe-mismatch"])

    assert rejected.exit_code == 2
    assert "--allow-probe-mismatch" in rejected.output
    assert allowed.exit_code == 0, allowed.output


def test_cli_report_requires_html(two_runs):
    result = CliRunner().invoke(main, ["report", str(two_runs / "a")])

    assert result.exit_code == 2
    assert "--html" in result.output


def test_report_to_unwritable_path_is_one_line(tmp_path):
    from click.testing import CliRunner

    from nerve_cli.cli import main
    from tests.synthetic_results import write_synthetic_run

    results = write_synthetic_run(tmp_path / "run-a")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    result = CliRunner().invoke(main, ["report", str(results), "--html", str(blocker / "r.html")])

    assert result.exit_code == 2
    assert "cannot write the report" in result.output or "not found" in result.output
    assert "Traceback" not in result.output


def test_report_does_not_replace_symlink(tmp_path):
    from click.testing import CliRunner

    from nerve_cli.cli import main
    from tests.synthetic_results import write_synthetic_run

    results = write_synthetic_run(tmp_path / "run-a")
    target = tmp_path / "target.html"
    target.write_text("keep")
    link = tmp_path / "link.html"
    link.symlink_to(target)

    result = CliRunner().invoke(main, ["report", str(results), "--html", str(link)])

    assert result.exit_code == 2
    assert "not a regular file" in result.output
    assert link.is_symlink()
    assert target.read_text() == "keep"
