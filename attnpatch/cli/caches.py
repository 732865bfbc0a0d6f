"""diffusers' own step caches as ``attnpatch compare`` settings: ``--caches "FirstBlockCache(threshold=0.2)"``
alone, or with a method (``"Neighborhood(window=7)+FirstBlockCache(threshold=0.2)"``, ``--combine``).

A cache is enabled on ``pipe.transformer`` with diffusers' ``enable_cache(config)`` for one run
and disabled after it, so every run starts from an empty cache. What a config needs from the
pipeline is supplied here, as diffusers' docs do: ``current_timestep_callback`` (PAB,
FasterCache), the step count and calibrated ``mag_ratios`` (MagCache), and FasterCache's
``is_guidance_distilled`` for pipelines that run the negative prompt as a call of its own."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
from dataclasses import dataclass, field

from ..tools.refine import call_source, current_timestep
from .runner import UsageError, parse_call

# CLI name -> config class in diffusers.hooks (those the installed diffusers lacks are not offered)
CONFIGS = {"FirstBlockCache": "FirstBlockCacheConfig", "TaylorSeerCache": "TaylorSeerCacheConfig",
           "FasterCache": "FasterCacheConfig", "PyramidAttentionBroadcast": "PyramidAttentionBroadcastConfig",
           "MagCache": "MagCacheConfig", "SeaCache": "SeaCacheConfig"}
# callables and model-specific state the pipeline supplies; a user cannot write them on a command line
SUPPLIED = ("current_timestep_callback", "attention_weight_callback", "low_frequency_weight_callback",
            "high_frequency_weight_callback", "raw_vision_callback")


def _config_class(name: str):
    import diffusers.hooks as hooks

    return getattr(hooks, CONFIGS[name], None)


def available() -> list[str]:
    """The cache names the installed diffusers has."""
    try:
        return [n for n in CONFIGS if _config_class(n) is not None]
    except ImportError:
        return []


def is_cache(spec: str) -> bool:
    return spec.strip().partition("(")[0].strip() in CONFIGS


@dataclass
class Cache:
    """A diffusers cache by name and keyword arguments, checked when parsed (before any load)."""
    name: str
    kwargs: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # filled from the pipeline by ``prepare``

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def config(self, pipe=None):
        cls = _config_class(self.name)
        kw = {**self.kwargs, **self.resolved}
        if pipe is not None and "current_timestep_callback" in _fields(cls):
            # the timestep of whichever stage runs: coarse-to-fine's img2img stage shares the transformer (and this cache)
            # but counts its own timestep; reading only pipe's gave None there and PAB / FasterCache failed on it
            kw["current_timestep_callback"] = lambda: current_timestep(pipe)
        if self.name == "MagCache" and "mag_ratios" not in kw:
            kw["calibrate"] = True  # checking the other parameters before the calibration run
        return cls(**kw)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def parse(spec: str) -> Cache:
    """``Name`` or ``Name(k=v, ...)`` -> a checked ``Cache``; a UsageError names what is wrong and what is valid."""
    have = available()
    name = spec.strip().partition("(")[0].strip()
    if name not in have:
        missing = f" ({name} needs a newer diffusers)" if name in CONFIGS else ""
        raise UsageError(f"unknown cache {name!r}{missing}; available: {', '.join(have) or '(none: install diffusers)'}")
    _, kwargs = parse_call(spec, "cache", "threshold=0.2")
    valid = [f for f in _fields(_config_class(name)) if f not in SUPPLIED and f != "calibrate"]
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise UsageError(f"{name} has no parameter {', '.join(map(repr, bad))} that a command line can set; "
                         f"valid: {', '.join(valid)}")
    for k, v in kwargs.items():
        why = _bad_value(k, v)
        if why:
            raise UsageError(f"{name}({k}={v!r}): {why}")
    cache = Cache(name, {k: list(v) if isinstance(v, tuple) and k == "mag_ratios" else v for k, v in kwargs.items()})
    try:
        cache.config()
    except (ValueError, TypeError) as e:
        raise UsageError(f"cache {cache}: {str(e).strip().splitlines()[0]}") from None
    return cache


def _bad_value(k: str, v) -> str | None:
    """Why a cache parameter's value is wrong, by what diffusers does with it (it checks none of these): a value
    that makes the cache run as stock (a threshold of 0 reuses nothing) or fail mid-run (a skip range of 0 is a
    modulo by zero), caught before any model loads; None if fine."""
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    integer = lambda low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    if k == "threshold" and not (num and v > 0):
        return "expected a number > 0 (a step is reused when its change is below it: 0 or less never reuses one, so the cache would run as stock)"
    if k.endswith("timestep_skip_range") or k.endswith("timestep_range"):
        if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] < v[1]):
            return "expected a (low, high) pair of timesteps with low < high, e.g. (100, 800)"
    elif k.endswith("skip_range") or k in ("cache_interval", "max_skip_steps", "max_consecutive_cached", "num_inference_steps"):
        if not integer(1) and not (v is None and k.endswith("skip_range")):  # PAB: None leaves that attention alone
            return "expected an integer >= 1 (how many steps or calls one computation serves; 0 divides by zero mid-run)"
    elif k in ("max_order", "disable_cache_before_step", "residual_order", "retention_steps", "cache_end_steps") and not integer(0):
        return "expected an integer >= 0"
    elif k == "retention_ratio" and not (num and 0 <= v <= 1):
        return "expected a fraction of the steps, 0 <= retention_ratio <= 1"
    return None


def check_pipeline(pipe, cache: Cache) -> None:
    """Why ``cache`` cannot run on ``pipe``, as a UsageError, before it is timed."""
    tr = getattr(pipe, "transformer", None)
    if tr is None or not hasattr(tr, "enable_cache"):
        raise UsageError(f"{cache}: diffusers' caches attach to pipe.transformer (a diffusers transformer model); "
                         f"{type(pipe).__name__} has none")
    if cache.name == "SeaCache" and "sigma=" not in call_source(pipe):
        # without step / sigma in cache_context SeaCache runs every block ("fail-open"): a cache that never caches
        raise UsageError(f"{cache}: {type(pipe).__name__} does not pass step_index / sigma / num_inference_steps to "
                         "transformer.cache_context, so SeaCache would never cache (diffusers runs it fail-open)")




def prepare(loaded, cache: Cache, calibrate) -> None:
    """Fill in what ``cache`` needs from the pipeline after stock attention has run once:
    FasterCache's ``is_guidance_distilled`` (its unconditional-batch skip halves a batch, which
    fails where the negative prompt is a call of its own, as in FLUX's true CFG and Wan), and
    MagCache's step count and ``mag_ratios`` (from ``calibrate(config)``, one untimed run)."""
    pipe = loaded.obj
    check_pipeline(pipe, cache)
    if cache.name == "FasterCache" and "is_guidance_distilled" not in cache.kwargs:
        cache.resolved["is_guidance_distilled"] = 'cache_context("uncond")' in call_source(pipe)
    if cache.name == "MagCache":
        steps = len(pipe.scheduler.timesteps)  # of the stock run just made: the steps every run takes
        cache.resolved["num_inference_steps"] = cache.kwargs.get("num_inference_steps", steps)
        if "mag_ratios" not in cache.kwargs and "mag_ratios" not in cache.resolved:  # one calibration per cache
            cache.resolved["mag_ratios"] = _calibrate_mag(cache, pipe, calibrate)


def _calibrate_mag(cache: Cache, pipe, calibrate) -> list[float]:
    """MagCache's per-step residual-magnitude ratios of this model, from a calibration run.
    diffusers only prints them (first context: the conditional branch), so they are read back."""
    cfg = cache.config(pipe)  # calibrate=True: no mag_ratios yet
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        calibrate(cfg)
    for line in buf.getvalue().splitlines():
        if line.strip().startswith("["):
            with contextlib.suppress(ValueError, SyntaxError):
                return [float(x) for x in ast.literal_eval(line.strip())]
    raise UsageError(f"{cache}: the calibration run printed no mag_ratios (diffusers' MagCache output changed?); "
                     "pass MagCache(mag_ratios=[...]) with one ratio per step")


@contextlib.contextmanager
def enabled(pipe, cache: Cache | None):
    """``cache`` on ``pipe.transformer`` for the body, disabled after (a fresh cache every run)."""
    if cache is None:
        yield
        return
    tr = pipe.transformer
    tr.enable_cache(cache.config(pipe))
    try:
        yield
    finally:
        tr.disable_cache()
