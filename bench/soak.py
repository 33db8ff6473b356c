"""Kill-and-resume soak: SIGKILL every stage at a random point, run it again, check nothing was lost.

For each stage (ingest, encode, hierarchy, train of level 0, evaluate) and each trial:
  1. a fresh root gets copies of the stage's upstream folders from an uninterrupted reference run;
  2. the stage runs in a forked child process (the task's own function, no Prefect server); the
     soak sleeps a random time in [0, the stage's reference time] and SIGKILLs the child's whole
     process group (Dask workers included), like a machine losing power; a child that finished
     first is not a kill;
  3. the stage runs again to completion, and its output is compared with the reference run:
     lost / duplicated samples (sample ids, rejects, metric rows), mismatched samples or tensors
     (bit-identical comparison), whether the store opens and validates, and for training the step
     it resumed from.

    .venv/bin/python bench/soak.py --trials 20            # -> bench/results/reliability.json
    .venv/bin/python bench/soak.py --trials 2 --out /tmp/r.json --stages ingest,encode
    .venv/bin/python bench/soak.py --trials 20 --stages train --merge   # redo one stage's trials
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("ingest", "encode", "hierarchy", "train", "evaluate")
SETUP = ("ingest", "encode", "hierarchy", "decoder", "train", "train-1", "train-2", "train-3", "judge", "evaluate")
# Longer training than tiny.yaml so a kill can land between snapshots; one Dask worker (2 shared cores).
OVERRIDES = ["source.num_images=96", "ingest.chunk_size=8", "generator.steps=40", "generator.checkpoint_every=4",
             "ingest.workers=1"]
RUN_ID = "soak"
KILL = ("SIGKILL to the stage process's group (Dask workers included) at uniform(0, reference time) after it "
        "starts (even trials), or, for stages with chunk markers, at uniform(0, reference chunk-writing time) after "
        "the first chunk marker appears (odd trials); then the stage is run again to completion")
COUNTS = ("trials", "kills", "lost", "duplicated", "mismatched", "store_invalid", "resume_failures")


# --- running a stage in a forked child -----------------------------------------------------------
# The soak imports every stage module once and forks a child per run: a fresh interpreter would
# spend most of a trial importing torch and Prefect (20-40 s on a loaded 2-core box), and the kill
# is meant to land inside the stage's work. The child is its own session, so a SIGKILL of its
# process group also takes the Dask workers it started, like a machine losing power.
def _import_stages() -> dict:
    import torch

    torch.set_num_threads(1)   # before any torch op, so no thread pool exists when we fork
    from tasks.encode.stage import encode_latents
    from tasks.evaluate.stage import evaluate_run
    from tasks.hierarchy.stage import build_teacher
    from tasks.ingest.stage import ingest_images
    from tasks.judge.stage import train_judge_task
    from tasks.train.stage import train_decoder_task, train_level_task

    level = lambda l: (lambda cfg, root: train_level_task.fn(cfg, root, l))  # noqa: E731
    return {"ingest": ingest_images.fn, "encode": encode_latents.fn, "hierarchy": build_teacher.fn,
            "decoder": train_decoder_task.fn, "train": level(0), "train-1": level(1), "train-2": level(2),
            "train-3": level(3), "judge": train_judge_task.fn,
            "evaluate": lambda cfg, root: evaluate_run.fn(cfg, root, RUN_ID)}


def launch(stage: str, root: Path, cfg, log: Path) -> int:
    """Fork a child that runs `stage` on `root`, output to `log`; returns its pid (= its process group)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        try:
            os.setpgid(pid, pid)
        except (PermissionError, ProcessLookupError):   # the child did it first, or already exited
            pass
        return pid
    code = 1
    try:
        os.setpgid(0, 0)   # its own process group (the parent sets it too: no race with an early kill)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        result = STAGE_FUNCTIONS[stage](cfg, str(root))
        print("RESULT " + json.dumps(result, default=str), flush=True)
        code = 0
    except BaseException:   # noqa: BLE001 - the child reports and exits; it never returns to the soak
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def wait_exit(pid: int, timeout: float | None = None) -> int | None:
    """The child's exit status (negative signal number when killed), or None while it runs past `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def run_to_end(stage: str, root: Path, cfg, log: Path, timeout: float = 1800) -> tuple[dict | None, float]:
    """Run the stage to completion; (its RESULT dict or None on failure, seconds)."""
    started = time.monotonic()
    pid = launch(stage, root, cfg, log)
    code = wait_exit(pid, timeout)
    if code is None:
        os.killpg(pid, signal.SIGKILL)
        wait_exit(pid)
    seconds = time.monotonic() - started
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.startswith("RESULT ")]
    return (json.loads(lines[-1][7:]) if code == 0 and lines else None), seconds


STAGE_FUNCTIONS: dict = {}


# --- comparison with the reference -------------------------------------------------------------
def stage_dirs(root: Path, cfg) -> dict[str, list[Path]]:
    from tasks import plan

    layout = plan.layout(root, cfg)
    return {"images": [layout.images()], "latents": [layout.latents()], "teacher": [layout.teacher()],
            "decoder": [layout.decoder()],
            "generators": [layout.generator(l) for l in range(cfg.hierarchy.generator_levels)], "judge": [layout.judge()],
            "ingest": [layout.images()], "encode": [layout.latents()], "hierarchy": [layout.teacher()],
            "train": [layout.generator(0)], "evaluate": [layout.evaluation()]}


UPSTREAM = {"ingest": [], "encode": ["images"], "hierarchy": ["images", "latents"],
            "train": ["images", "latents", "teacher"],
            "evaluate": ["images", "latents", "teacher", "decoder", "generators", "judge"]}


def _rows_differ(a, b) -> "np.ndarray":
    import numpy as np

    if a.shape != b.shape or a.dtype != b.dtype:
        return np.ones(max(len(a), len(b), 1), bool)
    if a.ndim == 0:
        return np.asarray([a.tobytes() != b.tobytes()])
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.dtype.kind in "fc":   # bit-identical, NaN included
        flat_a, flat_b = flat_a.view(f"u{a.dtype.itemsize}"), flat_b.view(f"u{b.dtype.itemsize}")
    return (flat_a != flat_b).any(axis=1)


def compare_zarr(trial: Path, ref: Path, skip: tuple[str, ...] = (), ids: str = "sample") -> dict:
    """Samples lost/duplicated (by the `sample` ids), samples mismatched in any per-sample array
    (+1 per differing whole-store array), and whether the store validates."""
    import numpy as np
    import zarr

    from storage import zarr_store

    out = {"lost": 0, "duplicated": 0, "mismatched": 0, "store_invalid": 0, "differing_arrays": []}
    try:
        ref_meta = zarr_store.store_attrs(ref)
        zarr_store.check_compatible(trial, ref_meta.get("stage_attrs", {}), exact=True)
        zarr_store.open_dataset(trial)   # opens as a whole
        assert zarr_store.is_complete(trial)
        chunk_size = ref_meta.get("chunk_size", 1)
        num = zarr_store.open_array(ref, ids).shape[0]
        starts = [info["start"] for info in zarr_store.chunk_infos(trial)]
        if (Path(ref) / zarr_store.MARKERS).exists():
            assert sorted(starts) == [s for s, _ in zarr_store.chunk_bounds(num, chunk_size)], starts
    except Exception as error:   # noqa: BLE001 - any failure to open/validate is the finding
        out["store_invalid"], out["error"] = 1, f"{type(error).__name__}: {error}"
        return out
    names, ref_ids = zarr_store.open_array(trial, ids)[:], zarr_store.open_array(ref, ids)[:]
    if ids not in skip:
        out["lost"] = len(set(ref_ids.tolist()) - set(names.tolist())) + int((names == "").sum())
        out["duplicated"] = len(names) - len(set(names.tolist()))
    group, ref_group = zarr.open_group(str(zarr_store.zarr_path(trial)), mode="r"), \
        zarr.open_group(str(zarr_store.zarr_path(ref)), mode="r")
    bad_rows = np.zeros(len(ref_ids), bool)
    for name in ref_group.array_keys():
        if name in skip or name == ids:
            continue
        if name not in group:
            out["mismatched"] += 1
            out["differing_arrays"].append(name)
            continue
        a, b = np.asarray(group[name][...]), np.asarray(ref_group[name][...])
        rows = _rows_differ(a, b)
        if rows.any():
            out["differing_arrays"].append(name)
            if a.shape == b.shape and a.ndim and len(a) == len(ref_ids):
                bad_rows |= rows
            else:
                out["mismatched"] += 1
    out["mismatched"] += int(bad_rows.sum())
    return out


def compare_rejects(trial: Path, ref: Path) -> dict:
    from storage.tables import load_rejects

    mine, theirs = load_rejects(trial), load_rejects(ref)
    return {"lost": len(set(theirs.path) - set(mine.path)), "duplicated": len(mine) - len(set(mine.path))}


def compare_checkpoints(trial: Path, ref: Path) -> dict:
    """Every final safetensors file of the reference, tensor by tensor; no snapshot left behind."""
    from safetensors.numpy import load_file

    out = {"lost": 0, "duplicated": 0, "mismatched": 0, "store_invalid": 0, "differing_arrays": []}
    if not (trial / "_COMPLETE").exists() or list(trial.glob("*-state-*.safetensors")) \
            or list(trial.glob("*train-state.json")):
        out["store_invalid"] = 1
    for path in sorted(ref.glob("*.safetensors")):
        if not (trial / path.name).exists():
            out["mismatched"] += 1
            out["differing_arrays"].append(path.name)
            continue
        mine, theirs = load_file(trial / path.name), load_file(path)
        for name, tensor in theirs.items():
            if name not in mine or mine[name].tobytes() != tensor.tobytes():
                out["mismatched"] += 1
                out["differing_arrays"].append(f"{path.name}:{name}")
        sidecar = json.loads(path.with_suffix(".json").read_text())
        if json.loads((trial / path.with_suffix(".json").name).read_text()).get("steps") != sidecar.get("steps"):
            out["mismatched"] += 1   # a resumed run that skipped or repeated steps
    return out


def compare_evaluation(trial_root: Path, ref_root: Path, trial: Path, ref: Path) -> dict:
    """Trajectory stores bit-identical; metric rows of the run present once each, with equal values."""
    import numpy as np
    import pandas as pd

    from storage.tables import load_metrics

    out = compare_zarr(trial / "trajectories.zarr", ref / "trajectories.zarr", ids="trajectory")
    edits = compare_zarr(trial / "edits.zarr", ref / "edits.zarr", skip=("trajectory", "parent"),  # uuids
                         ids="trajectory")
    for key in ("mismatched", "store_invalid"):
        out[key] += edits[key]
    out["differing_arrays"] += [f"edits:{n}" for n in edits["differing_arrays"]]
    keys = ["group", "metric", "level", "variant"]
    mine, theirs = load_metrics(trial_root, run_id=RUN_ID), load_metrics(ref_root, run_id=RUN_ID)
    out["duplicated"] += int(mine.duplicated(keys).sum())
    merged = theirs.merge(mine.drop_duplicates(keys), on=keys, how="left", suffixes=("", "_t"), indicator=True)
    out["lost"] += int((merged["_merge"] == "left_only").sum())
    both = merged[merged["_merge"] == "both"]
    same = np.ones(len(both), bool)
    for column in ("value", "ci_low", "ci_high", "n"):
        a, b = both[column].to_numpy(float), both[f"{column}_t"].to_numpy(float)
        same &= (a == b) | (np.isnan(a) & np.isnan(b))
    out["mismatched"] += int((~same).sum())
    if (~same).any():
        out["differing_arrays"] += [f"metric:{m}@{l}" for m, l in both.loc[~same, ["metric", "level"]].values]
    cols = [c for c in pd.read_parquet(ref / "edits.parquet").columns if c not in ("edit_id", "result")]
    if not pd.read_parquet(ref / "edits.parquet")[cols].equals(pd.read_parquet(trial / "edits.parquet")[cols]):
        out["mismatched"] += 1
        out["differing_arrays"].append("edits.parquet")
    return out


def compare(stage: str, trial_root: Path, ref_root: Path, cfg) -> dict:
    trial, ref = stage_dirs(trial_root, cfg)[stage][0], stage_dirs(ref_root, cfg)[stage][0]
    if stage == "train":
        return compare_checkpoints(trial, ref)
    if stage == "evaluate":
        return compare_evaluation(trial_root, ref_root, trial, ref)
    out = compare_zarr(trial, ref)
    if stage == "ingest":
        rejects = compare_rejects(trial, ref)
        out["lost"] += rejects["lost"]
        out["duplicated"] += rejects["duplicated"]
    return out


# --- the soak ----------------------------------------------------------------------------------
def copy_upstream(stage: str, ref_root: Path, trial_root: Path, cfg) -> None:
    dirs = stage_dirs(ref_root, cfg)
    for name in UPSTREAM[stage]:
        for source in dirs[name]:
            # The reference evaluation cached real-image statistics inside the images store; a trial
            # starts from the images store as ingest left it.
            shutil.copytree(source, trial_root / source.name, symlinks=True,
                            ignore=shutil.ignore_patterns("reference") if name == "images" else None)


def state_at_kill(stage: str, trial_root: Path, cfg) -> dict:
    folder = stage_dirs(trial_root, cfg)[stage][0]
    if stage == "train":
        pointer = folder / "generator-train-state.json"
        return {"snapshot_step": json.loads(pointer.read_text())["step"] if pointer.exists() else 0}
    markers = folder / "_chunks"
    return {"chunks_done": len(list(markers.glob("*.json"))) if markers.exists() else 0,
            "complete": (folder / "_COMPLETE").exists()}


def trial(stage: str, index: int, rng: random.Random, ref_root: Path, work: Path, cfg,
          work_s: float, writes: tuple[float, float] | None = None) -> dict:
    root = work / stage / f"trial-{index:03d}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    copy_upstream(stage, ref_root, root, cfg)
    pid = launch(stage, root, cfg, root / "killed.log")
    # Even trials: anywhere in the run. Odd trials: once the first chunk marker exists, within the
    # reference's chunk-writing time, since start-up (Dask cluster, model build) would otherwise
    # take most of the kills, and on a loaded machine start-up time varies too much to aim by clock.
    started, code = time.monotonic(), None
    if writes and index % 2:
        markers = stage_dirs(root, cfg)[stage][0] / "_chunks"
        while code is None and not any(markers.glob("*.json")):
            code = wait_exit(pid, 0.005)
        delay = rng.uniform(0.0, writes[1] - writes[0])
    else:
        delay = rng.uniform(0.0, work_s)
    killed = (code if code is not None else wait_exit(pid, delay)) is None
    delay = time.monotonic() - started   # when the kill came, counted from the stage's start
    if killed:
        os.killpg(pid, signal.SIGKILL)
        wait_exit(pid)
    record = {"stage": stage, "trial": index, "kill_after_s": round(delay, 3), "killed": killed,
              "at_kill": state_at_kill(stage, root, cfg)}
    result, seconds = run_to_end(stage, root, cfg, root / "resume.log")
    record["resume_s"] = round(seconds, 2)
    record["stale_lock_taken_over"] = "taking over the stale lock" in (root / "resume.log").read_text(errors="replace")
    if result is None:
        record.update(resume_failed=1, log=(root / "resume.log").read_text()[-2000:])
        return record
    record.update(compare(stage, root, ref_root, cfg), resume_failed=0,
                  resumed_from_step=result.get("resumed_from_step"))
    if not (record["lost"] or record["duplicated"] or record["mismatched"] or record["store_invalid"]):
        shutil.rmtree(root, ignore_errors=True)   # keep failing trials for inspection only
    return record


def reference(ref_root: Path, cfg, setup: list[str], log=print) -> dict[str, float]:
    """One uninterrupted run of every stage; returns each stage's seconds."""
    times = {}
    for stage in setup:
        launched = time.time()
        result, seconds = run_to_end(stage, ref_root, cfg, ref_root / "logs" / f"{stage}.log")
        if result is None:
            raise RuntimeError(f"reference {stage} failed:\n{(ref_root / 'logs' / f'{stage}.log').read_text()[-3000:]}")
        times[stage] = seconds
        # When the chunk markers were written: the window in which a kill leaves a partial store.
        markers = [m.stat().st_mtime - launched for m in (Path(result["path"]) / "_chunks").glob("*.json")]
        if len(markers) > 1:
            times[f"{stage}:writes"] = (min(markers), max(markers))
        log(f"reference {stage}: {seconds:.1f}s ({result['status']})")
    return times


