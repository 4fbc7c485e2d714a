"""The run report: ``<root>/_runs/<run_id>/report/`` with metrics.json, loss_curve.png and report.md.

Everything here is bounded (stages, metrics, epochs, rejection reasons), so it
is built on the driver from what the pipeline already holds.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # no display on a cluster driver
import matplotlib.pyplot as plt  # noqa: E402

from mfdist.publish import RunRecord  # noqa: E402
from mfdist.schema import EPOCHS_SCHEMA  # noqa: E402

EPOCH_FIELDS = [f.name for f in EPOCHS_SCHEMA.fields]


def metrics_json(record: RunRecord, metrics: list[tuple[str, str, float]], rejected: dict[str, int]) -> bytes:
    by_stage: dict[str, dict[str, float]] = defaultdict(dict)
    for stage, metric, value in metrics:
        by_stage[stage][metric] = value
    doc = {
        "run_id": record.run_id,
        "algorithm": record.algorithm,
        "input_rows": record.input_rows,
        "accepted_rows": record.accepted_rows,
        "rejected_rows": record.rejected_rows,
        "rejected_by_reason": rejected,
        "metrics": by_stage,
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def loss_curve_png(epochs: list[tuple]) -> bytes:
    """Per-epoch training loss / RMSE and test RMSE for each stage (train, refine)."""
    rows = [dict(zip(EPOCH_FIELDS, e)) for e in epochs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in sorted({r["stage"] for r in rows}):
        mine = [r for r in rows if r["stage"] == stage]
        for key, style in (("train_rmse", "-"), ("test_rmse", "--")):
            points = [(r["epoch"], r[key]) for r in mine if r[key] is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{stage} {key}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("RMSE")
    ax.set_title("RMSE per epoch")
    if ax.lines:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def report_md(record: RunRecord, metrics: list[tuple[str, str, float]], rejected: dict[str, int]) -> bytes:
    lines = [
        f"# Run {record.run_id}",
        "",
        f"Algorithm: {record.algorithm}. Input rows {record.input_rows}, accepted {record.accepted_rows}, "
        f"rejected {record.rejected_rows}.",
        "",
        "## Rejected rows by reason",
        "",
        *([f"- {reason}: {n}" for reason, n in sorted(rejected.items())] or ["- none"]),
        "",
        "## Seconds per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {s} | {v:.1f} |" for s, m, v in metrics if m == "seconds"],
        "",
        "## Metrics",
        "",
        "| stage | metric | value |",
        "|---|---|---|",
        *[f"| {s} | {m} | {v:.6g} |" for s, m, v in metrics if m != "seconds"],
        "",
    ]
    refine = {m: v for s, m, v in metrics if s == "refine"}
    if "rmse_before" in refine:
        lines += [
            "## Refine",
            "",
            f"Block validation RMSE {refine['rmse_before']:.4f} before, {refine.get('rmse_after', float('nan')):.4f} after.",
            "",
        ]
    lines += ["![loss curve](loss_curve.png)", ""]
    return "\n".join(lines).encode()


def build_report(
    record: RunRecord, metrics: list[tuple[str, str, float]], epochs: list[tuple], rejected: dict[str, int]
) -> dict[str, bytes]:
    """The report's files by name."""
    return {
        "metrics.json": metrics_json(record, metrics, rejected),
        "loss_curve.png": loss_curve_png(epochs),
        "report.md": report_md(record, metrics, rejected),
    }
