"""A node's state between rounds (client.state.SiteState): the previous round kept for a redone one, half precision,
read without unpickling, never non-finite, and chosen without reading a state file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from client.state import SiteState
from mstkd.config import load_config
from mstkd.errors import InputError, NonFiniteState
from mstkd.model import build_networks
from mstkd.train import Networks, make_optimizers


def _saved_twice(tmp_path):
    """A tiny site's networks, optimisers and generator, and its state saved after rounds 1 and 2."""
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path)
    for r in (1, 2):
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    return nets, optimizers, rng, state


def test_site_state_keeps_the_previous_round_for_a_resumed_round(tmp_path):
    nets, optimizers, rng, state = _saved_twice(tmp_path)
    assert state.load(nets, optimizers, rng, before_round=3)["round"] == 2
    assert state.load(nets, optimizers, rng, before_round=2)["round"] == 1  # round 2 is being redone
    assert state.load(nets, optimizers, rng, before_round=1) is None


def test_half_precision_site_state_halves_the_file_and_restores_float32_training_state(tmp_path):
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    for p in [*nets.teacher.parameters(), *nets.student.parameters()]:
        p.grad = torch.randn_like(p) * 1e-6  # squared-gradient averages near 1e-12: below float16's range
    for _ in range(257):  # a step count that float16 and bfloat16 cannot hold exactly (257 -> 256)
        optimizers.main.step()
    rng = np.random.default_rng(0)
    full, half = SiteState(tmp_path / "full"), SiteState(tmp_path / "half", "half")
    for state in (full, half):
        state.save(nets, optimizers, rng, {"round": 1, "rounds": 1, "epoch": 1.0})
    assert 0.45 < half.path.stat().st_size / full.path.stat().st_size < 0.6
    stored = torch.load(half.path, weights_only=False)
    assert hasattr(stored["teacher"], "_metadata")  # what load_state_dict reads module versions from

    fresh = Networks(*build_networks(cfg.model))
    fresh_opt = make_optimizers(fresh, cfg.train)
    assert half.load(fresh, fresh_opt, np.random.default_rng(1))["round"] == 1
    restored = fresh.teacher.state_dict()
    for name, value in nets.teacher.state_dict().items():
        assert restored[name].dtype == value.dtype, name
        if value.is_floating_point():  # the teacher as float16 holds it, widened again
            assert torch.equal(restored[name], value.half().float()), name
    teacher = next(nets.teacher.parameters())
    moments = fresh_opt.main.state[next(fresh.teacher.parameters())]
    assert moments["exp_avg"].dtype == torch.float32 and float(moments["step"]) == 257  # counters never rounded
    expected = optimizers.main.state[teacher]["exp_avg_sq"]
    assert expected.min() > 0 and moments["exp_avg_sq"].min() > 0  # not flushed to zero
    assert torch.allclose(moments["exp_avg_sq"], expected, rtol=1e-2, atol=0)


def test_site_state_is_read_without_unpickling_and_never_holds_non_finite_weights(tmp_path):
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path / "ok")
    state.save(nets, optimizers, rng, {"round": 1, "rounds": 1, "epoch": 1.0})
    assert state.load(nets, optimizers, rng)["round"] == 1  # weights_only reads what a node writes

    class Payload:  # anything beyond tensors and plain data: a pickle that would run code
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    hostile = SiteState(tmp_path / "hostile")
    hostile.path.parent.mkdir(parents=True)
    torch.save({"teacher": Payload(), "optimizer": {}, "disc_optimizer": {}, "rng": {}, "info": {}}, hostile.path)
    with pytest.raises(InputError, match="not readable as node state"):
        hostile.load(nets, optimizers, rng)
    assert not (tmp_path / "pwned").exists()

    for r in (2, 3):  # a newest state that does not read (a disk error, a foreign file): the one before it serves
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    state.path.write_bytes(b"garbage")
    assert state.load(nets, optimizers, rng, before_round=4)["round"] == 2

    with torch.no_grad():
        next(nets.teacher.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteState, match="not saved"):
        SiteState(tmp_path / "inf").save(nets, optimizers, rng, {"round": 2, "rounds": 2, "epoch": 2.0})
    assert not (tmp_path / "inf" / "local.pt").exists()


