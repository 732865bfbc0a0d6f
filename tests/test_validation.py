"""Bad input fails where it is written, with a message naming ``Owner(param=value)``, what is
expected and an example (issue 16): every Site field, every method parameter, every profile file.
Each case below was accepted silently, failed only at the first forward, or raised a raw Python /
safetensors error before the checks in ``attnpatch/checks.py``."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.pag import save_heads
from attnpatch.methods.schedule import save_profile
from attnpatch.methods.sink_calibration import load_profile

E = TypeError  # a wrong type (ParameterTypeError is also a ValueError)
V = ValueError

CASES = [
    # Site: truncated, accepted or raw before
    (lambda: Site(grid=(8.5, 8)), E, r"Site\(grid=\(8\.5, 8\)\): grid must be .*integer.*e\.g\. Site\(grid=\(64, 64\)\)"),
    (lambda: Site(grid=8), E, r"Site\(grid=8\): grid must be .*\(H, W\)"),
    (lambda: Site(q_offset=-5), V, r"Site\(q_offset=-5\): q_offset must be an integer >= 0 \(the KV-cache length"),
    (lambda: Site(text_len="3"), E, r"Site\(text_len='3'\): text_len must be an integer >= 0"),
    (lambda: Site(text_first="no"), E, r"Site\(text_first='no'\): text_first must be True or False"),
    (lambda: Site(causal=1), E, r"Site\(causal=1\): causal must be True or False"),
    (lambda: Site(decode="yes"), E, r"Site\(decode='yes'\): decode must be True or False"),
    (lambda: Site(layer=-1), V, r"Site\(layer=-1\): layer must be an integer >= 0"),
    (lambda: Site(layer=2.5), E, r"Site\(layer=2\.5\): layer must be an integer"),
    (lambda: Site(name=3), E, r"Site\(name=3\): name must be a string"),
    (lambda: Site(family=None), E, r"Site\(family=None\): family must be a string"),
    (lambda: Site(timestep=1.5), V, r"Site\(timestep=1\.5\): timestep must be None or a float in \[0, 1\]"),
    (lambda: Site(timestep="0.5"), E, r"Site\(timestep='0\.5'\): timestep must be"),
    (lambda: Site(step=-1), V, r"Site\(step=-1\): step must be an integer >= 0"),
    (lambda: Site(steps=0), V, r"Site\(steps=0\): steps must be an integer >= 1"),
    (lambda: Site(roles=("cond", "perturbd")), V, r"roles must be a tuple with one of \('cond', 'uncond', 'perturbed'\)"),
    (lambda: Site(roles="cond"), E, r"Site\(roles='cond'\): roles must be a tuple"),
    (lambda: Site(kv_shift=torch.tensor([0.5])), E, r"kv_shift must be None or a \(B,\) integer tensor"),
    (lambda: Site(kv_shift=[0, 3]), E, r"Site\(kv_shift=\[0, 3\]\): kv_shift must be None or a \(B,\) integer tensor"),
    # locality methods
    (lambda: ap.Radial(window=2), V, r"Radial\(window=2\): window must be .*odd integer.*e\.g\. Radial\(window=3\)"),
    (lambda: ap.Radial(window=(3,)), V, r"Radial\(window=\(3,\)\): window must be .*a pair of them, one per spatial axis"),
    (lambda: ap.Radial(tile=(4, 4, 4)), V, r"Radial\(tile=\(4, 4, 4\)\): tile must be .*one per spatial axis \(H, W\)"),
    (lambda: ap.Radial(decay=True), E, r"Radial\(decay=True\): decay must be a number >= 1"),
    (lambda: ap.Radial(decay=math.nan), V, r"Radial\(decay=nan\): decay must be a number >= 1"),
    (lambda: ap.Neighborhood(causal="yes"), E, r"Neighborhood\(causal='yes'\): causal must be True or False, or a tuple"),
    (lambda: ap.Neighborhood(causal=(True, False, True, False)), E, r"Neighborhood\(causal=.*\): causal must be True or False"),
    (lambda: ap.Neighborhood(window=(3, 3, 3, 3)), V, r"Neighborhood\(window=\(3, 3, 3, 3\)\): window must be .*1 to 3"),
    (lambda: ap.Neighborhood(window=(3, 3), stride=(1, 1, 1)), V, r"per-axis tuples .* all the same length"),
    (lambda: ap.Neighborhood(window=3, stride=5), V, r"Neighborhood\(stride=5\): stride must not exceed window=3"),
    (lambda: ap.SlidingTile(tile=(2, 2), window=(1, 1, 1)), V, r"SlidingTile\(tile=\(2, 2\), window=\(1, 1, 1\)\): per-axis"),
    (lambda: ap.TopKBlocks(keep="0.25"), E, r"TopKBlocks\(keep='0\.25'\): keep must be a number > 0 and <= 1"),
    (lambda: ap.TopKBlocks(mass=True), E, r"TopKBlocks\(mass=True\): mass must be a number"),
    (lambda: ap.TopKBlocks(block=(4, 4, 4, 4)), V, r"TopKBlocks\(block=\(4, 4, 4, 4\)\): block must be"),
    # the schedule of every sparse method
    (lambda: ap.Neighborhood(dense_layers="0,1"), E,
     r"Neighborhood\(dense_layers='0,1'\): .*not a list.*e\.g\. Neighborhood\(dense_layers=\(0, 1\)\)"),
    (lambda: ap.SlidingTile(dense_layers=5), E, r"SlidingTile\(dense_layers=5\): .*write \(5,\) for that one or range\(5\)"),
    (lambda: ap.Radial(dense_layers=(0, -1)), V, r"Radial\(dense_layers=\(0, -1\)\): dense_layers must be layer indices"),
    (lambda: ap.TopKBlocks(dense_layers=(0.5,)), E, r"TopKBlocks\(dense_layers=\(0\.5,\)\): dense_layers must be"),
    (lambda: ap.Neighborhood(profile=5), E, r"Neighborhood\(profile=5\): a profile is a path .*save_profile"),
    (lambda: ap.Neighborhood(profile={"window": torch.tensor([3, 0])}), V,
     r"Neighborhood profile \(a dict\) holds \{'window': 0\}, which is not a valid parameter set: .*integers >= 1"),
    (lambda: ap.Neighborhood(profile={"window": torch.tensor([3.5])}), V, r"holds \{'window': 3\.5\}.*must be an integer"),
    (lambda: ap.Neighborhood(window=9, profile={"stride": torch.tensor([[1, 12]])}), V, r"stride must not exceed window"),
    # guidance and calibration
    (lambda: ap.PAG(soft="0.5"), E, r"PAG\(soft='0\.5'\): soft must be a number in \[0, 1\]"),
    (lambda: ap.PAG(layers=2.5), E, r"PAG\(layers=2\.5\): layers must be None, a block ordinal"),
    (lambda: ap.PAG(layers=["blocks.("]), V, r"PAG\(layers=\['blocks\.\('\]\): .*does not compile"),
    (lambda: ap.PAG(heads=[-1]), V, r"PAG\(heads=\[-1\]\): heads must be head indices, integers >= 0"),
    (lambda: ap.PAG(heads={0: "1"}), E, r"PAG\(heads=\{0: '1'\}\): heads must be \{layer: \[heads\]\}"),
    (lambda: ap.PAG(heads=3), E, r"PAG\(heads=3\): heads must be head indices"),
    (lambda: ap.PAG(steps=3), E, r"PAG\(steps=3\): steps must be denoising step indices .*range\(3\)"),
    (lambda: ap.SharedAttention(adain="no"), E, r"SharedAttention\(adain='no'\): adain must be True or False"),
    (lambda: ap.SharedAttention(shift_pe=None), E, r"SharedAttention\(shift_pe=None\): shift_pe must be True or False"),
    (lambda: ap.Temperature(tau=True), E, r"Temperature\(tau=True\): tau must be a number > 0"),
    (lambda: ap.Temperature(tau=math.nan), V, r"Temperature\(tau=nan\): tau must be a number > 0"),
    (lambda: ap.Temperature(layers="3"), E, r"Temperature\(layers='3'\): layers must be layer indices"),
    (lambda: ap.SinkWindow(evict="yes"), E, r"SinkWindow\(evict='yes'\): evict must be True or False"),
    (lambda: ap.SinkCalibration(threshold="x"), E, r"SinkCalibration\(threshold='x'\): threshold must be a number > 0"),
    (lambda: ap.SinkCalibration(beta=0), V, r"SinkCalibration\(beta=0\): beta must be a number > 0 and <= 1"),
    (lambda: ap.SinkCalibration(first=-1), V, r"SinkCalibration\(first=-1\): first must be an integer >= 0"),
    (lambda: ap.SinkCalibration(max_sinks=0), V, r"SinkCalibration\(max_sinks=0\): max_sinks must be an integer >= 1"),
    (lambda: ap.SinkCalibration(heads=[1, 2]), V, r"heads must be \(layer, head\) pairs; e\.g\."),
    (lambda: ap.SinkCalibration(heads={1: 3}), V, r"each layer maps to a list of heads; e\.g\."),
]


@pytest.mark.parametrize("make,error,match", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_parameter_fails_at_construction_and_says_how(make, error, match):
    with pytest.raises(error, match=match) as info:
        make()
    assert isinstance(info.value, ValueError)  # ParameterTypeError too: code catching ValueError keeps working


def _write(tmp_path, kind: str):
    """A profile file of the given (wrong or right) kind."""
    path = tmp_path / f"{kind}.safetensors"
    if kind == "missing":
        return path
    if kind == "corrupt":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    elif kind == "weights":  # a safetensors file that is no attnpatch profile at all
        save_file({"weight": torch.zeros(2, 2)}, str(path))
    elif kind == "pag":
        save_heads(path, {1: [0]})
    elif kind == "neighborhood":
        save_profile(path, ap.Neighborhood(), {"window": torch.tensor([3, 5])})
    elif kind == "act-beyond":  # heads beyond the model its metadata describes
        save_file({"heads": torch.tensor([[0, 1], [5, 0]])}, str(path),
                  metadata={"kind": "act-heads", "num_layers": "2", "num_heads": "4"})
    elif kind == "act-float":
        save_file({"heads": torch.tensor([[0.5, 1.0]])}, str(path), metadata={"kind": "act-heads"})
    return path


@pytest.mark.parametrize("kind,error,match", [
    ("missing", FileNotFoundError, r"'{path}' does not exist.*expected a safetensors file of per-layer.*save_profile"),
    ("corrupt", ValueError, r"'{path}' is not a readable safetensors file .*save_profile\(path, SlidingTile\(\)"),
    ("weights", ValueError, r"'{path}' has no 'method' metadata: it was not written by save_profile"),
    ("pag", ValueError, r"'{path}' was written for a pag-heads profile, not SlidingTile"),
    ("neighborhood", ValueError, r"'{path}' was written for Neighborhood, not SlidingTile; pass it to Neighborhood"),
])
def test_sparse_profile_errors_name_path_format_and_fix(tmp_path, kind, error, match):
    path = _write(tmp_path, kind)
    with pytest.raises(error) as info:
        ap.SlidingTile(profile=path)
    assert re.search(match.format(path=re.escape(str(path))), str(info.value)), str(info.value)


@pytest.mark.parametrize("kind,error,match", [
    ("missing", FileNotFoundError, r"'{path}' does not exist.*kind='act-heads'.*python -m attnpatch.tools.calibrate"),
    ("corrupt", ValueError, r"'{path}' is not a readable safetensors file .*python -m attnpatch.tools.calibrate"),
    ("neighborhood", ValueError, r"{path} is not a SinkCalibration profile \(found: a Neighborhood profile\); expected"),
    ("pag", ValueError, r"{path} is not a SinkCalibration profile \(found: a pag-heads profile\)"),
    ("act-beyond", ValueError, r"{path}: its heads .* beyond the 2 layers x 4 heads its metadata says"),
    ("act-float", ValueError, r"{path}: tensor 'heads' must hold integer \(layer, head\) pairs"),
])
def test_sink_calibration_profile_errors_name_path_format_and_fix(tmp_path, kind, error, match):
    path = _write(tmp_path, kind)
    with pytest.raises(error) as info:
        load_profile(path)
    assert re.search(match.format(path=re.escape(str(path))), str(info.value)), str(info.value)


def test_profile_shape_errors_at_the_call_name_the_file(tmp_path):
    path = _write(tmp_path, "neighborhood")  # 2 layers, one window for all heads
    q = k = v = torch.randn(1, 4, 48, 8)
    with pytest.raises(ValueError) as info:
        ap.attend(q, k, v, ap.Neighborhood(profile=path), Site(grid=(6, 8), layer=4))
    assert re.search(rf"profile '{re.escape(str(path))}' has 2 layers .* layer 4 was called: a table needs one row per "
                     r"layer of this model; write one with .*save_profile", str(info.value)), str(info.value)
    m = ap.Neighborhood(profile={"window": torch.tensor([[3, 5, 7]])})
    with pytest.raises(ValueError, match=r"profile \(a dict\) table 'window' has 3 heads, the model has 4: give one value"):
        ap.attend(q, k, v, m, Site(grid=(6, 8)))


@pytest.mark.parametrize("table,match", [(torch.tensor([0.5, 0.25]), "has 2 layers and no head axis"),
                                         (torch.full((3, 2), 0.5), "has 3 layers and 2 heads")])
def test_profile_for_another_model_fails_at_patch_time(table, match):
    """A transformers config names its layers and heads: a profile made for another model is
    refused by ``patch``, not at the forward of the first layer it lacks."""
    from attnpatch.models.tiny import llm

    model = llm("llama", num_hidden_layers=3)  # 4 heads
    with pytest.raises(ValueError, match=rf"TopKBlocks profile \(a dict\): table 'keep' {match}, but this model has 3 "
                                         r"layers x 4 heads .*save_profile"):
        ap.patch(model, ap.TopKBlocks(keep=0.5, block=16, profile={"keep": table}))
    with ap.patch(model, ap.TopKBlocks(keep=0.5, block=16, profile={"keep": torch.tensor([[0.5], [0.25], [1.0]])})):
        assert model(torch.arange(40)[None]).logits.isfinite().all()  # a right profile patches and runs


def test_good_values_still_construct_and_are_normalised():
    """The checks refuse what is wrong, not what is merely spelled another way."""
    from attnpatch.checks import ParameterTypeError

    assert Site(grid=[np.int64(4), torch.tensor(5)], roles=["cond", "perturbed"], timestep=1).grid == (4, 5)
    assert Site(grid=[np.int64(4), torch.tensor(5)]).grid.__class__ is tuple
    assert all(type(g) is int for g in Site(grid=(np.int64(4), torch.tensor(5))).grid)
    assert Site(roles=["cond"]).roles == ("cond",)
    assert ap.Radial(window=(1, 3), tile=[4, 4]).tile == (4, 4)
    assert ap.Neighborhood(window=[3, 5], causal=(True, False)).window == (3, 5)
    assert ap.Neighborhood(dense_layers=range(2)).dense_layers == (0, 1)
    assert ap.PAG(layers=2, heads={1: range(2)}, steps=range(3))._heads == {1: [0, 1]}
    assert ap.TopKBlocks(keep=np.float32(0.5), mass=None).keep == 0.5
    assert isinstance(ParameterTypeError("x"), TypeError) and isinstance(ParameterTypeError("x"), ValueError)


def test_temperature_single_layer_is_that_layer():
    """``Temperature(layers=3)`` passed construction and crashed at the first forward
    (``site.layer not in 3``); an int is one layer, as in ``patch(..., layers=3)``."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    m = ap.Temperature(tau=2.0, layers=3)
    hot = F.scaled_dot_product_attention(q / 2.0, k, v)  # scores / tau, written from the definition
    torch.testing.assert_close(ap.attend(q, k, v, m, Site(layer=3)), hot)
    torch.testing.assert_close(ap.attend(q, k, v, m, Site(layer=2)), F.scaled_dot_product_attention(q, k, v))
