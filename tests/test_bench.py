"""`make bench`'s sections run alone (python -m csakd_qgis.bench --only …): the section's own
numbers, saved beside the full run's results and never over them."""

import json
import re

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


def test_the_distillation_section_runs_alone_and_reports_all_three(tmp_path, monkeypatch, shared_data_dir, capsys):
    """--only distillation co-trains the teacher and the distilled student beside the control
    within one scene and reports, per evaluation and at the end, which is ahead; the step count
    comes from --distillation-steps (0 leaves the section out)."""
    from csakd_qgis import bench

    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "DISTILLATION_EVERY", 1)
    from csakd_qgis import learnability

    transfer_sets = []
    step = learnability.distillation_step

    def spied(*args, transfer=None):
        transfer_sets.append(transfer)
        return step(*args, transfer=transfer)

    monkeypatch.setattr(learnability, "distillation_step", spied)
    assert bench.main(["--only", "distillation", "--distillation-steps", "2", "--data", str(shared_data_dir)]) == 0
    saved = json.loads((tmp_path / "results-distillation.json").read_text())["distillation"]
    assert saved["steps"] == 2 and "cave_feathers" in saved["scene"]
    for role in ("control", "distilled", "teacher"):
        assert [step for step, _ in saved[role]] == [1, 2]
    # The distilled student was given a transfer set, without its reference, at both steps.
    assert len(transfer_sets) == 2 and all(t is not None and t[3] is None for t in transfer_sets)
    # The three started from one base and took different steps.
    assert len({round(saved[role][-1][1], 6) for role in ("control", "distilled", "teacher")}) == 3
    report = (tmp_path / "results-distillation.md").read_text()
    assert "- step 2: student without the teacher " in report
    assert re.search(r"distilled student (ahead of|not ahead of) the one trained without the teacher by [+-]\d\.\d{3} dB; "
                     r"teacher (ahead of|not ahead of) the distilled student", report), report
    with pytest.raises(SystemExit) as stop:
        bench.main(["--only", "distillation", "--distillation-steps", "0"])
    assert stop.value.code == 2
