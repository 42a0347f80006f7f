"""The README's worked example: a router added as one class + one registry line, overriding no hook, trains
end to end through the shared layer (dispatch, losses, statistics, end_step) and the config keys it declares.
python -m pytest tests/test_add_router.py -q"""
import re
from pathlib import Path

import torch

import moe
from model import GPT, GPTConfig

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_router_code():
    section = README.read_text().split('## Add a router')[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_router_trains_and_is_registered(monkeypatch):
    monkeypatch.setitem(moe.ROUTERS, 'noisy_topk', None)  # removed from the registry after the test
    exec(readme_router_code(), vars(moe))
    cls = moe.ROUTERS['noisy_topk']
    assert cls.options == dict(noise_scale=1.0)
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, router='noisy_topk',
                       n_experts=4, top_k=2, router_options=dict(noise_scale=0.5))
    model = GPT(config)
    assert model.moe_layers()[0].router.scale == 0.5
    x = torch.randint(0, 32, (4, 17))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.end_step(model)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.moe_layers()[0].router.noise.weight.grad.abs().sum() > 0  # the noise net is trained
    stats = model.moe_layers()[0].stats()
    assert sum(stats['load']) == 40 * 4 * 16 * 2  # every assignment counted by the shared statistics
