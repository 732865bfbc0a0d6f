"""``attnpatch generate --parallel ulysses=N``: one generation split over N processes with diffusers'
Ulysses context parallelism, started by torchrun:

    torchrun --nproc-per-node 2 -m attnpatch generate --model builtin:flux-shapes --method Neighborhood --parallel ulysses=2

Every rank loads the pipeline, enables ``ContextParallelConfig(ulysses_degree=N)`` on its
denoiser(s) (``transformer`` and ``transformer_2``), patches and generates with the same seed: the
text encoders and the VAE run on every rank, each attention call of the denoiser is split (after
Ulysses' all-to-all a rank holds the whole sequence for H / N heads; see ``patchers.parallel``).
Rank 0 writes the outputs and the report. gloo on CPU; nccl on CUDA, rank r on ``cuda:LOCAL_RANK``.

Everything the command line and the model's config files tell is checked before the model loads
(and before the process group starts), so a bad command fails in a second, on every rank alike.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .runner import UsageError

DENOISERS = ("transformer", "transformer_2", "unet")  # pipeline components context parallelism splits
START = "torchrun --nproc-per-node {n} -m attnpatch generate ... --parallel ulysses={n}"


def add_arguments(p) -> None:
    p.add_argument("--parallel", metavar="ulysses=N", help="split each denoiser attention call over N processes "
                   "(diffusers' Ulysses context parallelism; N divides the head count); start with " + START.format(n="N"))


def degree(spec: str) -> int:
    """``ulysses=N`` -> N (>= 2); ring / unified attention refused, naming Ulysses."""
    parts = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise UsageError(f"--parallel {spec!r}: expected ulysses=N with N >= 2, e.g. --parallel ulysses=2")
        parts[key.strip()] = int(value)
    bad = [k for k in parts if k not in ("ulysses", "ring")]
    if bad:
        raise UsageError(f"--parallel {spec!r}: unknown kind {', '.join(bad)}; attnpatch runs Ulysses: ulysses=N")
    if parts.get("ring", 1) > 1:
        raise UsageError(f"--parallel {spec!r}: attnpatch refuses ring (and unified) attention, which split each "
                         "call's keys across ranks so a method's pattern would be merged chunk by chunk; use Ulysses: "
                         f"--parallel ulysses={parts['ring'] * parts.get('ulysses', 1)}")
    n = parts.get("ulysses", 1)
    if n < 2:
        raise UsageError(f"--parallel {spec!r}: ulysses=1 is one process; drop --parallel, or use ulysses=N with N >= 2")
    return n


def world(n: int) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, which must hold ``n`` processes."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise UsageError(f"--parallel ulysses={n} runs one process per rank and this process was not started by "
                         f"torchrun (no RANK / WORLD_SIZE in the environment); run: {START.format(n=n)}")
    size = int(env["WORLD_SIZE"])
    if size != n:
        raise UsageError(f"--parallel ulysses={n} needs {n} processes but torchrun started {size} (WORLD_SIZE={size}); "
                         f"run: {START.format(n=n)}")
    return int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"]))


def cp_families() -> str:
    """The attnpatch families whose diffusers denoiser has a ``_cp_plan`` in the installed version."""
    import diffusers

    from ..patchers.families import FAMILIES

    return ", ".join(f.label for f in FAMILIES if any(getattr(getattr(diffusers, c, None), "_cp_plan", None)
                                                      for c in f.models))


def check_denoisers(configs: dict, n: int, model: str) -> None:
    """``configs``: {component: (class name, config dict)}. Each has a ``_cp_plan`` and heads that split over n."""
    import diffusers

    if not configs:
        raise UsageError(f"--parallel: {model} has no transformer denoiser to split (no {' / '.join(DENOISERS)})")
    for comp, (cls, cfg) in configs.items():
        if getattr(getattr(diffusers, cls, None), "_cp_plan", None) is None:
            raise UsageError(f"--parallel: {model}'s {comp} is a {cls}, which has no context-parallel plan (_cp_plan) "
                             f"in diffusers {diffusers.__version__}, so it cannot be split; families that have one: "
                             f"{cp_families()}. Run it without --parallel (one process)")
        heads = cfg.get("num_attention_heads")
        if isinstance(heads, int) and heads % n:
            ok = [d for d in range(2, heads + 1) if heads % d == 0]
            raise UsageError(f"--parallel ulysses={n}: {model}'s {comp} has {heads} attention heads, which do not "
                             f"split over {n} ranks; use a degree dividing {heads}: {', '.join(map(str, ok)) or 'none'}")


def configs_on_disk(src) -> dict | None:
    """{component: (class name, config)} of the denoisers, read from the model's files without
    loading it; None when they cannot be read here (a hub model not downloaded): checked after load."""
    from .. import models

    if src.kind == "builtin":
        from ..models.fixtures import WEIGHTS

        read = lambda f: WEIGHTS / src.name / f  # noqa: E731
        if src.name not in models.BUILTIN or not (WEIGHTS / src.name).is_dir():
            return None
    elif src.kind == "folder":
        read = lambda f: Path(src.spec).expanduser() / f  # noqa: E731
    else:
        from huggingface_hub import hf_hub_download

        read = lambda f: hf_hub_download(src.spec, f, local_files_only=src.local_only)  # noqa: E731
    try:
        index = json.loads(Path(read("model_index.json")).read_text())
        return {c: (index[c][1], json.loads(Path(read(f"{c}/config.json")).read_text()))
                for c in DENOISERS if isinstance(index.get(c), list) and index[c][1]}
    except Exception:  # noqa: BLE001 - unreadable here: the loaded pipeline is checked instead
        return None


def configs_loaded(pipe) -> dict:
    return {c: (type(m).__name__, dict(m.config)) for c in DENOISERS if (m := getattr(pipe, c, None)) is not None}


def check(args, src) -> tuple[int, tuple[int, int, int]]:
    """Every check before the model loads: (degree, (rank, world size, local rank)) or a UsageError."""
    n = degree(args.parallel)
    if src.is_pipe is False:
        raise UsageError(f"--parallel splits a diffusion pipeline's denoiser; {args.model} is a language model")
    if getattr(args, "refine_from", None):
        raise UsageError("--parallel with --refine-from is not supported; run --refine-from in one process")
    configs = configs_on_disk(src)
    if configs is not None:
        check_denoisers(configs, n, args.model)
    return n, world(n)


def _start(device: str, n: int, ranks: tuple[int, int, int]):
    """The process group (gloo on CPU, nccl on CUDA) and the ("ring", "ulysses") mesh; the rank's device."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, size, local = ranks
    dev = torch.device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"--parallel: LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UsageError(f"--parallel runs on cpu (gloo) or cuda (nccl), not {dev.type}")
    cuda = dev.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size, device_id=dev if cuda else None)
    return dev, init_device_mesh(dev.type, (1, n), mesh_dim_names=("ring", "ulysses"))


