"""The entropy baselines (Tent, EATA, COME) against hand-computed values, direct float64 loops and a tiny LoRA Llama."""

import math

import pytest
import torch

from tlm_plugin.objectives.entropy import (
    come_entropy,
    come_loss,
    come_opinion,
    conservative_logits,
    eata_loss,
    eata_threshold,
    eata_weights,
    fisher_penalty,
    mean_entropy,
    tent_loss,
    token_entropy,
    uncertainty_lower_bound,
)


def entropy_of(probs: list[float]) -> float:
    return -sum(q * math.log(q) for q in probs if q > 0)


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def direct_opinion(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """COME's opinion straight from the definition, in float64: e = exp(z), S = sum e + K, b = e / S, u = K / S."""
    evidence = z.double().exp()
    strength = evidence.sum(-1, keepdim=True) + z.size(-1)
    return evidence / strength, (z.size(-1) / strength).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Softmax entropy and Tent


def test_token_entropy_of_uniform_is_log_v_and_of_one_hot_is_zero():
    vocab = 50
    uniform = torch.zeros(2, 3, vocab)
    assert torch.allclose(token_entropy(uniform, torch.ones(2, 3)), torch.full((2, 3), math.log(vocab)))
    one_hot = torch.zeros(1, 1, vocab)
    one_hot[..., 7] = 100.0
    assert token_entropy(one_hot, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-6)


def test_token_entropy_of_a_hand_computed_three_class_case_is_shift_invariant():
    z = logits_for([0.5, 0.25, 0.25]).float().view(1, 1, 3)
    expected = 1.5 * math.log(2)  # 0.5 ln 2 + 2 * 0.25 ln 4
    assert token_entropy(z, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-6)
    assert token_entropy(z + 1e4, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-3)


def test_token_entropy_is_float32_for_bf16_logits():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 300) * 5
    h = token_entropy(z.bfloat16(), torch.ones(2, 4))
    assert h.dtype == torch.float32
    direct = token_entropy(z.bfloat16().double(), torch.ones(2, 4))
    assert torch.allclose(h.double(), direct, atol=1e-5)


def test_masked_positions_are_ignored_even_if_garbage():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    garbage = z.clone()
    garbage[mask == 0] = float("nan")
    h = mean_entropy(garbage, mask)
    assert h[0].item() == pytest.approx(token_entropy(z[:1, [0, 1, 3]], torch.ones(1, 3)).mean().item(), rel=1e-6)
    assert h[1].item() == 0.0  # a sample without any position
    assert (token_entropy(garbage, mask)[mask == 0] == 0).all()


def test_tent_loss_equals_a_direct_loop_over_samples_and_positions():
    torch.manual_seed(1)
    z = torch.randn(4, 6, 9, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    per_sample = []
    for i in range(4):
        positions = [t for t in range(6) if mask[i, t]]
        if positions:  # samples without a generated token are left out of the mean
            per_sample.append(sum(entropy_of(z[i, t].softmax(-1).tolist()) for t in positions) / len(positions))
    assert tent_loss(z, mask).item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-9)