def summarise(records: list[dict]) -> dict:
    def total(rows):
        out = {"trials": len(rows), "kills": sum(r["killed"] for r in rows),
               "lost": sum(r.get("lost", 0) for r in rows), "duplicated": sum(r.get("duplicated", 0) for r in rows),
               "mismatched": sum(r.get("mismatched", 0) for r in rows),
               "store_invalid": sum(r.get("store_invalid", 0) for r in rows),
               "resume_failures": sum(r.get("resume_failed", 0) for r in rows)}
        return out
    per_stage = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        per_stage[stage] = total(rows)
        if stage == "train":
            per_stage[stage]["killed_after_a_snapshot"] = sum(
                r["killed"] and r["at_kill"]["snapshot_step"] > 0 for r in rows)
            per_stage[stage]["resumed_from_checkpoint"] = sum((r.get("resumed_from_step") or 0) > 0 for r in rows)
        elif stage != "evaluate":   # evaluate has no chunk markers to count
            per_stage[stage]["killed_with_partial_output"] = sum(
                r["killed"] and 0 < r["at_kill"].get("chunks_done", 0) and not r["at_kill"].get("complete")
                for r in rows)
            per_stage[stage]["stale_lock_taken_over"] = sum(r.get("stale_lock_taken_over", False) for r in rows)
    return {"total": total(records), "per_stage": per_stage}


