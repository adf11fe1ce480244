"""kvrt's C kernels for the CPU (kernels_cpu/) against their reference twins: the fused decode over a
layer's tiers against merge_partials of each tier's own partial, CaliDrop's fused step against
CalibrationTier.partial's ops path; every tier kind, ragged rows (padding poisoned with NaN, so a
kernel that reads past a row's length fails), GQA groups, dtypes; the dispatch rule and the fallback
when no compiler works; a model's greedy tokens and logits with the kernels on and off, every spec."""

import contextlib
import os

import numpy as np
import pytest
import torch

from cache_runs import run_spec, token_ids
from kvrt.cache.attention import merge_partials
from kvrt.backends.torch.ops import TorchOps
from kvrt.kernels_cpu import build
from kvrt.kernels_cpu.decode import decode_tiers
from kvrt.cache.methods.calidrop import CaliDrop, CalibrationTier
from kvrt.cache.methods.kivi import KIVI, QuantizedTier
from kvrt.cache.methods.ott import OTT, TracedTier
from kvrt.cache.tiers import FullPrecisionTier, KeptTier

pytestmark = pytest.mark.kernels
OPS = TorchOps()
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # out vs the twin: a few ulps of ~1
NAN = float("nan")
SCALE = 64**-0.5  # CaliDrop's tests: head dim 64, so scores of a model's size (bf16 scores round coarsely past that)


@pytest.fixture(autouse=True)
def kernels_built():
    if build.library() is None:
        pytest.fail("the CPU kernels did not build here (a C compiler is part of the test setup)")


def rows_of(make, lengths, hkv, d, dtype, seed):
    """One tier per batch row, row b holding lengths[b] tokens, stacked into a ragged batch."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        k = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        v = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        k[:, :, ::7] *= 0.02  # a few small keys: OTT traces them
        parts.append(make(k, v))
    return parts


def full_tier(k, v):
    tier = FullPrecisionTier(OPS)
    if k.shape[2]:  # a row that holds nothing yet stays empty
        tier.append(k, v)
    return tier


def kept_tier(k, v):
    tier = KeptTier(OPS)
    if k.shape[2]:
        tier.replace(k, v, torch.arange(k.shape[2], dtype=torch.int32).expand(1, k.shape[1], -1).contiguous())
    return tier


def quantized_tier(config):
    def make(k, v):
        tier = config.new_tier(OPS, 5)
        tier.add(k, v)
        return tier
    return make


def poison(lengths, *buffers):
    """NaN in every row's padding (token axis -2 past the row's length), views' storage included."""
    for x in buffers:
        for row, n in enumerate(lengths):
            x[row, :, n:] = NAN


@contextlib.contextmanager
def twins():
    """Every op on its reference twin (KVRT_KERNELS=off) inside the block."""
    before = os.environ.get("KVRT_KERNELS")
    os.environ["KVRT_KERNELS"] = "off"
    try:
        yield
    finally:
        os.environ.pop("KVRT_KERNELS") if before is None else os.environ.__setitem__("KVRT_KERNELS", before)


def reference(tiers, q, scale, extra=None):
    with twins():
        parts = [tier.partial(q, scale, None, True) for tier in tiers] + ([extra] if extra is not None else [])
        return merge_partials(OPS, parts)


def check(q, tiers, scale=0.3, extra=None, tol=2e-5, poisoned=()):
    """The kernel against the twin; `poisoned`: (lengths, buffers) to fill with NaN past each row's
    length once the twin has run (it reads a row's padding too, and hides it only by a −inf bias)."""
    ref_out, ref_lse = reference(tiers, q, scale, extra)
    for lengths, *buffers in poisoned:
        poison(lengths, *buffers)
    out, lse = decode_tiers(q, [s for tier in tiers for s in tier.segments()], scale, extra)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g,hkv,d", [(1, 2, 64), (3, 3, 64), (4, 2, 128), (7, 1, 48)])