def test_tent_loss_gradient_reaches_unmasked_positions_only():
    torch.manual_seed(2)
    z = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    tent_loss(z, mask).backward()
    per_position = z.grad.abs().sum(-1)
    assert (per_position[mask == 1] > 0).all()
    assert (per_position[mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# EATA


def test_eata_threshold_is_a_fraction_of_log_vocab():
    assert eata_threshold(1000) == pytest.approx(0.4 * math.log(1000))  # EATA's ImageNet value, 2.763
    assert eata_threshold(128256) == pytest.approx(0.4 * math.log(128256))
    assert eata_threshold(100, fraction=0.5) == pytest.approx(0.5 * math.log(100))
    with pytest.raises(ValueError, match="vocab_size"):
        eata_threshold(1)
    with pytest.raises(ValueError, match="fraction"):
        eata_threshold(100, fraction=0.0)


def test_eata_weights_are_exp_of_margin_minus_entropy_on_reliable_samples_only():
    entropy = torch.tensor([0.5, 1.0, 1.2, 2.0], requires_grad=True)
    weights, selected = eata_weights(entropy, e0=1.2)
    assert selected.tolist() == [True, True, False, False]  # strict H < E0
    assert weights[0].item() == pytest.approx(math.exp(0.7), rel=1e-6)  # 1 / exp(0.5 - 1.2)
    assert weights[1].item() == pytest.approx(math.exp(0.2), rel=1e-6)
    assert weights[2].item() == 0.0 and weights[3].item() == 0.0
    assert not weights.requires_grad


def three_samples_of_known_entropy() -> tuple[torch.Tensor, list[float]]:
    """(3, 2, 4) logits whose two positions share one distribution per sample: H = ln 4, 0.940, 0.168 nats."""
    dists = [[0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.97, 0.01, 0.01, 0.01]]
    z = torch.stack([logits_for(d).float().expand(2, 4) for d in dists]).clone()
    return z, [entropy_of(d) for d in dists]


def test_eata_loss_sums_weighted_entropies_over_selected_and_divides_by_their_number():
    z, h = three_samples_of_known_entropy()
    z.requires_grad_(True)
    loss, weights, selected = eata_loss(z, torch.ones(3, 2), e0=1.0)
    assert selected.tolist() == [False, True, True]
    expected = (math.exp(1.0 - h[1]) * h[1] + math.exp(1.0 - h[2]) * h[2]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert weights[0].item() == 0.0 and weights[1].item() == pytest.approx(math.exp(1.0 - h[1]), rel=1e-5)
    loss.backward()
    per_sample = z.grad.abs().sum(dim=(1, 2))
    assert per_sample[0] == 0  # filtered out: no gradient
    assert (per_sample[1:] > 0).all()


def test_eata_loss_with_the_default_threshold_and_an_extra_keep_mask():
    z, h = three_samples_of_known_entropy()
    loss, _, selected = eata_loss(z, torch.ones(3, 2), e0=eata_threshold(4))  # 0.4 ln 4 = 0.555 nats
    assert selected.tolist() == [False, False, True]
    assert loss.item() == pytest.approx(math.exp(eata_threshold(4) - h[2]) * h[2], rel=1e-5)
    _, _, selected = eata_loss(z, torch.ones(3, 2), e0=1.0, keep=torch.tensor([True, False, True]))
    assert selected.tolist() == [False, False, True]


def test_eata_loss_is_zero_but_attached_when_nothing_is_selected_and_skips_empty_samples():
    z, _ = three_samples_of_known_entropy()
    z.requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])  # the confident sample has no generated position
    loss, weights, selected = eata_loss(z, mask, e0=0.5)
    assert not selected.any() and loss.item() == 0.0 and (weights == 0).all()
    loss.backward()
    assert (z.grad == 0).all()


def test_fisher_penalty_on_a_tiny_case():
    params = {"w": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([3.0], requires_grad=True)}
    anchor = {"w": torch.zeros(2), "b": torch.ones(1)}
    fisher = {"w": torch.tensor([1.0, 0.5])}  # "b" is not penalised
    penalty = fisher_penalty(params, anchor, fisher, coeff=2000.0)
    assert penalty.item() == pytest.approx(2000.0 * (1.0 * 1.0 + 0.5 * 4.0))
    penalty.backward()
    assert params["w"].grad.tolist() == pytest.approx([2000.0 * 2 * 1.0 * 1.0, 2000.0 * 2 * 0.5 * 2.0])
    assert params["b"].grad is None
    assert fisher_penalty(params, anchor, {}, coeff=1.0).item() == 0.0
    with pytest.raises(KeyError, match="missing"):
        fisher_penalty(params, anchor, {"missing": torch.ones(1)}, coeff=1.0)


def test_come_opinion_sums_to_one_and_matches_the_definition_in_float64():
    torch.manual_seed(4)
    z = torch.randn(3, 5, 17) * 2
    belief, u = come_opinion(z)
    assert belief.shape == (3, 5, 17) and u.shape == (3, 5)
    assert torch.allclose(belief.sum(-1) + u, torch.ones(3, 5), atol=1e-6)
    b_direct, u_direct = direct_opinion(z)
    assert torch.allclose(belief.double(), b_direct, atol=1e-7)
    assert torch.allclose(u.double(), u_direct, atol=1e-7)
    strength = z.double().exp().sum(-1) + 17
    assert torch.allclose(u.double(), 17 / strength, atol=1e-7)  # u = K / S


def test_come_entropy_matches_the_definition_in_float64():
    torch.manual_seed(5)
    z = torch.randn(2, 3, 6) * 2
    b, u = direct_opinion(z)
    direct = -(b * b.log()).sum(-1) - u * u.log()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    h = come_entropy(z, mask)
    assert torch.allclose(h[mask == 1].double(), direct[mask == 1], atol=1e-6)
    assert (h[mask == 0] == 0).all()


def test_come_stays_finite_for_huge_logits_and_a_50k_vocabulary():
    torch.manual_seed(6)
    vocab = 50_000
    z = (torch.randn(1, 2, vocab) * 1e3).requires_grad_(True)
    belief, u = come_opinion(z)
    assert torch.isfinite(belief).all() and torch.isfinite(u).all()
    assert torch.allclose(belief.sum(-1) + u, torch.ones(1, 2), atol=1e-5)
    h = come_entropy(z, torch.ones(1, 2))
    assert torch.isfinite(h).all() and (h >= 0).all() and (h <= math.log(vocab + 1)).all()
    come_loss(z, torch.ones(1, 2)).backward()
    assert torch.isfinite(z.grad).all()
    # All logits at -1e3: no evidence at all, the opinion is pure uncertainty (u = 1, H = 0).
    _, u = come_opinion(torch.full((1, vocab), -1e3))
    assert u.item() == pytest.approx(1.0)


def test_come_opinion_of_bf16_logits_is_float32():
    belief, u = come_opinion(torch.randn(2, 30).bfloat16())
    assert belief.dtype == torch.float32 and u.dtype == torch.float32


def test_conservative_logits_keep_the_value_and_remove_the_scale_from_the_gradient():
    torch.manual_seed(7)
    z = (torch.randn(2, 3, 40) * 3).requires_grad_(True)
    rescaled = conservative_logits(z)
    assert torch.allclose(rescaled, z, atol=1e-5)  # same forward value (official code)
    assert come_loss(z, torch.ones(2, 3)).item() == pytest.approx(
        come_loss(z, torch.ones(2, 3), conservative=False).item(), rel=1e-6
    )
    (grad,) = torch.autograd.grad(come_loss(z, torch.ones(2, 3)), z)
    (free_grad,) = torch.autograd.grad(come_loss(z, torch.ones(2, 3), conservative=False), z)
    cosine = torch.nn.functional.cosine_similarity(grad, z.detach(), dim=-1)
    assert cosine.abs().max() < 1e-4  # orthogonal to z: no first-order change of the logits' scale
    assert torch.nn.functional.cosine_similarity(free_grad, z.detach(), dim=-1).abs().min() > 1e-2


def test_conservative_descent_keeps_the_logit_norm_and_unconstrained_descent_does_not():
    torch.manual_seed(8)
    start = torch.randn(4, 1, 30) * 2
    mask = torch.ones(4, 1)
    norms = {}
    for conservative in (True, False):
        z = start.clone()
        for _ in range(50):  # plain gradient descent on the logits themselves
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(come_loss(z, mask, conservative=conservative), z)
            z = (z - 0.5 * grad).detach()
        norms[conservative] = z.norm(dim=-1)
    drift = (norms[True] / start.norm(dim=-1) - 1).abs().max().item()
    free_drift = (norms[False] / start.norm(dim=-1) - 1).abs().max().item()
    assert drift < 0.02 and free_drift > 10 * drift


def test_reference_norm_pins_the_scale_and_bounds_the_uncertainty():
    torch.manual_seed(9)
    z = torch.randn(5, 64) * 4
    reference = torch.tensor([1.0, 2.0, 5.0, 10.0, 0.5])
    rescaled = conservative_logits(z, reference_norm=reference)
    assert torch.allclose(rescaled.norm(dim=-1), reference, rtol=1e-5)
    _, u = come_opinion(rescaled)
    assert (u >= uncertainty_lower_bound(reference) - 1e-7).all()  # u >= sigmoid(-r)
    # The bound is tight for p = inf and constant logits: z = r * 1 gives u = 1 / (1 + e^r).
    r = torch.tensor([0.0, 1.0, 3.0])
    _, u = come_opinion(r.unsqueeze(-1).expand(3, 10))
    assert torch.allclose(u, uncertainty_lower_bound(r), atol=1e-7)
    flat = conservative_logits(torch.ones(3, 10), reference_norm=r, p=float("inf"))
    assert torch.allclose(flat, r.unsqueeze(-1).expand(3, 10))


def test_come_loss_equals_mean_over_samples_of_mean_opinion_entropy():
    torch.manual_seed(10)
    z = torch.randn(3, 4, 12) * 2
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    h = come_entropy(z, mask)
    expected = (h[0, :3].mean() + h[2, 1]) / 2
    assert come_loss(z, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_every_loss_sends_gradient_to_the_logits_of_counted_positions():
    torch.manual_seed(11)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    losses = {
        "tent": lambda z: tent_loss(z, mask),
        "eata": lambda z: eata_loss(z, mask, e0=math.log(16) + 1)[0],
        "come": lambda z: come_loss(z, mask),
        "come_reference": lambda z: come_loss(z, mask, reference_norm=torch.full((2, 3), 3.0)),
    }
    for name, loss_fn in losses.items():
        z = torch.randn(2, 3, 16, requires_grad=True)
        loss_fn(z).backward()
        per_position = z.grad.abs().sum(-1)
        assert (per_position[mask == 1] > 0).all(), name
        assert (per_position[mask == 0] == 0).all(), name


# ---------------------------------------------------------------------------------------------------------------------
# End to end: a tiny random Llama with LoRA on q_proj / v_proj


@pytest.fixture(scope="module")
def lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    base = LlamaForCausalLM(config)
    # init_lora_weights=False: B starts non-zero, otherwise dL/dA = 0 at the first step and the check is vacuous.
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(base, lora)


def test_each_loss_backpropagates_into_the_lora_weights_of_q_and_v(lora_llama):
    model = lora_llama
    prompt = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    new_tokens = 5
    with torch.no_grad():
        sequence = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
        )
    assert sequence.shape == (2, 7 + new_tokens)
    mask = torch.zeros_like(sequence)
    mask[:, 7 - 1 : 7 + new_tokens - 1] = 1  # the positions whose logits predicted the generated tokens
    losses = {
        "tent": lambda logits: tent_loss(logits, mask),
        "eata": lambda logits: eata_loss(logits, mask, e0=math.log(100) + 1)[0],  # H <= ln V: all selected
        "come": lambda logits: come_loss(logits, mask),
    }
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora_params) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert all("q_proj" in n or "v_proj" in n for n in lora_params)
    for name, loss_fn in losses.items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(input_ids=sequence).logits)
        assert loss.item() > 0, name
        loss.backward()
        for param_name, param in lora_params.items():
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, param_name)
        frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
        assert all(p.grad is None and not p.requires_grad for p in frozen), name


def test_fisher_penalty_grad_is_the_gradient_of_the_penalty():
    from tlm_plugin.objectives import fisher_penalty, fisher_penalty_grad

    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    anchor, fisher = torch.randn(3, 4), torch.rand(3, 4)
    fisher_penalty({"w": w}, {"w": anchor}, {"w": fisher}, 7.0).backward()
    assert torch.allclose(fisher_penalty_grad(w, anchor, fisher, 7.0), w.grad, atol=1e-6)
