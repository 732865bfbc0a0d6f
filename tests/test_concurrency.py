"""Concurrent calls: the caches kernels and methods share (plans, BlockMasks, tiles' per-plan data)
stay correct when threads run one patched model at once, and outputs equal serial ones."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Plan, Site


class _SwitchAfterWrite(dict):
    """A cache store that lets other threads run right after the write of ``victim`` (as a thread switch
    there may): the writer waits until ``others_done`` is set, or until the others stop writing for
    ``patience`` seconds (they wait for a lock the writer holds: a correct cache)."""

    def __init__(self, victim, others_done, patience=0.3):
        super().__init__()
        self.victim, self.others_done, self.patience, self.writes = victim, others_done, patience, 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.writes += 1
        if key == self.victim:
            seen = -1
            while not self.others_done.wait(self.patience) and self.writes != seen:
                seen = self.writes


def _race(victim_call, other_call, others_done):
    """Run ``victim_call`` in one thread and ``other_call`` (then set ``others_done``) in another;
    returns (victim's result or exception, other's result or exception)."""
    import threading

    results = [None, None]

    def run(i, fn, after=None):
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - the test asserts there is none
            results[i] = e
        if after is not None:
            after.set()

    a = threading.Thread(target=run, args=(0, victim_call))
    b = threading.Thread(target=run, args=(1, other_call, others_done))
    a.start()
    import time

    time.sleep(0.05)  # the victim is inside its write
    b.start()
    a.join(), b.join()
    return results


def test_plan_cache_is_safe_when_another_thread_evicts_between_write_and_read():
    """PlanCache.get wrote a key and read it back: a thread switch in between that evicted it raised
    KeyError. Two threads through a one-entry cache each get their own plan."""
    import threading

    from attnpatch.methods._grid import PlanCache

    cache = PlanCache(lambda site, S, device: ("plan", S), maxsize=1)
    done = threading.Event()
    victim = (Site().grid, 0, True, False, 0, 5, "cpu")
    cache.store = _SwitchAfterWrite(victim, done)
    got = _race(lambda: cache.get(Site(), 5, "cpu"), lambda: cache.get(Site(), 7, "cpu"), done)
    assert got == [("plan", 5), ("plan", 7)], got


def test_flex_block_mask_cache_is_safe_when_another_thread_evicts(monkeypatch):
    """The flex BlockMask cache had the same write-then-read pattern (64 entries, oldest evicted)."""
    import threading

    from attnpatch.kernels import flex

    pytest.importorskip("torch.nn.attention.flex_attention")
    plans = [Plan(mask_mod=lambda b, h, q, kv, w=w: (q - kv).abs() <= w) for w in range(66)]
    key = lambda p: (id(p.mask_mod), id(p.blocks), False, 0, 1, None, 128, 128, "cpu")
    done = threading.Event()
    monkeypatch.setattr(flex, "_BLOCK_MASKS", _SwitchAfterWrite(key(plans[0]), done))
    flex._BLOCK_MASKS.popitem = lambda last=True: flex._BLOCK_MASKS.pop(next(iter(flex._BLOCK_MASKS)))  # FIFO as OrderedDict's
    mask = lambda p: flex._block_mask(p, None, 1, None, 128, 128, "cpu")
    got = _race(lambda: mask(plans[0]), lambda: [mask(p) for p in plans[1:]], done)
    assert not isinstance(got[0], Exception) and not isinstance(got[1], Exception), got
    from torch.nn.attention.flex_attention import create_block_mask

    want = create_block_mask(plans[0].mask_mod, 1, None, 128, 128, device="cpu")
    assert torch.equal(got[0].to_dense(), want.to_dense())


def test_concurrent_calls_equal_serial_ones():
    """Threads running every method of the zoo (tests/zoo.py: plan caches, tiles' per-plan caches and
    per-thread buffers, data-dependent selection, guidance parts) at once get the outputs of serial calls."""
    from concurrent.futures import ThreadPoolExecutor

    from zoo import ZOO, inputs

    rows = [(c.method, site, tuple(t.float() for t in qkv)) for c in ZOO for site, qkv in [inputs(c)]]
    call = lambda i: ap.attend(*rows[i % len(rows)][2], *rows[i % len(rows)][:2]).clone()
    serial = [call(i) for i in range(len(rows))]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, range(3 * len(rows))))
    for i, o in enumerate(outs):
        assert torch.equal(o, serial[i % len(rows)]), ZOO[i % len(rows)].id
