"""metrics.jsonl: one run's log; a resume drops what ran after its checkpoint, a fresh start empties it."""

from perflow_video.training.metrics_log import append_metrics, metric_history, read_metrics, truncate_metrics


def test_truncation_keeps_the_steps_up_to_the_checkpoint_and_a_fresh_start_keeps_none(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (0, 1, 2, 3):
        append_metrics(path, step, {"loss": float(step)})
    append_metrics(path, 2, {"eval_loss": 0.5})
    truncate_metrics(path, 2)
    assert [(m["step"], sorted(m)) for m in read_metrics(path)] == [
        (0, ["loss", "step"]), (1, ["loss", "step"]), (2, ["loss", "step"]), (2, ["eval_loss", "step"]),
    ]  # fmt: skip
    truncate_metrics(path, None)
    assert read_metrics(path) == []
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_history_has_one_value_per_step_and_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, 0, {"eval_loss": 3.0})
    append_metrics(path, 5, {"loss": 1.0})
    append_metrics(path, 5, {"eval_loss": 2.0})
    append_metrics(path, 5, {"eval_loss": 1.5})  # logged again (e.g. by a resumed run): the last counts
    with open(path, "a") as f:
        f.write('{"step": 6, "eval_lo')  # a crash mid-write
    assert metric_history(path, "eval_loss") == [(0, 3.0), (5, 1.5)]
    assert metric_history(path, "loss") == [(5, 1.0)]
