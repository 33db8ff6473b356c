import math


from storage.tables import compare_runs, load_metrics, load_rejects, metric_row, write_metrics, write_rejects


def test_metrics_append_per_run_and_filter(tmp_path):
    ctx = {"latents_key": "l", "teacher_key": "t", "model_key": "m", "code_version": "v", "encoder_weights": "random-init"}
    write_metrics(tmp_path, "run-a", [metric_row("quality", "fd_dinov2", 1.5, n=10),
                                      metric_row("structure", "nesting", 0.9, level=0, n=10, ci=(0.8, 1.0))], ctx)
    write_metrics(tmp_path, "run-b", [metric_row("quality", "fd_dinov2", 2.5, n=10)], ctx)
    frame = load_metrics(tmp_path)
    assert len(frame) == 3 and set(frame.run_id) == {"run-a", "run-b"}
    fd = load_metrics(tmp_path, metric="fd_dinov2")
    assert sorted(fd.value) == [1.5, 2.5]
    nest = load_metrics(tmp_path, metric="nesting", level=0).iloc[0]
    assert (nest.ci_low, nest.ci_high) == (0.8, 1.0)
    assert (frame.encoder_weights == "random-init").all()


def test_skipped_metric_never_carries_a_number(tmp_path):
    row = metric_row("quality", "fid", 12.0, status="skipped", reason="no weights")
    assert math.isnan(row["value"]) and row["reason"] == "no weights"
    nan_row = metric_row("quality", "fid", float("nan"))
    assert nan_row["status"] == "skipped" and nan_row["reason"]


def test_rejects_are_kept_per_chunk(tmp_path):
    write_rejects(tmp_path, 0, [{"stage": "ingest", "path": "a.jpg", "reason": "truncated"}])
    write_rejects(tmp_path, 1, [])
    frame = load_rejects(tmp_path)
    assert list(frame.path) == ["a.jpg"] and list(frame.chunk) == [0]


def test_compare_runs_puts_two_runs_side_by_side(tmp_path):
    ctx = {"latents_key": "l", "teacher_key": "t", "model_key": "m", "code_version": "v", "encoder_weights": "x"}
    for run, shift in (("tf", 0.0), ("flat", 1.0)):
        write_metrics(tmp_path, run, [metric_row("per_level", "fd_level", 1.0 + shift + level, level=level, n=5)
                                      for level in range(3)]
                      + [metric_row("quality", "fid", None, status="skipped", reason="no weights")], ctx)
    table = compare_runs(tmp_path, ["tf", "flat"])
    assert list(table.columns[-2:]) == ["tf", "flat"] and len(table) == 3   # skipped rows stay out
    assert (table["flat"] - table["tf"]).tolist() == [1.0, 1.0, 1.0]


def test_a_reused_run_id_never_overwrites_and_the_tables_read_whole_with_pandas(tmp_path):
    import concurrent.futures as cf

    import pandas as pd

    from storage.tables import claim_run_id, load_runs, write_run_report

    ctx = {"latents_key": "l", "teacher_key": "t", "model_key": "m", "code_version": "v", "encoder_weights": "x"}
    first, second = claim_run_id(tmp_path, "manual"), claim_run_id(tmp_path, "manual")
    assert first == "manual" and second.startswith("manual-") and second != first
    for run in (first, second):
        write_run_report(tmp_path, run, [{"run_id": run, "flow": "ingest", "stage": "ingest", "status": "reused"}])
        write_metrics(tmp_path, run, [metric_row("quality", "fd_dinov2", 1.0, n=3)], ctx)
    assert set(load_runs(tmp_path).run_id) == {first, second} and set(load_metrics(tmp_path).run_id) == {first, second}
    # one schema: pandas reads each table whole, run_id from the run_id=<run> folders
    assert set(pd.read_parquet(tmp_path / "tables" / "runs").run_id.astype(str)) == {first, second}
    assert set(pd.read_parquet(tmp_path / "tables" / "metrics").run_id.astype(str)) == {first, second}
    # runs started together with one id each get their own
    with cf.ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: claim_run_id(tmp_path, "nightly"), range(16)))
    assert len(set(claimed)) == 16 and claimed.count("nightly") == 1
    assert len({claim_run_id(tmp_path) for _ in range(3)}) == 3      # no id given: a fresh one each time


