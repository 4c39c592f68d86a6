"""`make bench`'s sections run alone (python -m csakd_qgis.bench --only …): the section's own
numbers, saved beside the full run's results and never over them."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_section_runs_alone_and_leaves_the_full_runs_results_alone(tmp_path, monkeypatch, shared_data_dir, capsys):
    from csakd_qgis import bench

    full = tmp_path / "results.json"
    full.write_text('{"a full run": true}\n')
    monkeypatch.setattr(bench, "RESULTS", full)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.main(["--only", "quality", "--data", str(shared_data_dir)]) == 0
    assert json.loads(full.read_text()) == {"a full run": True}
    alone = json.loads((tmp_path / "results-quality.json").read_text())
    assert alone["sections"] == ["quality"] and "costs" not in alone
    assert not list(tmp_path.glob("*.partial.json"))
    student = alone["quality"]["summary"]["student"]
    # The bundled student on the 27 Wald cases (35.17 dB, 4.91° when this was written).
    assert 33 < student["psnr"] < 38 and 3 < student["sam"] < 7
    report = (tmp_path / "results-quality.md").read_text()
    assert "(`python -m csakd_qgis.bench --only quality`)" in report and "| **mean** |" in report
    printed = capsys.readouterr().out
    assert "student: PSNR ≥ 1 dB above the better of GSA and bicubic on 27/27 cases" in printed
    assert "saved results-quality.json" in printed


def test_an_unknown_section_is_a_usage_error(capsys):
    from csakd_qgis import bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--only", "everything"])
    assert stop.value.code == 2
    assert "invalid choice: 'everything'" in capsys.readouterr().err


def test_the_sections_done_are_kept_when_a_run_stops(tmp_path, monkeypatch, shared_data_dir):
    """A run stopped in a later section (here by an error) leaves what the sections before it
    measured, in the partial file, and the results file untouched."""
    from csakd_qgis import bench

    full = tmp_path / "results.json"
    full.write_text('{"a full run": true}\n')
    monkeypatch.setattr(bench, "RESULTS", full)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "robustness", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--only", "quality", "robustness", "--data", str(shared_data_dir)])
    kept = json.loads((tmp_path / "results-quality-robustness.partial.json").read_text())
    assert kept["quality"]["summary"]["student"]["psnr"] > 30 and "robustness" not in kept
    assert json.loads(full.read_text()) == {"a full run": True}
    assert not (tmp_path / "results-quality-robustness.json").exists()


def test_nothing_left_to_run_is_a_usage_error(capsys):
    from csakd_qgis import bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--only", "adaptation", "--adapt-minutes"])
    assert stop.value.code == 2
    assert "no section left to run" in capsys.readouterr().err
