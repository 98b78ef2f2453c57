"""Display names and one-sentence meanings of the NerVE metrics, as shown in the report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MetricInfo",
    "MetricFamily",
    "METRICS",
    "FAMILIES",
    "LOSS_LABELS",
    "metric_label",
]


@dataclass(frozen=True)
class MetricInfo:
    """Display name of one metrics column and what a reader should know about it."""

    label: str
    meaning: str
    healthy: str


METRICS: dict[str, MetricInfo] = {
    "se_pre": MetricInfo(
        "SE pre", "spectral entropy before the nonlinearity, in nats", "lower than SE post"
    ),
    "se_post": MetricInfo(
        "SE post", "spectral entropy after the nonlinearity, in nats", "higher than SE pre"
    ),
    "pr_pre": MetricInfo(
        "PR pre", "participation ratio before the nonlinearity", "lower than PR post"
    ),
    "pr_post": MetricInfo(
        "PR post", "participation ratio after the nonlinearity", "higher than PR pre"
    ),
    "eee_pre": MetricInfo(
        "EEE pre", "eigenvalue early enrichment before the nonlinearity", "higher than EEE post"
    ),
    "eee_post": MetricInfo(
        "EEE post",
        "eigenvalue early enrichment after the nonlinearity",
        "lower than EEE pre and falling",
    ),
    "js": MetricInfo(
        "JS", "Jensen-Shannon divergence between the pre and post spectra, in nats", "above 0"
    ),
    "pr_gain": MetricInfo("PR gain", "PR post / PR pre", "above 1"),
    "eee_delta": MetricInfo("EEE delta", "EEE post - EEE pre", "below 0"),
    "se_delta": MetricInfo("SE delta", "SE post - SE pre, in nats", "above 0"),
}


@dataclass(frozen=True)
class MetricFamily:
    """A metric measured at pre and post (or once, for JS), drawn as one trajectory panel."""

    title: str
    short: str
    columns: tuple[str, ...]
    legend: str


FAMILIES: dict[str, MetricFamily] = {
    "se": MetricFamily(
        "Spectral entropy (SE)",
        "SE",
        ("se_pre", "se_post"),
        "SE (nats) is high when variance is spread over many directions and 0 when one direction "
        "holds it all. Healthy: SE post above SE pre, because the nonlinearity reinjects variance.",
    ),
    "pr": MetricFamily(
        "Participation ratio (PR)",
        "PR",
        ("pr_pre", "pr_post"),
        "PR is the effective number of directions that carry variance, from 1 to the FFN width. "
        "Healthy: PR post above PR pre.",
    ),
    "eee": MetricFamily(
        "Eigenvalue early enrichment (EEE)",
        "EEE",
        ("eee_pre", "eee_post"),
        "EEE is 0 for a flat spectrum and near 1 when the top eigenvalues hold all variance. "
        "Healthy: EEE post below EEE pre, and EEE post falling over training.",
    ),
    "js": MetricFamily(
        "Jensen-Shannon divergence (JS)",
        "JS",
        ("js",),
        "JS (nats, at most ln 2) measures how much the nonlinearity reshapes the spectrum. "
        "0 means the post spectrum has the same shape as the pre spectrum.",
    ),
}

LOSS_LABELS = {"eval_loss": "eval loss", "probe_loss": "probe loss"}


def metric_label(column: str) -> str:
    """Return the display name of a metrics column, or the column name itself if unknown."""
    info = METRICS.get(column)
    return info.label if info else column


TRAJECTORY_CAPTION = (
    "Dashed: pre, solid: post, dotted grey: loss on the right axis. The title gives Pearson r "
    "between each layer-mean curve and the loss over checkpoints."
)

HEATMAP_CAPTIONS = {
    "js": "JS between the pre and post spectra of each layer and checkpoint, in nats. "
    "Higher means the nonlinearity reshapes the spectrum more, and 0 means it keeps its shape.",
    "pr_gain": "PR post / PR pre: how many times more effective directions the nonlinearity opens. "
    "Healthy: above 1.",
    "eee_post": "EEE after the nonlinearity: 0 is a flat spectrum, near 1 means the top "
    "eigenvalues hold all variance. Healthy: low, and falling over training.",
}

SELECTOR_CAPTION = (
    "The other metrics of the same layer x step grid: choose one in the menu at the top right. "
    "Each metric has its own colour scale."
)

LAST_STEP_CAPTION = (
    "SE, PR and EEE of every layer at the last analyzed step, pre (blue) against post (red). "
    "Healthy: post above pre for SE and PR, and below pre for EEE."
)

SCREE_CAPTION = (
    "Eigenvalue / sum against rank, log-log, for the first, a middle and the last layer at the "
    "first, a middle and the last checkpoint (dashed: pre, solid: post). A flatter curve spreads "
    "variance over more directions. Zero eigenvalues are left out, and long spectra are "
    "subsampled at log-spaced ranks."
)

OVERLAY_CAPTION = (
    "Layer-mean trajectories of every run, one colour per run, pre dashed and post solid, "
    "against each run's own steps. The tables below compare the runs at aligned steps."
)
