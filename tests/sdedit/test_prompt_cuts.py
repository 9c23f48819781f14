"""sdedit.prompt_cuts: which text encoders take only the first tokens of a prompt, for every
text family (the tiny CLIP tokenizers take 12 tokens, the tiny T5 the pipelines' 256 / 512)."""

from __future__ import annotations

import pytest
import torch

from sdedit import PromptCut, prompt_cuts
from tests.support.tiny_latent import MAX_LENGTH

TEN = "red blue cat dog room bed lamp sky red blue"  # 10 words + start and end: 12 tokens


def test_a_clip_prompt_is_cut_where_the_encoder_stops_reading(tiny_sd):
    """The count is the encoder's own: an 11-word prompt is embedded as its first 10 words."""
    longer = TEN + " cat"
    assert prompt_cuts(tiny_sd, [TEN, longer, "", longer]) == [
        (), (PromptCut("text_encoder", MAX_LENGTH + 1, MAX_LENGTH),), (),
        (PromptCut("text_encoder", MAX_LENGTH + 1, MAX_LENGTH),)]
    embed = tiny_sd.text.embed
    assert torch.equal(embed([longer]), embed([TEN]))  # what was cut is never read


def test_each_encoder_of_sdxl_and_sd3_reports_its_own_window(tiny_sdxl, tiny_sd3):
    longer = TEN + " cat"
    both = (PromptCut("text_encoder", 13, 12), PromptCut("text_encoder_2", 13, 12))
    assert prompt_cuts(tiny_sdxl, [longer, TEN]) == [both, ()]
    assert prompt_cuts(tiny_sd3, [longer]) == [both]  # T5 (256 tokens) takes it whole
    t5_long = "red " * 300  # 300 words + </s> for T5; CLIP stops at 12 as before
    (cuts,) = prompt_cuts(tiny_sd3, [t5_long])
    assert cuts[-1] == PromptCut("text_encoder_3", 301, 256) and len(cuts) == 3


@pytest.mark.parametrize("words, expected", [
    (11, [PromptCut("text_encoder", 13, 12)]),
    (600, [PromptCut("text_encoder", 602, 12), PromptCut("text_encoder_2", 601, 512)])])
def test_flux_cuts_clip_at_its_window_and_t5_at_512(tiny_flux_dev, words, expected):
    assert prompt_cuts(tiny_flux_dev, [" ".join(["red"] * words)]) == [tuple(expected)]


def test_a_model_without_text_cuts_nothing(tiny_vp):
    assert prompt_cuts(tiny_vp, ["red " * 100, ""]) == [(), ()]


@pytest.mark.parametrize("family", ["qwen-image", "z-image", "chroma"])
def test_the_open_families_count_the_tokens_their_encoder_reads(open_family_models, family):
    """Qwen-Image counts the prompt in its template less the 34 dropped template tokens,
    Z-Image the prompt in its chat template, Chroma plain T5 tokens; each takes 512."""
    model = open_family_models[family]
    long = "red " * 600
    (cuts,), (short,) = prompt_cuts(model, [long]), prompt_cuts(model, ["a red room"])
    assert short == ()
    assert len(cuts) == 1 and cuts[0].encoder == "text_encoder" and cuts[0].kept == 512
    assert cuts[0].tokens > 600
    if family == "qwen-image":  # what the encoder reads of the cut prompt is exactly 512 tokens
        rows = model.text.embed([long]).rows
        assert int(rows["encoder_hidden_states_mask"].sum()) == cuts[0].kept
