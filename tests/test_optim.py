"""optim.py: the schedules in closed form, who gets Muon and weight decay, and the fp32 Newton-Schulz."""
import argparse

import pytest
import torch

from config import get_config
from model import GPT
from optim import lr_at, make_optimizer, newton_schulz_fp32


def test_lr_schedule_values():
    """Closed form: linear warmup over warmup_frac of the run, cosine to min_lr at its end, min_lr after."""
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup_frac=0.1, schedule="cosine")
    assert lr_at(0.05, args) == pytest.approx(5e-4)
    assert lr_at(0.1, args) == pytest.approx(1e-3)
    assert lr_at(0.55, args) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(1.0, args) == pytest.approx(1e-4)
    assert lr_at(1.7, args) == pytest.approx(1e-4)
    after_warmup = [lr_at(0.1 + i / 100, args) for i in range(91)]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup_frac=0.1, schedule="wsd", decay_frac=0.2)
    assert lr_at(0.05, args) == pytest.approx(5e-4)
    assert lr_at(0.1, args) == lr_at(0.5, args) == lr_at(0.8, args) == pytest.approx(1e-3)
    assert lr_at(0.9, args) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(1.0, args) == pytest.approx(1e-4) and lr_at(1.3, args) == pytest.approx(1e-4)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = GPT(get_config("tiny", n_layer=2, tie_embeddings=False))
    opt = make_optimizer(model, argparse.Namespace(lr=1e-3, muon_lr=2e-2, weight_decay=0.1, optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for group in opt.parts["muon"].param_groups for p in group["params"]}
    adamw = {names[id(p)] for group in opt.parts["adamw"].param_groups for p in group["params"]}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon == {f"layers.{i}.{part}.{p}.weight" for i in range(2) for part, ps in
                    (("self_attn", projections[:4]), ("mlp", projections[4:])) for p in ps}
    assert adamw == set(names.values()) - muon and {"embed_tokens.weight", "lm_head.weight"} <= adamw
    assert opt.parts["muon"].param_groups[0]["lr"] == 2e-2 and opt.parts["adamw"].param_groups[0]["lr"] == 1e-3


def test_weight_decay_groups():
    model = GPT(get_config("tiny", n_layer=2))
    opt = make_optimizer(model, argparse.Namespace(lr=1e-3, weight_decay=0.1, optimizer="adamw"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "embed_tokens.weight" in names and "layers.1.mlp.down_proj.weight" in names
    assert not any("norm" in n for n in names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("shape", [(64, 192), (192, 64)])
def test_newton_schulz_in_fp32_matches_torchs_bf16_iteration(shape):
    """The fp32 Newton-Schulz that Muon uses where bf16 GEMMs are slow against torch's own (bf16): the same
    iteration, so the same result up to bf16 rounding; and both orthogonalise (singular values near 1)."""
    torch.manual_seed(0)
    grad = torch.randn(shape)
    ours = newton_schulz_fp32(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    theirs = torch.optim._muon._zeropower_via_newtonschulz(grad, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
    assert ours.shape == grad.shape and ours.dtype == grad.dtype
    assert (ours - theirs).norm() / theirs.norm() < 3e-2
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_fp32_newton_schulz_runs_for_the_step_only(machine, monkeypatch):
    """Pinned on, Muon's step orthogonalises with newton_schulz_fp32, and torch's own function is back after it;
    pinned off, torch's runs."""
    import torch.optim._muon as muon

    torchs, calls = muon._zeropower_via_newtonschulz, []
    monkeypatch.setattr("optim.newton_schulz_fp32", lambda *a: calls.append("fp32") or newton_schulz_fp32(*a))
    monkeypatch.setattr(muon, "_zeropower_via_newtonschulz", lambda *a: calls.append("torch") or torchs(*a))
    for on in (1, 0):
        machine.pin(f"bf16_gemms_in_fp32={on}")
        model = GPT(get_config("tiny", n_layer=1))
        opt = make_optimizer(model, argparse.Namespace(lr=1e-3, muon_lr=None, weight_decay=0.1, optimizer="muon"))
        model(torch.randint(0, 4096, (2, 16)), torch.randint(0, 4096, (2, 16)))[1].backward()
        calls.clear()
        opt.step()
        assert calls == ["fp32" if on else "torch"] * 7  # one per hidden matrix of the layer
        assert muon._zeropower_via_newtonschulz is not newton_schulz_fp32
