"""The attention cost model's route choice, machine profiles, traces and `bench attention`."""

import dataclasses
import heapq
import json
import random

import pytest
import torch

from spectrumkv.cli import main
from spectrumkv.paged import calibrate, report, traces
from spectrumkv.paged.cost import (
    KERNEL_ROUTES,
    Geometry,
    MachineProfile,
    choose,
    clear_plans,
    cut,
    default_profile_path,
    load_profile,
    lpt_loads,
    predict,
    profile_for,
    route_terms,
    splits_of,
    stream_seconds,
    task_heads,
    this_machine,
)
from spectrumkv.paged.errors import PagedInputError

SMOL = Geometry(kv_heads=3, group=3, head_dim=64)
# the cost model's choice among every route (batch_invariant excludes padded: tested apart)
BASE = MachineProfile(beta=10e9, beta_1=6e9, lam=20e-6, tau=1e-6, beta_pad=2e9, lam_pad=1e-4,
                      batch_invariant=False)  # fmt: skip


def test_splits_match_the_kernel_rule():
    assert splits_of(1, 16, 1024) == (1, 32)
    assert splits_of(5000, 16, 1024) == (5, 1024)  # 1000 -> whole 32-token tiles
    assert splits_of(100_000, 4, 1024) == (4, 25_024)
    assert splits_of(65, 3, 32) == (3, 32)
    # on a grid of parts: whole parts per range, one partial per part
    assert cut(5000, 16, 1024, 512) == (5, 1024, 10)
    assert cut(5000, 3, 32, 512) == (3, 2048, 10)  # 4 + 4 + 2 parts
    assert cut(300, 8, 32, 512) == (1, 512, 1)
    assert cut(100_000, 4, 1024, 0) == (4, 25_024, 4)
    # past MAX_PARTS (16) parts: 16 equal parts of whole tiles, so partials stay O(1) in n
    assert cut(100_000, 16, 1024, 1024) == (16, 6272, 16)
    assert cut(100_000, 8, 32, 1024) == (8, 12_544, 16)
    assert cut(16 * 1024 + 1, 16, 1024, 1024) == (16, 1056, 16)


def test_route_choice_on_synthetic_profiles():
    mixed = [30_000, 2_000, 9_000, 4_000, 50_000, 3_000, 7_000, 2_500]
    # dispatches are expensive: never one per request
    slow_dispatch = dataclasses.replace(BASE, lam=5e-3)
    assert choose(mixed, SMOL, slow_dispatch) in ("split", "workqueue")
    assert predict("per-request", mixed, SMOL, slow_dispatch) > 8 * 5e-3
    # a padded batch that costs nothing wins
    assert choose(mixed, SMOL, dataclasses.replace(BASE, beta_pad=1e15, lam_pad=1e-9)) == "padded"
    # one long request, splitting disabled for workqueue: only `split` uses both threads
    no_split = dataclasses.replace(BASE, min_split_tokens=1 << 30, split_splits=8)
    assert choose([60_000], SMOL, no_split) == "split"
    # many short requests: `split` pays a task and merge per tiny piece, per-request a dispatch
    short = [64] * 32
    busy = dataclasses.replace(BASE, tau=5e-6, split_splits=16)
    assert choose(short, SMOL, busy) == "workqueue"
    # one 1000-token request: 3 head tasks on 2 threads (one thread reads two) vs split's 24
    # balanced pieces; cheap tasks favour split, expensive ones workqueue
    assert choose([1000], SMOL, dataclasses.replace(BASE, tau=1e-9), KERNEL_ROUTES) == "split"
    assert choose([1000], SMOL, dataclasses.replace(BASE, tau=1e-5), KERNEL_ROUTES) != "split"
    # one ~10K-token request: split's 5 ranges are too few pieces to fuse heads (15 one-head
    # tasks), workqueue's 10 fuse them; with one-head tasks measured slower, workqueue wins
    grid = dataclasses.replace(BASE, min_split_tokens=1024, max_splits=16, split_splits=8,
                               batch_invariant=True, tau=1e-8)  # fmt: skip
    assert task_heads(SMOL, 5, 2) == [1, 1, 1] and task_heads(SMOL, 10, 2) == [3]
    slow_one = dataclasses.replace(grid, one_head_scale=1.17)
    assert predict("split", [9784], SMOL, slow_one) > predict("split", [9784], SMOL, grid)
    assert predict("workqueue", [9784], SMOL, slow_one) == predict("workqueue", [9784], SMOL, grid)
    assert choose([9784], SMOL, slow_one, KERNEL_ROUTES) == "workqueue"
    # ... unless every task takes one head anyway (fuse_heads off): the factor does not apply
    unfused = dataclasses.replace(slow_one, fuse_heads=False)
    plain = dataclasses.replace(unfused, one_head_scale=1.0)
    assert predict("split", [9784], SMOL, unfused) == predict("split", [9784], SMOL, plain)
    # a fitted per-route scale moves the choice
    assert choose(mixed, SMOL, dataclasses.replace(BASE, scale_workqueue=0.8)) == "workqueue"
    assert choose(mixed, SMOL, dataclasses.replace(BASE, scale_split=0.8)) == "split"
    # plans are memoized per step and forgotten on request
    assert choose(tuple(mixed), SMOL, BASE) == choose(mixed, SMOL, BASE)
    clear_plans()


