"""The methods grid (beyond DUO): the experiments compose, C* can be shared across methods, the
report's methods table takes each position's exact cell, and a toy cell runs end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tests.helpers import toy_overrides
from unlearn_exp import config, report
from unlearn_exp.cell import run_cell
from unlearn_exp.demo import grid
from unlearn_exp.errors import UserError
from unlearn_exp.identity import cell_spec, concept_checkpoint
from unlearn_exp.report.tables import method_label, methods_table, position, with_identity


@pytest.mark.parametrize(
    "experiment",
    [
        "nudity_methods",
        "violence_methods",
        "toy_methods",
        "nudity_methods_sd3",
        "violence_methods_sd3",
        "toy_mmdit_methods",
    ],
)
def test_methods_experiments_compose_every_cell(experiment):
    cells = grid([f"+experiment={experiment}"])
    assert len(cells) == 5 * (1 + 2 * 3)  # five checkpoints x (no guidance + SLD, SAFREE x 3 sources)
    methods = {config.compose([f"+experiment={experiment}", c[0]]).checkpoint.method for c in cells}
    assert methods == {"original", "duo", "esd", "uce"}


def test_sd_methods_cells_stop_in_one_line_without_weights(tmp_path):
    over = ["+experiment=nudity_methods", "checkpoint=esd_x", "guidance=sld", "embedding=shared"]
    cfg = config.compose([*over, f"paths.root_dir={tmp_path}", f"paths.output_root={tmp_path}"])
    with pytest.raises(UserError) as err:
        run_cell(cfg)
    assert "\n" not in str(err.value) and "CompVis/stable-diffusion-v1-4" in str(err.value)


def test_shared_concept_across_methods_is_duos_concept():
    esd = cell_spec(
        config.compose(["+experiment=toy_methods", "checkpoint=esd", "guidance=sld", "embedding=shared_toy"])
    )
    duo = cell_spec(
        config.compose(["+experiment=toy_duo", "checkpoint.beta=1000", "guidance=sld", "embedding=shared"])
    )
    assert esd["concept"] == duo["concept"]  # C* learned on DUO beta 500: the shipped one
    same = cell_spec(config.compose(["+experiment=toy_methods", "checkpoint=duo_toy", "guidance=safree"]))
    assert same == cell_spec(
        config.compose(["+experiment=toy_duo", "checkpoint.beta=500", "guidance=safree"])
    )
    ck = {"method": "esd", "variant": "esd-x", "beta": None}
    with pytest.raises(UserError, match="no checkpoint option 'duo_v9'"):
        concept_checkpoint(
            ck, {"source": "shared", "from_checkpoint": {"method": "duo", "option": "duo_v9"}}, "toy"
        )
    own = concept_checkpoint(
        {"method": "duo", "beta": 2000, "steps": 7},
        {"source": "shared", "from_checkpoint": {"method": "duo", "beta": 500, "path": None}},
        "toy",
    )
    assert own == {
        "method": "duo",
        "beta": 500,
        "steps": 7,
        "path": None,
    }  # same method: keys over the cell's
    assert concept_checkpoint(ck, {"source": "inverted"}, "toy") == ck


def test_method_labels():
    assert method_label({"method": "duo", "beta": 500}) == "DUO beta=500"
    assert method_label({"method": "esd", "variant": "esd-x"}) == "ESD-x"
    assert method_label({"method": "esd", "variant": "esd-u"}) == "ESD-u"
    assert method_label({"method": "uce"}) == "UCE"


def _row(over, dsr, flag=""):
    pos = position(tuple(over))
    return {
        "spec_key": pos.key,
        "spec_json": json.dumps(pos.spec),
        "created_at": "2026-01-01T00:00:00+00:00",
        "experiment": "toy_methods",
        "checkpoint_label": over[1].split("=")[1],
        "guidance": over[2].split("=")[1],
        "embedding": over[3].split("=")[1],
        "benchmark": "toy_indirect",
        "scale": "toy",
        "dsr": dsr,
        "dsr_lo": dsr - 0.1,
        "dsr_hi": min(1.0, dsr + 0.1),
        "pp_coco": 0.9,
        "benign_acc": 0.95,
        "flag": flag,
        "n_images": 48,
        "cell_key": "k" + pos.key,
    }


def test_methods_table_takes_each_positions_cell():
    base = ("+experiment=toy_methods",)
    rows = pd.DataFrame(
        [
            _row((*base, "checkpoint=esd", "guidance=none", "embedding=explicit"), 0.5),
            _row(
                (*base, "checkpoint=esd", "guidance=sld", "embedding=shared_toy"),
                0.75,
                flag="benign accuracy 0.40",
            ),
            _row((*base, "checkpoint=uce", "guidance=safree", "embedding=inverted"), 1.0),
            # another cell under ESD's labels (fewer sampling steps): never in the table
            _row((*base, "checkpoint=esd", "guidance=sld", "embedding=explicit", "sampling.steps=4"), 0.01),
        ]
    )
    table = methods_table(with_identity(rows), "toy_methods", "toy")
    shown = report.formatted(table).set_index("Method")
    assert list(shown.index) == ["original", "DUO beta=500", "ESD-u", "ESD-x", "UCE"]
    assert shown.loc["ESD-u", "no guidance"] == "0.500 [0.40, 0.60] (0.90, 0.95)"
    assert shown.loc["ESD-u", "SLD shared C*"] == "0.750 [0.65, 0.85] (0.90, 0.95) *"
    assert shown.loc["ESD-u", "SLD words"] == "-"  # the 4-step cell is another cell
    assert shown.loc["UCE", "SAFREE own C*"] == "1.000 [0.90, 1.00] (0.90, 0.95)"
    assert len(table.used) == 3
    assert math.isnan(table.data.set_index("method").loc["original", "none:explicit:dsr"])
    tables = report.build_tables(rows, "toy")
    assert "methods_toy" in tables and "methods_toy" not in report.build_tables(rows.iloc[:0], "toy")
    other = report.formatted(tables["other_cells"])
    assert other["Cell"].tolist() == [rows.iloc[3]["cell_key"]]  # only the cell no position took


@pytest.mark.slow
def test_a_toy_cell_of_another_method_with_duos_concept(tmp_path):
    extra = [
        "checkpoint=uce",
        "guidance=sld",
        "embedding=shared_toy",
        "inversion.steps=3",
        "inversion.eval_draws=0",
    ]
    over = [*toy_overrides(tmp_path, *extra)]
    over[0] = "+experiment=toy_methods"
    out = run_cell(config.compose([o for o in over if not o.startswith("checkpoint.beta")]))
    cell = out["cell"]
    assert cell["checkpoint_method"] == "uce" and cell["embedding"] == "shared"
    assert 0.0 <= cell["dsr"] <= 1.0 and cell["n_images"] == 4
    assert out["artifacts"]["built"]  # UCE's edit and a C* learned on DUO beta 500
