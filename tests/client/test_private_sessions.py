"""A stateful loss without ``session=`` behaves like one local module: its state lives on the server for
the life of the module (a private session), is dropped with it, and copies do not share it silently."""

from __future__ import annotations

import copy
import gc
import logging
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from losswire.client import RemoteLoss
from losswire.client.sessions import PRIVATE_PREFIX
from losswire.server.evaluation.sessions import SESSION_NAME
from losswire.server.losses import LOSSES

SEESAW = dict(type="SeesawLoss", num_classes=5)
GHMR = dict(type="GHMR", momentum=0.7)


def seesaw_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 7, generator=generator), torch.randint(0, 6, (16,), generator=generator)


def ghm_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + step)
    pred = torch.randn(32, 4, generator=generator)
    return pred, pred + torch.randn(32, 4, generator=generator) * 0.5, torch.ones(32, 4)


def live_sessions(client) -> set[str]:
    return {info.session for info in client.list_sessions().sessions}


def wait_until_gone(client, name: str, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while name in live_sessions(client):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_seesaw_follows_the_local_modules_curve(target):
    """SeesawLoss's cum_samples: 20 steps of one remote module against one local module (their curves
    drifted 18% apart when every call started afresh)."""
    remote, local = RemoteLoss(SEESAW, target), LOSSES.build(SEESAW)
    for step in range(20):
        scores, labels = seesaw_batch(step)
        got, want = remote(scores, labels), local(scores, labels)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"step {step} {key}")
    torch.testing.assert_close(remote.session_state()["cum_samples"], local.cum_samples)
    assert remote.last_session_step == 20 and remote.session_name.startswith(PRIVATE_PREFIX)
    assert SESSION_NAME.fullmatch(remote.session_name)  # a name the server accepts


def test_each_module_has_a_state_of_its_own(target):
    first, second = RemoteLoss(GHMR, target), RemoteLoss(GHMR, target)
    local_first, local_second = LOSSES.build(GHMR), LOSSES.build(GHMR)
    for step in range(3):
        torch.testing.assert_close(first(*ghm_batch(step)), local_first(*ghm_batch(step)))
    torch.testing.assert_close(second(*ghm_batch(7)), local_second(*ghm_batch(7)))  # a fresh module's first call
    assert first.session_name != second.session_name


def test_a_config_without_state_names_no_session(client, target):
    before = live_sessions(client)
    stateless = RemoteLoss(dict(type="GHMR"), target)  # momentum 0: no state
    stateless(*ghm_batch(0))
    stateless(*ghm_batch(1))
    assert stateless.session_name is None and not live_sessions(client) - before  # (others may have gone)
    with pytest.raises(ValueError, match=r"RemoteLoss\(GHMR\) holds no state on the server"):
        stateless.session_state()


def test_the_session_is_dropped_when_the_module_is_collected(client, target):
    module = RemoteLoss(GHMR, target)
    module(*ghm_batch(0))
    name = module.session_name
    assert name in live_sessions(client)
    del module
    gc.collect()
    assert wait_until_gone(client, name)


def test_a_changed_config_starts_a_new_state_and_drops_the_old(client, target):
    module = RemoteLoss(GHMR, target)
    module(*ghm_batch(0))
    old = module.session_name
    module.cfg["momentum"] = 0.5  # as a head changing a parameter would
    got = module(*ghm_batch(1))
    torch.testing.assert_close(got, LOSSES.build({**GHMR, "momentum": 0.5})(*ghm_batch(1)))
    assert module.session_name != old
    assert wait_until_gone(client, old)
    module.cfg["momentum"] = 0.0  # no state at all now
    module(*ghm_batch(2))
    assert module.session_name != old


@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_a_copy_has_a_state_of_its_own_and_says_so(target, caplog, duplicate):
    """mmengine deep-copies models (EMA). A copy of a local module carries a copy of its buffers; the
    server cannot copy a session, so the copy starts afresh, and when the original had state that
    differs from a local copy, which a warning says. Both keep their own state from then on."""

    def twin(module: RemoteLoss) -> RemoteLoss:
        return copy.deepcopy(module) if duplicate == "deepcopy" else pickle.loads(pickle.dumps(module))

    unused = RemoteLoss(SEESAW, target)
    with caplog.at_level(logging.WARNING, logger="losswire.client"):
        twin(unused)
    assert not caplog.records  # nothing accumulated yet: the copy is exact (mmengine's EMA copies here)

    original, local = RemoteLoss(SEESAW, target), LOSSES.build(SEESAW)
    for step in range(2):
        original(*seesaw_batch(step))
        local(*seesaw_batch(step))
    with caplog.at_level(logging.WARNING, logger="losswire.client"):
        copied = twin(original)
    assert "a copy of RemoteLoss(SeesawLoss) starts from a fresh server-side state" in caplog.text
    assert original.session_name in caplog.text
    assert copied.session_name is None  # its own session comes with its first call
    before = original.session_state()["cum_samples"].clone()
    fresh = copied(*seesaw_batch(5))
    expected = LOSSES.build(SEESAW)(*seesaw_batch(5))
    torch.testing.assert_close(fresh["loss_cls_classes"], expected["loss_cls_classes"])
    assert copied.session_name not in (None, original.session_name)
    torch.testing.assert_close(original.session_state()["cum_samples"], before)  # untouched by the copy
    torch.testing.assert_close(
        original(*seesaw_batch(2))["loss_cls_classes"], local(*seesaw_batch(2))["loss_cls_classes"]
    )


def test_a_named_session_is_still_shared(target):
    name = f"shared/{time.monotonic_ns()}"
    first, second = RemoteLoss(SEESAW, target, session=name), RemoteLoss(SEESAW, target, session=name)
    local = LOSSES.build(SEESAW)
    for step, module in enumerate((first, second, first)):
        torch.testing.assert_close(
            module(*seesaw_batch(step))["loss_cls_classes"], local(*seesaw_batch(step))["loss_cls_classes"]
        )
    assert second.session_name == name and first.reset_session()["cum_samples"].sum() > 0


@pytest.mark.slow
def test_the_session_is_dropped_when_the_process_exits(client, target):
    script = textwrap.dedent(
        f"""
        import torch
        from losswire.client import RemoteLoss
        loss = RemoteLoss({GHMR!r}, {target!r})
        loss(torch.randn(8, 4), torch.randn(8, 4), torch.ones(8, 4))
        print(loss.session_name, flush=True)
        keep = loss  # alive at exit: only the exit handler can drop it
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip().splitlines()[-1]
    assert name.startswith(PRIVATE_PREFIX)
    assert wait_until_gone(client, name, seconds=2.0)  # gone when the process was: no expiry needed
