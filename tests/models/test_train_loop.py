"""Training loop: Muon/AdamW groups, warmup, EMAs, and exact resume from an exported state."""
import dataclasses

import numpy as np
import pytest
import torch

from models.generator.optim import build_optimizers, param_groups
from models.generator.train_loop import LevelData, train_generator
from models.generator.train_state import export_state
from specs import objective, optim, tiny_data, tiny_model
from storage.checkpoints import load_train_state, save_train_state

pytestmark = pytest.mark.usefixtures("single_thread")   # tests/models/conftest.py


def test_a_batch_is_the_levels_canvases_of_its_rows_as_a_whole_set_read_would_give():
    """LevelData.batch builds the canvases of the rows it is given; they equal the rows of canvases built
    over the whole set (float32, normalised as load_latents did before batches were built on the device)."""
    from models.hierarchy.reference import region_canvas

    data = tiny_data()
    whole = (data.tokens.float() - data.mean) / data.std
    index = torch.tensor([3, 0, 7, 7])
    target, cond, label, ids = data.batch(index, "cpu")
    assert torch.equal(target, region_canvas(whole, data.target_ids)[index])
    assert torch.equal(cond, region_canvas(whole, data.cond_ids)[index])
    assert torch.equal(label, data.label[index]) and torch.equal(ids, data.target_ids[index])
    last = LevelData(data.tokens, data.mean, data.std, data.label, None, data.cond_ids)   # the latent itself
    target, _, _, ids = last.batch(index, "cpu")
    assert torch.equal(target, whole[index]) and ids is None
    first = LevelData(data.tokens, data.mean, data.std, data.label, data.target_ids, None)   # level 0: no condition
    assert not first.batch(index, "cpu")[1].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned copies need CUDA (runs on the GPU machine)")
def test_latents_left_on_the_host_give_the_same_batches_without_waiting_for_the_gpu(monkeypatch):
    """When the latents do not fit on the GPU (resident's share), the rest moves and the latents are gathered
    through two pinned buffers in turn: the batches equal the resident ones, and no copy synchronises (a
    copy from pageable memory drains the stream's queue at every micro-batch)."""
    import models.generator.train_loop as loop

    data = tiny_data(n=40)
    [on_gpu] = loop.resident([data], "cuda")
    monkeypatch.setattr(loop, "DEVICE_RESIDENT_SHARE", 0.0)
    [on_host] = loop.resident([data], "cuda")
    assert on_gpu.host_tokens is None and on_gpu.tokens.is_cuda
    assert on_host.tokens.device.type == "cpu" and on_host.host_tokens is not None
    assert on_host.label.is_cuda and on_host.target_ids.is_cuda and on_host.mean.is_cuda
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(40, (n,), generator=g) for n in (8, 8, 5, 8, 12)]   # the buffers grow once
    for index in indices:
        for mine, expected in zip(on_host.batch(index, "cuda"), on_gpu.batch(index.cuda(), "cuda")):
            assert torch.equal(mine, expected)
    # Two more micro-batches behind about 0.2 s of queued work, as a step's kernels are queued ahead: each
    # buffer's last copy has landed, so neither gather may wait for that work. A copy from pageable memory
    # may (the driver stages it), which torch's sync check does not see: the queue must still be busy after.
    slow = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            slow = slow @ slow / 90.5
        queued = torch.cuda.Event()
        queued.record()
        got = [on_host.batch(index, "cuda") for index in indices[:2]]
        still_busy = not queued.query()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert still_busy
    for index, batch in zip(indices, got):
        for mine, expected in zip(batch, on_gpu.batch(index.cuda(), "cuda")):
            assert torch.equal(mine, expected)
    # The copy itself overtakes queued work (a stream of its own): on the compute stream it waited for all of
    # it, the cores idle meanwhile. Only what uses the rows waits for the copy.
    torch.cuda.synchronize()
    for _ in range(12):
        slow = slow @ slow / 90.5
    queued = torch.cuda.Event()
    queued.record()
    rows = on_host.host_tokens.to_device(indices[0], "cuda")
    landed = on_host.host_tokens.buffers[1 - on_host.host_tokens.turn][1]
    landed.synchronize()
    assert not queued.query()
    assert torch.equal(rows, data.tokens[indices[0]].cuda())


class Stop(Exception):
    pass