def test_lpt_schedule_and_bandwidth_phases():
    rng = random.Random(0)
    for _ in range(300):  # the grouped schedule equals task-by-task LPT
        tasks = {rng.randint(1, 50): rng.randint(1, 9) for _ in range(rng.randint(1, 5))}
        m = rng.randint(1, 5)
        loads = [0] * m
        for size in sorted((s for s, c in tasks.items() for _ in range(c)), reverse=True):
            heapq.heapreplace(loads, loads[0] + size)
        assert lpt_loads(tasks, m) == sorted(loads)
    assert lpt_loads({10: 3}, 2) == [10, 20] and lpt_loads({10: 4}, 2) == [20, 20]
    # 3 equal heads on 2 threads: both stream at beta, then one alone at beta_1
    p = dataclasses.replace(BASE, beta=10.0, beta_1=6.0)
    assert stream_seconds([10, 20], p) == pytest.approx(20 / 10 + 10 / 6)
    assert stream_seconds([10, 10], dataclasses.replace(p, beta=100.0)) == pytest.approx(20 / 12)
    # the route terms: per-request dispatches once per request, tasks = heads x splits
    stream, dispatches, tasks = route_terms("per-request", [5000, 10], SMOL, BASE)
    assert (dispatches, tasks) == (2, 3 * 3 + 3) and stream > 0
    assert route_terms("workqueue", [5000, 10], SMOL, BASE)[1:] == (1, 12)


def test_calibration_fit_recovers_constants():
    # one stream scale: the three kernel routes run the same kernel (calibrate._fit)
    truth = {"lam": 30e-6, "tau": 2e-6, "scale_per_request": 0.97, "scale_split": 0.97,
             "scale_workqueue": 0.97}  # fmt: skip
    rng = random.Random(1)
    rows = []
    for _ in range(60):
        route = rng.choice(KERNEL_ROUTES)
        stream, dispatches, tasks = rng.uniform(1e-4, 0.1), rng.randint(1, 32), rng.randint(3, 400)
        key = "scale_" + route.replace("-", "_")
        t = truth[key] * stream + dispatches * truth["lam"] + tasks * truth["tau"]
        rows.append((route, stream, dispatches, tasks, t))
    fit = calibrate._fit(rows)
    assert fit == pytest.approx(truth, rel=1e-6)
    # a coefficient the data drive below its floor is pinned there, the rest refitted
    rows = [(r, s, d, n, t - n * truth["tau"]) for r, s, d, n, t in rows]
    assert calibrate._fit(rows)["tau"] == calibrate.FLOORS["tau"]
    # per route: a scale each, recovered where the routes differ
    truth |= {"scale_per_request": 0.85, "scale_split": 1.1}
    rows = [(r, s, d, n, truth["scale_" + r.replace("-", "_")] * s + d * truth["lam"]
             + n * truth["tau"]) for r, s, d, n, _ in rows]  # fmt: skip
    assert calibrate._fit(rows, per_route=True) == pytest.approx(truth, rel=1e-6)
    shared = calibrate._fit(rows)
    assert len({shared[k] for k in truth if k.startswith("scale")}) == 1


def _record(route, rounds, seed=0, chosen=None):
    return {"shape": "s", "page_size": 32, "trace": "uniform", "batch": 8, "seed": seed,
            "route": route, "step_ms": min(rounds), "step_rounds_ms": rounds, "limit_ms": 1.0,
            "lengths": [100], "tokens_per_s": 8e3 / min(rounds), "chosen": chosen}  # fmt: skip


