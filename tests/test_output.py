"""Output without a terminal (CI logs, pipes): plain progress lines, whole tables, JSON listings."""
import json
import time

from typer.testing import CliRunner

from auditkit import api
from auditkit.cli import app
from auditkit.plainprogress import PlainProgress

runner = CliRunner()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_at_most_one_line_every_10_s_with_rate_elapsed_and_eta():
    clock, lines = Clock(), []
    progress = PlainProgress(lines.append, clock=clock)
    progress.start("cell_a pass 1/3", 100)
    for i in range(1, 10):  # 9 s: nothing yet, so a run that fails early prints only its error
        clock.now += 1
        progress.update(i * 5)
    assert lines == []
    clock.now += 1
    progress.update(50)
    assert lines == ["cell_a pass 1/3: 50/100, 5/s, elapsed 10s, ETA 10s"]
    clock.now += 5
    progress.update(60)
    assert len(lines) == 1
    progress.start("cell_b pass 1/3", 200)
    clock.now += 5
    progress.update(20, "cell_b pass 1/3: rate 5%")
    assert lines[1] == "cell_b pass 1/3: rate 5%: 20/200, 4/s, elapsed 20s, ETA 45s"


def test_tables_are_never_cut_in_a_pipe_and_models_lists_as_json():
    result = runner.invoke(app, ["models"])  # CliRunner's output is not a terminal, as `| cat`
    assert result.exit_code == 0
    assert "covidnet_small " in result.output and "FLOPs/image" in result.output and "…" not in result.output
    listed = json.loads(runner.invoke(app, ["models", "--json"]).output)
    assert [m["name"] for m in listed] == ["covidnet_small", "covidnet_large"]
    assert listed[0]["input_size"] == 224 and listed[0]["parameters"] > 0


def test_inspect_json_carries_the_model_identity(tiny_model):
    result = runner.invoke(app, ["inspect", "--model", str(tiny_model), "--json"])
    info = json.loads(result.output)
    assert info["classes"] == ["normal", "pneumonia", "COVID-19"] and info["input_size"] == 32
    assert info["white_box"] is True and set(info["sha256"]) == {"tiny.keras", "tiny.yaml"}


def fake_training(name, *, progress, epochs, **_kw):
    for epoch in range(1, epochs + 1):
        progress(epoch, {"val_accuracy": epoch / 10})
    return {"test_accuracy": 0.5, "trained_on": "x", "sha256": "0" * 64}


def test_zoo_train_off_a_terminal_prints_one_line_per_epoch_and_nothing_with_quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "train_zoo", fake_training)
    result = runner.invoke(app, ["zoo", "train", "covidnet_small", "--epochs", "3", "--out", str(tmp_path)])
    epochs = [line for line in result.output.splitlines() if "epoch" in line]
    assert epochs == [f"  training covidnet_small: epoch {e}/3, accuracy {e * 10}.0%" for e in (1, 2, 3)]
    quiet = runner.invoke(app, ["zoo", "train", "covidnet_small", "--epochs", "3", "--out", str(tmp_path), "-q"])
    assert "epoch" not in quiet.output and "test accuracy 50.0%" in quiet.output


def test_heartbeat_writes_while_a_step_is_silent_and_stops_at_close():
    lines = []
    progress = PlainProgress(lines.append, every_s=0.05, heartbeat=True)
    progress.start("crafting 2 cells", 2)
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.close()
    assert lines and lines[0].startswith("crafting 2 cells: 0/2")
    seen = len(lines)
    time.sleep(0.2)
    assert len(lines) == seen
