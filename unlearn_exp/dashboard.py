"""The W&B comparison workspace: DSR against PP per method and beta, DSR / PP bars per guidance and
embedding source (docs/design.md 1, the experiment grid).

``python -m unlearn_exp.dashboard --entity ENTITY [--project unlearn-exp] [--experiment nudity_duo]
[--dry-run]``

``dashboard_spec`` returns the saved views as plain data (tested offline); ``build_workspaces``
turns them into ``wandb_workspaces`` objects, which ``main`` saves to W&B (online only: sync the
offline runs first with ``wandb sync``). One view per experiment over all betas, then one per beta.
A method is a group of runs with the same (guidance, embedding source), the grid's method axis
(DUO alone is guidance none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from unlearn_exp import paper
from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.errors import UserError, exit_status

# run config keys (the resolved Hydra config logged by unlearn_exp.tracking) and summary keys
BETA, GUIDANCE, EMBEDDING, TASK = "checkpoint.beta", "guidance.name", "embedding.source", "task.name"
METHOD_GROUPBY = (GUIDANCE, EMBEDDING)


def _scatter(title: str, pp: str) -> dict:
    return {"kind": "scatter", "title": title, "x": pp, "y": "dsr"}


def _bar(title: str, metric: str, groupby: str) -> dict:
    return {"kind": "bar", "title": title, "metrics": [metric], "groupby": groupby}


def dashboard_spec(experiment: str, betas: Sequence[int] = paper.BETAS, pp: str = "pp_coco") -> list[dict]:
    """The saved views of one experiment as plain data.

    Each view: ``name`` (W&B refuses symbols such as "=" in view names), ``filters`` (a W&B filter
    expression), ``groupby`` (run config keys) and ``sections`` (each a ``name`` and ``panels``:
    ``scatter`` with ``x``/``y`` summary keys, or ``bar`` with ``metrics`` and a config key
    ``groupby``).
    """
    if pp not in ("pp_coco", "pp_bench"):
        raise UserError(f"pp must be pp_coco or pp_bench, got '{pp}'")
    group = f"Metric('Group') == '{experiment}'"
    bars = [
        _bar("DSR by guidance", "dsr", GUIDANCE),
        _bar("DSR by embedding source", "dsr", EMBEDDING),
        _bar("PP by guidance", pp, GUIDANCE),
        _bar("PP by embedding source", pp, EMBEDDING),
    ]
    views = [
        {
            "name": f"{experiment}, all betas",
            "filters": group,
            "groupby": [BETA, *METHOD_GROUPBY],
            "sections": [
                {"name": "DSR against PP", "panels": [_scatter("DSR against PP (beta, method)", pp)]},
                {
                    "name": "DSR and PP by beta",
                    "panels": [_bar("DSR by beta", "dsr", BETA), _bar("PP by beta", pp, BETA)],
                },
                {"name": "DSR and PP by guidance and embedding", "panels": bars},
            ],
        }
    ]
    for beta in betas:
        views.append(
            {
                "name": f"{experiment}, beta {beta}",
                "filters": f"{group} and Config('{BETA}') == {beta}",
                "groupby": list(METHOD_GROUPBY),
                "sections": [
                    {
                        "name": "DSR against PP",
                        "panels": [_scatter(f"DSR against PP, beta={beta} (method)", pp)],
                    },
                    {"name": "DSR and PP by guidance and embedding", "panels": bars},
                ],
            }
        )
    return views


def build_workspaces(spec: list[dict], entity: str, project: str) -> list:
    """``wandb_workspaces`` Workspace objects for the views of ``dashboard_spec`` (no network)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise UserError(
            "the dashboard needs the wandb-workspaces package: pip install wandb-workspaces"
        ) from e

    def panel(p: dict):
        if p["kind"] == "scatter":
            return wr.ScatterPlot(title=p["title"], x=wr.SummaryMetric(p["x"]), y=wr.SummaryMetric(p["y"]))
        if p["kind"] == "bar":
            return wr.BarPlot(
                title=p["title"],
                metrics=[wr.SummaryMetric(m) for m in p["metrics"]],
                groupby=wr.Config(p["groupby"]),
                groupby_aggfunc="mean",
                groupby_rangefunc="minmax",
                orientation="v",
            )
        raise ValueError(f"unknown panel kind '{p['kind']}'")

    out = []
    for view in spec:
        out.append(
            ws.Workspace(
                entity=entity,
                project=project,
                name=view["name"],
                sections=[
                    ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True)
                    for s in view["sections"]
                ],
                runset_settings=ws.RunsetSettings(
                    filters=view["filters"], groupby=[ws.Config(k) for k in view["groupby"]]
                ),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unlearn_exp.dashboard",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--entity",
        default=os.environ.get("WANDB_ENTITY"),
        help="the W&B entity (user or team) the workspace is saved to; $WANDB_ENTITY",
    )
    p.add_argument("--project", default="unlearn-exp", help="the W&B project holding the runs")
    p.add_argument(
        "--experiment",
        nargs="+",
        default=["nudity_duo", "violence_duo"],
        help="one view per experiment (the runs' group)",
    )
    p.add_argument(
        "--pp",
        default="pp_coco",
        choices=("pp_coco", "pp_bench"),
        help="the PP axis: on the benign (COCO) prompts or on the benchmark's own",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the views as JSON (or write them to --spec-out), save nothing online",
    )
    p.add_argument("--spec-out", default=None, help="with --dry-run: write the workspace spec to this file")
    args = p.parse_args(argv)

    def body() -> int:
        spec = [v for e in args.experiment for v in dashboard_spec(e, pp=args.pp)]
        if args.dry_run:
            if args.spec_out:
                atomic_write_json(args.spec_out, spec)
                print(f"wrote the workspace spec ({len(spec)} views) to {args.spec_out}")
            else:
                print(json.dumps(spec, indent=1))
            return 0
        if not args.entity:
            raise UserError("--entity (or WANDB_ENTITY) is needed to save the workspace")
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled"):
            raise UserError(
                "the workspace is saved online: unset WANDB_MODE=offline, `wandb login`, and upload the "
                "offline runs first (wandb sync <dir>/wandb/offline-run-*)"
            )
        for w in build_workspaces(spec, args.entity, args.project):
            try:
                w.save()  # each call saves a new view
            except Exception as e:
                raise UserError(f"saving the view '{w.name}' to W&B failed ({type(e).__name__}: {e})") from e
            print(f"saved view '{w.name}': {w.url}")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