def test_calibrate_end_to_end_on_scaled_down_traces(tmp_path):
    """The whole calibration (rates, split grids, fit, the printed checks) on the calibration
    traces scaled to 1/512 (seconds, not the 15 minutes of the real one): every constant
    measured or fitted and in range, the chosen settings from the grids, the profile marked
    calibrated for its page dtype, and it survives its JSON round trip and drives adaptive's
    choice."""
    lines: list[str] = []
    prof = calibrate.calibrate(dtype=torch.float16, ring_bytes=1 << 18, rounds=1,
                               progress=lines.append, scale=1 / 512)  # fmt: skip
    assert prof.calibrated and prof.threads >= 1 and prof.dtype == "float16"
    assert prof.machine == this_machine()
    assert prof.beta > 0 and prof.beta_1 > 0 and prof.beta_pad > 0 and prof.lam_pad > 0
    assert prof.lam >= calibrate.FLOORS["lam"] and prof.tau >= calibrate.FLOORS["tau"]
    scales = {prof.scale(r) for r in KERNEL_ROUTES}
    assert min(scales) >= calibrate.FLOORS["scale"]
    (kept,) = [line for line in lines if line.startswith("stream scales:")]
    assert len(scales) == 1 if "shared" in kept.split("(")[0] else len(scales) == 3
    assert (prof.min_split_tokens, prof.max_splits) in calibrate.WQ_GRID
    assert prof.split_splits in calibrate.SPLIT_GRID
    (heads,) = [line for line in lines if line.startswith("heads per task: ") and "(" in line]
    assert prof.fuse_heads == (heads.split("(")[0].strip() == "heads per task: fused")
    assert prof.one_head_scale >= 1.0 and (prof.fuse_heads or prof.one_head_scale == 1.0)
    for head in ("beta ", "split settings:", "stream scales:", "fit:", "on the calibration cases:",
                 "batch-invariant grid"):  # fmt: skip
        assert sum(line.startswith(head) for line in lines) == 1, head
    assert sum(line.startswith("fit case ") for line in lines) == (
        len(traces.TRACES) * len(calibrate.FIT_BATCHES) * len(calibrate.CAL_SEEDS)
    )
    path = tmp_path / "profile.json"
    prof.save(path)
    assert load_profile(path) == prof
    assert choose([9000, 300, 40000], SMOL, prof) in KERNEL_ROUTES  # padded: not invariant


def test_targets_use_paired_rounds_spreads_and_noise():
    def rows(ad_rounds, wq_rounds):
        recs = []
        for seed in range(3):
            recs += [_record("workqueue", wq_rounds, seed), _record("split", [9.0] * 5, seed),
                     _record("adaptive", ad_rounds, seed, chosen="workqueue")]  # fmt: skip
        (row,) = [r for r in report.targets(recs) if "best fixed" in r["target"]]
        return row

    quiet = rows([5.0, 5.1, 5.0, 5.2, 5.0], [5.0, 5.0, 5.1, 5.0, 5.1])
    assert quiet["median"] == pytest.approx(1.0) and quiet["met"] and quiet["spread"] < 0.03
    # adaptive is 5 % slower in the median round, but the rounds scatter by more: noise
    noisy = rows([5.0] * 5, [4.0, 4.25, 4.75, 5.25, 5.5])
    assert not noisy["met"] and noisy["met_within_noise"]
    # a steady 10 % loss is a loss
    slow = rows([5.5, 5.5, 5.6, 5.5, 5.5], [5.0, 5.0, 5.1, 5.0, 5.0])
    assert not slow["met"] and not slow["met_within_noise"]
    assert "met in 0 of 1 cases strictly" in report.targets_text([slow])


def test_profile_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "p.json"
    BASE.save(path)
    assert load_profile(path) == BASE
    path.write_text(json.dumps({"beta": -1.0}))
    with pytest.raises(PagedInputError, match="beta"):
        load_profile(path)
    path.write_text(json.dumps({"beta": 1e9, "rm_rf": 1}))
    with pytest.raises(PagedInputError, match="unknown"):
        load_profile(path)
    path.write_text("not json")
    with pytest.raises(PagedInputError):
        load_profile(path)
    with pytest.raises(PagedInputError, match="max_splits"):
        MachineProfile(max_splits=0)
    with pytest.raises(PagedInputError, match="part_tokens"):
        MachineProfile(part_tokens=100)


