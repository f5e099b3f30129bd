"""The training step against PyTorch, step for step: transformers' GPT2LMHeadModel with
torch's AdamW (weight decay on 2-D tensors only), clip_grad_norm_ and nanoGPT's get_lr,
from the same weights on the same batches."""

import dataclasses
import math

import numpy as np
import pytest

from jaxgpt import hf, optim, step
from jaxgpt.config import Config, DataConfig, OptimConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OPT = OptimConfig(learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, lr_decay_iters=25, weight_decay=0.1,
                  beta1=0.9, beta2=0.99, grad_clip=0.5)  # a clip this low is active on most steps


def nanogpt_lr(it: int) -> float:
    """nanoGPT's get_lr, written out."""
    if it < OPT.warmup_iters:
        return OPT.learning_rate * (it + 1) / (OPT.warmup_iters + 1)
    if it > OPT.lr_decay_iters:
        return OPT.min_lr
    ratio = (it - OPT.warmup_iters) / (OPT.lr_decay_iters - OPT.warmup_iters)
    return OPT.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (OPT.learning_rate - OPT.min_lr)


def test_training_matches_pytorch_step_for_step(tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=67, n_positions=16, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    hf_model.save_pretrained(tmp_path)
    mcfg, params = hf.load_hf(tmp_path)
    cfg = Config(model=dataclasses.replace(mcfg, dropout=0.0), data=DataConfig(batch_size=4), optim=OPT)
    opt = optim.make_optimizer(OPT)
    train_step = step.make_train_step(cfg, opt)
    opt_state = opt.init(params)

    decay = [p for p in hf_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf_model.parameters() if p.dim() < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], betas=(OPT.beta1, OPT.beta2))
    batches = np.random.default_rng(0).integers(0, mcfg.vocab_size, (3, 1, 4, 17)).astype(np.int32)
    jax_losses, torch_losses = [], []
    for it in range(30):
        xy = batches[it % 3]  # few enough to memorize, so the loss falls
        x, y = xy[..., :-1], xy[..., 1:]
        params, opt_state, loss, _ = train_step(params, opt_state, x, y, it)
        jax_losses.append(float(loss))

        for group in torch_opt.param_groups:
            group["lr"] = nanogpt_lr(it)
        logits = hf_model(torch.from_numpy(x[0]).long()).logits
        torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, mcfg.vocab_size), torch.from_numpy(y[0]).long().reshape(-1))
        torch_loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), OPT.grad_clip)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        torch_losses.append(torch_loss.item())

    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=2e-5)
    assert jax_losses[-1] < jax_losses[0] - 0.5  # it learned: the updates themselves were compared
    wte_torch = hf_model.transformer.wte.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(params["wte"]), wte_torch, rtol=0, atol=1e-5)
