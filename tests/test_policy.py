import copy
import math
from pathlib import Path

import pytest
import yaml

from auditkit.errors import AuditkitError
from auditkit.policy import load_policy, parse_policy, validate_against_classes
from auditkit.uap.base import AttackSettings

POLICIES = Path(__file__).resolve().parents[1] / "policies"
CLASSES = ["normal", "pneumonia", "COVID-19"]
MINIMAL = {
    "version": 1,
    "attacks": [{"kinds": ["nontargeted", "targeted"], "targets": ["COVID-19"], "norms": ["inf"], "zetas": [0.02]}],
    "thresholds": [{"metric": "fooling_rate", "split": "test", "max": 0.3}],
}


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(**changes) -> dict:
    """MINIMAL with dotted-path keys set, e.g. edited(**{"attacks.0.zetas": [0.5]})."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(last) if isinstance(node, list) else last] = value
    return data


def error_of(tmp_path: Path, data) -> str:
    path = write(tmp_path, yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(AuditkitError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


@pytest.mark.parametrize("name, n_cells", [("paper", 16), ("quick", 2), ("release-gate", 48)])
def test_shipped_policies_load_and_expand(name, n_cells):
    policy = load_policy(POLICIES / f"{name}.yaml")
    cells = policy.cells(policy.data.classes)
    assert len(cells) == n_cells
    assert len({c.key for c in cells}) == n_cells
    for t in policy.thresholds:
        assert not t.per_cell or any(t.selects(c) for c in cells)


def test_paper_policy_matches_the_paper():
    policy = load_policy(POLICIES / "paper.yaml")
    cells = policy.cells(policy.data.classes)
    # 2 norms x 2 zetas x (1 nontargeted + 3 targets)
    assert sorted({c.norm for c in cells}) == ["2", "inf"]
    assert sorted({c.zeta for c in cells}) == [0.01, 0.02]
    assert sorted({c.target for c in cells if c.target}) == sorted(CLASSES)
    assert {(c.eps, c.max_iter, c.delta, c.clip) for c in cells} == {(0.001, 15, 1e-6, False)}
    assert policy.data.manifest is None
    assert policy.data.preprocess.crop_top == "model"  # the zoo models state COVID-Net's 1/6 in their spec
    assert policy.random_controls.draws == 5
    assert not policy.hardening.enabled and policy.hardening.rounds == 5


def test_cell_keys_are_stable_and_filename_safe():
    cells = parse_policy(MINIMAL).cells(CLASSES)
    assert [c.key for c in cells] == ["nontargeted_inf_z0.02", "targeted-COVID-19_inf_z0.02"]
    odd = AttackSettings(kind="targeted", target="COVID 19/x", norm="2", zeta=0.01, eps=0.001, max_iter=1,
                         delta=0.0, clip=True, algorithm="paper")
    assert odd.key == "targeted-COVID_19_x_2_z0.01"


@pytest.mark.parametrize("written, expected", [(2, "2"), ("L2", "2"), ("inf", "inf"), (math.inf, "inf"),
                                               ("Linf", "inf"), (".inf", "inf")])
def test_norm_spellings_normalise(written, expected):
    assert parse_policy(edited(**{"attacks.0.norms": [written]})).attacks[0].norms == [expected]


def test_yaml_inf_and_exponent_floats(tmp_path):
    # PyYAML alone reads 1e-6 as the string "1e-6"; the policy loader reads it as a float.
    text = "version: 1\nattacks:\n  - {kinds: [nontargeted], norms: [.inf, L2], zetas: [2e-2], delta: 1e-6}\n"
    grid = load_policy(write(tmp_path, text)).attacks[0]
    assert grid.norms == ["inf", "2"]
    assert grid.zetas == [0.02] and grid.delta == 1e-6


def test_defaults():
    policy = parse_policy({"version": 1, "attacks": [{"kinds": ["nontargeted"], "norms": [2], "zetas": [0.01]}]})
    assert policy.data.classes == CLASSES
    assert policy.data.eval_splits == ["train", "test"] and policy.data.craft_split == "train"
    assert policy.attacks[0].clip is True and policy.attacks[0].eps == 0.001
    assert policy.report.formats == ["html", "pdf", "json", "junit"]
    assert policy.thresholds == [] and policy.random_controls.draws == 5


@pytest.mark.parametrize(
    "data, path",
    [
        (edited(colour="red"), "colour"),
        (edited(**{"attacks.0.zeta": 0.1}), "attacks.0.zeta"),
        (edited(**{"data.preprocess.sise": 64}), "data.preprocess.sise"),
        (edited(**{"attacks.0.max_iter": "many"}), "attacks.0.max_iter"),
        (edited(**{"attacks.0.clip": "yes"}), "attacks.0.clip"),
        (edited(**{"attacks.0.zetas": [0.01, 0]}), "attacks.0.zetas.1"),
        (edited(**{"attacks.0.zetas": [0.01, 1.5]}), "attacks.0.zetas.1"),
        (edited(**{"attacks.0.norms": ["3"]}), "attacks.0.norms.0"),
        (edited(**{"attacks.0.norms": ["inf", "Linf"]}), "attacks.0.norms.1"),
        (edited(**{"attacks.0.kinds": ["untargeted"]}), "attacks.0.kinds.0"),
        (edited(**{"attacks.0.targets": ["covid"]}), "attacks.0.targets.0"),
        (edited(**{"thresholds.0.min": 0.1}), "thresholds.0"),
        (edited(**{"thresholds.0.zeta": 0.01}), "thresholds.0"),
        (edited(**{"thresholds.0.split": "validation"}), "thresholds.0.split"),
        (edited(**{"thresholds.0.target": "Covid"}), "thresholds.0.target"),
        (edited(**{"thresholds.0.max": 1.5}), "thresholds.0.max"),
        (edited(**{"data.classes": ["a"]}), "data.classes"),
        (edited(**{"data.aliases": {"covid": "COVID19"}}), "data.aliases.covid"),
        (edited(**{"data.max_images": {"val": 10}}), "data.max_images.val"),
        (edited(**{"hardening.attack": {"kind": "targeted", "target": "flu"}}), "hardening.attack.target"),
        (edited(version=2), "version"),
        (edited(**{"thresholds.0.max_increase": 1.5}), "thresholds.0.max_increase"),
        (edited(**{"thresholds.0.max_increase": 0.05, "thresholds.0.max": None, "thresholds.0.min": 0.1}),
         "thresholds.0.max_increase"),
        (edited(**{"report.signatories": [{"name": "A. Person"}]}), "report.signatories.0.role"),
        (edited(**{"report.signatories": [{"name": "A", "role": "Reviewed by", "date": "March"}]}),
         "report.signatories.0.date"),
    ],
)
def test_bad_fields_name_their_key_path(tmp_path, data, path):
    message = error_of(tmp_path, data)
    assert f": {path}: " in message, message
    assert "\n" not in message


def test_error_message_style(tmp_path):
    message = error_of(tmp_path, edited(**{"attacks.0.zetas": [0.01, 1.5]}))
    assert message.endswith("attacks.0.zetas.1: must be in (0, 1], got 1.5")
    assert "did you mean 'zetas'" in error_of(tmp_path, edited(**{"attacks.0.zeta": 0.1}))
    assert "(+1 more)" in error_of(tmp_path, edited(seed=-1, **{"attacks.0.eps": 0}))


def test_threshold_selecting_no_cell(tmp_path):
    data = edited(thresholds=[{"metric": "fooling_rate", "split": "test", "max": 0.3},
                              {"metric": "fooling_rate", "split": "test", "norm": 2, "max": 0.3}])
    assert "thresholds.1: selects no cell" in error_of(tmp_path, data)


def test_clean_accuracy_takes_no_attack_selector(tmp_path):
    data = edited(thresholds=[{"metric": "clean_accuracy", "split": "test", "kind": "targeted", "min": 0.8}])
    assert "thresholds.0.kind" in error_of(tmp_path, data)


def test_repeated_cell_across_grids(tmp_path):
    data = edited(attacks=[MINIMAL["attacks"][0], {"kinds": ["nontargeted"], "norms": ["Linf"], "zetas": [0.02]}])
    assert "attacks.1: cell 'nontargeted_inf_z0.02' is already produced by attacks.0" in error_of(tmp_path, data)


def test_threshold_selection():
    data = edited(thresholds=[
        {"metric": "targeted_success_rate", "split": "test", "max": 0.3},
        {"metric": "fooling_rate", "split": "test", "kind": "nontargeted", "max": 0.3},
        {"metric": "clean_accuracy", "split": "test", "min": 0.8},
    ])
    policy = parse_policy(data)
    nontargeted, targeted = policy.cells(CLASSES)
    rs, rf, acc = policy.thresholds
    assert (rs.selects(nontargeted), rs.selects(targeted)) == (False, True)
    assert (rf.selects(nontargeted), rf.selects(targeted)) == (True, False)
    assert not acc.per_cell and not acc.selects(nontargeted)
    assert [t.name for t in policy.thresholds] == [
        "targeted_success_rate (test, targeted) <= 0.3",
        "fooling_rate (test, nontargeted) <= 0.3",
        "clean_accuracy (test) >= 0.8",
    ]


def test_validate_against_other_classes():
    policy = parse_policy(MINIMAL)
    validate_against_classes(policy, ["normal", "COVID-19"])
    with pytest.raises(AuditkitError, match="attacks.0.targets.0: unknown class 'COVID-19'"):
        validate_against_classes(policy, ["normal", "covid"])


@pytest.mark.parametrize(
    "text, where",
    [
        ("version: 1\nattacks: [\n  - kinds\n", ":3: invalid YAML"),
        ("version: 1\n  seed: 2\n", ":2: invalid YAML"),
        ("version: 1\nseed: 1\nseed: 2\n", ":3: invalid YAML: duplicate key 'seed'"),
        ("- version: 1\n", ":1: the top level must be a mapping"),
        ("\njust text\n", ":2: the top level must be a mapping"),
        ("", ": policy file is empty"),
    ],
)
def test_bad_yaml_names_file_and_line(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(AuditkitError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}{where}")


def test_missing_file(tmp_path):
    with pytest.raises(AuditkitError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_the_policy_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    text = yaml.safe_dump(edited(**{"data.manifest": "data/manifest.csv"}))
    policy = load_policy(write(tmp_path / "sub", text))
    assert policy.data.manifest == str(tmp_path.resolve() / "sub" / "data" / "manifest.csv")


def test_sha256_stable_and_sensitive(tmp_path):
    text = (POLICIES / "paper.yaml").read_text()
    first = load_policy(write(tmp_path, text, "a.yaml")).sha256()
    assert load_policy(write(tmp_path, text, "b.yaml")).sha256() == first
    assert load_policy(POLICIES / "paper.yaml").sha256() == first
    changed = text.replace("max_iter: 15", "max_iter: 14")
    assert changed != text
    assert load_policy(write(tmp_path, changed, "c.yaml")).sha256() != first


def test_max_increase_is_refused_on_clean_accuracy_and_named_in_the_default_rule_name():
    data = edited(**{"thresholds.0.max_increase": 0.05})
    assert parse_policy(data).thresholds[0].name == "fooling_rate (test, all cells) <= 0.3, rise <= 0.05"
    bad = copy.deepcopy(MINIMAL)
    bad["thresholds"] = [{"metric": "clean_accuracy", "split": "test", "min": 0.5, "max_increase": 0.05}]
    with pytest.raises(AuditkitError, match="thresholds.0.max_increase: bounds the rise of an attack metric"):
        parse_policy(bad, "p.yaml")


def test_a_recorded_policy_parses_back_to_the_same_digest():
    from auditkit.policy import policy_from_record

    sgd = parse_policy(edited(**{"attacks.0.algorithm": "sgd", "attacks.0.sgd": {"batch_size": 8}}))
    for policy in [sgd, *(load_policy(POLICIES / f"{name}.yaml") for name in ("paper", "quick", "release-gate"))]:
        assert policy_from_record(policy.model_dump(mode="json"), "results.json").sha256() == policy.sha256()