def soak(trials: int, stages: list[str], config: str, overrides: list[str], work: Path, seed: int,
         log=print) -> dict:
    """Reference run, then `trials` kill-and-resume trials per stage; the summary and every trial."""
    from storage.config import load_config

    STAGE_FUNCTIONS.update(_import_stages())
    cfg = load_config(config, overrides)
    rng = random.Random(seed)
    ref_root = work / "reference"
    shutil.rmtree(work, ignore_errors=True)
    ref_root.mkdir(parents=True)
    started = time.monotonic()
    needs = {"ingest": 1, "encode": 2, "hierarchy": 3, "train": 5, "evaluate": len(SETUP)}   # SETUP prefixes
    times = reference(ref_root, cfg, list(SETUP[:max(needs[s] for s in stages)]), log)
    records = []
    for stage in stages:
        for index in range(trials):
            record = trial(stage, index, rng, ref_root, work, cfg, times[stage], times.get(f"{stage}:writes"))
            records.append(record)
            flags = {k: record.get(k) for k in ("killed", "lost", "duplicated", "mismatched", "store_invalid",
                                                "resume_failed", "resumed_from_step")}
            log(f"{stage} trial {index}: kill at {record['kill_after_s']:.2f}s {record['at_kill']} {flags}")
            (work / "trials.jsonl").open("a").write(json.dumps(record, default=str) + "\n")   # survives a crash
    return {**summarise(records), "reference_s": {k: v if isinstance(v, tuple) else round(v, 2)
                                                  for k, v in times.items()},
            "wall_s": round(time.monotonic() - started, 1), "trials": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per stage")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                        help=f"config overrides (default: {' '.join(OVERRIDES)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tf-soak"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reliability.json")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these stages' trials in an existing --out file")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="no soak: merge these result files (disjoint stages, e.g. two soaks run side by side)")
    args = parser.parse_args(argv)
    from bench.results_io import commit, machine

    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        records = [r for part in parts for r in part["trials"]]
        result = {**parts[0], **summarise(records), "trials": records, "kill": KILL, "commit": commit(),
                  "command": " | ".join(part["command"] for part in parts),
                  "wall_s": max(part["wall_s"] for part in parts),
                  "reference_s": {k: v for part in parts for k, v in part["reference_s"].items()}}
        result["figures"] = {k: {"value": result["total"][k], "unit": "count"} for k in COUNTS}
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(json.dumps({"total": result["total"], "per_stage": result["per_stage"]}, indent=2))
        return 0

    overrides = OVERRIDES if args.overrides is None else args.overrides
    stages = args.stages.split(",")
    body = soak(args.trials, stages, args.config, overrides, args.work, args.seed,
                log=lambda line: print(line, flush=True))
    records = body["trials"]
    if args.merge and args.out.exists():   # e.g. the train stage re-run after training changed
        old = json.loads(args.out.read_text())
        records = [r for r in old["trials"] if r["stage"] not in stages] + records
        body.update(summarise(records), trials=records,
                    reference_s={**old.get("reference_s", {}), **body["reference_s"]})
    result = {"bench": "reliability", "machine": machine(), "commit": commit(),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "config": args.config,
              "overrides": overrides, "seed": args.seed,
              "kill": KILL,
              "figures": {k: {"value": body["total"][k], "unit": "count"} for k in COUNTS}, **body}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({"total": result["total"], "per_stage": result["per_stage"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