def enable(pipe, n: int, mesh) -> None:
    """Ulysses-n on every denoiser of ``pipe`` (both experts of Wan 2.2)."""
    from diffusers import ContextParallelConfig

    from ..patchers import parallel

    for comp in DENOISERS:
        if getattr(pipe, comp, None) is not None:
            parallel.enable(getattr(pipe, comp), ContextParallelConfig(ulysses_degree=n, mesh=mesh))


def generate(args) -> int:
    """``generate --parallel``: checks, process group, load, enable, patch, generate; rank 0 writes."""
    from . import EXIT_OK, _out_dir, _prepare, runner

    method = runner.parse_method(args.method, args.set)
    name = _prepare(args, [method])
    n, ranks = check(args, runner.resolve(args.model))
    out = _out_dir(args, "attnpatch-out", name, [type(method).__name__])  # every rank: the same check
    import torch.distributed as dist

    dev, mesh = _start(args.device, n, ranks)
    with contextlib.ExitStack() as stack:
        stack.callback(dist.destroy_process_group)
        if ranks[0] != 0:  # rank 0 speaks for all
            args.quiet = True  # and shows the progress bars
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return EXIT_OK if _run(args, method, n, dev, mesh, out, ranks[0]) else 1


def _run(args, method, n: int, dev, mesh, out: Path, rank: int) -> bool:
    import tempfile

    from .. import api
    from . import compare, runner

    loaded = _load(args, dev, rank)
    check_denoisers(configs_loaded(loaded.obj), n, args.model)
    try:
        api.patch(loaded.obj, method).remove()
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot patch {args.model} with {method}: {str(e).splitlines()[0]}") from None
    enable(loaded.obj, n, mesh)
    prompts = args.prompt or loaded.prompts
    if args.compare:  # every rank runs it (the same collectives); the others save into a folder thrown away
        with tempfile.TemporaryDirectory(prefix="attnpatch-rank-") as scratch, shards(n):
            return compare.against_stock(loaded, method, prompts, args, out if rank == 0 else Path(scratch))
    with api.patch(loaded.obj, method) as handle, shards(n):
        result, t = runner.run(loaded, prompts, args.seed, **compare.run_kw(args))
        stats = compare.summary(handle)
    if rank == 0:
        compare.save(loaded, result, prompts, out / "patched", args)
        _report(out, args, method, n, dev, t, stats, prompts)
        print(f"{method}: {t:.2f} s for {len(prompts)} prompt(s) on {n} ranks (Ulysses)")
        print(f"outputs in {out}")
    return True


@contextlib.contextmanager
def shards(n: int):
    """diffusers' bare assertion on a sequence that does not split (the first denoiser call) as a UsageError."""
    try:
        yield
    except AssertionError as e:
        if "divisible by mesh size" not in str(e):
            raise
        raise UsageError(f"--parallel ulysses={n}: diffusers splits every denoiser input's sequence evenly over the "
                         f"{n} ranks and one does not split (its length is not a multiple of {n}): choose --height / "
                         f"--width / --frames whose token counts (and a text length) are multiples of {n}") from None


def _load(args, dev, rank: int):
    from . import runner

    loaded = runner.load(args.model, str(dev), args.dtype)
    if rank and hasattr(loaded.obj, "set_progress_bar_config"):
        loaded.obj.set_progress_bar_config(disable=True)  # one progress bar: rank 0's
    return loaded


def _report(out: Path, args, method, n: int, dev, seconds: float, stats: dict, prompts) -> None:
    meta = dict(model=args.model, method=repr(method), parallel=f"ulysses={n}", world_size=n, device=str(dev),
                backend="nccl" if dev.type == "cuda" else "gloo", prompts=prompts, seed=args.seed, steps=args.steps,
                height=args.height, width=args.width, seconds=round(seconds, 4), stats=stats,
                note="rank 0's wall time of the whole generation; every rank ran the pipeline with the same seed, "
                     "each denoiser attention call split over the ranks by heads (Ulysses)")
    (out / "report.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    (out / "report.md").write_text(
        f"# {args.model}: {method!r} under Ulysses-{n}\n\n{len(prompts)} prompt(s), seed {args.seed}, {n} processes "
        f"({meta['backend']}, {dev.type}): {seconds:.2f} s (rank 0, whole generation). attnpatch: {stats.get('routed', 0)} "
        f"attention calls through the method, handed back {stats.get('handed_back') or 'none'}. Outputs: patched_*.\n")
