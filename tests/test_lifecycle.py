"""The life of a patched model: what users do to it after ``patch`` (adapters, LoRA, fused QKV,
new processors, ``copy.deepcopy``) keeps it patched with the same method, ``unpatch`` then gives
exactly the stock model after the same operation, errors arrive at ``patch`` time, and every call
handed back to stock attention is logged and counted (``Handle.stats()`` / ``summary()``)."""
import copy
import logging
import threading

import pytest
import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch.patchers import route
from attnpatch.models.tiny import CASES, llm

SPARSE = ap.SlidingTile(tile=2, window=1)  # on the tiny (3, 5) grid: changes the output


def _flux():
    c = CASES["flux"]
    torch.manual_seed(0)
    return c.build().eval(), c.inputs


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "attnpatch" and r.levelno == logging.WARNING]


def _ip_state(model, clip=8, tokens=4):
    """A random Flux IP-adapter state dict with the keys and shapes diffusers' loader expects."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    d, inner = model.config.joint_attention_dim, model.inner_dim
    ip = {}
    for i in range(len(model.transformer_blocks)):
        for n in ("to_k_ip", "to_v_ip"):
            ip.update({f"{i}.{n}.weight": r(inner, d), f"{i}.{n}.bias": r(inner)})
    proj = {"proj.weight": r(d * tokens, clip), "proj.bias": r(d * tokens), "norm.weight": 1 + r(d), "norm.bias": r(d)}
    return {"image_proj": proj, "ip_adapter": ip}


def _ip_run(model, inputs):
    kw = inputs()
    kw["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(2))]}
    return model(**kw)[0]


@torch.no_grad()
def test_ip_adapter_loads_on_a_patched_flux_and_unpatch_is_exact():
    model, inputs = _flux()
    ref = copy.deepcopy(model)
    sd = _ip_state(model)
    h = ap.patch(model, SPARSE)
    model._load_ip_adapter_weights(sd, low_cpu_mem_usage=False)  # FluxIPAdapterMixin.load_ip_adapter's step
    assert any("to_k_ip" in k for k in model.state_dict())  # the adapter's weights stay in the module tree
    out = _ip_run(model, inputs)
    ref._load_ip_adapter_weights(sd, low_cpu_mem_usage=False)
    stock = _ip_run(ref, inputs)
    with ap.patch(ref, SPARSE):  # the other order: load, then patch
        assert torch.equal(_ip_run(ref, inputs), out)
    assert (out - stock).abs().max() > 1e-3 and h.stats()["routed"] > 0
    ap.unpatch(model)
    assert torch.equal(_ip_run(model, inputs), stock)


@torch.no_grad()
def test_set_attn_processor_keeps_the_patch_and_unpatch_keeps_the_new_processors():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model, inputs = _flux()
    stock = model(**inputs())[0]
    with ap.patch(model, SPARSE) as h:
        sparse = model(**inputs())[0]
        model.set_attn_processor(FluxAttnProcessor())
        assert torch.equal(model(**inputs())[0], sparse)  # still patched, with the same method
        new = dict(model.attn_processors)
    assert h.stats()["routed"] == 4 and not h.stats()["handed_back"]
    assert model.attn_processors == new  # unpatch does not undo the user's own change
    assert torch.equal(model(**inputs())[0], stock)


def _sd3():
    from diffusers import SD3Transformer2DModel  # without dual attention: diffusers' fused processor needs joint calls

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=4).eval()


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_fuse_qkv_projections_on_a_patched_model(family):
    torch.manual_seed(0)
    model, inputs = (_sd3(), CASES["sd3"].inputs) if family == "sd3" else _flux()
    ref = copy.deepcopy(model)
    ref.fuse_qkv_projections()
    stock_fused = ref(**inputs())[0]
    with ap.patch(ref, SPARSE):
        sparse_fused = ref(**inputs())[0]
    h = ap.patch(model, SPARSE)
    model.fuse_qkv_projections()  # SD3 installs FusedJointAttnProcessor2_0 here
    out = model(**inputs())[0]
    torch.testing.assert_close(out, sparse_fused, atol=1e-6, rtol=1e-6)
    assert (out - stock_fused).abs().max() > 1e-4 and not h.stats()["handed_back"]
    ap.unpatch(model)
    assert torch.equal(model(**inputs())[0], stock_fused)


@torch.no_grad()
def test_lora_on_a_patched_model():
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = _flux()
    ref = copy.deepcopy(model)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    with ap.patch(model, SPARSE) as h:
        torch.manual_seed(3)
        model.add_adapter(lora)
        out = model(**inputs())[0]
    torch.manual_seed(3)
    ref.add_adapter(lora)
    stock = ref(**inputs())[0]
    with ap.patch(ref, SPARSE):
        assert torch.equal(ref(**inputs())[0], out)
    assert (out - stock).abs().max() > 1e-3 and h.stats()["routed"] > 0
    assert torch.equal(model(**inputs())[0], stock)


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 12, generator=g), return_dict=False)
    return unet, inputs


class Diagonal(ap.Method):
    """Each query sees only its own key: far from stock, so a silent fallback shows."""

    def plan(self, q, k, site):
        return ap.Plan(mask_mod=lambda b, h, qi, kv: qi == kv, name="diagonal")


@torch.no_grad()
def test_a_processor_that_computes_attention_itself_is_handed_back_loudly(caplog):
    from diffusers.models.attention_processor import AttnProcessor

    unet, inputs = _unet()
    ref = copy.deepcopy(unet)
    ref.set_attn_processor(AttnProcessor())  # bmm attention: nothing attnpatch can intercept
    stock = ref(**inputs)[0]
    with pytest.raises(TypeError, match="AttnProcessor .* computes attention itself.*restore the default processors"):
        ap.patch(ref, Diagonal())  # known at patch time: refused
    mixed = copy.deepcopy(unet)
    [*_, last] = (m for m in mixed.modules() if hasattr(m, "processor"))
    last.set_processor(AttnProcessor())
    with pytest.raises(TypeError, match="computes attention itself"):
        ap.patch(mixed, Diagonal())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in mixed.modules())  # nothing half-applied
    h = ap.patch(unet, Diagonal())
    unet.set_attn_processor(AttnProcessor())  # after patch: each call runs stock, said once and counted
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        out = unet(**inputs)[0]
        unet(**inputs)
    stats = h.stats()
    (reason, n), = stats["handed_back"].items()
    assert "AttnProcessor" in reason and n == 2 * len(h.modules) and stats["routed"] == 0
    assert len(_warnings(caplog)) == 1 and reason in _warnings(caplog)[0].getMessage()
    assert "handed back to stock attention" in h.summary() and reason in h.summary()
    assert torch.equal(out, stock)
    ap.unpatch(unet)
    assert torch.equal(unet(**inputs)[0], stock)


class DropoutProcessor:
    """A self-attention processor that asks for attention dropout (module-level F, as diffusers' own)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        return out.transpose(1, 2).flatten(2)  # (B, S, H * D)


@torch.no_grad()
def test_dropout_is_handed_back_loudly(caplog):
    model, inputs = _flux()
    h = ap.patch(model, SPARSE)
    attn = model.single_transformer_blocks[0].attn
    attn.set_processor(DropoutProcessor())
    x = torch.randn(1, 6, attn.query_dim)
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        attn(hidden_states=x)
        attn(hidden_states=x)
    assert h.stats() == {"routed": 0, "handed_back": {"dropout_p > 0": 2}, "skipped": {}}
    assert len(_warnings(caplog)) == 1 and "dropout_p > 0" in _warnings(caplog)[0].getMessage()
    ap.unpatch(model)
    assert F is torch.nn.functional  # this module's F is routed only while patched


@torch.no_grad()
def test_calls_that_are_not_visual_are_counted_as_not_applicable(caplog):
    model, inputs = _flux()
    attn = model.single_transformer_blocks[0].attn
    x = torch.randn(1, 6, attn.query_dim)  # 6 tokens, fewer than the 15-token image grid: text only
    stock = attn(hidden_states=x)
    with caplog.at_level(logging.WARNING, logger="attnpatch"), ap.patch(model, SPARSE) as h:
        model(**inputs())  # the grid is now known
        out = attn(hidden_states=x)
    assert h.stats() == {"routed": 2, "handed_back": {}, "skipped": {"text-only self-attention": 1}}
    assert not _warnings(caplog) and "1 not applicable (text-only self-attention: 1)" in h.summary()
    assert torch.equal(out, stock)


@pytest.mark.parametrize("unpatch_first", ["original", "copy"])
@torch.no_grad()
def test_deepcopy_of_a_patched_diffusers_model(unpatch_first):
    model, inputs = _flux()
    stock = model(**inputs())[0]
    h = ap.patch(model, SPARSE)
    sparse = model(**inputs())[0]
    twin = copy.deepcopy(model)
    assert torch.equal(twin(**inputs())[0], sparse)
    hc = ap.handle.handle_of(twin)
    assert hc is not h and hc.active and hc.method is h.method and hc.stats()["routed"] == 2
    first, second = (model, twin) if unpatch_first == "original" else (twin, model)
    ap.unpatch(first)
    assert torch.equal(first(**inputs())[0], stock)
    assert torch.equal(second(**inputs())[0], sparse)  # still patched, still sparse
    ap.unpatch(second)
    assert torch.equal(second(**inputs())[0], stock)
    assert not any(n.startswith("diffusers.models.transformers.transformer_flux") for n in route._INSTALLED)
    with pytest.raises(ValueError, match="not patched"):
        ap.unpatch(second)


def test_deepcopy_of_a_patched_pipeline():
    from attnpatch.models.tiny import flux_call, flux_pipeline

    pipe = flux_pipeline()
    stock = flux_call(pipe, steps=2)
    ap.patch(pipe, SPARSE)
    sparse = flux_call(pipe, steps=2)
    twin = copy.deepcopy(pipe)
    hook, twin_hook = (p.transformer._diffusers_hook.get_hook("attnpatch") for p in (pipe, twin))
    assert twin_hook.model is twin.transformer and twin_hook.state.tracker is not hook.state.tracker  # its own steps
    ap.unpatch(pipe)
    assert torch.equal(flux_call(twin, steps=2), sparse) and torch.equal(flux_call(pipe, steps=2), stock)
    ap.unpatch(twin)
    assert torch.equal(flux_call(twin, steps=2), stock) and "progress_bar" not in twin.__dict__


@pytest.mark.parametrize("unpatch_first", ["original", "copy"])
@torch.no_grad()
def test_deepcopy_of_a_patched_transformers_model(unpatch_first):
    model = llm("llama")
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    stock = model(ids).logits
    h = ap.patch(model, ap.SinkWindow(sink=1, window=3))
    sparse = model(ids).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids).logits, sparse) and (sparse - stock).abs().max() > 1e-3
    assert ap.handle.handle_of(twin).stats()["routed"] == 2 and h.stats()["routed"] == 2
    first, second = (model, twin) if unpatch_first == "original" else (twin, model)
    ap.unpatch(first)
    assert torch.equal(first(ids).logits, stock) and first.config._attn_implementation == "sdpa"
    assert torch.equal(second(ids).logits, sparse)
    ap.unpatch(second)
    assert torch.equal(second(ids).logits, stock)


