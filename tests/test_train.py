"""Training mechanics (qvlm.train): one optimiser step by hand, stats as floats once per step, every
RNG state, the main-process write hook, checkpoints that survive a kill at any instant, the data
fingerprint, divergence, and a toy online loop (rollout -> targets -> epochs of minibatches) that
resumes bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from qvlm.algos.ilql import ILQLConfig, train_ilql
from qvlm.algos.value import ValueConfig, train_value
from qvlm.errors import QVLMError
from qvlm.losses import value_regression_loss
from qvlm.mdp import EncodedSample, Sample, TokenBatch
from qvlm.model import QVModel
from qvlm.returns import monte_carlo_returns
from qvlm.train.checkpoint import (
    data_fingerprint,
    has_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_run,
)
from qvlm.train.distributed import is_main_process
from qvlm.train.loop import check_finite, train_loop
from qvlm.train.metrics import MetricsLogger, stats_to_floats
from qvlm.train.optim import make_optimizer, optimizer_step
from qvlm.train.rng import rng_state, set_rng_state, set_seed
from qvlm.trunk import TrunkConfig
from tests.helpers import tiny_model

PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl"]


# ---------------------------------------------------------------- one optimiser step, by hand


def test_optimizer_step_clips_steps_and_schedules():
    # loss = 0.5 |w|^2 at w = (3, 4): grad = w = (3, 4), norm 5. Clipped to 1: (0.6, 0.8).
    # SGD lr 1: w = (3 - 0.6, 4 - 0.8) = (2.4, 3.2). StepLR(gamma 0.5) then halves the lr.
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    norm = optimizer_step(0.5 * (w**2).sum(), opt, grad_clip=1.0, scheduler=sched)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and not norm.requires_grad
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([2.4, 3.2]))
    assert opt.param_groups[0]["lr"] == 0.5
    # no clipping, lr 0.5 now: grad (2.4, 3.2), norm 4; w = (2.4 - 1.2, 3.2 - 1.6) = (1.2, 1.6)
    norm = optimizer_step(0.5 * (w**2).sum(), opt, grad_clip=0.0)
    assert norm.item() == pytest.approx(4.0)
    torch.testing.assert_close(w.detach(), torch.tensor([1.2, 1.6]))
    assert opt.param_groups[0]["lr"] == 0.5  # no scheduler given: the lr stays


def test_optimizer_step_zeroes_previous_gradients():
    # a stale gradient (100, 100) must not add to this step's (1, 1): loss = w1 + w2
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.full((2,), 100.0)
    opt = torch.optim.SGD([w], lr=0.1)
    optimizer_step(w.sum(), opt)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, -0.1]))


# ---------------------------------------------------------------- stats as floats


def test_stats_to_floats_keeps_order_and_is_exact(monkeypatch):
    calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real_tolist(self))
    stats = {
        "losses/q": torch.tensor(0.1, dtype=torch.float32),  # float32 0.1 = 0.100000001490116...
        "charts/n": 3,
        "values/v": torch.tensor(0.1, dtype=torch.bfloat16),  # bfloat16 0.1 = 0.10009765625
        "losses/v": torch.tensor(-2.5, dtype=torch.float64),
    }
    floats = stats_to_floats(stats)
    assert list(floats) == ["losses/q", "charts/n", "values/v", "losses/v"]
    assert floats == {"losses/q": float(np.float32(0.1)), "charts/n": 3.0, "values/v": 0.10009765625, "losses/v": -2.5}
    assert all(type(v) is float for v in floats.values())
    assert len(calls) == 1  # one read for all tensors: one device sync per step
    assert stats_to_floats({"a": 1}) == {"a": 1.0}


def test_check_finite_names_step_and_terms():
    check_finite(3, 0.5, {"losses/q": 0.25, "values/v": float("nan"), "charts/grad_norm": 1.0})  # values/* ignored
    with pytest.raises(QVLMError, match=r"diverged at step 7: objective=nan, losses/q=inf, losses/v=0\.5"):
        check_finite(7, float("nan"), {"losses/q": float("inf"), "losses/v": 0.5})
    with pytest.raises(QVLMError, match="charts/grad_norm=inf"):
        check_finite(0, 1.0, {"charts/grad_norm": float("inf")})


# ---------------------------------------------------------------- RNG states, main process


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    set_seed(5)
    _draws()
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    set_seed(99)  # move every generator elsewhere
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_set_seed_seeds_python_numpy_torch():
    set_seed(3)
    first = _draws()
    set_seed(3)
    assert _draws() == first


def test_is_main_process_honours_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_other_ranks_write_nothing(tmp_path, monkeypatch, tiny):
    model, _ = tiny
    qv = QVModel.from_trunk(model, with_q=False)
    opt = make_optimizer(qv, 1e-3, 1e-5, 0.0)
    monkeypatch.setenv("RANK", "1")
    assert save_checkpoint(tmp_path / "run", qv, opt, 1, ILQLConfig()) is None
    save_run(tmp_path / "run", qv, ILQLConfig())
    logger = MetricsLogger(tmp_path / "run")
    logger.log(0, {"losses/v": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert logger.history == {"losses/v": [(0, 1.0)]}


# ---------------------------------------------------------------- checkpoints


def _heads(qv):
    return {k: v.clone() for k, v in qv.heads.state_dict().items()}


def _assert_heads(qv, expected):
    for k, v in qv.heads.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


@dataclass
class Cfg:
    lr: float = 1e-2
    checkpoint_every: int = 1


def _ckpt_setup(tiny):
    model, _ = tiny
    qv = QVModel.from_trunk(model, with_q=False)
    opt = make_optimizer(qv, 1e-2, 1e-5, 0.0)
    return qv, opt


def _perturb(qv, value):
    with torch.no_grad():
        for p in qv.heads.parameters():
            p.fill_(value)


def _entries(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def test_checkpoint_layout_and_round_trip(tmp_path, tiny):
    qv, opt = _ckpt_setup(tiny)
    run = tmp_path / "run"
    assert not has_checkpoint(run)
    _perturb(qv, 0.25)
    saved = _heads(qv)
    set_seed(1)
    save_checkpoint(run, qv, opt, 4, Cfg(), data_position={"epoch": 1, "k": 2}, fingerprint="abc", extra={"x": [1, 2]})
    after_save = _draws()
    assert _entries(run) == ["latest", "step-00000004"]
    assert (run / "checkpoint" / "latest").read_text() == "step-00000004\n"
    _perturb(qv, 9.0)
    set_seed(2)
    resumed = load_checkpoint(run, qv, opt, Cfg(), fingerprint="abc")
    assert (resumed.step, resumed.data_position, resumed.extra) == (4, {"epoch": 1, "k": 2}, {"x": [1, 2]})
    _assert_heads(qv, saved)
    assert _draws() == after_save  # every RNG continues where the save left it
    # saving the same step again (a resumed run that is already complete) takes a fresh name
    save_checkpoint(run, qv, opt, 4, Cfg())
    assert _entries(run) == ["latest", "step-00000004.1"]
    save_checkpoint(run, qv, opt, 6, Cfg())
    assert _entries(run) == ["latest", "step-00000006"]


def test_load_refuses_missing_legacy_and_other_data(tmp_path, tiny):
    qv, opt = _ckpt_setup(tiny)
    with pytest.raises(QVLMError, match="no checkpoint to resume"):
        load_checkpoint(tmp_path, qv, opt, Cfg())
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(QVLMError, match="older qvlm"):
        load_checkpoint(tmp_path, qv, opt, Cfg())
    save_checkpoint(tmp_path / "b", qv, opt, 1, Cfg(), fingerprint="f" * 64)
    with pytest.raises(QVLMError, match="other data"):
        load_checkpoint(tmp_path / "b", qv, opt, Cfg(), fingerprint="0" * 64)
    with pytest.raises(QVLMError, match="lr differ"):
        load_checkpoint(tmp_path / "b", qv, opt, Cfg(lr=1.0))
    with pytest.raises(QVLMError, match=r"extra state extra\['f'\] is a builtin_function"):
        save_checkpoint(tmp_path / "c", qv, opt, 1, Cfg(), extra={"f": len})


class Killed(Exception):
    """Stands for the process being killed at this instant."""


def _kill_at(monkeypatch, module_attr: str, n: int):
    """Make the n-th call (1-based) of ``os.replace`` / ``shutil.rmtree`` raise :class:`Killed`."""
    owner, name = (os, "replace") if module_attr == "os.replace" else (shutil, "rmtree")
    real = getattr(owner, name)
    count = [0]

    def fake(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            raise Killed(f"{module_attr} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fake)


@pytest.mark.parametrize("call", ["os.replace", "shutil.rmtree"])
def test_kill_at_every_instant_of_a_save_resumes(tmp_path, tiny, monkeypatch, call):
    """Kill the save of step 4 at each rename / delete in turn: a resume then reads step 2 or
    step 4 (complete either way), and the next save succeeds and leaves one clean checkpoint."""
    qv, opt = _ckpt_setup(tiny)
    n, outcomes = 0, set()
    while True:
        n += 1
        run = tmp_path / f"{call}-{n}"
        _perturb(qv, 2.0)
        save_checkpoint(run, qv, opt, 2, Cfg())
        save_checkpoint(run, qv, opt, 3, Cfg())  # so that the killed save has an older one to delete
        _perturb(qv, 4.0)
        _kill_at(monkeypatch, call, n)
        try:
            save_checkpoint(run, qv, opt, 4, Cfg())
            killed = False
        except Killed:
            killed = True
        monkeypatch.undo()
        _perturb(qv, -1.0)
        step = load_checkpoint(run, qv, opt, Cfg()).step
        outcomes.add(step)
        assert step in (3, 4)
        _assert_heads(qv, {k: torch.full_like(v, 2.0 if step == 3 else 4.0) for k, v in _heads(qv).items()})
        save_checkpoint(run, qv, opt, 5, Cfg())  # no "Directory not empty", whatever was left
        assert _entries(run) == ["latest", "step-00000005"], n
        assert load_checkpoint(run, qv, opt, Cfg()).step == 5
        if not killed:
            break
    # os.replace: the kill fell before the pointer moved (resume at 3) and after it (at 4);
    # shutil.rmtree only runs once the new checkpoint is in place
    assert outcomes == ({3, 4} if call == "os.replace" else {4}) and n > (6 if call == "os.replace" else 1)


def test_first_save_killed_before_its_pointer_still_resumes(tmp_path, tiny, monkeypatch):
    qv, opt = _ckpt_setup(tiny)
    real = os.replace

    def no_pointer(src, dst, *a, **k):  # the folder is renamed into place; the pointer never is
        if os.path.basename(dst) == "latest":
            raise Killed
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", no_pointer)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, qv, opt, 7, Cfg())
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-00000007"
    assert load_checkpoint(tmp_path, qv, opt, Cfg()).step == 7


def test_data_fingerprint_by_hand():
    items = [EncodedSample([1, 2], [3], [0.5], True, False)]
    text = b"[[[1,2],[3],[0.5],true,false]]"
    assert data_fingerprint(items) == hashlib.sha256(text).hexdigest()
    assert data_fingerprint([EncodedSample([1, 2], [3], [0.25], True, False)]) != data_fingerprint(items)
    assert data_fingerprint([EncodedSample([1, 2], [4], [0.5], True, False)]) != data_fingerprint(items)


# ---------------------------------------------------------------- the offline loop


def _ilql_run(run_dir, samples, cfg, resume=False, callbacks=()):
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model)
    train_ilql(qv, tok, samples, cfg, run_dir=run_dir, resume=resume, callbacks=callbacks)
    return qv


def test_resume_refuses_other_data(tmp_path):
    cfg = ILQLConfig(steps=2, batch_size=4, max_length=32, progress=False)
    samples = [Sample(p, p[::-1], 1.0) for p in PROMPTS]
    _ilql_run(tmp_path, samples, cfg)
    other = samples[:-1] + [Sample(PROMPTS[-1], PROMPTS[-1][::-1], 0.0)]  # one reward changed
    with pytest.raises(QVLMError, match="other data"):
        _ilql_run(tmp_path, other, cfg, resume=True)
    _ilql_run(tmp_path, samples, cfg, resume=True)  # the same data resumes


def test_a_checkpoint_written_before_a_config_field_existed_resumes_at_its_default(tmp_path):
    """A field added since a checkpoint was written counts as saved at its default (an older checkpoint
    without target_sync_every resumes as 1); one that differs from the run is refused; a field retired
    since (fsdp moved to the trunk config, issue 21) is not compared."""
    cfg = ILQLConfig(steps=2, batch_size=4, max_length=32, progress=False)
    samples = [Sample(p, p[::-1], 1.0) for p in PROMPTS]
    _ilql_run(tmp_path, samples, cfg)
    config_file = latest_checkpoint(tmp_path) / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "target_sync_every"}, "fsdp": False}))
    _ilql_run(tmp_path, samples, cfg, resume=True)
    config_file = latest_checkpoint(tmp_path) / "config.json"
    config_file.write_text(json.dumps({**saved, "target_sync_every": 5}))
    with pytest.raises(QVLMError, match=r"different config \(target_sync_every differ"):
        _ilql_run(tmp_path, samples, cfg, resume=True)


def test_divergence_stops_the_run_and_writes_no_final_heads(tmp_path):
    # a reward of 1e30 squares to inf in float32: the TD loss is infinite at the first step
    samples = [Sample(p, p[::-1], 1e30) for p in PROMPTS]
    cfg = ILQLConfig(steps=4, batch_size=4, max_length=32, progress=False)
    with pytest.raises(QVLMError, match=r"diverged at step 0: objective=(inf|nan).*losses/q=inf"):
        _ilql_run(tmp_path, samples, cfg)
    assert not (tmp_path / "heads.safetensors").exists() and not has_checkpoint(tmp_path)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model, with_q=False)
    cfg = ILQLConfig(steps=6, batch_size=2, max_length=32, checkpoint_every=2, progress=False)
    saved, calls = {}, []

    def loss_fn(m, batch: TokenBatch):
        v = m.heads.values(m.features(batch)[0])
        loss, stats = value_regression_loss(v, batch.rewards, batch.response_mask)
        calls.append(1)
        if len(calls) == 4:  # the 4th step (step 3) blows up
            loss = loss * float("nan")
        return loss, {"losses/v": stats["loss"]}

    def remember(step, stats):
        if step == 1:
            saved.update(_heads(qv))

    samples = [Sample(p, p[::-1], 1.0) for p in PROMPTS]
    with pytest.raises(QVLMError, match="diverged at step 3"):
        train_loop(qv, tok, samples, cfg, loss_fn, "toy", tmp_path, callbacks=[remember])
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert not (tmp_path / "heads.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the diverged step is not logged
    resumed = QVModel.from_trunk(model, with_q=False)
    load_checkpoint(tmp_path, resumed, make_optimizer(resumed, 1e-3, 1e-5, 0.0), cfg)
    _assert_heads(resumed, saved)
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_train_loop_moves_each_batch_to_the_model_device_once(tiny, monkeypatch):
    model, tok = tiny
    qv = QVModel.from_trunk(model, with_q=False)
    moves = []
    real_to = TokenBatch.to
    monkeypatch.setattr(
        TokenBatch, "to", lambda self, device: moves.append(torch.device(device)) or real_to(self, device)
    )
    cfg = ILQLConfig(steps=3, batch_size=2, max_length=32, progress=False)

    def loss_fn(m, batch):
        v = m.heads.values(m.features(batch)[0])
        return value_regression_loss(v, batch.rewards, batch.response_mask)

    history = train_loop(qv, tok, [Sample(p, p[::-1], 1.0) for p in PROMPTS], cfg, loss_fn, "toy")
    assert moves and all(d == torch.device("cpu") for d in moves)
    assert moves.count(torch.device("cpu")) >= 3  # at least once per step
    assert [s for s, _ in history["loss"]] == [0, 1, 2] and "charts/grad_norm" in history


def test_token_batch_to_moves_every_field():
    b = TokenBatch(*(torch.zeros(1, 2, dtype=torch.long) for _ in range(8)), index=torch.tensor([4]))
    moved = b.to("cpu")
    assert isinstance(moved, TokenBatch) and moved.index.tolist() == [4]
    assert all(v.device == torch.device("cpu") for v in moved.__dict__.values())


# ---------------------------------------------------------------- a toy online trainer, resumed


@dataclass
class ToyOnline:
    iterations: int = 4
    rollout: int = 12  # samples per rollout
    minibatch: int = 4
    epochs: int = 2
    lr: float = 1e-2
    seed: int = 0


def toy_online(run_dir, cfg: ToyOnline, resume=False, kill_at: tuple[int, int] | None = None):
    """rollout (torch + numpy RNG) -> targets -> ``epochs`` x shuffled minibatches (python RNG),
    checkpoint after each iteration; ``kill_at=(iteration, minibatch)`` raises there."""
    model, _ = tiny_model("llama", seed=0)
    set_seed(cfg.seed)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), with_q=False)
    optimizer = make_optimizer(qv, cfg.lr, 1e-5, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (1.0 + 0.1 * k))
    start, extra = 0, {"baseline": torch.zeros(())}
    if resume:
        resumed = load_checkpoint(run_dir, qv, optimizer, cfg, scheduler=scheduler)
        start, extra = resumed.data_position["iteration"], resumed.extra
    logger = MetricsLogger(run_dir, resume_step=start)
    H, T = qv.heads.config.hidden_size, 3
    mask, done = torch.ones(cfg.rollout, T), torch.zeros(cfg.rollout, T)
    done[:, -1] = 1.0
    for it in range(start, cfg.iterations):
        # rollout
        h = torch.randn(cfg.rollout, T, H)
        rewards = torch.from_numpy(np.random.rand(cfg.rollout, T)).float()
        # targets
        returns = monte_carlo_returns(rewards, done, 0.9, mask)
        baseline = 0.9 * extra["baseline"] + 0.1 * returns.mean()
        # optimise
        k = 0
        for _ in range(cfg.epochs):
            order = list(range(cfg.rollout))
            random.shuffle(order)
            for i in range(0, cfg.rollout, cfg.minibatch):
                if kill_at == (it, k):
                    raise Killed
                idx = order[i : i + cfg.minibatch]
                loss, stats = value_regression_loss(qv.heads.values(h[idx]), returns[idx] - baseline, mask[idx])
                grad_norm = optimizer_step(loss, optimizer, 1.0, scheduler)
                k += 1
        # log and checkpoint
        extra = {"baseline": baseline}
        logger.log(it, stats_to_floats({"losses/v": stats["loss"], "charts/grad_norm": grad_norm}))
        save_checkpoint(
            run_dir, qv, optimizer, it + 1, cfg, scheduler=scheduler, data_position={"iteration": it + 1}, extra=extra
        )
    logger.close()
    return qv, optimizer, scheduler, rng_state()


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_toy_online_loop_resumes_bit_for_bit(tmp_path):
    cfg = ToyOnline()
    full = toy_online(tmp_path / "full", cfg)
    with pytest.raises(Killed):
        toy_online(tmp_path / "cut", cfg, kill_at=(2, 3))  # mid-way through iteration 2's second epoch
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000002"
    resumed = toy_online(tmp_path / "cut", cfg, resume=True)
    for (name, a), b in zip(full[0].heads.state_dict().items(), resumed[0].heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    _assert_same(full[1].state_dict(), resumed[1].state_dict(), "optimizer")
    _assert_same(full[2].state_dict(), resumed[2].state_dict(), "scheduler")
    _assert_same(full[3], resumed[3], "rng")
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("instant", ["before the pointer moves", "while the old checkpoint is deleted"])
def test_ilql_killed_inside_a_checkpoint_save_resumes_to_the_uninterrupted_heads(tmp_path, monkeypatch, instant):
    cfg = ILQLConfig(steps=8, batch_size=4, max_length=32, checkpoint_every=3, progress=False)
    samples = [Sample(p, p[::-1] + "xy", float(i % 3)) for i, p in enumerate(PROMPTS * 2)]
    full = _ilql_run(tmp_path / "full", samples, cfg)
    real_replace, real_rmtree, saves = os.replace, shutil.rmtree, []

    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == "latest":
            saves.append(1)
            if len(saves) == 2 and instant == "before the pointer moves":  # the save of step 6
                raise Killed
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if len(saves) == 2 and instant == "while the old checkpoint is deleted":
            raise Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        _ilql_run(tmp_path / "cut", samples, cfg)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == (
        "step-00000003" if instant == "before the pointer moves" else "step-00000006"
    )
    resumed = _ilql_run(tmp_path / "cut", samples, cfg, resume=True)
    _assert_heads(resumed, _heads(full))
    assert _entries(tmp_path / "cut") == ["latest", "step-00000008"]


def _value_run(run_dir, samples, resume=False, kill_after=None):
    """Monte-Carlo value regression on the frozen tiny trunk (features cached), a checkpoint every step;
    ``kill_after``: stop as a kill would once that many steps have run."""
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), with_q=True, q_head="tied", head_hidden=16)
    cfg = ValueConfig(epochs=3, batch_size=3, max_length=64, progress=False, checkpoint_every=1, lr=1e-2)

    def kill(step, _):
        if kill_after is not None and step + 1 == kill_after:
            raise Killed

    try:
        train_value(qv, tok, samples, cfg, run_dir=run_dir, resume=resume, callbacks=[kill])
    except Killed:
        pass
    return qv


def test_a_frozen_trunk_run_killed_in_its_first_epoch_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """Issue 25: a resumed run recomputes its cached trunk features in the batches the first epoch computed
    them in (on SmolLM2, padding and batch shapes change a feature's last bits, and training amplifies
    them). Killed after 1 and 3 steps (epoch 0 has 2), every resume runs the trunk on exactly the
    uninterrupted run's batches and ends with its heads, bit for bit."""
    samples = [Sample(p, p[::-1] * (1 + i % 4), float(i % 3)) for i, p in enumerate(PROMPTS)]
    computed = []
    real = QVModel._trunk_features

    def recording(self, batch, logits):
        computed.append(tuple(batch.index.tolist()))  # a cache miss: the trunk runs on this batch
        return real(self, batch, logits)

    monkeypatch.setattr(QVModel, "_trunk_features", recording)
    whole = _value_run(tmp_path / "whole", samples)
    first_epoch, computed[:] = list(computed), []
    assert len(first_epoch) == 2 and sorted(i for b in first_epoch for i in b) == list(range(len(samples)))
    for k in (1, 3):
        run = tmp_path / f"killed-{k}"
        _value_run(run, samples, kill_after=k)
        before_kill, computed[:] = list(computed), []
        resumed = _value_run(run, samples, resume=True)
        assert before_kill == first_epoch[: min(k, 2)] and computed == first_epoch, k
        computed[:] = []
        for name, v in whole.heads.state_dict().items():
            assert torch.equal(v, resumed.heads.state_dict()[name]), (k, name)
