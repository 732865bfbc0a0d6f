"""SinkRedistribution beyond its zoo rows (tests/zoo.py: the golden on every kernel): the attention it
leaves (v = identity makes the output the probabilities), the precision of rows with little target mass,
profiles, MagnetScan's calibration rules, and the patchers it reaches (a diffusers FLUX pipeline; a
transformers LLaVA's language model)."""
from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.redistribute import MagnetScan, load_profile, save_profile
from goldens_redistribute import redistribution

J = Site(grid=(3, 4), text_len=4, kind="joint")  # keys 0..3 text, 4..15 visual


def _qkv(S=16, D=16, B=1, H=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, dtype=dtype) for _ in range(3)]


def test_probabilities_move_as_defined():
    """With v = identity the output is p': magnets keep 1 - alpha, targets gain alpha M pro rata, others stay."""
    q, k, _ = _qkv()
    v = torch.eye(16, dtype=torch.float64).expand(1, 2, 16, 16)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
    out = ap.attend(q, k, v, ap.SinkRedistribution(magnets=[0, 2], targets="visual", alpha=0.7), J, backend="reference")
    M = p[..., [0, 2]].sum(-1, keepdim=True)
    assert torch.allclose(out[..., [0, 2]], 0.3 * p[..., [0, 2]], atol=1e-12)
    assert torch.allclose(out[..., [1, 3]], p[..., [1, 3]], atol=1e-12)  # text keys that are not magnets: untouched
    T = p[..., 4:].sum(-1, keepdim=True)
    assert torch.allclose(out[..., 4:], p[..., 4:] * (1 + 0.7 * M / T), atol=1e-12)
    assert torch.allclose(out.sum(-1), torch.ones(1, 2, 16, dtype=torch.float64), atol=1e-12)


def test_nothing_to_move_is_plain_attention():
    """No magnet (none given, none above the threshold) returns the kernel's output itself."""
    q, k, v = _qkv(dtype=torch.float32)
    dense = ap.attend(q, k, v, ap.Dense(), J, backend="sdpa")
    for m in (ap.SinkRedistribution(magnets=[]), ap.SinkRedistribution(threshold=1e6)):
        assert torch.equal(ap.attend(q, k, v, m, J, backend="sdpa"), dense)


def test_causal_rows_without_targets_are_unchanged():
    q, k, v = _qkv(S=20)
    site = Site(causal=True)
    dense = ap.attend(q, k, v, ap.Dense(), site, backend="reference")
    out = ap.attend(q, k, v, ap.SinkRedistribution(magnets=[0], targets=range(12, 20)), site, backend="reference")
    assert torch.equal(out[:, :, :12], dense[:, :, :12]) and not torch.allclose(out[:, :, 12:], dense[:, :, 12:])


def test_rows_with_little_target_mass_stay_accurate_in_float32():
    """A magnet holding ~99.9 % of a row leaves T ~ 1e-3: A_T taken as the difference (out - A_notT) would
    carry float32 rounding / T; such rows are recomputed over their targets (error stays ~1e-6)."""
    q, k, v = _qkv(S=24, D=16, seed=3)
    k[:, :, 1] = 40 * q.mean(2) / q.mean(2).norm(dim=-1, keepdim=True)  # key 1 dominates every row
    targets = list(range(4, 24))  # more targets than other keys: the complement path
    want = redistribution(q, k, v, 0, False, alpha=0.5, magnets=[1], targets=targets)[0]
    m = ap.SinkRedistribution(magnets=[1], targets=targets, alpha=0.5)
    got = ap.attend(q.float(), k.float(), v.float(), m, Site(), backend="sdpa").double()
    assert (got - want).abs().max() < 2e-5


def test_profile_round_trip_and_refusals(tmp_path):
    path = tmp_path / "var.safetensors"
    save_profile(path, [(0, 1), (2, 0)], [0, 5], model_type="llama")
    heads, mags, meta = load_profile(path)
    assert heads == [(0, 1), (2, 0)] and mags == [0, 5] and meta["kind"] == "redistribution"
    m = ap.SinkRedistribution(heads=path)
    assert m.magnets == (0, 5) and m.heads_at(2, 4) == [0] and m.heads_at(1, 4) == []
    from safetensors.torch import save_file
    save_file({"heads": torch.zeros(1, 2, dtype=torch.int64)}, str(tmp_path / "act.safetensors"), metadata={"kind": "act-heads"})
    with pytest.raises(ValueError, match="not a SinkRedistribution profile"):
        ap.SinkRedistribution(heads=tmp_path / "act.safetensors")


