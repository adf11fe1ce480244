"""Sampling filters, seeded reproducibility and stop strings."""

import numpy as np
import pytest
import torch

from kvrt.backends.torch.ops import TorchOps
from kvrt.errors import KvrtError
from kvrt.generation.stops import StopMatcher
from kvrt.generation.sampling import Sampler, SamplingParams, filtered_probs, penalize_repeats

OPS = TorchOps()
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])


def draws(params, n=200):
    sampler = Sampler(params)
    return [sampler(OPS, LOGITS, []) for _ in range(n)]


def test_greedy_picks_the_argmax():
    assert draws(SamplingParams(), 3) == [5, 5, 5]


def test_same_seed_same_tokens_and_other_seed_differs():
    a = draws(SamplingParams(temp=1.0, seed=7))
    assert a == draws(SamplingParams(temp=1.0, seed=7))
    assert a != draws(SamplingParams(temp=1.0, seed=8))
    assert len(set(a)) > 2  # it really samples


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplingParams(temp=5.0, top_k=2, seed=0))) == {0, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.exp(LOGITS.numpy() - LOGITS.numpy().max())
    probs /= probs.sum()  # sorted: 5 (0.61), 0 (0.22), 1 (0.08) ...
    kept = filtered_probs(LOGITS.numpy().astype(np.float64), SamplingParams(temp=1.0, top_p=0.7)) > 0
    assert set(np.flatnonzero(kept)) == {5, 0}
    assert probs[5] < 0.7 <= probs[5] + probs[0]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    kept = filtered_probs(LOGITS.numpy().astype(np.float64), SamplingParams(temp=1.0, min_p=0.3)) > 0
    assert set(np.flatnonzero(kept)) == {5, 0}  # e^2/e^3 = 0.37 >= 0.3, e^1/e^3 = 0.14 < 0.3


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = penalize_repeats(np.array([2.0, -1.0, 1.0]), [0, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 1.0]
    assert Sampler(SamplingParams(repetition_penalty=10.0))(OPS, LOGITS, [5]) == 0


@pytest.mark.parametrize("bad", [dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1)])
def test_invalid_sampling_values_are_clear_errors(bad):
    with pytest.raises(KvrtError):
        SamplingParams(**bad)


def test_stop_matcher_cuts_at_the_stop_and_holds_back_possible_prefixes():
    m = StopMatcher(["\nUser:"])
    assert m.push("Hello") == "Hello"
    assert m.push(" there\nUs") == " there"  # "\nUs" may begin the stop string
    assert m.push("e") == ""
    assert m.push("r: hi") == "" and m.stopped


def test_stop_matcher_releases_a_false_alarm():
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ""
    assert m.push("ART") == "START"
    assert m.flush() == "" and not m.stopped