def test_profiles_are_per_page_dtype(tmp_path, monkeypatch):
    """A profile says which page dtype it was calibrated on; the default one is looked up per
    dtype, and one of another dtype (or none where a path is given) is a typed error."""
    monkeypatch.setattr("spectrumkv.paged.cost.PROFILE_DIR", tmp_path)
    assert profile_for("float16") is None  # none calibrated: the caller's defaults
    fp16 = dataclasses.replace(BASE, dtype="float16", beta=3e9)
    fp16.save(default_profile_path("float16"))
    assert default_profile_path(torch.float16).name == "attention-profile-float16.json"
    assert profile_for(torch.float16) == fp16 and profile_for("bfloat16") is None
    with pytest.raises(PagedInputError, match="calibrated on float16 pages, not bfloat16"):
        profile_for(torch.bfloat16, default_profile_path("float16"))
    with pytest.raises(PagedInputError, match="cannot read"):
        profile_for("bfloat16", tmp_path / "missing.json")
    with pytest.raises(PagedInputError, match="no attention profile for float32"):
        profile_for(torch.float32)


def test_a_profile_of_another_machine_is_refused(tmp_path, monkeypatch):
    """A profile records the machine it was calibrated on (CPU model, decode kernel); one from
    another machine is a typed error, one that does not say (older files) is taken."""
    monkeypatch.setattr("spectrumkv.paged.cost.PROFILE_DIR", tmp_path)
    here = dataclasses.replace(BASE, machine=this_machine())
    here.save(default_profile_path("bfloat16"))
    assert profile_for("bfloat16") == here
    elsewhere = dataclasses.replace(BASE, machine="Intel Xeon Platinum 8480+ / amx")
    elsewhere.save(default_profile_path("bfloat16"))
    with pytest.raises(PagedInputError, match="calibrated on 'Intel Xeon Platinum 8480"):
        profile_for("bfloat16")
    BASE.save(default_profile_path("bfloat16"))  # no machine recorded
    assert profile_for(torch.bfloat16) == BASE
    with pytest.raises(PagedInputError, match="machine"):
        MachineProfile(machine=7)
    with pytest.raises(PagedInputError, match="dtype"):
        MachineProfile(dtype="int8")
    old = tmp_path / "old.json"  # written before profiles had a dtype: bf16, as calibrated
    old.write_text(json.dumps({k: v for k, v in dataclasses.asdict(BASE).items() if k != "dtype"}))
    assert profile_for("bfloat16", old) == BASE


def test_traces_are_seeded_and_shaped():
    for name in traces.TRACES:
        a = traces.lengths(name, 16, 7)
        assert a == traces.lengths(name, 16, 7) and a != traces.lengths(name, 16, 8)
        assert len(a) == 16 and min(a) >= 1
    bimodal = traces.lengths("bimodal", 8, 1)
    assert all(n >= 24_600 for n in bimodal[3::4]) and max(bimodal[:3]) <= 12_000
    assert set(traces.lengths("bucketed", 32, 0)) <= {8192, 16384, 32768, 65536}
    assert traces.lengths("uniform", 4, 0, scale=0.001) == [
        max(1, int(n * 0.001)) for n in traces.lengths("uniform", 4, 0)
    ]
    with pytest.raises(PagedInputError):
        traces.lengths("poisson", 4, 0)


def test_trace_file_validation(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"context": 100, "decode": 5}, {"context": 7}]))
    recs = traces.load_trace(f)
    assert traces.file_lengths(recs, 3, 0) in ([100, 7, 100], [7, 100, 7])
    for bad in ([], [{"context": 0}], [{"context": 5, "x": 1}], {"context": 5}, [{"context": "5"}]):
        f.write_text(json.dumps(bad))
        with pytest.raises(PagedInputError):
            traces.load_trace(f)