def test_muon_gets_every_linear_weight_and_adam_the_rest():
    """optax's default split on the reference's layout: its Dense kernels are the 2-D leaves (tables,
    tokens, norms and biases are not); tests/models/test_muon.py checks the updates themselves."""
    model = tiny_model()
    muon, adam = param_groups(model, "muon")
    muon_names, adam_names = {n for n, _ in muon}, {n for n, _ in adam}
    assert muon_names and not muon_names & adam_names
    assert muon_names | adam_names == {n for n, _ in model.named_parameters()}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert muon_names == linears
    assert {"trunk.0.attn.qkv.weight", "x_blocks.0.mlp.2.weight", "fuse.weight", "h_embed.0.weight",
            "x_final.linear.weight", "v_final.modulation.1.weight"} <= muon_names
    assert {"class_embed.weight", "level_embed.weight", "trunk.0.attn.qkv.bias"} <= adam_names
    optimizers, _ = build_optimizers(model, optim(optimizer="muon"))
    assert [type(o).__name__ for o in optimizers] == ["ReferenceMuon"]
    assert param_groups(model, "adamw")[0] == []


def test_warmup_is_linear_then_flat():
    model = tiny_model()
    optimizers, schedules = build_optimizers(model, optim(lr=1e-3, warmup_steps=4))
    lrs = []
    for _ in range(6):
        lrs.append(optimizers[0].param_groups[0]["lr"])
        optimizers[0].step()
        schedules[0].step()
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_ema_copies_follow_their_decays():
    cfg = optim(steps=3, batch_size=4, ema_decays=[0.0, 0.5], ema_halflives_kimg=[], warmup_steps=1)
    state = train_generator(tiny_model(), tiny_data(), 1, objective(), cfg, "cpu")
    model, instant, half = state.model, state.ema(0.0), state.ema(0.5)
    for p, p0 in zip(model.parameters(), instant.parameters()):
        assert torch.equal(p, p0)   # decay 0: the EMA is the model
    start = tiny_model()             # the same init the run started from
    moved = [float((h - s).detach().abs().max()) for h, s in zip(half.parameters(), start.parameters())]
    assert max(moved) > 0
    assert any(not torch.equal(h, p) for h, p in zip(half.parameters(), model.parameters()))
    assert set(state.history) >= {"loss", "loss_u", "loss_v", "loss_region", "grad_norm"}
    assert len(state.history["loss"]) == 3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, optimizer):
    cfg = optim(steps=6, batch_size=4, optimizer=optimizer, ema_decays=[0.9, 0.99], ema_halflives_kimg=[],
                warmup_steps=3, checkpoint_every=2, seed=3)
    mean_flow = objective(label_dropout=0.3)
    data = tiny_data()
    unbroken = export_state(train_generator(tiny_model(), data, 1, mean_flow, cfg, "cpu"))

    def kill_after_step_4(state):
        tensors, meta = export_state(state)
        save_train_state(tmp_path, "generator", state.step, tensors, meta)
        if state.step == 4:
            raise Stop

    with pytest.raises(Stop):
        train_generator(tiny_model(), data, 1, mean_flow, cfg, "cpu", on_checkpoint=kill_after_step_4)
    torch.manual_seed(12345)          # disturb the global RNG: resume must restore it
    np.random.seed(7)
    saved = load_train_state(tmp_path, "generator")
    assert saved[1]["step"] == 4 and len(list(tmp_path.glob("generator-state-*.safetensors"))) == 1
    fresh = tiny_model(seed=99)      # a different init: every weight must come from the snapshot
    resumed = export_state(train_generator(fresh, data, 1, mean_flow, cfg, "cpu", resume=saved))

    tensors, meta = unbroken
    assert set(tensors) == set(resumed[0]) and meta["step"] == resumed[1]["step"] == 6
    different = [name for name in tensors if not torch.equal(tensors[name], resumed[0][name])]
    assert different == []
    assert any(name.startswith("state/optimizers") for name in tensors)
    assert {f"ema/{d!r}/fuse.weight" for d in (0.9, 0.99)} <= set(tensors)
    assert any(name.startswith("state/global_rng") for name in tensors)   # torch + numpy states, compared above
    # optimiser hyper-parameters and schedules; Python's global RNG is compared at the restore instead:
    # after a Prefect flow has run in this process (earlier tests), its server threads draw from it
    assert without_python_rng(meta["tree"]) == without_python_rng(resumed[1]["tree"])


def without_python_rng(tree):
    """An exported state's JSON tree without global_rng's "python" entry."""
    if isinstance(tree, dict) and "__dict__" in tree:
        return {"__dict__": [[key, without_python_rng(value)] for key, value in tree["__dict__"] if key != "python"]}
    return tree


def test_import_restores_pythons_global_rng():
    """What the end-of-run comparison above leaves to this test: import_state sets Python's RNG back."""
    import random

    from models.generator.train_state import import_state

    state = train_generator(tiny_model(), tiny_data(), 1, objective(),
                            optim(steps=1, batch_size=4, ema_decays=[0.999], ema_halflives_kimg=[]), "cpu")
    tensors, meta = export_state(state)
    expected = [random.random() for _ in range(3)]
    import_state(state, tensors, meta)
    assert [random.random() for _ in range(3)] == expected


