"""stablemoe-routing-report on runs laid out like the recipes (examples/common.sh: RUN_DIR with
checkpoints/routing_probe/, metrics.jsonl, tensorboard/): the run, save and routing_probe
directories give the same report, labelled by RUN_DIR's name and written under RUN_DIR by
default; the stage switch found from the probe records and marked on the plots; integer expert
ticks; and the exact errors for a run without probe history and for a missing directory."""
import json
from pathlib import Path

import pytest

from stablemoe_megatron.analysis import expert_load_statistics
from stablemoe_megatron.analysis.history import stage_switch_iteration
from stablemoe_megatron.analysis.locate import locate_history
from stablemoe_megatron.cli.routing_report import main
from test_routing_analysis import write_synthetic_history

PROG = "stablemoe-routing-report"
SWITCH = 20   # --moe-stage2-start-iter of the synthetic run: probes at 10, 20 in stage 1; 30, 40 in stage 2


def recipe_run(root: Path, name: str = "quickstart-tiny") -> Path:
    """A RUN_DIR as the recipes leave it: the probe history in checkpoints/routing_probe/ (--save),
    metrics.jsonl with the iteration records (load statistics, stage-1 distillation agreement)."""
    run = root / name
    meta = {"router": "stablemoe", "interval": 10, "train_iters": 40, "stage2_start_iter": SWITCH,
            "metrics_file": str(run / "metrics.jsonl"), "tensorboard_dir": str(run / "tensorboard")}
    write_synthetic_history(run / "checkpoints" / "routing_probe", stages=(1, 1, 2, 2), meta=meta)
    (run / "tensorboard").mkdir()
    lines = []
    for iteration in (10, 20, 30, 40):
        layer = dict(expert_load_statistics([160.0 - iteration, 96.0 + iteration]),
                     tokens_per_expert=[160.0 - iteration, 96.0 + iteration], dropped_fraction=0.0)
        if iteration <= SWITCH:
            layer["distill_agreement"] = 0.5 + iteration / 100
        lines.append(json.dumps({"iteration": iteration, "stage": 1 if iteration <= SWITCH else 2, "lm_loss": 5.0,
                                 "moe_layers": {"3": layer}}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_run_save_and_probe_directories_give_the_same_report(tmp_path, capsys):
    run = recipe_run(tmp_path)
    reports = []
    for k, named in enumerate((run, run / "checkpoints", run / "checkpoints" / "routing_probe")):
        out = tmp_path / f"out{k}"
        assert main([str(named), "--output", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"{PROG}: report: {out / 'report.md'}\n" in printed and f"{out / 'agreement.png'}" in printed
        assert sorted(p.name for p in out.iterdir()) == ["agreement.png", "fluctuation.png", "load_quickstart-tiny.png",
                                                         "report.md"]
        reports.append((out / "report.md").read_text())
    assert reports[0] == reports[1] == reports[2]
    text = reports[0]
    # labelled by RUN_DIR's name, never "checkpoints"; the switch found from the records
    assert (f"| quickstart-tiny | {run / 'checkpoints' / 'routing_probe'} | stablemoe | 2 | 3 | 4 | 8 | 10 | 40 | "
            f"{SWITCH} |") in text
    assert "| quickstart-tiny | 3 | routed | 25.0 | 0.0 | 0.0 |" in text       # last change at 10 of 40
    assert "### quickstart-tiny, layer 3 (routing at iteration 40)" in text
    assert "Last logged interval of **quickstart-tiny**" in text              # metrics.jsonl of RUN_DIR read
    assert "| checkpoints |" not in text and "SPEC" not in text


def test_the_report_goes_under_the_run_by_default(tmp_path, monkeypatch, capsys):
    run = recipe_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([str(run / "checkpoints")]) == 0
    out = run / "routing_report"
    assert capsys.readouterr().out.splitlines()[-1] == f"{PROG}: report: {out / 'report.md'}"
    assert (out / "report.md").is_file() and (out / "load_quickstart-tiny.png").is_file()
    assert list(elsewhere.iterdir()) == []
    assert main([str(run), "--output", str(tmp_path / "mine")]) == 0      # --output still overrides
    assert (tmp_path / "mine" / "report.md").is_file()


def test_stage_switch_iteration_from_the_probe_records():
    records = lambda *stages: [{"iteration": 10 * (k + 1), "stage": s} for k, s in enumerate(stages)]  # noqa: E731
    assert stage_switch_iteration(records(1, 1, 2, 2)) == 20                  # the last stage-1 probe
    assert stage_switch_iteration(records(1, 1, 2, 2), stage2_start_iter=25) == 25   # configured, fits
    assert stage_switch_iteration(records(1, 1, 2, 2), stage2_start_iter=20) == 20
    assert stage_switch_iteration(records(1, 1, 2, 2), stage2_start_iter=5) == 20     # does not fit the records
    assert stage_switch_iteration(records(1, 1, 1)) is None                   # stage 1 only / never reached
    assert stage_switch_iteration(records(1, 1, 1), stage2_start_iter=35) is None
    assert stage_switch_iteration(records(2, 2)) is None                      # switched before the first probe
    assert stage_switch_iteration(records(2, 2), stage2_start_iter=4) == 4
    assert stage_switch_iteration([]) is None


def test_plots_mark_the_stage_switch_and_use_integer_expert_ticks(tmp_path, monkeypatch):
    from matplotlib.ticker import MaxNLocator

    from stablemoe_megatron.analysis import plots
    from stablemoe_megatron.analysis.report import load_run

    figures = {}

    def keep(fig, path):   # instead of saving and closing: keep the figure to look at
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    run = load_run(recipe_run(tmp_path))
    assert run.name == "quickstart-tiny" and run.switch_iteration == SWITCH
    plots.draw_all([run], tmp_path)
    label = f"stage 1 → 2 switch at iteration {SWITCH}"
    agreement = figures["agreement.png"].axes[0]
    assert label in [t.get_text() for t in agreement.get_legend().get_texts()]
    assert [line.get_xdata()[0] for line in agreement.get_lines() if line.get_label() == label] == [SWITCH]
    heat, lines = figures["load_quickstart-tiny.png"].axes[:2]   # heat map, line plot (then the colour bar)
    assert label in [t.get_text() for t in lines.get_legend().get_texts()]
    assert any(line.get_xdata()[0] == SWITCH for line in heat.get_lines())
    locator = heat.yaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer
    figures["load_quickstart-tiny.png"].canvas.draw()
    low, high = heat.get_ylim()
    ticks = [t for t in heat.get_yticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)
    fluctuation = figures["fluctuation.png"].axes[0]
    assert [line.get_xdata()[0] for line in fluctuation.get_lines()
            if line.get_label() == label + " = 50% of training"] == [50.0]


def test_where_the_history_is_found(tmp_path):
    run = recipe_run(tmp_path)
    for named in (run, run / "checkpoints", run / "checkpoints" / "routing_probe"):
        location = locate_history(named)
        assert (location.probe_dir, location.run_dir, location.name) == \
            (run / "checkpoints" / "routing_probe", run, "quickstart-tiny")
    # --save DIR/ckpt --metrics-file DIR/metrics.jsonl (the README's training example): the run is DIR
    other = tmp_path / "x"
    write_synthetic_history(other / "ckpt" / "routing_probe", meta={"metrics_file": str(other / "metrics.jsonl")})
    assert locate_history(other / "ckpt").run_dir == other and locate_history(other).name == "x"
    # no --save: the history beside the metrics file, in the run directory itself
    plain = tmp_path / "plain"
    write_synthetic_history(plain / "routing_probe", meta={"metrics_file": str(plain / "metrics.jsonl")})
    assert locate_history(plain).run_dir == plain and locate_history(plain / "routing_probe").run_dir == plain


def test_a_run_without_probe_history_says_where_it_looked(tmp_path, capsys):
    run = tmp_path / "noprobe"
    (run / "checkpoints" / "iter_0000400").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"iteration": 20, "lm_loss": 5.0, "moe_layers": {}}\n')
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"{PROG}: error: {run}: this run has no routing-probe history (looked for {run}/meta.json, "
        f"{run}/routing_probe/meta.json and {run}/*/routing_probe/meta.json, e.g. "
        f"{run}/checkpoints/routing_probe/meta.json); train with --routing-probe-interval N (the history "
        f"goes to <--save>/routing_probe/, else beside --metrics-file, else into --tensorboard-dir)\n")
    assert not (run / "routing_report").exists()


def test_a_missing_directory_is_not_a_missing_history(tmp_path, capsys):
    run = recipe_run(tmp_path)
    missing = tmp_path / "runs" / "quickstart-probe"
    assert main([str(run), str(missing)]) == 2     # every run is located before anything is written
    assert capsys.readouterr().err == f"{PROG}: error: {missing}: no such directory\n"
    assert not (run / "routing_report").exists()


def test_several_histories_under_one_directory_must_be_told_apart(tmp_path, capsys):
    parent = tmp_path / "sweep"
    for name in ("a", "b"):
        write_synthetic_history(parent / name / "routing_probe")
    assert main([str(parent)]) == 2
    err = capsys.readouterr().err
    assert f"{parent}: several routing-probe histories ({parent / 'a' / 'routing_probe'}, " in err
    assert main([str(parent / "a"), str(parent / "b"), "--output", str(tmp_path / "o")]) == 0
    assert "| a | " in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("labels", [["A"], ["A", "B", "C"]])
def test_labels_must_match_the_runs(tmp_path, capsys, labels):
    run = recipe_run(tmp_path)
    assert main([str(run), str(run), "--labels", *labels]) == 2
    assert f"--labels: {len(labels)} names for 2 runs" in capsys.readouterr().err
    assert not (run / "routing_report").exists()