def test_named_backend_that_can_never_run_the_method_raises_at_patch_time():
    model, _ = _flux()
    with pytest.raises(ValueError, match="backend 'tiles' can never run Dense.*leave backend unset"):
        ap.patch(model, ap.Dense(), backend="tiles")
    assert ap.handle.handle_of(model) is None and not model._forward_pre_hooks
    ap.patch(model, SPARSE, backend="tiles").remove()  # a method with block plans is fine


def test_compiled_model_names_the_fix():
    model, _ = _flux()
    with pytest.raises(TypeError, match=r"patch before compiling.*_orig_mod"):
        ap.patch(torch.compile(model), ap.Dense())
    assert not model._forward_pre_hooks


@torch.no_grad()
def test_counters_are_per_patch_and_thread_safe():
    model, inputs = _flux()
    m = llm("llama")
    with ap.patch(model, ap.Dense()) as h, ap.patch(m, ap.Dense()) as hm:
        threads = [threading.Thread(target=lambda: [model(**inputs()) for _ in range(3)]) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m(torch.randint(3, 97, (1, 5)))
    assert h.stats() == {"routed": 12, "handed_back": {}, "skipped": {}} and hm.stats()["routed"] == 2
    assert h.summary() == "attnpatch: 12 calls through Dense()"


@torch.no_grad()
def test_two_threads_on_one_model_each_see_their_own_grid():
    """Thread A stops inside its forward (its grid already read from its inputs) while thread B runs
    a forward on another grid; A must still attend on its own grid."""
    from attnpatch.models.tiny import _flux_inputs

    model, _ = _flux()
    a_in, b_in = _flux_inputs(H=3, W=5), _flux_inputs(H=5, W=3)
    ap.patch(model, SPARSE)
    serial = {"A": model(**a_in)[0], "B": model(**b_in)[0]}
    a_waits, b_done, out = threading.Event(), threading.Event(), {}

    def hold_a(module, args):
        if threading.current_thread().name == "A":
            a_waits.set()
            b_done.wait(30)

    model.transformer_blocks[0].attn.register_forward_pre_hook(hold_a)

    def run(name, inputs):
        with torch.no_grad():
            out[name] = model(**inputs)[0]

    a = threading.Thread(target=run, args=("A", a_in), name="A")
    a.start()
    assert a_waits.wait(30)
    run("B", b_in)
    b_done.set()
    a.join()
    assert (serial["A"] - serial["B"]).abs().max() > 1e-3  # the two grids give different masks
    assert torch.equal(out["A"], serial["A"]) and torch.equal(out["B"], serial["B"])
