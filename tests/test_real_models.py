"""Real architectures as users build them (transformers tiny random configs with their default settings).

Each test is a regression for something that broke on a real model: the configs are left at the
defaults users get (key/value cache on, tied embeddings), only the sizes are tiny.
"""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch

import sparsetrain
from sparsetrain import methods
from sparsetrain.autograd import MaskedPruner

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    except TimeoutError as exc:  # raised deep inside a library loop: report it without its traceback
        pytest.fail(str(exc), pytrace=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 64, (2, 8))}


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 64, (2, 8))}


def test_llama_rotary_attention_is_left_out_instead_of_hanging():
    """Torch-Pruning's group walk never ends through rotary embeddings; the MLP neurons are still pruned."""
    model, x = _llama()
    with _deadline(60):
        pruner = MaskedPruner(model, methods.Magnitude(0.5, structure="neurons"), example_inputs=x)
    assert [g.name for g in pruner.groups.groups] == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    assert "does not converge" in pruner.groups.skipped["model.layers.0.self_attn.q_proj"]
    with _deadline(60):
        small = pruner.export(x)
    assert small.model.layers[0].mlp.down_proj.weight.shape == (32, 24)
    model.eval()
    with torch.no_grad():
        want, got = model(**x).logits, small(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_llama_attention_named_in_include_is_refused_with_the_reason():
    model, x = _llama()
    with _deadline(60), pytest.raises(ValueError, match="q_proj.*does not converge"):
        MaskedPruner(model, methods.GReg1(0.5), example_inputs=x, include=["model.layers.0.self_attn.q_proj"])


def test_gpt2_with_its_default_kv_cache_traces_and_keeps_the_setting():
    """GPT-2's default ``use_cache=True`` adds a cache concatenation Torch-Pruning could not size."""
    model, x = _gpt2()
    assert model.config.use_cache
    opt = sparsetrain.optim.AdamW(model.parameters(), lr=1e-3, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="neurons"), example_inputs=x)
    assert [g.name for g in pruner.groups.groups] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert model.config.use_cache
    small = pruner.export(x)
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert small.config.use_cache


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_export_folds_the_mask_into_a_tied_weight(path):
    """GPT-2's ``lm_head.weight`` is ``wte.weight``: the copy lists it once, under the embedding's name."""
    model, x = _gpt2()
    method = methods.Magnitude(0.5)
    if path == "fused":
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
        pruner = sparsetrain.Pruner(model, opt, method)
        model(**x).logits.sum().backward()
        opt.step()
    else:
        pruner = MaskedPruner(model, method, backend="torch")
        pruner.step()
    tied = [t for t in pruner.targets if "lm_head.weight" in (t.name, *t.aliases)]
    assert [(t.name, t.aliases) for t in tied] == [("transformer.wte.weight", ("lm_head.weight",))]
    small = pruner.export()
    assert small.lm_head.weight is small.transformer.wte.weight
    mask = pruner.mask("lm_head.weight")
    assert not mask.all()
    torch.testing.assert_close(small.lm_head.weight, model.lm_head.weight.detach() * mask, rtol=0, atol=0)
    model.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, model(**x).logits)


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_the_tied_embedding_and_lm_head_are_one_target_counted_once(path):
    """Both modules of GPT-2's tied weight selected: one target, one mask, its parameters counted once."""
    from sparsetrain.summary import layer_rows

    model, x = _gpt2()
    method, include = methods.Magnitude(0.5), ["transformer.wte", "lm_head", "transformer.h.0.mlp.c_fc"]
    if path == "fused":
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
        pruner = sparsetrain.Pruner(model, opt, method, include=include)
        model(**x).logits.sum().backward()
        opt.step()
    else:
        pruner = MaskedPruner(model, method, include=include, backend="torch")
        pruner.step()
        assert len(model.lm_head.parametrizations.weight) == len(model.transformer.wte.parametrizations.weight) == 1
    names = [(t.name, t.aliases) for t in pruner.targets]
    assert names == [("transformer.wte.weight", ("lm_head.weight",)), ("transformer.h.0.mlp.c_fc.weight", ())]
    rows = layer_rows(pruner, x)
    assert [r.params for r in rows] == [64 * 32, 32 * 128]
    assert rows[0].macs == 8 * 64 * 32  # lm_head's 8 tokens; the embedding lookup multiplies nothing
    assert sum(r.alive_params for r in rows) == (64 * 32 + 32 * 128) // 2
    assert "transformer.wte.weight (= lm_head.weight)" in pruner.summary()
    mask = pruner.mask("lm_head.weight")
    assert torch.equal(pruner.mask("transformer.wte"), mask) and int(mask.sum()) == 64 * 32 // 2
    ids = x["input_ids"]
    torch.testing.assert_close(model.transformer.wte(ids), (model.lm_head.weight * mask)[ids], rtol=0, atol=0)


def test_summary_counts_macs_from_keyword_inputs():
    """``summary(example_inputs)`` takes the dict of keyword arguments transformers models are called with."""
    from sparsetrain.summary import layer_rows

    model, x = _gpt2()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5), exclude=["lm_head"])
    rows = layer_rows(pruner, x)
    tokens = x["input_ids"].shape[1]
    assert [r.macs for r in rows] == [t.param.numel() * tokens for t in pruner.targets]
    assert "transformer.h.0.mlp.c_fc.weight" in pruner.summary(x)
