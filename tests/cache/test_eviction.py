"""Eviction (StreamingLLM, H2O, SnapKV, PyramidKV) and CaliDrop: the properties that must hold.

Tolerances: fp32; logits within 1e-4 of the full cache where the merge is exact.
"""

import pytest
import torch

from cache_runs import run_spec as run, token_ids
from kvrt.backends.torch.ops import TorchOps
from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.cache.kvcache import KVCache
from kvrt.errors import KvrtError
from kvrt.cache.methods.base import Candidates, selection
from kvrt.cache.methods.h2o import H2O, accumulated_attention
from kvrt.cache.methods.pyramidkv import PyramidKV
from kvrt.cache.methods.snapkv import SnapKV
from kvrt.cache.methods.streaming import StreamingLLM
from kvrt.cache.spec import CacheSpec

OPS = TorchOps()
METHODS = ["streaming:budget={b}", "h2o:budget={b}", "snapkv:budget={b},window=8",
           "pyramidkv:budget={b},window=8"]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return TorchRuntime(tiny_model_dir("llama"))  # 4 query heads, 2 KV heads: GQA 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("calidrop", ["", "+calidrop"])
def test_budget_at_least_the_sequence_equals_the_full_cache(runtime, method, calidrop):
    ids = token_ids(90)
    full, _ = run(runtime, "full", ids, 80)
    got, cache = run(runtime, method.format(b=200) + calidrop, ids, 80)
    assert torch.equal(got, full)
    assert all(layer.kept.length == 0 for layer in cache.layers)


@pytest.mark.parametrize("method", METHODS)
def test_calidrop_recomputing_every_step_equals_full_attention(runtime, method):
    """θ1 = 1.0 recomputes over the whole uncapped evicted tier at each query: the merge is exact."""
    ids = token_ids(100, seed=1)
    full, _ = run(runtime, "full", ids, 80, all_logits=False)
    spec = method.format(b=24) + "+calidrop:theta1=1.0,theta2=1.0"
    got, cache = run(runtime, spec, ids, 80, all_logits=False)
    assert all(0 < layer.kept.length <= layer.budget < 80 for layer in cache.layers)  # really evicted
    assert (got - full).abs().max().item() <= 1e-4
    counts = cache.stats()["calidrop"]
    assert counts["recompute"] > 0 and counts["skip"] == 0


def test_eviction_without_calibration_changes_the_output(runtime):
    ids = token_ids(100, seed=1)
    full, _ = run(runtime, "full", ids, 80, all_logits=False)
    got, _ = run(runtime, "snapkv:budget=24,window=8", ids, 80, all_logits=False)
    assert (got - full).abs().max().item() > 1e-3  # the exactness above is CaliDrop's doing


def test_recompute_never_keeps_no_evicted_tier(runtime):
    ids = token_ids(100, seed=2)
    _, auto = run(runtime, "snapkv:budget=24,window=8+calidrop", ids, 80)
    _, never = run(runtime, "snapkv:budget=24,window=8+calidrop:recompute=never", ids, 80)
    assert never.layers[0].calibration.store.length == 0 and auto.layers[0].calibration.store.length > 0
    assert never.stats()["calidrop"]["recompute"] == 0
    assert never.nbytes() < auto.nbytes()


def test_calibration_size_caps_the_evicted_tier(runtime):
    _, cache = run(runtime, "snapkv:budget=24,window=8+calidrop:calibration_size=10", token_ids(90), 80)
    assert all(layer.calibration.store.length == 10 for layer in cache.layers)


@pytest.mark.parametrize("budget", [16, 32, 64])
def test_stored_tiers_are_per_kv_head_and_bytes_fall_with_the_budget(runtime, budget):
    prompt = token_ids(120)
    _, cache = run(runtime, f"snapkv:budget={budget},window=8", prompt, 120)
    layer = cache.layers[0]
    assert tuple(layer.kept.k.shape) == (1, runtime.args.num_kv_heads, budget, runtime.args.head_dim)
    assert layer.newest.length == 0 and layer.newest.keys.data is None  # the full prompt's buffers are freed
    per_token = 2 * runtime.args.num_kv_heads * runtime.args.head_dim * 4 + runtime.args.num_kv_heads * 4
    assert cache.nbytes() == runtime.args.num_layers * budget * per_token  # K, V (fp32) and int32 positions


