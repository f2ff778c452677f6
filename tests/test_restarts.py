"""Restarts: N crafts of a cell from independent seeded streams; restart 0 is the cell as crafted without restarts,
rules judge the worst, the report shows the spread."""
import json

import numpy as np
import pytest

from auditkit.policy import parse_policy
from auditkit.uap.base import AttackSettings, cell_rng

from test_strength import policy, run_cli


def test_restart_0_draws_the_cells_own_stream_and_later_restarts_their_own():
    cell = AttackSettings(kind="nontargeted", norm="inf", zeta=0.02)
    again = cell.model_copy(update={"restart": 2})
    assert cell.key == "nontargeted_inf_z0.02" and again.key == "nontargeted_inf_z0.02_r2"
    assert cell.stream(7).random() == cell_rng(7, "nontargeted_inf_z0.02").random()
    assert again.stream(7).random() == cell_rng(7, "nontargeted_inf_z0.02:restart2").random()
    assert again.stream(7, ":reach").random() == cell_rng(7, "nontargeted_inf_z0.02:restart2:reach").random()


def test_a_grid_with_restarts_expands_every_cell_that_many_times():
    grid = {"kinds": ["nontargeted"], "norms": ["inf", "2"], "zetas": [0.02], "restarts": 3}
    cells = parse_policy({"version": 1, "attacks": [grid]}).cells(["a", "b", "c"])
    assert [c.key for c in cells] == [f"nontargeted_{n}_z0.02{r}" for n in ("inf", "2") for r in ("", "_r1", "_r2")]


@pytest.mark.slow
def test_restarts_craft_distinct_uaps_and_rules_judge_the_worst(tmp_path, tiny_model, phantom_manifest):
    single = policy(tmp_path / "one.yaml", zetas=(0.1,))
    three = tmp_path / "three.yaml"
    three.write_text(single.read_text().replace("    max_iter: 3\n", "    max_iter: 3\n    restarts: 3\n"))
    runs = {}
    for name, path in (("one", single), ("three", three)):
        code, output = run_cli("run", "--model", tiny_model, "--policy", path, "--data", phantom_manifest,
                               "--out", tmp_path / name, "--jobs", 2)
        assert code == 0, output
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    cells = runs["three"]["cells"]
    assert [c["key"] for c in cells] == ["nontargeted_inf_z0.1", "nontargeted_inf_z0.1_r1", "nontargeted_inf_z0.1_r2"]
    uaps = [np.load(tmp_path / "three" / c["uap_file"]) for c in cells]
    alone = np.load(tmp_path / "one" / runs["one"]["cells"][0]["uap_file"])
    assert np.array_equal(uaps[0], alone)  # restart 0 is the cell crafted without restarts, byte for byte
    assert not np.array_equal(uaps[0], uaps[1]) and not np.array_equal(uaps[1], uaps[2])
    rates = [c["evals"]["test"]["fooling_rate"]["value"] for c in cells]
    rule = runs["three"]["rules"][0]
    assert rule["measured"] == max(rates) and rule["worst_cell"] == cells[int(np.argmax(rates))]["key"]
    assert len({c["strength"]["reach_rate"] for c in cells}) == 1  # one reachability craft for all restarts
    html = (tmp_path / "three" / "report.html").read_text()
    assert "Restarts: each of these cells" in html and f"{100 * min(rates):.1f}%" in html
    from auditkit import reproduce

    again = reproduce.recompute_cells(tmp_path / "three", "nontargeted_inf_z0.1_r2")
    assert again.problem is None and len(again.lines) == 1, again