def test_full_precision_tiers_in_one_pass_equal_their_merged_partials(dtype, g, hkv, d):
    """Kept and newest tiers of ragged rows (one empty, padding NaN), merged with an extra partial."""
    lengths, kept_lengths = [70, 0, 129, 64], [40, 40, 12, 40]
    newest = FullPrecisionTier.stack(rows_of(full_tier, lengths, hkv, d, dtype, 1), [1] * 4)
    kept = KeptTier.stack(rows_of(kept_tier, kept_lengths, hkv, d, dtype, 2), [1] * 4)
    q = torch.randn(4, g * hkv, 1, d).to(dtype)
    extra = (torch.randn(4, g * hkv, 1, d).to(dtype), torch.randn(4, g * hkv, 1))
    extra[1][1, 0] = float("-inf")  # a head the extra tier does not cover
    check(q, [newest], tol=TOL[dtype])
    padding = [(lengths, newest.keys.data, newest.values.data), (kept_lengths, kept.k, kept.v)]
    check(q, [kept, newest], extra=extra, tol=TOL[dtype], poisoned=padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [
    KIVI(bits=2, group=32, residual=0), KIVI(bits=4, group=16, residual=0), KIVI(bits=8, group=32, residual=0),
    KIVI(bits=2, group=128, residual=0), KIVI(bits=2, group=32, residual=0, value_group=8),  # a word spans groups
    OTT(bits=2, group=32, residual=0, skip_layers=0), OTT(bits=4, group=32, residual=0, outliers=5, overflow=4,
                                                         skip_layers=0),
], ids=lambda c: f"{c.name}{c.bits}g{c.group}v{c.value_group}")
def test_the_packed_tier_read_from_its_words_equals_its_partial(dtype, config):
    """The quantized tier as stored (words, scales, zeros; OTT's traced slots hidden and its pools
    read beside), ragged rows (one that flushed nothing), against dequantize-and-attend."""
    g, hkv, d = 3, 2, 64
    lengths = [4 * config.group, 2 * config.group, 0, 3 * config.group]
    parts = [quantized_tier(config)(*rows_of(lambda k, v: (k, v), [n], hkv, d, dtype, 5 + i)[0]) if n else
             config.new_tier(OPS, 5) for i, n in enumerate(lengths)]
    tier = type(parts[0]).stack(parts, [1] * 4)
    newest = FullPrecisionTier.stack(rows_of(full_tier, [9, 1, 5, 30], hkv, d, dtype, 9), [1] * 4)
    q = torch.randn(4, g * hkv, 1, d).to(dtype)
    groups = [n // config.group for n in lengths]
    padding = [(lengths, tier.buffers["v_scale"].data, tier.buffers["v_zero"].data),  # per token
               (groups, tier.buffers["k_scale"].data, tier.buffers["k_zero"].data)]  # per group
    check(q, [tier, newest], tol=TOL[dtype], poisoned=padding)


def test_a_traced_slot_is_never_read_from_its_group():
    """OTT: a traced token is read from its pool, not from its group slot: pushing the slot's key
    codes to the top of the range changes nothing, in the kernel as in the twin."""
    tier = quantized_tier(OTT(bits=2, group=32, residual=0, skip_layers=0))(
        *rows_of(lambda k, v: (k, v), [128], 2, 64, torch.float32, 3)[0])
    q = torch.randn(1, 6, 1, 64)
    before, _ = decode_tiers(q, tier.segments(), 0.3)
    head, group, slot = (int(i) for i in (tier.slots.view()[0] >= 0).nonzero()[0][:2].tolist() + [0])
    slot = int(tier.slots.view()[0, head, group].max())
    token, per = group * 32 + slot, 16
    words = tier.buffers["k_codes"].data
    words[0, head, token // per] |= torch.tensor(3, dtype=torch.int32) << ((token % per) * 2)
    after, _ = decode_tiers(q, tier.segments(), 0.3)
    torch.testing.assert_close(after, before)
    check(q, [tier])


def calibration(lengths, hkv, g, d, dtype, config, seed=0):
    """A batch of calibration tiers, row b with lengths[b] evicted tokens (0: nothing evicted yet)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        tier = CalibrationTier(OPS, config)
        if n:
            k = torch.randn(1, hkv, n, d, generator=gen).to(dtype)
            v = torch.randn(1, hkv, n, d, generator=gen).to(dtype)
            tier.add_evicted(k, v, torch.rand(1, hkv, n), torch.randn(1, hkv * g, 3, d, generator=gen).to(dtype), SCALE)
        parts.append(tier)
    tier = CalibrationTier.stack(parts, [1] * len(lengths))
    tier.evicted_lengths = lengths
    return tier


def queries_near(tier, g_noise, seed):
    """Decode queries around the proxies: some heads close (reuse), some turned away (recompute); at
    even seeds head 1 points away from its proxy (ρ = −1)."""
    gen = torch.Generator().manual_seed(seed)
    proxy = tier.proxy[:, :, None, :]
    q = proxy + g_noise * torch.randn(proxy.shape, generator=gen) * proxy.norm(dim=-1, keepdim=True)
    if seed % 2 == 0:
        q[:, 1] = -proxy[:, 1]
    return q


def in_float32(tier):
    """A copy of a calibration tier with its arrays in float32 (bf16 values are exact there)."""
    out = tier.take(range(tier.rows))
    out.out = out.out.float()
    if out.store.length:
        out.store.pairs.data = out.store.pairs.data.float()
    return out


def step_both(tier, q):
    """(kernel result, new state), (reference result, new state) of one step from the same state; the
    kernel's copy of the evicted tier has NaN in each row's padding. The twin runs in float32: in bf16
    its own scores round to bf16 (measured: 0.1-0.5 off a float64 result where the kernel is 0.004 off)."""
    plain = in_float32(tier)
    with twins():
        ref = plain.partial(q.float(), SCALE, None, True)
    assert OPS.paths["calidrop"] == "reference"
    fused = tier.take(range(tier.rows))
    if fused.store.length:
        fused.store.pairs.data = fused.store.pairs.data.clone()
        poison(tier.evicted_lengths, fused.store.pairs.data)
    kernel = fused.partial(q, SCALE, None, True)
    assert OPS.paths["calidrop"] == "cpu"
    return (kernel, fused), (ref, plain)


@pytest.mark.parametrize("granularity", ["head", "kv_head", "layer"])
@pytest.mark.parametrize("rule", ["taylor", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calidrop_step_equals_its_ops_path(granularity, rule, dtype):
    """Branches, recomputed partials, moved lse, new state and counts, over several steps of a ragged
    batch (one row that has evicted nothing). In float32 the twin is off a float64 result by up to
    4e-5 here (exp of scores minus a large lse), the kernel by 3e-6: hence 1e-4."""
    config = CaliDrop(granularity=granularity, rule=rule)
    tier = calibration([50, 0, 130, 64], hkv=2, g=3, d=64, dtype=dtype, config=config)
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype]
    for step, noise in enumerate([0.3, 0.05, 1.0, 0.02]):
        q = queries_near(tier, noise, step).to(dtype)
        (kernel, fused), (ref, plain) = step_both(tier, q)
        assert torch.equal(torch.isinf(kernel[1]), torch.isinf(ref[1]))  # the same heads skip
        torch.testing.assert_close(kernel[1], ref[1], atol=tol, rtol=tol)
        torch.testing.assert_close(kernel[0].float(), ref[0], atol=tol, rtol=tol)
        for name in ("proxy", "out", "lse") + (("mean_key",) if rule == "taylor" else ()):
            torch.testing.assert_close(getattr(fused, name).float(), getattr(plain, name), atol=tol, rtol=tol)
        for name, counts in fused.branch_counts().items():
            np.testing.assert_array_equal(counts, plain.branch_counts()[name])
        tier, tier.evicted_lengths = fused, tier.evicted_lengths
        tier.store.pairs.data = tier.store.pairs.data.nan_to_num(0.0)  # the next twin reads padding too
    assert tier.branch_counts()["recompute"].sum() > 0 and tier.branch_counts()["calibrate"].sum() > 0


@pytest.mark.parametrize("spec", ["calidrop:theta1=1.0,theta2=1.0", "calidrop:theta1=-1.0,theta2=-1.0",
                                  "calidrop:recompute=never", "calidrop:theta1=0.5,theta2=0.9,rule=paper"])
def test_calidrop_step_at_the_thresholds_edges(spec):
    """Every head recomputing, none, no evicted tier kept, a skip band: kernel and twin agree."""
    config = CaliDrop(**{k: (float(v) if "theta" in k else v) for k, v in
                         (kv.split("=") for kv in spec.split(":")[1].split(","))})
    tier = calibration([40, 90], hkv=1, g=4, d=64, dtype=torch.float32, config=config, seed=3)
    q = queries_near(tier, 0.4, 1)
    (kernel, fused), (ref, plain) = step_both(tier, q)
    torch.testing.assert_close(kernel[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernel[0], ref[0], atol=1e-4, rtol=1e-4)
    for name, counts in fused.branch_counts().items():
        np.testing.assert_array_equal(counts, plain.branch_counts()[name])


def test_partial_attention_takes_the_kernel_for_one_query_and_a_bias_broadcast_over_heads():
    """Ops.partial_attention routes a decode query to the kernel (values wider than keys too, as
    CaliDrop's pairs are), reading a key bias of one head as every head's."""
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(3, 6, 1, 64, generator=gen), torch.randn(3, 2, 40, 64, generator=gen)
    v = torch.randn(3, 2, 40, 128, generator=gen)
    bias = torch.where(torch.rand(3, 1, 40, generator=gen) < 0.3, float("-inf"), 0.0)
    lengths = np.array([40, 7, 0])
    with twins():
        ref = OPS.partial_attention(q, k, v, 0.125, key_bias=bias, key_lengths=lengths)
    out = OPS.partial_attention(q, k, v, 0.125, key_bias=bias, key_lengths=lengths)
    assert OPS.paths["decode"] == "cpu"
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=2e-5)


def test_kernels_dispatch_on_cpu_unless_turned_off(monkeypatch):
    q = torch.randn(1, 6, 1, 64)
    assert OPS.decode_kernel(q, 2) is not None and OPS.calidrop_kernel(q, 2) is not None
    assert OPS.decode_kernel(torch.randn(1, 6, 2, 64), 2) is None  # two queries: not a decode step
    monkeypatch.setenv("KVRT_KERNELS", "off")
    assert OPS.decode_kernel(q, 2) is None and OPS.calidrop_kernel(q, 2) is None
    assert OPS.paths["calidrop"] == "reference"


def test_without_a_compiler_kvrt_warns_once_and_takes_the_twins(monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(build, "_library", None)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setenv("KVRT_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    q = torch.randn(1, 6, 1, 64)
    assert OPS.decode_kernel(q, 2) is None and OPS.calidrop_kernel(q, 2) is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "warning: CPU kernels unavailable" in err and "reference" in err
    assert OPS.decode_kernel(q, 2) is None
    assert capfd.readouterr().err == ""  # once


SPECS = ["snapkv:budget=24,window=8", "pyramidkv:budget=24,window=8", "streaming:budget=20,sinks=2",
         "h2o:budget=24", "snapkv:budget=24,window=8+calidrop", "streaming:budget=20,sinks=2+calidrop",
         "h2o:budget=24+calidrop:granularity=kv_head", "pyramidkv:budget=24,window=8+calidrop:rule=paper",
         "snapkv:budget=24,window=8+calidrop:offload=int2", "kivi:bits=2,group=16,residual=8",
         "kivi:bits=4,group=16,residual=0", "ott:bits=2,group=16,residual=8,skip_layers=1",
         "snapkv:budget=24,window=8+ott:bits=2,group=16,residual=8",
         "streaming:budget=20,sinks=2+calidrop+kivi:bits=2,group=16,residual=8"]


@pytest.mark.parametrize("spec", SPECS)
def test_a_model_decodes_the_same_with_the_cpu_kernels_on_and_off(tiny_model_dir, monkeypatch, spec):
    from kvrt.backends.torch.runtime import TorchRuntime

    runtime = TorchRuntime(tiny_model_dir("llama"))
    ids = token_ids(90, seed=4)
    fused, cache = run_spec(runtime, spec, ids, 60)
    assert cache.stats()["kernels"]["decode"] == "cpu"
    monkeypatch.setenv("KVRT_KERNELS", "off")
    plain, cache = run_spec(runtime, spec, ids, 60)
    assert cache.stats()["kernels"]["decode"] == "reference"
    torch.testing.assert_close(fused, plain, atol=2e-4, rtol=2e-4)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