@pytest.mark.parametrize("kw", [dict(alpha=0), dict(alpha=1.5), dict(magnets="text"), dict(targets="image"),
                                dict(queries=[-1]), dict(max_magnets=0)])
def test_bad_parameters_name_the_parameter(kw):
    with pytest.raises(ValueError, match=f"SinkRedistribution\\({next(iter(kw))}="):
        ap.SinkRedistribution(**kw)


def test_magnet_scan_rules():
    """MagnetScan: a boosted key is a magnet (ACT's rule); a head whose rows look at the visual keys but not
    mostly at a visual magnet is image-centric (VAR's rule); one that looks elsewhere is not."""
    S, D = 16, 16
    q, k, _ = _qkv(S=S, D=D, H=3, seed=1)
    k[:, 0, 2] = 8 * q[:, 0].mean(1)  # head 0: key 2 (text) a magnet
    k[:, 1, 6] = 8 * q[:, 1].mean(1)  # head 1: key 6 (visual) takes most of the visual mass
    q[:, 2] = q[:, 2, :1]  # head 2: every row the same query, and the visual keys point away from it
    k[:, 2, 4:] = -2 * q[:, 2, :1]
    scan = MagnetScan()
    scan(q, k, J)
    assert 2 in scan.magnets(threshold=2.5)
    heads = scan.heads(magnets=[2, 6], visual=range(4, 16), rho=0.5, summ=0.2)
    assert heads == [(0, 0)]


def test_transformers_vlm_language_model():
    """A LLaVA built from a config: the wrapper is refused, its language model patches; Dense there is
    bit-identical, and redistribution changes only the rows after the image (VAR's text rows)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                          patch_size=8)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
    vlm = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=5,
                                                    vision_feature_layer=-1, vision_feature_select_strategy="default")).eval()
    ids, px = torch.tensor([[1, 7, 8, 5, 5, 5, 5, 9, 10, 11]]), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        stock = vlm(input_ids=ids, pixel_values=px).logits
        with pytest.raises(TypeError, match="llava"):
            ap.patch(vlm, ap.Dense())
        with ap.patch(vlm.model.language_model, ap.Dense()):
            assert torch.equal(vlm(input_ids=ids, pixel_values=px).logits, stock)
        m = ap.SinkRedistribution(magnets=[0], targets=range(3, 7), queries=range(7, 10), alpha=0.8)
        with ap.patch(vlm.model.language_model, m):
            got = vlm(input_ids=ids, pixel_values=px).logits
    assert torch.equal(got[:, :7], stock[:, :7]) and (got[:, 7:] - stock[:, 7:]).abs().max() > 1e-4


def test_diffusers_flux_joint_calls():
    """On a tiny FLUX pipeline the text keys are the candidates and the visual keys the targets: it runs
    through the joint attention calls and changes the picture."""
    from attnpatch.models import tiny
    pipe = tiny.flux_pipeline()
    stock = tiny.flux_call(pipe, steps=2)
    with ap.patch(pipe, ap.SinkRedistribution(candidates="text", targets="visual", threshold=0.5, alpha=0.9)) as h:
        got = tiny.flux_call(pipe, steps=2)
        assert h.stats()["routed"] > 0
    stock, got = (x[0] if isinstance(x, (tuple, list)) else x for x in (stock, got))
    assert not torch.allclose(torch.as_tensor(got), torch.as_tensor(stock))


def test_all_other_keys_as_targets_match_the_golden_on_each_path():
    """targets=None (the magnets' own sums reused) and the same set given explicitly (the general path)."""
    q, k, v = _qkv(S=16, B=2, H=2, seed=5)
    want = redistribution(q, k, v, 0, False, alpha=0.6, magnets=[0, 2])[0]
    others = [j for j in range(16) if j not in (0, 2)]
    for m in (ap.SinkRedistribution(magnets=[0, 2], alpha=0.6), ap.SinkRedistribution(magnets=[0, 2], targets=others, alpha=0.6)):
        assert (ap.attend(q, k, v, m, J, backend="reference") - want).abs().max() < 1e-12