def test_compile_settings_reach_inductor_only_inside_the_loop_and_only_with_compile():
    """generator.compile / compile_tuning -> OptimConfig -> inductor's settings while the training loop's
    steps (and so their compiles) run; the process-wide settings are left as they were."""
    import torch._inductor.config as inductor

    from models.generator.train_loop import compile_settings
    from storage.config import load_config
    from tasks.plan import generator_optim

    tuned = generator_optim(load_config("configs/tiny.yaml", ["generator.compile=true",
                                                              "generator.compile_tuning=true"]), seed=0)
    assert tuned.compile and tuned.compile_tuning

    def current():
        return inductor.coordinate_descent_tuning, inductor.triton.multi_kernel, inductor.fx_graph_cache

    before = current()
    with compile_settings(tuned, "cuda"):
        assert current() == (True, 1, False)   # multi-kernel modules do not survive the FX graph cache
    with compile_settings(optim(compile=True), "cuda:1"):   # multi-kernel comes with compile alone
        assert current() == (False, 1, False)
    with compile_settings(tuned, "cpu"):   # C++ kernels: no multi-kernel, the cache stays
        assert current() == (True, before[1], before[2])
    with compile_settings(optim(compile=False, compile_tuning=True), "cuda"):   # nothing compiled, nothing tuned
        assert current() == (False, before[1], before[2])
    assert current() == before

    seen = []
    train_generator(tiny_model(), tiny_data(), 1, objective(), optim(steps=1, batch_size=4, compile_tuning=True,
                    ema_decays=[0.999], ema_halflives_kimg=[]), "cpu",
                    on_step=lambda *_: seen.append(inductor.coordinate_descent_tuning))
    assert seen == [False]   # compile off in this run


def test_edm_ema_follows_the_reference_half_life_with_ramp_up():
    """utils/ema_util.py of the reference written out: its k-th update (train.py passes the new step k)
    has half-life min(500 kimg, 0.05 x 1024 k images), decay 0.5 ** (1024 / half-life), whatever the
    batch; so a short run's EMA holds recent weights, not the random init."""
    from models.generator.train_state import EMA

    halflife_kimg = 500.0
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, halflife_kimg=halflife_kimg, rampup=0.05)
    assert ema.name == "edm500kimg"
    shadow = [p.detach().double() for p in model.parameters()]   # the recursion in float64
    generator = torch.Generator().manual_seed(0)
    for k in range(1, 301):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        ema.update(model, k)
        beta = 0.5 ** (1024 / max(min(halflife_kimg * 1000, k * 1024 * 0.05), 1e-8))
        shadow = [beta * s + (1 - beta) * p.detach().double() for s, p in zip(shadow, model.parameters())]
    # float32 lerp rounds by <= 2^-24 x |value| (values < 5) a step; the average contracts each error by
    # beta >= 0.5 ** (1 / 15), so the float32 EMA stays within 22 x 3e-7 = 7e-6 of the float64 recursion.
    for got, want in zip(ema.shadow.parameters(), shadow):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    assert ema.beta(10) == pytest.approx(0.25, abs=1e-12)        # issue 30: the old step k - 1 gave 0.2143
    assert ema.beta(1) == 0.5 ** 20                                 # the first update: almost a copy
    assert ema.beta(10**9) == 0.5 ** (1024 / 500_000)               # past the ramp: the full half-life
    const = EMA(model, decay=0.99)
    assert const.name == "0.99" and const.beta(1) == 0.99


def test_the_loop_hands_the_ema_its_new_step():
    """Update k of a training run moves the EDM EMA by decay 0.5 ** (1 / (0.05 k)) (the ramp), read from
    the model and EMA weights at each snapshot: k = 10 keeps 0.25 of the EMA, where step k - 1 kept 0.2143."""
    seen = {}

    def grab(state):
        seen[state.step] = ([p.detach().clone() for p in state.model.parameters()],
                            [p.detach().clone() for p in state.ema("edm500kimg").parameters()])

    cfg = optim(steps=11, batch_size=4, lr=1e-2, ema_decays=[], ema_halflives_kimg=[500.0], checkpoint_every=1,
                warmup_steps=1)   # a large rate: weights far apart, so a wrong decay shows well above rounding
    train_generator(tiny_model(), tiny_data(), 1, objective(), cfg, "cpu", on_checkpoint=grab)
    for k in (2, 5, 10):
        (_, before), (model, after) = seen[k - 1], seen[k]
        beta = 0.5 ** (1 / (0.05 * k))
        for b, m, a in zip(before, model, after):
            torch.testing.assert_close(a, beta * b + (1 - beta) * m, atol=1e-6, rtol=1e-5)
    assert 0.5 ** (1 / (0.05 * 10)) == 0.25