def test_a_damaged_sidecar_or_a_state_of_other_networks_falls_back_to_the_state_before_it(tmp_path):
    """A sidecar of ``[]`` (TypeError) or with a round of ``"x"`` (ValueError), and a state whose teacher does not fit
    this run's networks (RuntimeError), each stopped the message instead of falling back as the docs promise."""
    import json

    nets, optimizers, rng, state = _saved_twice(tmp_path)
    sidecar = next(p for p in tmp_path.iterdir() if p.name.endswith(".json") and "prev" not in p.name)
    written = json.loads(sidecar.read_text())
    sidecar.write_text("[]")  # not a sidecar: the state file itself is read, and it is good
    assert state.load(nets, optimizers, rng)["round"] == 2
    sidecar.write_text(json.dumps({**written, "info": {**written["info"], "round": "x"}}))
    assert state.load(nets, optimizers, rng)["round"] == 2
    payload = torch.load(state.path, weights_only=True)
    for bad_info in ({"round": "x"}, ["round"]):  # the file's own counters are not a node's
        torch.save({**payload, "info": bad_info}, state.path)
        assert state.load(nets, optimizers, rng)["round"] == 1
        # the same behind a sidecar that matches the file (its stamp renewed): the file's counters still count
        sidecar.write_text(
            json.dumps(
                {"stamp": [state.path.stat().st_size, state.path.stat().st_mtime_ns], **{"info": written["info"]}}
            )
        )
        assert state.load(nets, optimizers, rng)["round"] == 1
    torch.save({**payload, "teacher": {"x": torch.zeros(2)}}, state.path)
    assert state.load(nets, optimizers, rng)["round"] == 1
    state.previous.write_bytes(b"garbage")
    with pytest.raises(InputError, match="no usable node state"):
        state.load(nets, optimizers, rng)


def test_site_state_is_chosen_without_reading_a_state_file(tmp_path, monkeypatch):
    """At `paper` size a state file is gigabytes: a round reads exactly the one it restores, and a save none."""
    import client.state

    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(
        client.state.torch, "load", lambda path, **kw: reads.append(Path(path).name) or real_load(path, **kw)
    )
    for r in (1, 2, 3):
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    assert reads == []  # the sidecars told which round each file holds
    assert state.load(nets, optimizers, rng, before_round=3)["round"] == 2
    assert reads == ["local.prev.pt"]  # local.pt (round 3) was skipped without being read
    (tmp_path / "local.json").write_text("{}")  # a sidecar that does not describe its file is ignored
    assert state.info(tmp_path / "local.pt")["round"] == 3 and reads[-1] == "local.pt"


def test_a_sites_state_folder_is_private_to_the_nodes_user(tmp_path):
    """The teacher in a node's state learned from the site's cases: its folder is created readable by the node's
    user only, whatever the umask leaves to others (it was world-readable under the usual 022)."""
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    old = os.umask(0o022)
    try:
        SiteState(tmp_path / "nodes" / "run-1" / "site-a").save(
            nets, make_optimizers(nets, cfg.train), np.random.default_rng(0), {"round": 1, "rounds": 1, "epoch": 1.0}
        )
    finally:
        os.umask(old)
    assert (tmp_path / "nodes" / "run-1" / "site-a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "nodes" / "run-1" / "site-a" / "local.pt").is_file()


@pytest.mark.parametrize("kind", ["expanded", "nan"])
def test_a_state_file_whose_tensors_cannot_be_checked_safely_falls_back_to_the_state_before_it(tmp_path, kind):
    """One number expanded to 10^13 values in a node's state file (a 40 TB allocation when checked for finiteness)
    raised an error the fallback did not catch: the node failed every round on the same file. It is now refused as
    that file, as a NaN teacher is, and the state before it serves."""
    nets, optimizers, rng, state = _saved_twice(tmp_path)
    payload = torch.load(state.path, weights_only=True)
    if kind == "expanded":
        payload["rng"] = {"huge": torch.zeros(1).expand(10**13)}
    else:
        payload["teacher"] = {k: torch.full_like(v, float("nan")) for k, v in payload["teacher"].items()}
    torch.save(payload, state.path)
    assert state.load(nets, optimizers, rng)["round"] == 1