def test_bench_attention_quick(tmp_path, capsys):
    out, png, trace = tmp_path / "a.json", tmp_path / "a.png", tmp_path / "t.json"
    prof = tmp_path / "p.json"
    BASE.save(prof)
    trace.write_text(json.dumps([{"context": 3000, "decode": 4}, {"context": 40}]))
    argv = ["bench", "attention", "--quick", "--json", str(out), "--plot", str(png),
            "--profile", str(prof)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    records = doc["records"]
    routes = {r["route"] for r in records}
    assert {"per-request", "split", "workqueue", "padded", "adaptive", "sdpa"} <= routes
    keys = {"trace", "batch", "seed", "route", "tokens_per_s", "step_ms", "limit_ms",
            "dispatches_per_step", "max_abs_err"}  # fmt: skip
    for r in records:
        assert keys <= set(r) and r["step_ms"] > 0 and r["limit_ms"] > 0
        assert r["step_ms"] == pytest.approx(min(r["step_rounds_ms"]), rel=1e-3)
        assert r["max_abs_err"] < 2e-3 or r["route"] in ("padded", "sdpa", "vllm")
        if r["route"] == "adaptive":
            assert r["chosen"] in ("per-request", "split", "workqueue", "padded")
            assert r["adaptive_timing"] == "per-step" and r["plan_ms"] > 0
        if r["route"] == "per-request":
            assert r["dispatches_per_step"] == r["batch"]
    assert doc["profile"]["beta"] == BASE.beta and doc["targets"] and doc["complete"]
    assert png.stat().st_size > 1000
    assert "adaptive" in capsys.readouterr().out
    assert main([*argv[:3], "--trace", str(trace), "--json", str(out), "--routes",
                 "workqueue,adaptive", "--profile", str(prof), "--adaptive-timing",
                 "per-layer"]) == 0  # fmt: skip
    assert "adaptive timed: per-layer" in capsys.readouterr().out
    recs = json.loads(out.read_text())["records"]
    assert [r["adaptive_timing"] for r in recs if r["route"] == "adaptive"] == ["per-layer"] * 2
    assert {r["trace"] for r in recs} == {"file"}
    assert all(set(r["lengths"]) <= {150, 2} for r in recs)  # 3000 and 40 at scale 0.05
    capsys.readouterr()
    assert main(["bench", "attention", "--from-json", str(out)]) == 0  # re-render, no run
    assert "adaptive >= 0.97x best fixed: met in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read"):
        main(["bench", "attention", "--from-json", str(trace)])


def test_plan_is_memoized_by_value(monkeypatch):
    import torch

    from spectrumkv.paged import cost, routes

    calls = []
    real = cost.choose
    monkeypatch.setattr(cost, "choose", lambda *a: calls.append(a[0]) or real(*a))
    q, k = torch.zeros(2, 9, 64), torch.zeros(4, 3, 32, 64, dtype=torch.bfloat16)
    lens = torch.tensor([4000, 100], dtype=torch.int32)
    routes.clear_plans()
    first = routes.plan(q, k, lens, None, BASE)
    assert first in KERNEL_ROUTES + ("padded",) and len(calls) == 1
    # the same values (a new tensor, an equal profile): no new plan
    assert routes.plan(q, k, lens.clone(), None, dataclasses.replace(BASE)) == first
    assert len(calls) == 1
    # other lengths, starts (the spans are planned), geometry or profile: planned again
    routes.plan(q, k, torch.tensor([4000, 101], dtype=torch.int32), None, BASE)
    routes.plan(q, k, lens, torch.tensor([0, 50], dtype=torch.int32), BASE)
    assert calls[-1] == [4000, 50]
    routes.plan(q, k.float(), lens, None, BASE)
    routes.plan(q, k, lens, None, dataclasses.replace(BASE, lam=1e-3))
    assert len(calls) == 5
    routes.clear_plans()  # forgets plan's memo and cost.choose's
    routes.plan(q, k, lens, None, BASE)
    assert len(calls) == 6
    with pytest.raises(PagedInputError, match="span is < 1"):
        routes.plan(q, k, lens, torch.tensor([0, 100], dtype=torch.int32), BASE)
    routes.clear_plans()


def test_choice_with_pruning_equals_predicting_every_route():
    from spectrumkv.paged.cost import FIXED_ROUTES, lower_bound

    rng = random.Random(1)
    for _ in range(300):
        lens = [rng.choice([1, 31, 33, 2048, 9000]) if rng.random() < 0.3 else
                rng.randint(1, 40_000) for _ in range(rng.randint(1, 33))]  # fmt: skip
        p = dataclasses.replace(
            BASE, lam=10 ** rng.uniform(-7, -2), tau=10 ** rng.uniform(-9, -4),
            beta_1=BASE.beta * rng.uniform(0.3, 1.2), threads=rng.randint(1, 4),
            scale_per_request=rng.uniform(0.5, 1.5), min_split_tokens=rng.choice([32, 2048]),
        )  # fmt: skip
        for r in KERNEL_ROUTES:
            assert lower_bound(r, lens, SMOL, p) <= predict(r, lens, SMOL, p) * (1 + 1e-12)
        clear_plans()
        want = min(FIXED_ROUTES, key=lambda r: (predict(r, lens, SMOL, p), r == "per-request"))
        assert choose(lens, SMOL, p) == want
        if len(lens) == 1:  # per-request is then the same dispatch: it loses the tie
            q = dataclasses.replace(p, scale_per_request=p.scale_workqueue)
            assert predict("per-request", lens, SMOL, q) == predict("workqueue", lens, SMOL, q)
            assert choose(lens, SMOL, q, ("per-request", "workqueue")) == "workqueue"
    clear_plans()
