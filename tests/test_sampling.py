"""runtime/sampling.py and runtime/text.py: the pure functions, on hand-made logits and text."""

from __future__ import annotations

import pytest
import torch

from slm_export.runtime import GREEDY, SamplingConfig, TextDecoder, make_generator, sample
from slm_export.runtime.sampling import adjust, min_p_filter, probabilities, top_p_filter
from slm_export.runtime.text import StopStrings
from slm_export.tokenizer import encode


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    inf = float("-inf")
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> p=0.7 needs {0.4, 0.3}; p=0.71 needs 0.15 too
    assert top_p_filter(logits, 0.7).isinf().tolist() == [[True, False, True, False, True]]
    assert top_p_filter(logits, 0.71).isinf().tolist() == [[True, False, True, False, False]]
    assert top_p_filter(logits, 0.01)[0].tolist().count(inf) == 4  # the best always stays
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=None))
    torch.testing.assert_close(probs, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=4, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)
    probs = probabilities(logits, SamplingConfig(temperature=0.5, top_k=None))
    torch.testing.assert_close(probs, torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]) ** 2
                               / (torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2).sum())
    assert probabilities(logits, GREEDY).tolist() == [[0, 1, 0, 0, 0]]


def test_min_p_keeps_tokens_near_the_most_likely_one():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # 0.4 x 0.3 = 0.12: 0.15 and 0.3 stay with 0.4; 0.1 and 0.05 go
    assert min_p_filter(logits, 0.3).isinf().tolist() == [[True, False, True, False, False]]
    assert not min_p_filter(logits, 0.0).isinf().any()
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=None, min_p=0.3))
    torch.testing.assert_close(probs, torch.tensor([[0, 0.4, 0, 0.3, 0.15]]) / 0.85)


def test_sample_draws_only_allowed_tokens_with_the_right_frequencies():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])).repeat(4000, 1)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    draws = sample(logits, cfg, make_generator(0))
    assert set(draws.tolist()) == {1, 3, 4}
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probabilities(logits[:1], cfg)[0], atol=0.03, rtol=0)
    assert sample(logits[:2], GREEDY).tolist() == [1, 1]


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(min_p=1.5), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                 dict(logit_bias=((5, 101.0),))])
def test_a_config_out_of_range_is_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_penalties_and_bias_on_hand_made_logits():
    """OpenAI's presence / frequency penalties over the generated tokens' counts, CTRL's
    repetition penalty over every token seen (positive logits divided, negative multiplied),
    and the logit bias added last."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # generated: token 0 twice, 1 once
    seen = torch.tensor([[True, True, False, True]])  # token 3 is in the prompt
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                         logit_bias=((2, 10.0),))
    got = adjust(logits, cfg, counts, seen)
    want = torch.tensor([[2.0 / 2 - 0.5 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5 + 10, 3.0 / 2]])
    torch.testing.assert_close(got, want)
    assert adjust(logits, SamplingConfig()) is logits  # nothing to adjust: the same tensor
    assert SamplingConfig(logit_bias=((1, 2.0),)).adjusts and not SamplingConfig().adjusts
    assert sample(adjust(logits, SamplingConfig(logit_bias=((1, 100.0),))), GREEDY).tolist() == [1]


def test_text_decoder_holds_back_split_characters():
    ids = encode(" a unicorn 🦄 and 你好!")
    decoder = TextDecoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == " a unicorn 🦄 and 你好!"
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # some tokens were held back
    assert TextDecoder().push(ids[2]) == " "  # the first byte pair of the emoji waits


def test_stop_strings_cut_the_text_before_a_stop_spanning_pieces():
    stop = StopStrings(["The end", "\n\n"])
    assert stop.push("Once upon a time. Th") == ("Once upon a time. ", False)  # "Th" may start one
    assert stop.push("ey") == ("They", False)  # it did not
    assert stop.push(" lived. The e") == (" lived. ", False)
    assert stop.push("nd of it") == ("", True)
    assert stop.push("more") == ("", True) and stop.flush() == ""
    other = StopStrings(["\n\n", "lived"])
    assert other.push("they lived\n\nhappily") == ("they ", True)  # the earliest stop wins
    tail = StopStrings(["The end"])
    assert tail.push("and The") == ("and ", False) and tail.flush() == "The"  # ended: released
    assert StopStrings([]).push("anything") == ("anything", False)