def test_a_diverged_run_stops_at_the_next_read_of_its_flag_and_snapshots_only_finite_weights():
    """lr 1e3 makes the loss NaN at update 4 (this seed). With snapshots every 2 steps the flag is read
    before each: the snapshot of step 2 is taken, none after, and the error names update 4. Without
    snapshots the flag is read every CHECK_EVERY steps: the run stops there, not at its 100 steps."""
    from models.nonfinite import CHECK_EVERY, NonFiniteTraining

    snapshots, seen = [], []

    def keep(state):
        snapshots.append([t.clone() for t in state.model.state_dict().values()])

    cfg = optim(steps=100, batch_size=4, lr=1e3, checkpoint_every=2, ema_decays=[], ema_halflives_kimg=[500.0])
    with pytest.raises(NonFiniteTraining, match=r"non-finite loss at update 4: loss nan") as raised:
        train_generator(tiny_model(), tiny_data(), 1, objective(), cfg, "cpu", on_checkpoint=keep)
    assert raised.value.step == 4 and len(snapshots) == 1
    assert all(torch.isfinite(t).all() for t in snapshots[0])
    with pytest.raises(NonFiniteTraining, match="update 4"):
        train_generator(tiny_model(), tiny_data(), 1, objective(), dataclasses.replace(cfg, checkpoint_every=0),
                        "cpu", on_step=lambda step, stats: seen.append(step))
    assert len(seen) == CHECK_EVERY - 1 < 100   # read after update CHECK_EVERY, before its on_step


def test_the_watch_names_the_first_bad_update_and_looks_at_the_weights_when_asked():
    """A finite loss and gradient can still step the weights to infinity: a check given the weights (the
    loop's at snapshots and at the end) counts them too."""
    from models.nonfinite import DivergenceWatch, NonFiniteTraining

    watch = DivergenceWatch("cpu")
    for loss in (1.0, 2.0):
        watch.observe(torch.tensor(loss), torch.tensor(0.5))
    watch.check([torch.ones(3)])
    with pytest.raises(NonFiniteTraining, match=r"2 non-finite weight values after update 2"):
        watch.check([torch.ones(3), torch.tensor([1.0, float("inf"), float("nan")])])
    watch.observe(torch.tensor(3.0), torch.tensor(float("inf")))      # update 3: the gradient
    watch.observe(torch.tensor(float("nan")), torch.tensor(1.0))      # update 4: the loss; the first is kept
    with pytest.raises(NonFiniteTraining, match=r"non-finite gradient norm at update 3: loss 3.0, gradient norm inf"):
        watch.check()


def test_a_gradient_that_vanishes_above_a_non_zero_loss_is_divergence_but_a_perfect_fit_is_not():
    """Finite divergence: weights thrown far enough saturate the output and every gradient is exactly zero
    (decoder.lr 1e6 on configs/tiny.yaml). A zero loss with a zero gradient is a fit, not that."""
    from models.nonfinite import DivergenceWatch, NonFiniteTraining

    fitted = DivergenceWatch("cpu")
    fitted.observe(torch.tensor(0.0), torch.tensor(0.0))
    fitted.check()
    watch = DivergenceWatch("cpu")
    watch.observe(torch.tensor(0.3), torch.tensor(0.03))
    watch.observe(torch.tensor(0.87), torch.tensor(0.0))
    watch.observe(torch.tensor(float("nan")), torch.tensor(0.0))   # the first is kept
    with pytest.raises(NonFiniteTraining, match=r"the gradient vanished at update 2: loss 0.87\d*, gradient norm "
                                                r"0.0 \(every gradient exactly zero") as raised:
        watch.check()
    assert raised.value.step == 2


def test_stats_reach_the_host_one_step_late_and_every_step_is_reported_in_order():
    """LaggedStats: step k's stats are read at the end of step k + 1 (no sync between steps); the loop
    still reports every step once, in order, and its history holds them all, the last one included."""
    from models.generator.train_loop import LaggedStats

    lagged = LaggedStats()
    assert lagged.push(0, {"loss": torch.tensor(1.5)}) is None
    assert lagged.push(1, {"loss": torch.tensor(2.5)}) == (0, {"loss": 1.5})
    assert lagged.pop() == (1, {"loss": 2.5}) and lagged.pop() is None

    seen = []
    cfg = optim(steps=7, batch_size=4, checkpoint_every=3, ema_decays=[], ema_halflives_kimg=[500.0])
    histories = []
    state = train_generator(tiny_model(), tiny_data(), 1, objective(), cfg, "cpu",
                            on_step=lambda step, stats: seen.append((step, stats["loss"])),
                            on_checkpoint=lambda s: histories.append((s.step, len(s.history["loss"]))))
    assert [step for step, _ in seen] == list(range(7))
    assert state.history["loss"] == [loss for _, loss in seen]
    assert histories == [(3, 3), (6, 6)]   # a snapshot's history reaches its own step
