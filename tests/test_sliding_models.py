"""Mistral-style models (a `sliding_window` for every layer, no `layer_types`), on a tiny
randomly initialised local model: fingerprinted as sliding, transferred and decoded past the
window token for token as plain HF generation (the vLLM connector's refusal: test_vllm_units).
Its head_dim (80) is not a power of two: the codec's block rotation and group 16 run too."""

import pytest
import torch

import spectrumkv as skv
from spectrumkv.engines.hf import dir_fingerprint

from .tiny_models import MISTRAL_WINDOW as WINDOW
from .tiny_models import mistral_dir as make_mistral


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="module")
def mistral(mistral_dir):
    return skv.load(str(mistral_dir))


def test_every_layer_of_a_mistral_style_model_slides(mistral, mistral_dir):
    fp = mistral.fingerprint
    assert fp.sliding_layers == (0, 1, 2) and fp.sliding_window == WINDOW
    assert dir_fingerprint(mistral_dir, "float16") == fp


def test_transfer_and_decode_past_the_window(mistral):
    """Before, the fingerprint said "no sliding layers": prefill found 15 cached slots where it
    expected the whole prompt, and decoding past the window failed on tensor sizes."""
    ids = torch.randint(0, 2048, (40,), generator=torch.Generator().manual_seed(1))
    context, last = skv.split_prompt(ids)
    pre = skv.prefill(mistral, context)
    assert pre.layers[0].positions[0] == context.numel() - (WINDOW - 1)
    ref = skv.generate(mistral, skv.reference_state(mistral, pre), last, 8)
    hf = mistral.model.generate(ids.view(1, -1), max_new_tokens=8, do_sample=False)
    assert hf[0, ids.numel() :].tolist() == ref and len(set(ref)) > 3
    for policy, budget in (("spectrum", 1.0), ("spectrum", 0.4)):
        header, plan = skv.plan_transfer(mistral, pre, skv.PolicyConfig(policy, budget=budget))
        out = skv.generate(mistral, skv.receive(mistral, skv.encode(header, pre, plan)), last, 8)
        if budget == 1.0:
            assert out == ref
        else:  # quantized tiers through the block rotation, decoded past the window
            assert len(out) == 8 and plan.counts()