def _row(run_id, kind, stage, status, start_s, seconds, parent="", **extra):
    import pandas as pd

    began = pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(seconds=start_s)
    return {"run_id": run_id, "parent_run_id": parent, "kind": kind, "flow": "pipeline", "stage": stage,
            "key": "k" if stage else "", "status": status, "started_at": began,
            "ended_at": None if seconds != seconds else began + pd.Timedelta(seconds=seconds),   # NaN: running
            "duration_s": seconds, **extra}


def test_runs_have_typed_times_and_a_routed_pipeline_sums_with_its_stage_runs(tmp_path):
    """One row per stage per run, the stage run's rows under its own id with the pipeline as parent, and one
    run row for the pipeline: summed, the stage seconds and the overhead give the run's total; metrics written
    under the stage run read under the pipeline's id."""
    import pandas as pd

    from storage.tables import load_runs, run_metrics, run_summaries, write_run_report

    write_run_report(tmp_path, "p", [_row("p", "stage", "ingest", "computed", 1, 4),
                                     _row("p", "run", "", "completed", 0, 20, overhead_s=6.0)])
    write_run_report(tmp_path, "p-encode", [_row("p-encode", "stage", "encode", "computed", 8, 5, "p"),
                                            _row("p-encode", "stage", "evaluate", "reused", 13, 5, "p")])
    write_run_report(tmp_path, "q", [_row("q", "stage", "config", "failed", 30, 0.5, error="ValueError: bad"),
                                     _row("q", "run", "", "failed", 30, 1, error="ValueError: bad", overhead_s=0.5)])
    runs = load_runs(tmp_path)
    for column in ("started_at", "ended_at"):
        assert isinstance(runs[column].dtype, pd.DatetimeTZDtype) and str(runs[column].dt.tz) == "UTC"
    assert list(runs.run_id) == ["p", "p", "p-encode", "p-encode", "q", "q"]   # by start time
    assert len(runs[(runs.run_id == "p") | (runs.parent_run_id == "p")]) == 1 + 3   # 1 + stages
    summary = run_summaries(tmp_path).set_index("run_id")
    assert list(summary.index) == ["q", "p"]   # newest first; the stage run is folded into its pipeline
    p = summary.loc["p"]
    assert (p.status, p.stage_s, p.stage_runs, p.computed, p.reused) == ("completed", 14.0, "p-encode",
                                                                          "ingest, encode", "evaluate")
    assert p.stage_s + p.overhead_s == p.duration_s
    q = summary.loc["q"]
    assert (q.status, q.failed_stage, q.error) == ("failed", "config", "ValueError: bad")
    ctx = {"latents_key": "l", "teacher_key": "t", "model_key": "m", "code_version": "v", "encoder_weights": "x"}
    write_metrics(tmp_path, "p-encode", [metric_row("quality", "fd_dinov2", 1.0, n=3)], ctx)
    assert list(load_metrics(tmp_path, parent_run_id="p").run_id) == ["p-encode"]
    assert list(run_metrics(tmp_path, "p").value) == [1.0] and run_metrics(tmp_path, "q").empty


def test_runs_recorded_before_version_2_load_with_typed_times(tmp_path):
    """Version 1 parts (a string `timestamp` written at the run's end, no kind) read with the new ones."""
    import pandas as pd

    from storage.tables import load_runs, run_summaries, write_run_report

    legacy = tmp_path / "tables" / "runs" / "run_id=old" / "report.parquet"
    legacy.parent.mkdir(parents=True)
    pd.DataFrame([{"timestamp": "2025-06-01T10:00:30+00:00", "flow": "pipeline", "stage": "ingest", "key": "a",
                   "status": "computed", "duration_s": 30.0, "path": "data/images-a", "encoder_weights": "w",
                   "error": None}]).to_parquet(legacy, index=False)
    write_run_report(tmp_path, "new", [_row("new", "run", "", "running", 0, float("nan"))])
    runs = load_runs(tmp_path).set_index("run_id")
    old = runs.loc["old"]
    assert (old.kind, old.parent_run_id, old.error) == ("stage", "", "")
    assert old.started_at == pd.Timestamp("2025-06-01T10:00:00Z") and old.ended_at == pd.Timestamp("2025-06-01T10:00:30Z")
    summary = run_summaries(tmp_path).set_index("run_id")
    assert (summary.loc["old", "status"], summary.loc["old", "duration_s"]) == ("completed", 30.0)
    assert summary.loc["new", "status"] == "running"