@pytest.mark.parametrize("method", ["streaming:budget=20", "h2o:budget=20"])
def test_streaming_and_h2o_stay_within_budget_during_decode(runtime, method):
    _, cache = run(runtime, method, token_ids(70), 40)
    for layer in cache.layers:
        assert layer.kept.length + layer.newest.length <= 20
    if method.startswith("streaming"):  # sinks and the newest tokens, nothing else
        positions = cache.layers[0].kept.positions[0, 0].tolist()
        assert positions == [0, 1, 2, 3] + list(range(70 - 16, 70))


def test_snapkv_decode_appends_after_compressing_the_prompt(runtime):
    _, cache = run(runtime, "snapkv:budget=20,window=8", token_ids(70), 40)
    assert cache.layers[0].kept.length == 20 and cache.layers[0].newest.length == 30


# --- selections against plain references --------------------------------------------------


def random_candidates(s=60, t=12, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, hkv, s, d, generator=g)
    q = torch.randn(1, hq, t, d, generator=g)
    positions = torch.arange(s, dtype=torch.int32).expand(1, hkv, s).contiguous()
    return k, q, positions


def plain_window_scores(q, k, scale):
    """Loop-by-loop SnapKV scoring: softmax per query head, causal inside the window, summed over the
    window, averaged over each KV head's query heads."""
    hq, w, s, hkv = q.shape[1], q.shape[2], k.shape[2], k.shape[1]
    out = torch.zeros(hkv, s)
    for h in range(hq):
        for i in range(w):
            visible = s - w + i + 1
            logits = torch.tensor([float(q[0, h, i] @ k[0, h // (hq // hkv), j]) * scale for j in range(visible)])
            out[h // (hq // hkv), :visible] += torch.softmax(logits, 0) / (hq // hkv)
    return out


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snapkv_selection_equals_a_plain_reference(pool):
    k, q, positions = random_candidates()
    method = SnapKV(budget=20, window=8, kernel=5, pool=pool)
    c = Candidates(k, positions, None, q, 0.25, offset=60, budget=20)
    got = method.scores(OPS, c)[0]
    plain = plain_window_scores(q[:, :, -8:], k, 0.25)
    prefix = plain[:, :52]
    padded = torch.nn.functional.pad(prefix, (2, 2), value=0.0 if pool == "avg" else float("-inf"))
    windows = padded.unfold(1, 5, 1)
    pooled = windows.mean(-1) if pool == "avg" else windows.max(-1).values
    torch.testing.assert_close(got[:, :52], pooled, atol=1e-5, rtol=1e-5)
    assert torch.isinf(got[:, 52:]).all()
    kept, _ = selection(OPS, got[None], 20)
    kept = kept[0]
    # the 12 best of the prefix, then the window; max pooling makes exact ties, which go to the earlier
    # token (ranked on kvrt's values, already shown equal to the reference's within rounding)
    best = [sorted(range(52), key=lambda j: (-float(got[h, j]), j))[:12] for h in range(2)]
    assert kept.tolist() == [sorted(b) + list(range(52, 60)) for b in best]


def test_h2o_accumulated_attention_equals_full_matrix_column_sums():
    k, q, _ = random_candidates(s=40, t=40)
    got = accumulated_attention(OPS, q, k, 0.3, block=7)  # blocks that do not divide T
    full = plain_window_scores(q, k, 0.3)  # all 40 queries over all 40 keys, causal
    torch.testing.assert_close(got[0], full, atol=1e-5, rtol=1e-5)


def test_h2o_keeps_recent_half_and_heaviest_rest():
    k, q, positions = random_candidates()
    acc = torch.rand(1, 2, 60, generator=torch.Generator().manual_seed(3))
    scores = H2O(budget=20).scores(OPS, Candidates(k, positions, acc, q, 0.25, offset=60, budget=20))
    keep = torch.sort(torch.argsort(scores[0], dim=-1, descending=True)[:, :20]).values
    for h in range(2):
        heavy = sorted(torch.topk(acc[0, h, :50], 10).indices.tolist())
        assert keep[h].tolist() == heavy + list(range(50, 60))


def test_streaming_keeps_sinks_and_most_recent():
    k, q, positions = random_candidates()
    scores = StreamingLLM(budget=12, sinks=4).scores(OPS, Candidates(k, positions, None, q, 0.25, 60, 12))
    keep = torch.sort(torch.argsort(scores[0], dim=-1, descending=True)[:, :12]).values
    assert keep[0].tolist() == [0, 1, 2, 3] + list(range(52, 60))


def test_pyramidkv_budgets_follow_the_published_schedule():
    m = PyramidKV(budget=128, window=32)
    budgets = [m.layer_budget(layer, 30, 2000) for layer in range(30)]
    # min = 96 // 20 = 4, max = 192 - 4 = 188, step = 184 // 29 = 6: layer l keeps 188 - 6 l + 32
    assert budgets == [188 - 6 * layer + 32 for layer in range(30)]
    assert sum(budgets) == 3990 and budgets[0] > budgets[-1]
    # a prompt with max >= n - w caps the top: max = 200 - 32 = 168, min = 192 - 168 = 24, step = 144 // 29 = 4
    assert [m.layer_budget(layer, 30, 200) for layer in (0, 29)] == [168 + 32, 168 - 29 * 4 + 32]
    # shorter than 2 (C - w) = 192: the reference falls back to a uniform C
    assert {m.layer_budget(layer, 30, 150) for layer in range(30)} == {128}


def test_pyramidkv_really_stores_per_layer_budgets(runtime):
    _, cache = run(runtime, "pyramidkv:budget=24,window=8", token_ids(120), 120)
    assert [layer.kept.length for layer in cache.layers] == [
        PyramidKV(budget=24, window=8).layer_budget(i, len(cache.layers), 120) for i in range(len(cache.layers))
    ]


@pytest.mark.parametrize("spec,needle", [
    ("snapkv:budget=32", "must exceed 32"),
    ("snapkv:budget=16,window=16", "observation window"),
    ("streaming:budget=4", "sink"),
    ("streaming:budget=8,sinks=8", "sink"),
    ("h2o:ratio=0", "ratio"),
    ("pyramidkv:ratio=1.2", "ratio"),
    ("snapkv", "exactly one of budget"),
    ("snapkv:budget=64,ratio=0.5", "exactly one of budget"),
    ("snapkv:budget=64,kernel=4", "odd"),
    ("snapkv:budget=64,pool=mean", "avg or max"),
    ("snapkv:budget=64+calidrop:recompute=sometimes", "auto or never"),
    ("full+calidrop", "after an eviction method"),
    ("snapkv:budget=64+quantize", "unknown cache modifier"),
    ("lru:budget=64", "unknown cache method .lru.; available: full, streaming, h2o, snapkv, pyramidkv, kivi"),
])
def test_bad_specs_and_impossible_budgets_are_clear_errors(spec, needle):
    with pytest.raises(KvrtError, match=needle):
        CacheSpec.parse(spec)


def test_a_ratio_too_small_for_the_prompt_is_a_clear_error(runtime):
    cache = runtime.new_cache("snapkv:ratio=0.1,window=8")
    with pytest.raises(KvrtError, match="ratio 0.1 of a 50-token prompt keeps 5 tokens"):
        runtime.forward(token_ids(50), cache)


def test_spec_round_trips_and_the_flags_map_onto_it():
    from kvrt.cli.cache_flags import cache_spec_from

    assert str(CacheSpec.parse("snapkv:budget=128+calidrop:theta1=0.7")) == "snapkv:budget=128+calidrop:theta1=0.7"
    assert cache_spec_from(None, "h2o", 64, True) == "h2o:budget=64+calidrop"
    assert cache_spec_from(None, None, None, False) == "full"
    assert cache_spec_from(kv_bits=2) == "ott:bits=2"
    assert cache_spec_from(None, "snapkv", 512, True, 2, 64, 16, 0) == \
        "snapkv:budget=512+calidrop+ott:bits=2,group=64,residual=16,outliers=0"


def test_chat_with_eviction_rebuilds_or_reuses_its_cache(tiny_model_dir):
    import kvrt
    from kvrt.generation.sampling import SamplingParams

    model = kvrt.load(str(tiny_model_dir("qwen2")), backend="torch")
    session = model.chat_session(cache="streaming:budget=24")
    for text in ("first turn " * 5, "second turn " * 5):
        session.send(text, max_tokens=6).text()
        assert session.cache.offset == len(session.cached_ids)
        assert all(layer.kept.length + layer.newest.length <= 24 for layer in session.cache.layers)


def test_kvcache_rejects_specs_it_cannot_build():
    with pytest.raises(KvrtError):
        KVCache(OPS, 2, "snapkv:budget=8")


@pytest.mark.parametrize("spec", ["h2o:budget=24+calidrop", "pyramidkv:budget=24,window=8+calidrop",
                                  "kivi:bits=2,group=32,residual=16,value_group=16"])
def test_a_prefill_shared_across_specs_equals_running_it_under_each(runtime, spec):
    """Compression never changes a prompt's own outputs, so one full-cache prefill can seed any spec."""
    ids = token_ids(100, seed=5)
    direct, direct_cache = run(runtime, spec, ids, 80, all_logits=False)
    full = runtime.new_cache("full")
    captured = []
    for layer in full.layers:
        layer.attend = lambda q, k, v, scale, f=layer.attend: captured.append((q, k, v, scale)) or f(q, k, v, scale)
    first = runtime.forward(ids[:80], full)
    cache = runtime.new_cache(spec)
    for layer, chunk in zip(cache.layers, captured):
        layer.prefilled(*chunk)
    replayed = torch.cat([first] + [runtime.forward([t], cache) for t in ids[80:]])
    assert torch.equal(replayed, direct)
    for a, b in zip(cache.layers, direct_cache.layers):
        assert a.nbytes() == b.nbytes()
        assert (a.kept.positions is None and b.kept.positions is None) or torch.equal(a.kept.positions, b.kept.positions)


def test_calidrop_recomputes_only_the_kv_heads_that_ask_and_gets_them_exact():
    """A tier in another memory (host, for a GPU) is read only for the KV heads that ask; a tier
    where the query lies is attended whole in one call (no head copies), equally exact; the mean
    key (rule=taylor) comes from the same pass, on both paths."""
    from kvrt.cache.methods.calidrop import CaliDrop

    k, q, _ = random_candidates(s=30, t=1, hq=6, hkv=3)
    v = torch.randn_like(k)
    tier = CaliDrop().new_tier(OPS)
    tier.add_evicted(k, v, torch.rand(1, 3, 30), q, 0.25)
    asks = torch.tensor([[[False], [False], [True], [False], [False], [False]]])  # query head 2 -> KV head 1
    ref_out, ref_lse = OPS.partial_attention(q, k, v, 0.25)
    ref_key = OPS.partial_attention(q, k, k, 0.25)[0]
    assert tier.store.local_to(q)
    out, lse = tier.recomputed(q, asks, 0.25, False, local=True)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    _, _, key = tier.recomputed(q, asks, 0.25, True, local=True)
    torch.testing.assert_close(key, ref_key, atol=1e-6, rtol=1e-6)
    assert tier.recomputed(q, asks & False, 0.25, True, local=False) is None  # no head asks: nothing moves
    out, lse, key = tier.recomputed(q, asks, 0.25, True, local=False)  # as if the tier sat in host memory
    torch.testing.assert_close(out[:, 2:4], ref_out[:, 2:4], atol=1e-6, rtol=1e-6)  # both heads of KV head 1
    torch.testing.assert_close(lse[:, 2:4], ref_lse[:, 2:4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(key[:, 2:4], ref_key[:, 2:4], atol=1e-6, rtol=1e-6)
    assert not out[:, :2].any() and not out[:, 4:].any()  # the others were never computed


@pytest.mark.parametrize("offload", ["none", "int8"])
def test_the_evicted_tier_gives_its_partial_and_mean_key_in_one_call(offload):
    """Full precision or quantized (whole groups + a rest), the store's partial with mean_key equals
    attention over its own tokens with the keys as values; int8 stays close to the exact tier."""
    from kvrt.cache.methods.evicted_store import evicted_store

    torch.manual_seed(2)
    k, v, q = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 4, 1, 16)
    store = evicted_store(OPS, offload)
    store.add(k[:, :, :20], v[:, :, :20])
    store.add(k[:, :, 20:], v[:, :, 20:])
    out, lse, key = store.partial(q, 0.25, None, True)
    sk, sv = store.tokens()
    ref_out, ref_lse = OPS.partial_attention(q, sk, sv, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key, OPS.partial_attention(q, sk, sk, 0.25)[0], atol=1e-5, rtol=1e-5)
    assert (key - OPS.partial_attention(q, k, k, 0.25)[0]).abs().max() < (0.05 if offload == "int8" else 1e-5)


def test_calidrop_taylor_rule_moves_the_reused_lse_toward_the_query():
    """rule=taylor keeps the evicted keys' mean under the proxy, the gradient of the partial's lse
    (over scale): at the proxy itself it changes nothing, and for a query near the proxy its lse is
    closer to the exact one than the paper's reused lse; the output is the paper's."""
    from kvrt.cache.methods.calidrop import CaliDrop

    torch.manual_seed(7)
    ops, scale = TorchOps(), 0.25
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    proxy = torch.randn(1, 4, 1, 16)
    tiers = {rule: CaliDrop(rule=rule, theta1=-1.0, theta2=-0.5).new_tier(ops) for rule in ("paper", "taylor")}
    for tier in tiers.values():
        tier.add_evicted(k, v, torch.zeros(1, 2, 40), proxy, scale)
    near = proxy + 0.05 * torch.randn(1, 4, 1, 16)
    exact = ops.partial_attention(near, k, v, scale)[1]
    (out_p, lse_p), (out_t, lse_t) = (tiers[r].partial(near, scale, None, True) for r in ("paper", "taylor"))
    torch.testing.assert_close(out_t, out_p)
    assert (lse_t - exact).abs().max() < 0.5 * (lse_p - exact).abs().max()
    same = tiers["taylor"].partial(proxy, scale, None, True)[1]
    torch.testing.assert_close(same, tiers["paper"].partial(proxy, scale, None, True)[1])
    with pytest.raises(KvrtError):
        CacheSpec.parse("snapkv:budget=64+calidrop:rule=bogus")


def test_calidrop_taylor_reuses_wherever_it_does_not_recompute_and_paper_keeps_its_skip_band():
    """rule=taylor's θ2 defaults to θ1 (its moved lse never overstates the tier, so no head drops
    it); rule=paper keeps the paper's θ2 = 0.85, and an explicit θ2 wins over either default."""
    from kvrt.cache.methods.calidrop import CaliDrop

    assert (CaliDrop().theta1, CaliDrop().theta2) == (0.7, 0.7)
    assert CaliDrop(theta1=0.85).theta2 == 0.85 and CaliDrop(rule="paper").theta2 == 0.85
    assert CaliDrop(theta2=0.9).theta2 == 0.9
    torch.manual_seed(11)
    ops, scale = TorchOps(), 0.25
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    proxy = torch.randn(1, 4, 1, 16)
    tiers = {rule: CaliDrop(rule=rule).new_tier(ops) for rule in ("paper", "taylor")}
    for tier in tiers.values():
        tier.add_evicted(k, v, torch.zeros(1, 2, 40), proxy, scale)
    unit = proxy / proxy.norm(dim=-1, keepdim=True)
    side = torch.randn(1, 4, 1, 16)
    side = side - (side * unit).sum(-1, keepdim=True) * unit
    between = unit + 0.9 * side / side.norm(dim=-1, keepdim=True)  # cos ≈ 0.74: inside the paper's skip band
    for rule, tier in tiers.items():
        _, lse = tier.partial(between, scale, None, True)
        assert torch.isfinite(lse).all() == (rule == "taylor")
        assert tier.branch_counts()["recompute"].sum() == 0


def test_calidrop_taylor_mean_key_follows_a_recomputed_proxy():
    """After a recompute moves the proxy, the next reuse moves the lse with the mean key under the
    new proxy (from the recompute's own pass), tokens evicted in between included; and a reuse
    never exceeds the exact lse (lse is convex in q: the first-order value is a lower bound)."""
    from kvrt.cache.methods.calidrop import CaliDrop

    torch.manual_seed(3)
    ops, scale = TorchOps(), 0.25
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    tier = CaliDrop(theta1=0.5, theta2=0.9).new_tier(ops)
    tier.add_evicted(k[:, :, :30], v[:, :, :30], torch.zeros(1, 2, 30), torch.randn(1, 4, 1, 16), scale)
    far = torch.randn(1, 4, 1, 16)
    far = far - (far * tier.proxy[:, :, None]).sum(-1, keepdim=True) * tier.proxy[:, :, None] / (
        tier.proxy[:, :, None] ** 2).sum(-1, keepdim=True)  # orthogonal to the proxy: every head recomputes
    tier.partial(far, scale, None, True)
    assert tier.branch_counts()["recompute"].sum() == 4
    torch.testing.assert_close(tier.mean_key, ops.partial_attention(far, k[:, :, :30], k[:, :, :30], scale)[0])
    tier.add_evicted(k[:, :, 30:], v[:, :, 30:], torch.zeros(1, 2, 10), far, scale)
    near = far + 0.03 * torch.randn(1, 4, 1, 16)
    _, lse = tier.partial(near, scale, None, True)
    assert tier.branch_counts()["calibrate"].sum() == 4
    at_far = ops.partial_attention(far, k, v, scale)
    mean_key = ops.partial_attention(far, k, k, scale)[0]
    expected = at_far[1] + scale * ((near - far) * mean_key).sum(-1)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)
    assert (lse <= ops.partial_attention(near, k, v, scale)[1] + 1e-5).all()


@pytest.mark.parametrize("granularity,recomputed", [("head", 1), ("kv_head", 2), ("layer", 6)])
def test_calidrop_granularity_decides_per_head_per_group_or_per_layer(granularity, recomputed):
    """One query head turned away from its proxy: `head` recomputes it alone, `kv_head` its GQA
    group (their mean ρ falls below θ1), `layer` every head; each recomputed head is exact."""
    from kvrt.cache.methods.calidrop import CaliDrop

    torch.manual_seed(5)
    ops, scale = TorchOps(), 0.25
    k, v = torch.randn(1, 3, 30, 16), torch.randn(1, 3, 30, 16)
    proxy = torch.randn(1, 6, 1, 16)
    tier = CaliDrop(theta1=0.3, theta2=1.0, granularity=granularity).new_tier(ops)  # no reuse: recompute or skip
    tier.add_evicted(k, v, torch.zeros(1, 3, 30), proxy, scale)
    q = proxy + 0.05 * torch.randn(1, 6, 1, 16)  # ρ near 1 (but below θ2 = 1) for every head ...
    q[:, 2] = -proxy[:, 2]  # ... but query head 2 (KV head 1, with head 3): ρ = −1
    out, lse = tier.partial(q, scale, None, True)
    assert tier.branch_counts()["recompute"].sum() == recomputed
    exact = ops.partial_attention(q, k, v, scale)
    torch.testing.assert_close(lse[:, 2], exact[1][:, 2], atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse).sum() == 6 - recomputed  # the heads left out skip
